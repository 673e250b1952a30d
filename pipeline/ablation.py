"""The paper's ablation study as one command: Table 1 (RAF-DB) and Table 3 (SFEW), tracked in MLflow.

Resumable in pieces: each trained (row, seed) leaves its figures beside its model
(``models/ablation/<spec>/seed<N>/ablation_result.json``) with a fingerprint of its settings, data
and code; a rerun takes those as they are and continues an interrupted training run from its last
Ray checkpoint, so `fer ablation --seeds 3` can be run an evening at a time.

Each row is a configuration change of the same training function as the DVC stages
(`pipeline.train.launch.run_training` on Ray Train) followed by `evaluate_checkpoint` on the test
split, with the same seed budget for every row (``seeds`` runs, averaged). Rows that share a
trained model share its runs (``+ ten-crop`` reads the ten-crop accuracy of the ``+ LIP`` model;
``SFEW from the RAF-DB model`` fine-tunes the full RAF-DB model trained for Table 1 when the
configurations coincide). Every training run is an MLflow run (tag ``ablation_row``: the rows it
serves) under a parent ``ablation`` run; ``reports/ablation.md`` puts our figures beside the
paper's with each row's run ids.

Table 1 rows (RAF-DB test accuracy; rows 1-2 single centre crop, the rest ten-crop):

1. ``vgg16``       VGG16-BN: max pooling, FC head, no attention, random init
2. ``lip``         + LIP pooling (FC head, no attention)
3. ``ten_crop``    + ten-crop evaluation (the ``lip`` model)
4. ``imagenet``    + ImageNet pre-training (``imagenet_init.source``; "not run" without weights)
5. ``attention_off`` / 6. ``attention_on``: LIP-VGG16 with the conv head, ECA attention off / on
   (pre-trained like row 4 when weights are available, else random init). Not in the paper.

Table 3 rows (SFEW test accuracy, ten-crop, the ``model:`` section's network):

* ``sfew_imagenet`` SFEW from ImageNet init ("not run" without weights)
* ``sfew_scratch``  SFEW from random init: only when there are no ImageNet weights, as a stand-in
* ``sfew_rafdb``    SFEW from the RAF-DB model (trained here with the same init policy as row 6)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import load_params, section
from pipeline.ablation_report import comparisons, render
from pipeline.errors import FerError
from pipeline.params_schema import recorded_lip_switches

#: The paper's figures we carry (test accuracy, %): its Table 1 progression (VGG16, + LIP, + ten-crop,
#: + ImageNet pre-training) and Table 3. Nothing else is quoted from the paper.
PAPER = {"vgg16": 81.68, "lip": 83.15, "ten_crop": 84.97, "imagenet": 86.31, "sfew_imagenet": 50.00,
         "sfew_rafdb": 57.34}
NO_WEIGHTS = "not run: no ImageNet weights (set imagenet_init.source)"
SECTIONS = {"rafdb": "train_rafdb", "sfew": "finetune_sfew"}
#: Beside each trained (row, seed) model: its figures and fingerprint, so a rerun skips it.
DONE_FILE = "ablation_result.json"


def fingerprint(opts: dict[str, Any], data: Path) -> str:
    """What a (row, seed) result depends on: its training options, the parquet it reads (the
    split files' bytes), the model it starts from (a row fine-tuned from another's model) and the
    code a training run imports."""
    from pipeline import code_deps
    from pipeline.outputs import sha256_file

    files = sorted(data.glob("*.parquet")) if data.is_dir() else []
    init = Path(str(opts.get("init", "none")))
    files += [init] if init.is_file() else []
    splits = "".join(f"{f.name}:{sha256_file(f)};" for f in files).encode()
    return code_deps.digest("stages.train_rafdb", json.dumps(opts, sort_keys=True, default=str).encode(),
                            splits)[:16]


@dataclass
class Spec:
    """One trained model (per seed): dataset, network switches, initialisation."""
    key: str
    dataset: str
    model: dict[str, Any]
    init: str                 # "none" | "imagenet" | "spec:<key>" (fine-tune that spec's model)
    rows: list[str] = field(default_factory=list)


@dataclass
class Row:
    key: str
    table: int                # 1 or 3
    label: str
    metric: str               # "accuracy" (ten-crop) | "accuracy_center"
    spec: str | None          # None: not run
    reason: str = ""          # why not run
    paper: float | None = None
    values: list[float] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        mean = statistics.fmean(self.values) if self.values else None
        std = statistics.stdev(self.values) if len(self.values) > 1 else None
        return {"key": self.key, "table": self.table, "label": self.label, "metric": self.metric,
                "status": "ok" if self.values else (self.reason or "not run"),
                "mean": mean, "std": std, "values": list(self.values), "run_ids": list(self.run_ids),
                "paper": self.paper}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Row":
        """A row as :meth:`as_dict` wrote it (``reports/ablation.json``), with the paper figure this
        code carries (the figures are the code's, not the run's)."""
        return cls(d["key"], int(d["table"]), d["label"], d["metric"], None,
                   "" if d.get("status") == "ok" else str(d.get("status") or ""), PAPER.get(d["key"]),
                   [float(v) for v in d.get("values") or []], list(d.get("run_ids") or []))


# --------------------------------------------------------------------------- plan
def _imagenet_status(params: dict[str, Any], root: Path, model_cfgs: list[dict[str, Any]], work: Path
                     ) -> tuple[str | None, str]:
    """(source, "") when ImageNet weights can be mapped into every network that needs them,
    else (None, reason)."""
    from pipeline.model.checkpoint import write_imagenet_init

    source = str((params.get("imagenet_init") or {}).get("source", "none"))
    if source == "none":
        return None, NO_WEIGHTS
    src = source if source == "torchvision" else str((root / source).resolve())
    try:
        for mc in model_cfgs:
            if not _init_path(work, mc, src).is_file():
                write_imagenet_init(_init_path(work, mc, src), mc, src)
    except FerError as e:
        return None, f"not run: ImageNet weights unusable ({e})"
    return src, ""


def _init_path(work: Path, model_cfg: dict[str, Any], source: str) -> Path:
    digest = hashlib.sha256(json.dumps([model_cfg, source], sort_keys=True).encode()).hexdigest()[:10]
    return work / "init" / f"imagenet_{digest}.pt"


def plan(params: dict[str, Any], root: Path, work: Path) -> tuple[list[Row], dict[str, Spec], str | None]:
    """The rows, the training specs they need, and the usable ImageNet source (or None)."""
    model = section(params, "model")
    net = {k: model[k] for k in ("width", "lip_bottleneck", "lip_norm", "lip_start", "dropout") if k in model}

    def mc(pool, head, attention, num_classes=7):
        return {"num_classes": num_classes, "pool": pool, "head": head, "attention": attention,
                "width": float(net.get("width", 1.0)), "lip_bottleneck": float(net.get("lip_bottleneck", 0.25)),
                "dropout": float(net.get("dropout", 0.5)),
                **recorded_lip_switches(pool, net.get("lip_norm", True), net.get("lip_start", "avg"))}

    full = (model.get("pool", "lip"), model.get("head", "conv"), model.get("attention", "eca"))
    needs_imagenet = [mc("lip", "fc", "none"), mc("lip", "conv", "none"), mc("lip", "conv", "eca"), mc(*full)]
    source, reason = _imagenet_status(params, root, needs_imagenet, work)
    pre = "imagenet" if source else "none"

    specs: dict[str, Spec] = {}

    def spec(dataset: str, sw: tuple[str, str, str], init: str) -> str:
        key = f"{dataset}-{'-'.join(sw)}-{init.replace('spec:', 'from-')}"
        specs.setdefault(key, Spec(key, dataset, dict(zip(("pool", "head", "attention"), sw)), init))
        return key

    rows = [
        Row("vgg16", 1, "VGG16-BN: max pooling, FC head, no attention (centre crop)", "accuracy_center",
            spec("rafdb", ("max", "fc", "none"), "none"), paper=PAPER["vgg16"]),
        Row("lip", 1, "+ LIP pooling (centre crop)", "accuracy_center", spec("rafdb", ("lip", "fc", "none"), "none"),
            paper=PAPER["lip"]),
        Row("ten_crop", 1, "+ ten-crop evaluation (same model as the row above)", "accuracy",
            spec("rafdb", ("lip", "fc", "none"), "none"), paper=PAPER["ten_crop"]),
        Row("imagenet", 1, "+ ImageNet pre-training (LIP-VGG16)", "accuracy",
            spec("rafdb", ("lip", "fc", "none"), "imagenet") if source else None, reason, PAPER["imagenet"]),
        Row("attention_off", 1, f"LIP-VGG16, conv head, no attention ({'pre-trained' if source else 'random init'})",
            "accuracy", spec("rafdb", ("lip", "conv", "none"), pre)),
        Row("attention_on", 1, f"LIP-VGG16, conv head, + ECA attention ({'pre-trained' if source else 'random init'})",
            "accuracy", spec("rafdb", ("lip", "conv", "eca"), pre)),
        Row("sfew_imagenet", 3, "SFEW from ImageNet init", "accuracy",
            spec("sfew", full, "imagenet") if source else None, reason, PAPER["sfew_imagenet"]),
    ]
    if not source:
        rows.append(Row("sfew_scratch", 3, "SFEW from random init (stand-in: no ImageNet weights)", "accuracy",
                        spec("sfew", full, "none")))
    rafdb_full = spec("rafdb", full, pre)
    rows.append(Row("sfew_rafdb", 3, f"SFEW from the RAF-DB model ({rafdb_full})", "accuracy",
                    spec("sfew", full, f"spec:{rafdb_full}"), paper=PAPER["sfew_rafdb"]))
    for r in rows:
        if r.spec:
            specs[r.spec].rows.append(r.key)
    for s in specs.values():  # the RAF-DB model behind sfew_rafdb serves that row too
        if s.init.startswith("spec:"):
            dep = specs[s.init[5:]]
            if "sfew_rafdb" not in dep.rows:
                dep.rows.append("sfew_rafdb(init)")
    return rows, specs, source


# --------------------------------------------------------------------------- run
class _Runner:
    def __init__(self, params: dict[str, Any], root: Path, work: Path, specs: dict[str, Spec],
                 source: str | None, *, seeds: list[int], epochs: int | None, experiment: str,
                 parent_run_id: str, ablation_id: str):
        self.params, self.root, self.work, self.specs = params, root, work, specs
        self.source, self.seeds, self.epochs = source, seeds, epochs
        self.experiment, self.parent, self.ablation_id = experiment, parent_run_id, ablation_id
        self.results: dict[tuple[str, int], dict[str, Any]] = {}
        self.lock = threading.Lock()

    def _config(self, spec: Spec, seed: int):
        from pipeline.train.config import TrainConfig

        opts = TrainConfig.options(self.params, SECTIONS[spec.dataset], spec.model, {"seed": seed})
        if self.epochs is not None:
            opts["epochs"] = self.epochs
        ray_sec = section(self.params, "ray")
        storage = str(ray_sec.get("storage_path", "ray_results"))
        storage = storage if "://" in storage else str((self.root / storage).resolve())
        if spec.init == "none":
            init = "none"
        elif spec.init == "imagenet":
            cfg0 = TrainConfig.from_dict({**opts, "data": "x"})
            init = str(_init_path(self.work, cfg0.network(), self.source))
        else:
            init = self.results[(spec.init[5:], seed)]["model_path"]
        opts.update(data=str(self.root / "data" / "parquet" / spec.dataset), init=init)
        key = fingerprint(opts, self.root / "data" / "parquet" / spec.dataset)
        # Ray's run folder is named by the fingerprint: a rerun of the same row continues from its
        # last checkpoint, and a row whose code, data or settings changed starts afresh.
        opts.update(storage_path=f"{storage.rstrip('/')}/ablation/{key}", run_name=f"{spec.key}-s{seed}",
                    output=str(self.work / spec.key / f"seed{seed}"))
        return TrainConfig.from_dict(opts), key

    def _done(self, spec: Spec, seed: int, key: str) -> dict[str, Any] | None:
        """The result of this (row, seed) from an earlier invocation with the same fingerprint."""
        f = self.work / spec.key / f"seed{seed}" / DONE_FILE
        try:
            done = json.loads(f.read_text())
        except (OSError, ValueError):
            return None
        if done.get("fingerprint") != key or not Path(done.get("model_path", "")).is_file():
            return None
        return done

    def run(self, spec: Spec, seed: int) -> dict[str, Any]:
        from pipeline import tracking
        from pipeline.evaluate import evaluate_checkpoint
        from pipeline.train.launch import run_training

        cfg, key = self._config(spec, seed)
        done = self._done(spec, seed, key)
        if done is not None:
            print(f"ablation {spec.key} seed {seed}: trained and evaluated earlier with the same code, data "
                  f"and settings (MLflow run {done['run_id']}): not retrained", flush=True)
            with self.lock:
                self.results[(spec.key, seed)] = done
            return done
        with tracking.tracked_run(
                self.experiment, f"ablation-{spec.key}-s{seed}", stage="ablation", dataset=spec.dataset,
                params=cfg.to_dict(),
                tags={"mlflow.parentRunId": self.parent, "ablation_row": ",".join(spec.rows),
                      "ablation_spec": spec.key, "ablation_id": self.ablation_id, "seed": seed}) as run_id:
            cfg = cfg.model_copy(update={"mlflow_run_id": run_id})
            summary = run_training(cfg)
            ev = section(self.params, "evaluate") if "evaluate" in self.params else {}
            metrics, _ = evaluate_checkpoint(summary["model_path"], cfg.data, split="test",
                                             num_workers=1, batch_size=int(ev.get("batch_size", 64)))
            tracking.log_metrics(run_id, metrics, prefix="test_")
            tracking.log_metrics(run_id, {"best_val_accuracy": summary["best_val_accuracy"],
                                          "epochs_run": summary["epochs_run"]})
        out = {"run_id": run_id, "model_path": summary["model_path"], "metrics": metrics}
        (Path(cfg.output) / DONE_FILE).write_text(json.dumps({**out, "fingerprint": key}, indent=1))
        print(f"ablation {spec.key} seed {seed}: ten-crop {metrics['accuracy']:.4f}, "
              f"centre {metrics['accuracy_center']:.4f} (MLflow run {run_id})", flush=True)
        with self.lock:
            self.results[(spec.key, seed)] = out
        return out


def run_ablation(params_path: str | os.PathLike = "params.yaml", *, seeds: int = 1, epochs: int | None = None,
                 output: str | os.PathLike = "reports/ablation.md", max_concurrent: int | None = None
                 ) -> list[dict[str, Any]]:
    """Train and evaluate every row (``seeds`` runs each), write the markdown report to
    ``output`` and return the rows (dicts: key, table, label, metric, status, mean, std, values,
    run_ids, paper)."""
    if not isinstance(seeds, int) or seeds < 1:
        raise FerError(f"--seeds must be an integer >= 1, got {seeds!r}")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise FerError(f"--epochs must be an integer >= 1, got {epochs!r}")
    params_path = Path(params_path)
    params = load_params(params_path)
    root = params_path.resolve().parent
    for ds in ("rafdb", "sfew"):
        if not (root / "data" / "parquet" / ds).is_dir():
            raise FerError(f"dataset {root / 'data' / 'parquet' / ds} not found (run `dvc repro ingest` first)")
    work = root / "models" / "ablation"
    rows, specs, source = plan(params, root, work)
    base_seed = int(section(params, "train_rafdb").get("seed", 0))
    seed_list = [base_seed + i for i in range(seeds)]
    experiment = (params.get("mlflow") or {}).get("experiment", "lip-vgg16")

    import ray

    from pipeline import tracking
    from pipeline.cluster import concurrency, ensure_ray, planned_cpus_per_worker, worker_resources

    ablation_id = time.strftime("%Y%m%d-%H%M%S")
    t0 = time.perf_counter()
    parent = tracking.start_run(experiment, f"ablation-{ablation_id}", stage="ablation", dataset="rafdb+sfew",
                                params={"seeds": seed_list, "epochs": epochs, "imagenet": source or "none"},
                                tags={"ablation_id": ablation_id})
    ray_sec = section(params, "ray")
    workers = int(ray_sec.get("num_workers", 1))
    # A local instance gets at least one row's workers, as a training stage's does (rows' Train
    # controllers hold no CPU, so nothing else is counted beside them).
    started = ensure_ray(workers * planned_cpus_per_worker(ray_sec.get("cpus_per_worker"), workers))
    failures: dict[tuple[str, int], str] = {}
    try:
        res = worker_resources(ray_sec.get("use_gpu", "auto"), workers, ray_sec.get("cpus_per_worker"))
        ready, waiting = _jobs(specs, seed_list)
        conc = concurrency(ray.cluster_resources(), workers, res["cpus_per_worker"], res["use_gpu"],
                           max(len(ready), 1), max_concurrent)
        print(f"ablation {ablation_id}: {len(specs)} models x {seeds} seed(s) = {len(ready) + len(waiting)} "
              f"training runs, {conc} at a time; ImageNet init: {source or 'none'}", flush=True)
        runner = _Runner(params, root, work, specs, source, seeds=seed_list, epochs=epochs,
                         experiment=experiment, parent_run_id=parent, ablation_id=ablation_id)
        _schedule(runner, ready, waiting, conc, failures)
    except BaseException:
        tracking.end_run(parent, "FAILED")
        if started:
            ray.shutdown()
        raise
    if started:
        ray.shutdown()

    _fill_rows(rows, runner.results, seed_list, failures)
    meta = {"ablation_id": ablation_id, "seeds": seed_list, "epochs": epochs, "source": source,
            "params": str(params_path), "wall_s": time.perf_counter() - t0, "parent_run_id": parent,
            "n_test": {ds: next((r["metrics"]["n_test"] for (k, _), r in runner.results.items()
                                 if specs[k].dataset == ds), None) for ds in ("rafdb", "sfew")},
            "params_sections": {ds: SECTIONS[ds] for ds in SECTIONS}, "model": section(params, "model"),
            "commit": tracking.git_commit(root)}
    out = _write_report(rows, meta, Path(output), n_failed=len(failures))
    if failures:
        raise FerError(f"{len(failures)} ablation run(s) failed ({'; '.join(sorted(set(failures.values())))[:300]}); "
                       f"the report {out} marks their rows")
    return [r.as_dict() for r in rows]


def _jobs(specs: dict[str, Spec], seed_list: list[int]) -> tuple[list, list]:
    """The (spec, seed) training jobs as (ready, waiting): ``ready`` can start now, the models
    that others fine-tune from first so that those can start early; ``waiting`` fine-tune from
    another job's model."""
    deps = {s.init[5:] for s in specs.values() if s.init.startswith("spec:")}
    ready = [(s, sd) for s in sorted((s for s in specs.values() if not s.init.startswith("spec:")),
                                     key=lambda s: s.key not in deps) for sd in seed_list]
    waiting = [(s, sd) for s in specs.values() if s.init.startswith("spec:") for sd in seed_list]
    return ready, waiting


