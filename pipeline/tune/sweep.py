"""Ray Tune sweeps over the training function of the DVC stage (Tune over Ray Train, Ray 2.60).

Ray 2.60 runs Train V2, where the old ``Tuner(trainer)`` form fails. The supported pattern
(Ray docs, "Hyperparameter Tuning with Ray Tune" for Train V2) is used instead:

* every Tune trial is a small *driver function* (``tune.with_resources(fn, {"CPU": TRIAL_CPU})``:
  it only launches and watches the training run; its share is counted beside its workers', or a
  worker of all the instance's CPUs would never be placed) that calls :func:`pipeline.train.launch.fit`, the
  same training run as the ``train_rafdb`` stage's;
* the trainer's ``RunConfig(callbacks=[TuneReportCallback()])`` forwards each epoch's
  ``ray.train.report`` (rank 0) to Tune, so ASHA sees ``val_accuracy`` per epoch (its time axis is
  the reported ``epoch``, which survives a resume, unlike Tune's ``training_iteration``);
* the Train run is named after the trial id under a fixed storage path: a trial that is
  restarted (``Tuner.restore`` of an interrupted sweep) resumes its Train run from the last
  epoch checkpoint instead of starting over. Finished trials are never rerun.

Concurrency comes from the cluster's resources (GPUs per trial, else CPUs per trial with one CPU
left to Ray), capped by ``tune.max_concurrent`` when set. Every trial is an MLflow run under a
parent sweep run (tag ``mlflow.parentRunId``, plus ``sweep`` and ``trial_id`` tags).

The ``tune:`` section is read and checked by :mod:`pipeline.tune.settings`; the sweep's
MLflow runs are kept by :mod:`pipeline.tune.runs`; its table, best trial and noise note
are :mod:`pipeline.tune.results`.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.cluster import TRIAL_CPU, concurrency, ensure_ray, job_env, planned_cpus_per_worker, worker_resources
from pipeline.config import load_params, section
from pipeline.errors import FerError
from pipeline import ray_workarounds
from pipeline.tune.results import (METRIC, MODE, ablation_seed_std, round_sig, format_table, noise_note,
                                          pick_best, targets, trial_rows)
from pipeline.tune.runs import parent_run, trial_run, trial_callback
from pipeline.tune.settings import apply_best, base_options, resolve_path, sweep_name, tune_settings


def build_space(space: dict[str, Any]) -> dict[str, Any]:
    """params.yaml distributions -> Ray Tune search space."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        if not isinstance(spec, dict):
            out[key] = spec
            continue
        (kind, args), = spec.items()
        out[key] = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
                    "randint": lambda a: tune.randint(*a), "choice": tune.choice,
                    "grid": tune.grid_search}[kind](list(args))
    return out


# --------------------------------------------------------------------------- the trial
def _trial_config(ctx: dict[str, Any], trial_id: str, sampled: dict[str, Any]):
    from pipeline.train.config import TrainConfig

    trial_dir = Path(ctx["trials_dir"]) / trial_id
    opts = {**ctx["base"], **sampled, "data": ctx["data"], "storage_path": ctx["train_storage"],
            "run_name": trial_id, "output": str(trial_dir / "model"),
            "use_gpu": ctx["use_gpu"], "cpus_per_worker": ctx["cpus_per_worker"]}
    init = ctx["init"]
    if init.startswith("imagenet:"):
        from pipeline.model.checkpoint import write_imagenet_init

        cfg0 = TrainConfig.from_dict({**opts, "init": "none"})
        init = str(trial_dir / "imagenet_init.pt")
        if not Path(init).is_file():
            write_imagenet_init(init, cfg0.network(), ctx["init"][len("imagenet:"):], seed=cfg0.seed)
    return TrainConfig.from_dict({**opts, "init": init})


def _train_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial: one training run (``launch.fit``) of one sampled configuration, each
    epoch forwarded to Tune so that ASHA sees ``val_accuracy``."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.train.launch import fit

    os.environ.update(ctx["env"])
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = _trial_config(ctx, trial_id, dict(config))
    cfg = cfg.model_copy(update={"mlflow_run_id": trial_run(ctx, trial_id, cfg.to_dict(), config)})
    trial_dir = Path(ctx["trials_dir"]) / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    pg_file = str(trial_dir / ray_workarounds.PG_FILE) if ctx["pg_workaround"] else None
    result = fit(cfg, callbacks=[TuneReportCallback()], pg_file=pg_file)
    # Only trials that end on their own get here: early stopping by `patience`, or a restarted
    # trial whose Train run had already finished its epochs (nothing new is reported then). ASHA
    # stops the others at a rung or at max_epochs. Tune gets the final epoch once more so that
    # its view matches the Train run; the driver writes the best trial's model afterwards.
    if result.metrics:
        final = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))}
        if result.checkpoint is not None:
            final["checkpoint_path"] = result.checkpoint.path
        ray.tune.report(final)


