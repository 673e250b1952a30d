"""Ray Tune sweeps over the training function of the DVC stage (Tune over Ray Train, Ray 2.60).

Ray 2.60 runs Train V2, where the old ``Tuner(trainer)`` form fails. The supported pattern
(Ray docs, "Hyperparameter Tuning with Ray Tune" for Train V2) is used instead:

* every Tune trial is a small *driver function* (``tune.with_resources(fn, {"CPU": 0.01})``: it
  only launches and watches the training run) that builds a ``TorchTrainer`` around the same
  ``train_loop_per_worker`` as the ``train_rafdb`` stage and calls ``fit()``;
* the trainer's ``RunConfig(callbacks=[TuneReportCallback()])`` forwards each epoch's
  ``ray.train.report`` (rank 0) to Tune, so ASHA sees ``val_accuracy`` per epoch (its time axis is
  the reported ``epoch``, which survives a resume, unlike Tune's ``training_iteration``);
* the Train run is named after the trial id under a fixed storage path: a trial that is
  restarted (``Tuner.restore`` of an interrupted sweep) resumes its Train run from the last
  epoch checkpoint instead of starting over. Finished trials are never rerun.

Concurrency comes from the cluster's resources (GPUs per trial, else CPUs per trial with one CPU
left to Ray), capped by ``tune.max_concurrent`` when set. Every trial is an MLflow run under a
parent sweep run (tag ``mlflow.parentRunId``, plus ``sweep`` and ``trial_id`` tags).

The ``tune:`` section of params.yaml (all keys optional except ``space``)::

    tune:
      dataset: rafdb            # rafdb (train_rafdb settings) | sfew (finetune_sfew, from models/rafdb)
      num_samples: 8            # trials (a `grid` entry multiplies them, as in Ray Tune)
      max_epochs: 12            # ASHA max_t; every trial's cosine schedule spans this many epochs
      grace_period: 1           # ASHA: epochs before a trial can be stopped
      reduction_factor: 2       # ASHA: keep the top 1/reduction_factor at each rung
      workers_per_trial: 1      # Ray Train workers per trial (ray.cpus_per_worker CPUs each)
      max_concurrent: null      # cap on concurrent trials; null: from the cluster's resources
      seed: 0                   # search seed (sampled configs are reproducible)
      name: null                # sweep name; null: "sweep-<hash of the settings>"
      fixed: {}                 # training keys fixed for the sweep only (e.g. {epochs...})
      space:                    # key: {loguniform|uniform|randint: [lo, hi]} | {choice|grid: [...]} | value
        lr: {loguniform: [1.0e-3, 1.0e-1]}
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import load_params, section
from pipeline.errors import FerError

METRIC, MODE = "val_accuracy", "max"
DATASETS = {"rafdb": "train_rafdb", "sfew": "finetune_sfew"}
MODEL_KEYS = ("pool", "head", "attention", "width", "lip_bottleneck", "dropout")
ARCH_KEYS = ("pool", "head", "attention", "width", "lip_bottleneck")
#: TrainConfig fields a sweep owns itself (paths, Ray sizing, the epoch budget): not tunable.
NOT_TUNABLE = {"data", "output", "storage_path", "run_name", "mlflow_run_id", "num_workers", "use_gpu",
               "cpus_per_worker", "max_failures", "init", "epochs", "num_classes", "amp", "channels_last"}
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
TUNE_DEFAULTS: dict[str, Any] = {
    "dataset": "rafdb", "num_samples": 8, "max_epochs": None, "grace_period": 1, "reduction_factor": 2,
    "workers_per_trial": 1, "max_concurrent": None, "seed": 0, "name": None, "fixed": {}, "space": None,
}
STARTS_TAG = "executions"      # trial MLflow runs: how many times the trial function started
SIG_DIGITS = 4                 # best values are rounded to this many significant digits


# --------------------------------------------------------------------------- settings
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def tunable_keys() -> list[str]:
    from pipeline.train.config import TrainConfig

    return [k for k in TrainConfig.field_names() if k not in NOT_TUNABLE]


def validate_space(space: Any) -> dict[str, Any]:
    """Check the ``space`` mapping (see the module doc); returns it unchanged."""
    if not isinstance(space, dict) or not space:
        raise FerError("tune.space must be a non-empty mapping of training keys to distributions, "
                       "e.g. {lr: {loguniform: [0.001, 0.1]}}")
    allowed = tunable_keys()
    for key, spec in space.items():
        if key not in allowed:
            raise FerError(f"tune.space: {key!r} cannot be tuned; tunable keys: {', '.join(allowed)}")
        if not isinstance(spec, dict):
            continue  # a constant
        if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise FerError(f"tune.space.{key}: {spec!r} must be one of "
                           + ", ".join(f"{{{d}: [...]}}" for d in DISTRIBUTIONS) + " or a plain value")
        (kind, args), = spec.items()
        if not isinstance(args, list) or not args:
            raise FerError(f"tune.space.{key}.{kind} needs a non-empty list, got {args!r}")
        if kind in ("loguniform", "uniform", "randint"):
            if len(args) != 2 or not all(_is_num(a) for a in args) or not args[0] < args[1]:
                raise FerError(f"tune.space.{key}.{kind} needs [low, high] numbers with low < high, got {args!r}")
            if kind == "loguniform" and args[0] <= 0:
                raise FerError(f"tune.space.{key}.loguniform needs low > 0, got {args!r}")
            if kind == "randint" and not all(_is_int(a) for a in args):
                raise FerError(f"tune.space.{key}.randint needs integers, got {args!r}")
    return space


def tune_settings(params: dict[str, Any]) -> dict[str, Any]:
    """The validated ``tune:`` section with defaults filled in (unknown keys are errors)."""
    if "tune" not in params or not isinstance(params.get("tune"), dict):
        raise FerError("params.yaml has no 'tune' section (see `fer tune --help` for its keys)")
    raw = params["tune"]
    unknown = sorted(set(raw) - set(TUNE_DEFAULTS))
    if unknown:
        raise FerError(f"unknown key(s) {unknown} in 'tune'; known: {sorted(TUNE_DEFAULTS)}")
    s = {**TUNE_DEFAULTS, **raw}
    if s["dataset"] not in DATASETS:
        raise FerError(f"tune.dataset={s['dataset']!r} must be one of {list(DATASETS)}")
    train = section(params, DATASETS[s["dataset"]])
    if s["max_epochs"] is None:
        s["max_epochs"] = train.get("epochs", 1)
    for key, low in (("num_samples", 1), ("max_epochs", 1), ("grace_period", 1), ("workers_per_trial", 1)):
        if not _is_int(s[key]) or s[key] < low:
            raise FerError(f"tune.{key}={s[key]!r} must be an integer >= {low}")
    if not _is_num(s["reduction_factor"]) or s["reduction_factor"] < 2:
        raise FerError(f"tune.reduction_factor={s['reduction_factor']!r} must be >= 2")
    if s["grace_period"] > s["max_epochs"]:
        raise FerError(f"tune.grace_period={s['grace_period']} exceeds max_epochs={s['max_epochs']}")
    if s["max_concurrent"] is not None and (not _is_int(s["max_concurrent"]) or s["max_concurrent"] < 1):
        raise FerError(f"tune.max_concurrent={s['max_concurrent']!r} must be null or an integer >= 1")
    if not _is_int(s["seed"]):
        raise FerError(f"tune.seed={s['seed']!r} must be an integer")
    if s["name"] is not None and (not isinstance(s["name"], str)
                                  or not re.fullmatch(r"[A-Za-z0-9._-]+", s["name"])):
        raise FerError(f"tune.name={s['name']!r} must be null or a name of letters, digits, '.', '_', '-'")
    if not isinstance(s["fixed"], dict):
        raise FerError("tune.fixed must be a mapping of training keys")
    bad = sorted(set(s["fixed"]) - set(tunable_keys()))
    if bad:
        raise FerError(f"tune.fixed: {bad} cannot be set here; allowed: {', '.join(tunable_keys())}")
    validate_space(s["space"])
    if s["dataset"] == "sfew":
        arch = sorted(k for k in list(s["space"]) + list(s["fixed"]) if k in ARCH_KEYS)
        if arch:
            raise FerError(f"tune.dataset sfew fine-tunes models/rafdb/model.pt: its architecture "
                           f"({', '.join(arch)}) cannot change in the sweep")
    return s


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


def _resolve(root: Path, p: str) -> str:
    return p if "://" in p else str((root / p).resolve())


def base_options(params: dict[str, Any], settings: dict[str, Any], root: Path) -> dict[str, Any]:
    """The TrainConfig options every trial starts from: model + ray + the dataset's training
    section (as the DVC stage reads them) + ``tune.fixed``."""
    from pipeline.train.config import TrainConfig

    opts = {**section(params, "model"), **section(params, "ray"),
            **section(params, DATASETS[settings["dataset"]]), **settings["fixed"]}
    opts.pop("storage_path", None)
    known = set(TrainConfig.field_names())
    unknown = sorted(set(opts) - known)
    if unknown:
        raise FerError(f"unknown training key(s) {unknown} in params.yaml")
    opts.update(epochs=settings["max_epochs"], num_workers=settings["workers_per_trial"])
    return opts


def sweep_name(settings: dict[str, Any], base: dict[str, Any], storage: str, init_source: str) -> str:
    """A stable name: the same settings resume the same sweep, changed ones start a new one."""
    if settings["name"]:
        return settings["name"]
    # Searched keys are overridden in every trial (so `--apply` keeps the name: a rerun finds the
    # finished sweep), and the concurrency cap does not change what the sweep computes.
    ident = {k: v for k, v in settings.items() if k != "max_concurrent"}
    fixed_base = {k: v for k, v in base.items() if k not in settings["space"]}
    blob = json.dumps({"tune": ident, "base": fixed_base, "storage": storage, "init": init_source},
                      sort_keys=True, default=str)
    return "sweep-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


# --------------------------------------------------------------------------- Ray + resources
def ensure_ray(num_cpus_hint: float = 0) -> bool:
    """``ray.init()`` once (joins RAY_ADDRESS when set); returns True when this call started it.
    The job's env carries the MLflow store, so Train workers (which chdir to their run folder)
    log to the same store as the driver."""
    import ray

    if ray.is_initialized():
        return False
    from pipeline.tracking import tracking_uri

    env = {"MLFLOW_TRACKING_URI": tracking_uri(),
           "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true")}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        local = os.cpu_count() or 1
        ray.init(num_cpus=max(local, math.ceil(num_cpus_hint)), include_dashboard=False,
                 runtime_env={"env_vars": env}, log_to_driver=True)
    return True


def trial_resources(ray_section: dict[str, Any], workers: int, cluster: dict[str, float]) -> dict[str, Any]:
    """Per-worker resources of one trial's Train run and whether it uses GPUs."""
    from pipeline.train.launch import auto_cpus_per_worker

    gpus, cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 0))
    use = ray_section.get("use_gpu", "auto")
    use_gpu = gpus >= workers if use == "auto" else bool(use)
    if use_gpu and gpus < workers:
        raise FerError(f"use_gpu: a trial's {workers} workers need {workers} GPUs, the cluster has {gpus:g}")
    cpw = ray_section.get("cpus_per_worker") or auto_cpus_per_worker(cpus, workers)
    if workers * cpw > cpus:
        raise FerError(f"a trial needs {workers} workers x {cpw:g} CPUs, the cluster has {cpus:g} CPUs; "
                       "lower tune.workers_per_trial or ray.cpus_per_worker")
    return {"use_gpu": use_gpu, "cpus_per_worker": float(cpw)}