def _fill_rows(rows: list[Row], results: dict, seed_list: list[int], failures: dict) -> None:
    """Each row's per-seed figures and run ids; a row with any seed missing gets none, and says
    why (a mean over fewer seeds than the others would not compare)."""
    for row in rows:
        if not row.spec:
            continue
        for sd in seed_list:
            r = results.get((row.spec, sd))
            if r is None:
                row.reason = failures.get((row.spec, sd), "failed")
                row.values, row.run_ids = [], []
                break
            row.values.append(float(r["metrics"][row.metric]))
            row.run_ids.append(r["run_id"])


def _write_report(rows: list[Row], meta: dict[str, Any], out: Path, *, n_failed: int) -> Path:
    """The markdown report and its JSON twin, also logged to the parent MLflow run, which is closed
    (FAILED when a run failed)."""
    from pipeline import tracking

    parent, wall = meta["parent_run_id"], meta["wall_s"]
    text = render(rows, meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "rows": [r.as_dict() for r in rows], "comparisons": comparisons(rows)}, indent=1,
        default=str))
    try:
        tracking.client().log_text(parent, text, "ablation.md")
    except Exception as e:
        print(f"warning: could not log the report to MLflow: {type(e).__name__}: {e}")
    tracking.log_metrics(parent, {"wall_time_s": wall, "failed_runs": n_failed})
    tracking.end_run(parent, "FAILED" if n_failed else "FINISHED")
    print(text, flush=True)
    print(f"ablation report -> {out} ({wall:.0f} s)", flush=True)
    return out