def write_trial_model(ctx: dict[str, Any], trial_id: str, config: dict[str, Any],
                      checkpoint_path: str) -> dict[str, Any]:
    """model.pt + history.json of a trial from its Train checkpoint (best epoch by val accuracy)."""
    from pipeline.model.checkpoint import read_state
    from pipeline.train.launch import write_outputs

    cfg = _trial_config(ctx, trial_id, config)
    st = read_state(checkpoint_path)
    return write_outputs(cfg, st, checkpoint_path=str(checkpoint_path), run_name=trial_id,
                         storage=cfg.storage_path)


def _trial_dirname(trial) -> str:
    return trial.trial_id


# --------------------------------------------------------------------------- the sweep
def run_sweep(params_path: str | os.PathLike = "params.yaml", *, num_samples: int | None = None,
              resume: bool = True, apply: bool = False, output: str | os.PathLike = "reports/tune_best.yaml",
              max_concurrent: int | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep described by params.yaml's ``tune:`` section; write the best
    config to ``output`` (YAML), print the trial table, and with ``apply`` write the best values
    into params.yaml (training section and ``model``). Returns a summary dict."""
    params_path = Path(params_path)
    params = load_params(params_path)
    root = params_path.resolve().parent
    settings = _settings(params, num_samples, max_concurrent)
    ctx, storage = _sweep_context(params, root, settings, resume)
    ray_sec = section(params, "ray")

    import ray
    from ray import tune

    from pipeline import tracking

    # A local instance gets the CPUs one trial needs: its workers and the trial's own share.
    workers = settings["workers_per_trial"]
    started = ensure_ray(workers * planned_cpus_per_worker(ray_sec.get("cpus_per_worker"), workers) + TRIAL_CPU)
    t0 = time.perf_counter()
    try:
        cluster = ray.cluster_resources()
        res = worker_resources(ray_sec.get("use_gpu", "auto"), workers, ray_sec.get("cpus_per_worker"),
                               cluster, overhead=TRIAL_CPU)
        n_trials = settings["num_samples"] * math.prod(
            len(s["grid"]) for s in settings["space"].values() if isinstance(s, dict) and "grid" in s)
        conc = concurrency(cluster, workers, res["cpus_per_worker"], res["use_gpu"],
                           n_trials, settings["max_concurrent"], overhead=TRIAL_CPU)
        ctx.update(use_gpu=res["use_gpu"], cpus_per_worker=res["cpus_per_worker"],
                   pg_workaround=ray_workarounds.needed(), git_commit=tracking.git_commit(root), env=job_env())
        restoring = resume and tune.Tuner.can_restore(ctx["experiment_path"])
        ctx["parent_run_id"] = parent_run(ctx, params, restoring)
        print(f"sweep {ctx['sweep']}: {n_trials} trials on {ctx['dataset']}, {conc} at a time "
              f"({settings['workers_per_trial']} worker(s) x {res['cpus_per_worker']:g} CPU"
              f"{' + 1 GPU' if res['use_gpu'] else ''} each), ASHA on {METRIC} "
              f"(grace {settings['grace_period']}, max {settings['max_epochs']} epochs, "
              f"reduction {settings['reduction_factor']})" + ("; resuming" if restoring else ""), flush=True)
        rows, wall = _fit(_tuner(ctx, settings, storage, conc, restoring), ctx, n_trials, t0)
        best = pick_best(rows)
        model = _best_model(ctx, best)
    except BaseException:
        if started:
            ray.shutdown()
        raise
    if started:
        ray.shutdown()

    best_params = {k: round_sig(v) for k, v in best["params"].items() if k in settings["space"]}
    doc = {
        "sweep": ctx["sweep"], "dataset": ctx["dataset"], "metric": METRIC, "mode": MODE,
        "best_trial": best["trial_id"], "best_val_accuracy": round(best["best_val_accuracy"], 6),
        "epochs": best["epochs"], "mlflow_run_id": best["mlflow_run_id"],
        "mlflow_parent_run_id": ctx["parent_run_id"], "experiment_path": ctx["experiment_path"],
        "model_path": model["model_path"] if model else None,
        "params": best_params, "apply": targets(best_params, ctx["dataset"]),
        "trials": len(rows), "stopped_early": sum(r["status"] == "stopped" for r in rows),
        "wall_time_s": round(wall, 1),
        "noise": noise_note(rows, best, ablation_seed_std(root)),
    }
    out, table = _report(doc, rows, best, output, wall)
    _track(ctx, doc, best, model, out, table, wall)
    if apply:
        apply_best(params_path, doc["apply"])
        print(f"applied to {params_path}: " + "; ".join(
            f"{s}." + ", ".join(f"{k}={v}" for k, v in vals.items()) for s, vals in doc["apply"].items()))
    for r in rows:
        r.pop("config", None)
    return {**doc, "output": str(out), "rows": rows, "concurrency": conc, "resumed": restoring,
            "applied": apply, "table": table}


def _sweep_context(params: dict[str, Any], root: Path, settings: dict[str, Any], resume: bool
                   ) -> tuple[dict[str, Any], str]:
    """(what every trial needs to know that does not depend on the cluster, the Tune storage
    path). The sweep's name hashes what it searches and from where, so an interrupted sweep is
    found again; without ``resume`` its previous state is removed first."""
    dataset = settings["dataset"]
    data = root / "data" / "parquet" / dataset
    if not data.is_dir():
        raise FerError(f"dataset {data} not found (run `dvc repro ingest@{dataset}` first)")
    storage = resolve_path(root, str(section(params, "ray").get("storage_path", "ray_results")))
    init_spec = _init_spec(params, root, dataset)
    base = base_options(params, settings, root)
    # one resolvable check of the base config before anything starts
    from pipeline.train.config import TrainConfig
    TrainConfig.from_dict({**base, "data": str(data)})
    name = sweep_name(settings, base, storage, init_spec)
    experiment_path = f"{storage.rstrip('/')}/{name}"
    local_root = Path(storage) if "://" not in storage else root / "models" / "tune"
    trials_dir = local_root / f"{name}-trials"
    if not resume and "://" not in storage and Path(experiment_path).exists():
        print(f"--no-resume: removing the previous state of sweep {name}", flush=True)
        shutil.rmtree(experiment_path, ignore_errors=True)
        shutil.rmtree(trials_dir, ignore_errors=True)
    experiment = section(params, "mlflow")["experiment"] if "mlflow" in params else "lip-vgg16"
    ctx = {"sweep": name, "dataset": dataset, "experiment": experiment, "experiment_path": experiment_path,
           "base": base, "data": str(data), "init": init_spec, "train_storage": str(trials_dir / "ray"),
           "trials_dir": str(trials_dir), "max_epochs": settings["max_epochs"]}
    return ctx, storage


def _settings(params: dict[str, Any], num_samples: int | None, max_concurrent: int | None) -> dict[str, Any]:
    """The ``tune:`` settings with the command line's overrides (checked: >= 1)."""
    settings = tune_settings(params)
    if num_samples is not None:
        if num_samples < 1:
            raise FerError(f"--num-samples must be >= 1, got {num_samples}")
        settings["num_samples"] = num_samples
    if max_concurrent is not None:
        if max_concurrent < 1:
            raise FerError(f"--max-concurrent must be >= 1, got {max_concurrent}")
        settings["max_concurrent"] = max_concurrent
    return settings


def _init_spec(params: dict[str, Any], root: Path, dataset: str) -> str:
    """What every trial starts from, as the training stage of ``dataset`` would: SFEW from the
    trained RAF-DB model, RAF-DB from ``imagenet_init.source`` (``imagenet:<source>``) or none."""
    if dataset == "sfew":
        init = root / "models" / "rafdb" / "model.pt"
        if not init.is_file():
            raise FerError(f"tune.dataset sfew starts from {init}: train it first (dvc repro train_rafdb)")
        return str(init)
    source = str(section(params, "imagenet_init").get("source", "none")) if "imagenet_init" in params else "none"
    return "none" if source == "none" else "imagenet:" + (source if source == "torchvision"
                                                          else resolve_path(root, source))


def _tuner(ctx: dict[str, Any], settings: dict[str, Any], storage: str, conc: int, restoring: bool):
    """The interrupted sweep's Tuner when ``restoring`` (its search state: no trial drawn twice,
    finished ones not rerun), else a new one."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    release = [ray_workarounds.release_stopped_trials_callback(ctx["trials_dir"])] if ctx["pg_workaround"] else []
    trainable = tune.with_resources(tune.with_parameters(_train_trial, ctx=ctx), {"CPU": TRIAL_CPU})
    if restoring:
        return tune.Tuner.restore(ctx["experiment_path"], trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=build_space(settings["space"]),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, num_samples=settings["num_samples"],
            trial_dirname_creator=_trial_dirname,
            # the concurrency cap lives in the generator: Tune ignores
            # max_concurrent_trials when a BasicVariantGenerator is passed in
            search_alg=BasicVariantGenerator(random_state=settings["seed"], max_concurrent=conc),
            scheduler=ASHAScheduler(time_attr="epoch", max_t=settings["max_epochs"],
                                    grace_period=settings["grace_period"],
                                    reduction_factor=settings["reduction_factor"])),
        run_config=tune.RunConfig(name=ctx["sweep"], storage_path=storage,
                                  callbacks=[trial_callback(ctx), *release], verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


def _fit(tuner, ctx: dict[str, Any], n_trials: int, t0: float) -> tuple[list[dict], float]:
    """Run the trials; (their rows, the sweep's wall time). An interrupted sweep (Ctrl-C, or a
    trial left unfinished) is an error that says how to resume it."""
    from pipeline import tracking

    try:
        grid = tuner.fit()
    finally:
        if ctx["pg_workaround"]:
            ray_workarounds.release_all(ctx["trials_dir"])
    wall = time.perf_counter() - t0
    if grid.num_terminated + grid.num_errors < n_trials:
        tracking.client().set_terminated(ctx["parent_run_id"], status="KILLED")
        raise FerError(f"sweep {ctx['sweep']} interrupted ({grid.num_terminated} of {n_trials} trials "
                       f"finished); run `fer tune` again to resume it")
    return trial_rows(grid, ctx["max_epochs"], ctx), wall


def _best_model(ctx: dict[str, Any], best: dict[str, Any]) -> dict[str, Any] | None:
    """The best trial's model.pt, from the checkpoint Tune reported or else the newest one of its
    Train run (a trial that ASHA stopped reports none); None when it has none."""
    ckpt = best["checkpoint_path"]
    if not ckpt:
        from pipeline.train.launch import latest_checkpoint_dir

        latest = latest_checkpoint_dir(ctx["train_storage"], best["trial_id"])
        ckpt = str(latest) if latest else None
    return write_trial_model(ctx, best["trial_id"], best["config"], ckpt) if ckpt else None


def _report(doc: dict[str, Any], rows: list[dict], best: dict[str, Any], output: str | os.PathLike,
            wall: float) -> tuple[Path, str]:
    """Write the best-config YAML and print the trial table; returns (the file, the table)."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Best config of sweep {doc['sweep']} ({doc['dataset']}), written by `fer tune`; "
                   f"`fer tune --apply` writes `apply` into params.yaml.\n"
                   + yaml.safe_dump(doc, sort_keys=False))
    table = format_table(rows, best["trial_id"])
    print(table)
    print(f"best: trial {best['trial_id']} val_accuracy {best['best_val_accuracy']:.4f} "
          f"-> {out}  ({wall:.0f} s)", flush=True)
    print(doc["noise"]["note"], flush=True)
    return out, table