def concurrency(cluster: dict[str, float], workers: int, cpus_per_worker: float, use_gpu: bool,
                num_trials: int, cap: int | None = None) -> int:
    """How many trials fit side by side: by GPUs when trials use them, else by CPUs with one CPU
    left to Ray (driver, trial functions, object store); at least 1, at most ``num_trials``/cap."""
    cpus = float(cluster.get("CPU", 0))
    free = cpus - 1 if cpus > 1 else cpus
    n = int(math.floor(free / (workers * cpus_per_worker) + 1e-9))
    if use_gpu:
        n = min(n, int(float(cluster.get("GPU", 0)) // workers))
    n = max(1, min(n, num_trials))
    return min(n, cap) if cap else n


# --------------------------------------------------------------------------- MLflow helpers
def _find_runs(experiment_id: str, **tags: str) -> list:
    from pipeline.tracking import client

    flt = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    return client().search_runs([experiment_id], filter_string=flt, max_results=1000,
                                order_by=["attributes.start_time DESC"])


def _parent_run(ctx: dict[str, Any], params: dict[str, Any], resumed: bool) -> str:
    from pipeline import tracking

    exp_id = tracking.get_or_create_experiment(ctx["experiment"])
    runs = _find_runs(exp_id, sweep=ctx["sweep"], stage="tune") if resumed else []
    if runs:  # the interrupted sweep's own parent run (the newest with this name)
        run_id = runs[0].info.run_id
        tracking.client().update_run(run_id, status="RUNNING")
        tracking.client().set_tag(run_id, "resumed", "true")
        return run_id
    return tracking.start_run(ctx["experiment"], ctx["sweep"], stage="tune", dataset=ctx["dataset"],
                              params={"tune": params["tune"], "base": ctx["base"]},
                              tags={"sweep": ctx["sweep"], "sweep_path": ctx["experiment_path"]})


def _trial_run(ctx: dict[str, Any], trial_id: str, cfg_dict: dict[str, Any], sampled: dict[str, Any]) -> str:
    """The trial's MLflow run (created once; a restarted trial reuses it and counts the start)."""
    from pipeline import tracking

    c = tracking.client()
    exp_id = tracking.get_or_create_experiment(ctx["experiment"])
    runs = _find_runs(exp_id, sweep=ctx["sweep"], trial_id=trial_id)
    if runs:
        run = runs[0]
        starts = int(run.data.tags.get(STARTS_TAG, "1")) + 1
        c.set_tag(run.info.run_id, STARTS_TAG, str(starts))
        c.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    return tracking.start_run(
        ctx["experiment"], f"{ctx['sweep']}-{trial_id}", stage="tune_trial", dataset=ctx["dataset"],
        params=cfg_dict,
        tags={"mlflow.parentRunId": ctx["parent_run_id"], "sweep": ctx["sweep"], "trial_id": trial_id,
              STARTS_TAG: "1", "searched": ",".join(sorted(sampled)), "git_commit": ctx["git_commit"],
              "mlflow.source.git.commit": ctx["git_commit"]})


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
            write_imagenet_init(init, cfg0.model_config(), ctx["init"][len("imagenet:"):], seed=cfg0.seed)
    return TrainConfig.from_dict({**opts, "init": init})


PG_FILE = "placement_groups.txt"


def release_placement_groups(pg_file: str | os.PathLike) -> int:
    """Remove the Train placement groups listed in ``pg_file`` that still exist; returns how many."""
    import ray
    from ray import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    path = Path(pg_file)
    if not path.is_file() or not ray.is_initialized():
        return 0
    n = 0
    for h in dict.fromkeys(path.read_text().split()):
        try:
            pg = PlacementGroup(PlacementGroupID(bytes.fromhex(h)))
            if placement_group_table(pg).get("state") not in ("REMOVED", None):
                remove_placement_group(pg)
                n += 1
        except Exception:  # already gone, or the cluster is shutting down
            pass
    return n


def _sweep_trainer_cls():
    """``TorchTrainer`` whose worker-group placement groups are released when Tune stops a trial.

    ASHA stops a trial by ending its Tune actor, which takes the Train controller down with it
    (fate sharing) before the controller can remove its placement group; Ray 2.60's own
    ``PlacementGroupCleaner`` needs the State API (dashboard), which a `ray[train,tune]` install
    lacks, so without this every stopped trial would keep its CPUs/GPUs reserved until Ray shuts
    down and the next trials would wait forever. The cleaner callback is replaced by one that
    records each worker group's placement group in a file next to the trial (the controller
    always runs on the trial's node); the sweep's Tune callback removes them once the trial has
    ended (the trial's actor cannot: it is ended without running exit handlers).
    """
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # another Ray version: keep its own behaviour
        return TorchTrainer

    class _RecordPlacementGroups(PlacementGroupCleanerCallback):
        def __init__(self, pg_file: str):
            super().__init__()
            self.pg_file = pg_file

        def after_controller_start(self, train_run_context) -> None:
            pass  # no detached cleaner actor

        def after_worker_group_start(self, worker_group) -> None:
            pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
            with open(self.pg_file, "a") as f:
                f.write(pg.id.hex() + "\n")

    class SweepTorchTrainer(TorchTrainer):
        pg_file: str = ""

        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return [_RecordPlacementGroups(self.pg_file) if type(c) is PlacementGroupCleanerCallback else c
                    for c in callbacks]

    return SweepTorchTrainer


def _train_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One Tune trial: the Ray Train driver for one sampled configuration."""
    import ray.train
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.train.worker import train_loop_per_worker

    os.environ.update(ctx["env"])
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = _trial_config(ctx, trial_id, dict(config))
    cfg.mlflow_run_id = _trial_run(ctx, trial_id, cfg.to_dict(), config)
    trial_dir = Path(ctx["trials_dir"]) / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    pg_file = trial_dir / PG_FILE

    cpw = cfg.cpus_per_worker
    loop_config = {**cfg.to_dict(), "model_config": cfg.model_config(), "train_config": cfg.to_dict(),
                   "torch_threads": max(1, int(cpw)), "mlflow_tracking_uri": ctx["env"]["MLFLOW_TRACKING_URI"]}
    resources = {"CPU": cpw, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer_cls = _sweep_trainer_cls()
    trainer = trainer_cls(
        train_loop_per_worker, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=bool(cfg.use_gpu),
                                     resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=trial_id, storage_path=cfg.storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()]),
    )
    trainer.pg_file = str(pg_file)
    result = trainer.fit()
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


def _make_callback(ctx: dict[str, Any]):
    from ray.tune import Callback

    class MlflowTrialCallback(Callback):
        """Driver side: close each trial's MLflow run with how it ended (ASHA stop, error)."""

        def __init__(self, ctx: dict[str, Any]):
            self.ctx = ctx
            self.pending: dict[str, float] = {}   # trial id -> when it ended
            self.checked: dict[str, float] = {}

        def _release_later(self, trial) -> None:
            self.pending[trial.trial_id] = time.monotonic()

        def on_step_begin(self, iteration, trials, **info):
            # A stopped trial's actor (and with it the Train controller) goes away within a
            # moment; then its worker group's placement group is released here. Re-checked for
            # a minute in case a dying controller had started another worker group.
            now = time.monotonic()
            for trial_id, ended in list(self.pending.items()):
                if now - ended < 2 or now - self.checked.get(trial_id, 0) < 2:
                    continue
                self.checked[trial_id] = now
                release_placement_groups(Path(self.ctx["trials_dir"]) / trial_id / PG_FILE)
                if now - ended > 60:
                    del self.pending[trial_id]

        def _close(self, trial, status: str) -> None:
            from pipeline import tracking

            try:
                exp_id = tracking.get_or_create_experiment(self.ctx["experiment"])
                runs = _find_runs(exp_id, sweep=self.ctx["sweep"], trial_id=trial.trial_id)
                if not runs:
                    return
                run = runs[0]
                last = trial.last_result or {}
                epoch = int(last.get("epoch") or 0)
                stopped = status == "FINISHED" and epoch < self.ctx["max_epochs"]
                c = tracking.client()
                c.set_tag(run.info.run_id, "stopped_early", "true" if stopped else "false")
                c.set_tag(run.info.run_id, "epochs_reached", str(epoch))
                if run.info.status == "RUNNING":
                    c.set_terminated(run.info.run_id, status=status)
            except Exception as e:  # tracking must never break the sweep
                print(f"warning: MLflow update of trial {trial.trial_id} failed: {type(e).__name__}: {e}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._release_later(trial)
            self._close(trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._release_later(trial)
            self._close(trial, "FAILED")

    return MlflowTrialCallback(ctx)


# --------------------------------------------------------------------------- results
def _round(v: Any) -> Any:
    if isinstance(v, float) and math.isfinite(v) and v != 0:
        return float(f"{v:.{SIG_DIGITS}g}")
    if hasattr(v, "item"):  # numpy scalars from tune.choice
        return _round(v.item())
    return v


def _trial_rows(grid, max_epochs: int, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    from pipeline import tracking

    exp_id = tracking.get_or_create_experiment(ctx["experiment"])
    run_ids = {r.data.tags.get("trial_id"): r.info.run_id
               for r in _find_runs(exp_id, sweep=ctx["sweep"], stage="tune_trial")}
    rows = []
    for res in grid:
        if res.config is None:  # never started
            continue
        m = res.metrics or {}
        trial_id = m.get("trial_id") or Path(res.path).name
        df = res.metrics_dataframe
        seen = [float(df[METRIC].max())] if df is not None and METRIC in df else []
        seen += [float(m[k]) for k in (METRIC, "best_val_accuracy") if _is_num(m.get(k))]
        best = max(seen) if seen else float("nan")
        epoch = int(m.get("epoch") or 0)
        rows.append({
            "trial_id": trial_id, "config": dict(res.config), "checkpoint_path": m.get("checkpoint_path"),
            "params": {k: _round(res.config[k]) for k in sorted(res.config)},
            "epochs": epoch, "val_accuracy": m.get(METRIC), "best_val_accuracy": best,
            "status": "error" if res.error else ("stopped" if epoch < max_epochs else "completed"),
            "mlflow_run_id": run_ids.get(trial_id),
        })
    return rows


def pick_best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Among the trials that ran the full budget (ASHA's survivors), the highest best val
    accuracy (ties: the lowest trial id); if none completed, the highest among all that reported."""
    ok = [r for r in rows if r["status"] != "error" and r["best_val_accuracy"] == r["best_val_accuracy"]]
    if not ok:
        raise FerError("no trial reported a val accuracy; see the Ray logs above")
    full = [r for r in ok if r["status"] == "completed"] or ok
    # ties: more epochs, then the first trial (max keeps the first of equal keys)
    return max(sorted(full, key=lambda r: r["trial_id"]), key=lambda r: (r["best_val_accuracy"], r["epochs"]))


def format_table(rows: list[dict[str, Any]], best_id: str | None = None) -> str:
    keys = sorted({k for r in rows for k in r["params"]})
    head = ["", "trial", *keys, "epochs", "val_acc", "best_val_acc", "status"]
    body = []
    def order(r):  # the chosen trial first, then by best val accuracy
        acc = r["best_val_accuracy"]
        return (r["trial_id"] != best_id, -(acc if acc == acc else -1.0))

    for r in sorted(rows, key=order):
        body.append(["*" if r["trial_id"] == best_id else "", r["trial_id"],
                     *[f"{r['params'].get(k)}" for k in keys], str(r["epochs"]),
                     "-" if r["val_accuracy"] is None else f"{r['val_accuracy']:.4f}",
                     f"{r['best_val_accuracy']:.4f}", r["status"]])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def targets(best_params: dict[str, Any], dataset: str) -> dict[str, dict[str, Any]]:
    """Where `--apply` writes each value: model keys -> `model`, the rest -> the training section."""
    out: dict[str, dict[str, Any]] = {}
    for k, v in best_params.items():
        out.setdefault("model" if k in MODEL_KEYS else DATASETS[dataset], {})[k] = v
    return out


# --------------------------------------------------------------------------- params.yaml edit
def _yaml_scalar(v: Any) -> str:
    text = yaml.safe_dump(v, default_flow_style=True, width=10_000)
    return text.split("\n...")[0].strip()


_KEY_LINE = r"^(?P<ind>{ind})(?P<key>{key}):(?P<sp>[ \t]*)(?P<val>[^#\n]*?)(?P<com>[ \t]+#.*)?$"


def set_yaml_values(text: str, updates: dict[str, dict[str, Any]]) -> str:
    """Set ``section.key`` scalars in YAML ``text`` by editing lines in place, so comments,
    ordering and formatting of everything else are kept; a missing key is appended to its
    section, a missing section to the file. The result is parsed back and checked."""
    lines = text.splitlines(keepends=True)
    for sec, values in updates.items():
        head = next((i for i, l in enumerate(lines) if re.match(rf"^{re.escape(sec)}:(\s|$)", l)), None)
        if head is not None and not re.match(rf"^{re.escape(sec)}:[ \t]*(#.*)?$", lines[head].rstrip("\n")):
            raise FerError(f"section {sec!r} of params.yaml is not in block style; set the values by hand")
        if head is None:
            if lines and not lines[-1].endswith("\n"):
                lines[-1] += "\n"
            lines += ["\n", f"{sec}:\n"] + [f"  {k}: {_yaml_scalar(v)}\n" for k, v in values.items()]
            continue
        end, indent, last = head + 1, None, head
        while end < len(lines):
            s = lines[end]
            if s.strip() and not s.lstrip().startswith("#"):
                if not s[0].isspace():
                    break
                if indent is None:
                    indent = s[:len(s) - len(s.lstrip())]
                last = end
            end += 1
        indent = indent if indent is not None else "  "
        for key, v in values.items():
            pat = re.compile(_KEY_LINE.format(ind=re.escape(indent), key=re.escape(key)))
            hit = next((i for i in range(head + 1, last + 1) if pat.match(lines[i].rstrip("\n"))), None)
            new = _yaml_scalar(v)
            if hit is None:
                lines.insert(last + 1, f"{indent}{key}: {new}\n")
                last += 1
                continue
            m = pat.match(lines[hit].rstrip("\n"))
            com = m.group("com") or ""
            if com:  # keep the comment's column when the value's width changes
                pad = len(m.group("val")) + len(com) - len(com.lstrip()) - len(new)
                com = " " * max(1, pad) + com.lstrip()
            lines[hit] = f"{m.group('ind')}{key}:{m.group('sp') or ' '}{new}{com}\n"
    out = "".join(lines)
    before, after = yaml.safe_load(text) or {}, yaml.safe_load(out) or {}
    for sec, values in updates.items():
        for k, v in values.items():
            if (after.get(sec) or {}).get(k) != v:
                raise FerError(f"could not set {sec}.{k} in params.yaml by a line edit (flow-style "
                               "section?); set it by hand")
        rest_b = {k: v for k, v in (before.get(sec) or {}).items() if k not in values}
        rest_a = {k: v for k, v in (after.get(sec) or {}).items() if k not in values}
        if rest_b != rest_a:
            raise FerError(f"editing section {sec!r} of params.yaml would change other keys; set it by hand")
    if {k: v for k, v in before.items() if k not in updates} != {k: v for k, v in after.items() if k not in updates}:
        raise FerError("editing params.yaml would change other sections; set the values by hand")
    return out


def apply_best(params_path: str | os.PathLike, updates: dict[str, dict[str, Any]]) -> None:
    path = Path(params_path)
    new = set_yaml_values(path.read_text(), updates)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(new)
    tmp.replace(path)
    load_params(path)  # still a valid params.yaml


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
    settings = tune_settings(params)
    if num_samples is not None:
        if num_samples < 1:
            raise FerError(f"--num-samples must be >= 1, got {num_samples}")
        settings["num_samples"] = num_samples
    if max_concurrent is not None:
        if max_concurrent < 1:
            raise FerError(f"--max-concurrent must be >= 1, got {max_concurrent}")
        settings["max_concurrent"] = max_concurrent
    dataset = settings["dataset"]
    data = root / "data" / "parquet" / dataset
    if not data.is_dir():
        raise FerError(f"dataset {data} not found (run `dvc repro ingest@{dataset}` first)")
    ray_sec = section(params, "ray")
    storage = _resolve(root, str(ray_sec.get("storage_path", "ray_results")))
    if dataset == "sfew":
        init = root / "models" / "rafdb" / "model.pt"
        if not init.is_file():
            raise FerError(f"tune.dataset sfew starts from {init}: train it first (dvc repro train_rafdb)")
        init_spec = str(init)
    else:
        source = str(section(params, "imagenet_init").get("source", "none")) if "imagenet_init" in params else "none"
        init_spec = "none" if source == "none" else "imagenet:" + (source if source == "torchvision"
                                                                   else _resolve(root, source))
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

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from pipeline import tracking

    started = ensure_ray()
    t0 = time.perf_counter()
    try:
        cluster = ray.cluster_resources()
        res = trial_resources(ray_sec, settings["workers_per_trial"], cluster)
        n_trials = settings["num_samples"] * math.prod(
            len(s["grid"]) for s in settings["space"].values() if isinstance(s, dict) and "grid" in s)
        conc = concurrency(cluster, settings["workers_per_trial"], res["cpus_per_worker"], res["use_gpu"],
                           n_trials, settings["max_concurrent"])
        experiment = section(params, "mlflow")["experiment"] if "mlflow" in params else "lip-vgg16"
        ctx: dict[str, Any] = {
            "sweep": name, "dataset": dataset, "experiment": experiment, "experiment_path": experiment_path,
            "base": base, "data": str(data), "init": init_spec, "train_storage": str(trials_dir / "ray"),
            "trials_dir": str(trials_dir), "max_epochs": settings["max_epochs"],
            "use_gpu": res["use_gpu"], "cpus_per_worker": res["cpus_per_worker"],
            "git_commit": tracking.git_commit(root),
            "env": {"MLFLOW_TRACKING_URI": tracking.tracking_uri(),
                    "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true")},
        }
        restoring = resume and tune.Tuner.can_restore(experiment_path)
        ctx["parent_run_id"] = _parent_run(ctx, params, restoring)
        trainable = tune.with_resources(tune.with_parameters(_train_trial, ctx=ctx), {"CPU": 0.01})
        print(f"sweep {name}: {n_trials} trials on {dataset}, {conc} at a time "
              f"({settings['workers_per_trial']} worker(s) x {res['cpus_per_worker']:g} CPU"
              f"{' + 1 GPU' if res['use_gpu'] else ''} each), ASHA on {METRIC} "
              f"(grace {settings['grace_period']}, max {settings['max_epochs']} epochs, "
              f"reduction {settings['reduction_factor']})" + ("; resuming" if restoring else ""), flush=True)
        if restoring:
            tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            tuner = tune.Tuner(
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
                run_config=tune.RunConfig(name=name, storage_path=storage,
                                          callbacks=[_make_callback(ctx)], verbose=1,
                                          failure_config=tune.FailureConfig(max_failures=0)),
            )
        try:
            grid = tuner.fit()
        finally:
            # Every trial actor is gone now (finished, stopped or interrupted): release the
            # placement groups their Train controllers could not (see _sweep_trainer_cls).
            time.sleep(1.0)
            for f in Path(ctx["trials_dir"]).glob(f"*/{PG_FILE}"):
                release_placement_groups(f)
        wall = time.perf_counter() - t0
        if grid.num_terminated + grid.num_errors < n_trials:
            tracking.client().set_terminated(ctx["parent_run_id"], status="KILLED")
            raise FerError(f"sweep {name} interrupted ({grid.num_terminated} of {n_trials} trials finished); "
                           f"run `fer tune` again to resume it")
        rows = _trial_rows(grid, settings["max_epochs"], ctx)
        n_done = len(rows)
        best = pick_best(rows)
        ckpt = best["checkpoint_path"]
        if not ckpt:
            from pipeline.train.launch import latest_checkpoint_dir

            latest = latest_checkpoint_dir(ctx["train_storage"], best["trial_id"])
            ckpt = str(latest) if latest else None
        model = write_trial_model(ctx, best["trial_id"], best["config"], ckpt) if ckpt else None
    except BaseException:
        if started:
            ray.shutdown()
        raise
    if started:
        ray.shutdown()

    best_params = {k: _round(v) for k, v in best["params"].items() if k in settings["space"]}
    doc = {
        "sweep": name, "dataset": dataset, "metric": METRIC, "mode": MODE,
        "best_trial": best["trial_id"], "best_val_accuracy": round(best["best_val_accuracy"], 6),
        "epochs": best["epochs"], "mlflow_run_id": best["mlflow_run_id"],
        "mlflow_parent_run_id": ctx["parent_run_id"], "experiment_path": experiment_path,
        "model_path": model["model_path"] if model else None,
        "params": best_params, "apply": targets(best_params, dataset),
        "trials": n_done, "stopped_early": sum(r["status"] == "stopped" for r in rows),
        "wall_time_s": round(wall, 1),
    }
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# Best config of sweep {name} ({dataset}), written by `fer tune`; "
                   f"`fer tune --apply` writes `apply` into params.yaml.\n"
                   + yaml.safe_dump(doc, sort_keys=False))
    table = format_table(rows, best["trial_id"])
    print(table)
    print(f"best: trial {best['trial_id']} val_accuracy {best['best_val_accuracy']:.4f} "
          f"-> {out}  ({wall:.0f} s)", flush=True)
    c = tracking.client()
    tracking.log_metrics(ctx["parent_run_id"], {"best_val_accuracy": best["best_val_accuracy"],
                                                "trials": n_done, "stopped_early": doc["stopped_early"],
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
    if apply:
        apply_best(params_path, doc["apply"])
        print(f"applied to {params_path}: " + "; ".join(
            f"{s}." + ", ".join(f"{k}={v}" for k, v in vals.items()) for s, vals in doc["apply"].items()))
    for r in rows:
        r.pop("config", None)
    return {**doc, "output": str(out), "rows": rows, "concurrency": conc, "resumed": restoring,
            "applied": apply, "table": table}


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