def _schedule(runner: _Runner, ready: list, waiting: list, conc: int, failures: dict) -> None:
    """Run the jobs on ``conc`` threads; a fine-tuning job starts (ahead of the queue) as soon
    as the model it starts from is trained; if that model failed, it is marked not run."""
    cond = threading.Condition()

    def settled(job) -> bool:
        dep = (job[0].init[5:], job[1])
        return dep in runner.results or dep in failures

    def take():
        with cond:
            while True:
                for job in waiting:
                    if settled(job):
                        waiting.remove(job)
                        return job
                if ready:
                    return ready.pop(0)
                if not waiting:
                    return None
                cond.wait(timeout=1.0)

    def attempt(job) -> None:
        spec, sd = job
        if spec.init.startswith("spec:") and (spec.init[5:], sd) not in runner.results:
            failures[(spec.key, sd)] = f"not run: its RAF-DB model {spec.init[5:]} failed"
            return
        try:
            runner.run(spec, sd)
        except FerError as e:
            failures[(spec.key, sd)] = f"failed: {e}"
        except Exception as e:  # one broken run must not lose the others
            failures[(spec.key, sd)] = f"failed: {type(e).__name__}: {e}"

    def loop() -> None:
        while (job := take()) is not None:
            try:
                attempt(job)
            finally:
                with cond:
                    cond.notify_all()

    threads = [threading.Thread(target=loop, name=f"ablation-{i}", daemon=True) for i in range(max(1, conc))]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.5)  # keeps the main thread responsive to Ctrl-C


# --------------------------------------------------------------------------- CLI
def add_ablation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (model, ray, train_rafdb, finetune_sfew)")
    p.add_argument("--seeds", type=int, default=1, help="training runs per row, averaged (default 1)")
    p.add_argument("--epochs", type=int, default=None, help="epochs for every run (default: from params)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="cap on concurrent training runs (default: from the cluster's resources)")
    p.add_argument("--output", default="reports/ablation.md", help="markdown report")


def ablation_command(args: argparse.Namespace) -> None:
    run_ablation(args.params, seeds=args.seeds, epochs=args.epochs, output=args.output,
                 max_concurrent=args.max_concurrent)