def _track(ctx: dict[str, Any], doc: dict[str, Any], best: dict[str, Any], model: dict[str, Any] | None,
           out: Path, table: str, wall: float) -> None:
    """The parent MLflow run: the sweep's figures, the best trial's tags, the files; closed."""
    from pipeline import tracking

    c = tracking.client()
    tracking.log_metrics(ctx["parent_run_id"], {"best_val_accuracy": best["best_val_accuracy"],
                                                "trials": doc["trials"], "stopped_early": doc["stopped_early"],
                                                "wall_time_s": wall})
    c.set_tag(ctx["parent_run_id"], "best_trial", best["trial_id"])
    c.set_tag(ctx["parent_run_id"], "best_run_id", str(best["mlflow_run_id"]))
    if model and best["mlflow_run_id"]:
        c.set_tag(best["mlflow_run_id"], "model_path", model["model_path"])
    try:
        c.log_text(ctx["parent_run_id"], out.read_text(), "tune_best.yaml")
        c.log_text(ctx["parent_run_id"], table + "\n", "trials.txt")
    except Exception as e:  # artifacts are a convenience
        print(f"warning: could not log sweep artifacts: {type(e).__name__}: {e}")
    tracking.end_run(ctx["parent_run_id"])


# --------------------------------------------------------------------------- CLI
def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file with the `tune:` section")
    p.add_argument("--num-samples", type=int, default=None, help="trials (default: tune.num_samples)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="cap on concurrent trials (default: from the cluster's resources)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start the sweep over instead of resuming an interrupted one")
    p.add_argument("--apply", action="store_true",
                   help="write the best values into params.yaml (training section and model)")
    p.add_argument("--output", default="reports/tune_best.yaml", help="best-config YAML file")


def tune_command(args: argparse.Namespace) -> None:
    run_sweep(args.params, num_samples=args.num_samples, resume=args.resume, apply=args.apply,
              output=args.output, max_concurrent=args.max_concurrent)
