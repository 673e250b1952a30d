"""Launch `train_loop_per_worker` on Ray Train (TorchTrainer, Train V2) and write the best model.

`fit` is the one place a trainer is built (stages, Tune trials and ablation rows all call it);
`run_training` is `fit` plus the model written to the run's output folder.

Resuming: Ray Train V2 keeps a checkpoint-manager snapshot under `storage_path/run_name`; a new
`TorchTrainer(...).fit()` with the same `RunConfig(name, storage_path)` loads it and hands the
latest checkpoint to the workers through `ray.train.get_checkpoint()`, so a rerun (after a crash,
Ctrl-C, or with more epochs) continues after the last finished epoch. Worker failures inside one
fit are retried the same way, up to `FailureConfig(max_failures)`, except a worker's FerError
(bad data or settings: it would fail again), which ends the run at once with its one line.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline.outputs import check_replaceable, replacing, write_marker
from pipeline import params_schema
from pipeline.errors import FerError
from pipeline.train.config import TrainConfig, WorkerConfig
from pipeline.model import checkpoint
from pipeline.train.steps import CONFIG_FILE
from pipeline.train.worker import train_loop_per_worker

# Changing these between a run and its resume would load weights into a different network.
ARCH_KEYS = ("num_classes", *params_schema.ARCH_KEYS)


def _is_uri(p: str) -> bool:
    return "://" in p


def storage_location(cfg: TrainConfig) -> str:
    return cfg.storage_path if _is_uri(cfg.storage_path) else str(Path(cfg.storage_path).resolve())


#: A training output of versions before the marker held only these files.
_LEGACY_OUTPUT = frozenset({"model.pt", "history.json"})


def check_output(out: Path) -> None:
    """FerError unless ``out`` may be replaced by a training run (missing, empty, or one)."""
    check_replaceable(out, what="training", legacy_names=_LEGACY_OUTPUT)


def latest_checkpoint_dir(storage_path: str, run_name: str) -> Path | None:
    """Newest intact `epoch_NNNN` checkpoint of a run in local storage (None: none, or remote
    storage)."""
    if _is_uri(storage_path):
        return None
    return _newest_intact(Path(storage_path) / run_name)


def _newest_intact(run: Path, before: str | None = None) -> Path | None:
    """The newest `epoch_NNNN` folder of ``run`` (older than ``before`` if given) that is intact."""
    dirs = sorted((p for p in run.glob("epoch_*") if (before is None or p.name < before) and checkpoint.has_state(p)),
                  reverse=True)
    return next((d for d in dirs if checkpoint.damage(d) is None), None)


#: Ray Train 2.60's record of a run's checkpoints (private format; read only for the name of the
#: checkpoint Ray will resume from: `latest_checkpoint_result.checkpoint_dir_name`).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def _ray_latest(run: Path) -> str | None:
    """The checkpoint Ray hands the workers on a rerun of ``run`` (None: Ray starts afresh).
    Not the newest folder: after a failed upload (a full disk) the newest folder is one Ray never
    registered, and the resume line must name what is actually resumed."""
    try:
        snap = json.loads((run / RAY_SNAPSHOT).read_text())
        return (snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except (OSError, ValueError, AttributeError):
        return None


def plan_resume(storage: str, run_name: str) -> tuple[Path | None, str | None]:
    """``(checkpoint to resume from, why Ray's own latest cannot be)``. Normally Ray resumes its
    latest checkpoint itself (the reason is None). When that one is damaged or gone (a torn
    write, a full disk, a folder deleted by hand) Ray would load it and fail the same way on every
    rerun, or refuse the run folder outright: then the newest intact epoch before it is returned
    with the reason, and :func:`set_aside` starts a fresh Ray run seeded from it. Remote storage
    is left to Ray."""
    if _is_uri(storage):
        return None, None
    run = Path(storage) / run_name
    latest = _ray_latest(run)
    if latest is None:
        return None, None
    why = checkpoint.damage(run / latest)
    if why is None:
        return run / latest, None
    return _newest_intact(run, before=latest), f"checkpoint {latest} is damaged ({why})"


def set_aside(run_name: str, resumed: Path | None, why: str, run: Path) -> Path | None:
    """Move the damaged run folder aside (kept, never deleted: it is the user's to inspect) so
    that Ray starts the run afresh; returns where ``resumed`` now lies, which the workers load
    themselves (``resume_from``)."""
    n = 1
    while (aside := run.with_name(f"{run.name}.damaged-{n}")).exists():
        n += 1
    run.rename(aside)
    if resumed is None:
        print(f"run {run_name!r}: {why} and no earlier one is intact; starting from epoch 1 "
              f"(the damaged run folder is kept at {aside})", flush=True)
        return None
    print(f"run {run_name!r}: {why}; resuming from {resumed.name}, the newest intact one "
          f"(the damaged run folder is kept at {aside})", flush=True)
    return aside / resumed.name


def _check_resume(cfg: TrainConfig, ckpt_dir: Path | None, *, quiet: bool = False) -> None:
    if ckpt_dir is None or not (ckpt_dir / CONFIG_FILE).exists():
        return
    old = json.loads((ckpt_dir / CONFIG_FILE).read_text())
    new = cfg.to_dict()
    arch = [k for k in ARCH_KEYS if k in old and old[k] != new[k]]
    if arch:
        raise FerError(f"run {cfg.resolved_run_name!r} in {cfg.storage_path} has a checkpoint of another "
                       f"network ({', '.join(f'{k}: {old[k]} -> {new[k]}' for k in arch)}); "
                       f"choose a new run_name or delete {ckpt_dir.parent}")
    changed = [k for k in new if k in old and old[k] != new[k] and k not in ("mlflow_run_id",)]
    if not quiet:
        print(f"resuming run {cfg.resolved_run_name!r} from {ckpt_dir.name}"
              + (f" (changed: {', '.join(changed)})" if changed else ""), flush=True)


def fit(cfg: TrainConfig, *, callbacks=(), pg_file: str | None = None,
        worker_options: dict[str, Any] | None = None, train_loop=None, datasets=None):
    """Build this run's ``TorchTrainer`` and fit it; returns Ray's ``Result``. The one place a
    trainer is built: the training stages, every Tune trial (``callbacks=[TuneReportCallback()]``)
    and every ablation row come here. ``worker_options`` are :class:`WorkerConfig` fields
    (test hooks such as ``fail_at_epoch``, the streamed loop's settings). ``train_loop`` replaces the face-set loop and
    ``datasets`` (Ray Datasets by name, or a function returning them, called once Ray is up)
    are streamed to the workers (``ray.train.get_dataset_shard``): ImageNet-init's training."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    from pipeline import LOG_LEVEL

    from pipeline.cluster import autoscaling, ensure_ray, placement_failure, planned_cpus_per_worker, worker_resources
    from pipeline.tracking import tracking_uri
    from pipeline import ray_workarounds
    from pipeline.train.progress import EpochBar

    data = Path(cfg.data).resolve()
    if not data.is_dir():
        raise FerError(f"data directory {data} does not exist")
    init = cfg.init
    if init != "none":
        init = str(Path(init).resolve())
        if not Path(init).is_file():
            raise FerError(f"init checkpoint {init} does not exist")
    storage = storage_location(cfg)
    run_name = cfg.resolved_run_name
    resumed, damaged = plan_resume(storage, run_name)
    _check_resume(cfg, resumed, quiet=damaged is not None)  # a different network: refused first
    seed = set_aside(run_name, resumed, damaged, Path(storage) / run_name) if damaged else None

    cpw = planned_cpus_per_worker(cfg.cpus_per_worker, cfg.num_workers)
    ensure_ray(cfg.num_workers * cpw + 1)  # enough logical CPUs, one left over
    res = worker_resources(cfg.use_gpu, cfg.num_workers, cfg.cpus_per_worker)
    bar = EpochBar(enabled=None if train_loop is None else False).start()  # the face-set loop's steps
    own_pg_file = None
    try:  # the bar's thread and queue actor end with the run, however it ends
        worker = WorkerConfig(
            run=cfg.model_copy(update={"data": str(data), "init": init}), network=cfg.network(),
            train_config=cfg.to_dict(), torch_threads=max(1, int(res["cpus_per_worker"])),
            tracking_uri=tracking_uri(), resume_from=str(seed) if seed else None,
            progress_queue=bar.queue, **(worker_options or {}))
        if pg_file is None and ray_workarounds.needed():
            fd, own_pg_file = tempfile.mkstemp(prefix="fer-pg-", suffix=".txt")
            os.close(fd)
        if callable(datasets):
            datasets = datasets()
        trainer = ray_workarounds.trainer_class(pg_file or own_pg_file)(
            train_loop or train_loop_per_worker,
            **({"datasets": datasets} if datasets is not None else {}),
            train_loop_config=worker.to_loop(),
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=res["use_gpu"],
                                         resources_per_worker={"CPU": res["cpus_per_worker"],
                                                               **({"GPU": 1} if res["use_gpu"] else {})}),
            run_config=RunConfig(
                name=run_name, storage_path=storage,
                # A worker group that cannot be placed (no node with the CPUs a worker asks for,
                # e.g. after a node loss) fails the run with one line instead of being retried
                # every 60 s for ever, unless the cluster may grow (FER_RAY_AUTOSCALING=1).
                failure_config=FailureConfig(max_failures=cfg.max_failures,
                                             controller_failure_limit=-1 if autoscaling() else 0),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                callbacks=list(callbacks) or None,
                logging_config=LoggingConfig(log_level=LOG_LEVEL),  # Ray Train's own messages
            ),
        )
        try:
            return trainer.fit()
        except Exception as e:  # ray.train.TrainingFailedError and friends
            placing = placement_failure(e)
            if placing:
                raise FerError(f"training run {run_name!r} stopped: {placing}") from e
            told = ray_workarounds.user_error(e)
            if told:  # bad data or settings: the same again on a rerun, so no "rerun to resume"
                raise FerError(told) from e
            msg = str(e).strip().splitlines()
            raise FerError(f"training run {run_name!r} failed: {msg[-1] if msg else type(e).__name__} "
                           f"(rerun to resume from the last checkpoint in {storage}/{run_name})") from e
    finally:
        bar.close()
        if own_pg_file:
            ray_workarounds.release(own_pg_file)
            Path(own_pg_file).unlink(missing_ok=True)


def run_training(cfg: TrainConfig, *, worker_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train with Ray Train, write ``output/model.pt`` (best epoch by val accuracy) and
    ``output/history.json``, return a summary."""
    check_output(Path(cfg.output))  # before hours of training, not after
    result = fit(cfg, worker_options=worker_options)
    if result.checkpoint is None:
        raise FerError(f"training run {cfg.resolved_run_name!r} reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        st = checkpoint.read_state(d)
    return write_outputs(cfg, st, checkpoint_path=result.checkpoint.path,
                         run_name=cfg.resolved_run_name, storage=storage_location(cfg))


# Per-epoch fields that describe this session, not the model: wall-clock speed and where a resumed
# run restarted. They go to MLflow and the summary; ``history.json`` (a DVC output) keeps only what
# the data, params and code determine, so a rerun on the same machine writes the same bytes.
SESSION_FIELDS = ("images_per_s", "epoch_time_s", "session_start_epoch")


def write_outputs(cfg: TrainConfig, st: dict, *, checkpoint_path: str, run_name: str,
                  storage: str) -> dict[str, Any]:
    from pipeline.data.classes import CLASSES

    out = Path(cfg.output)
    check_output(out)
    classes = list(CLASSES) if cfg.num_classes == len(CLASSES) else [f"class_{i}" for i in range(cfg.num_classes)]
    history = st["history"]
    with replacing(out) as tmp:  # a killed run leaves the previous model in place
        checkpoint.save_model(tmp / "model.pt", st["best_state"], model_config=st["model_config"],
                              classes=classes, image_size=st["image_size"], crop=cfg.crop,
                              epoch=st["best_epoch"], val_accuracy=st["best_val_accuracy"],
                              train_config={k: v for k, v in cfg.to_dict().items()
                                            if k != "mlflow_run_id"})  # bookkeeping, not the model
        (tmp / "history.json").write_text(json.dumps(
            [{k: v for k, v in h.items() if k not in SESSION_FIELDS} for h in history], indent=1))
        write_marker(tmp, "training")
    ips = [h["images_per_s"] for h in history]
    summary = {
        "best_val_accuracy": st["best_val_accuracy"], "best_epoch": st["best_epoch"],
        "epochs_run": len(history), "last_epoch": st["epoch"], "early_stopped": st["stopped"],
        "images_per_s": sum(ips) / len(ips) if ips else 0.0,
        "checkpoint": checkpoint_path, "run_name": run_name, "storage_path": storage,
        "model_path": str(out / "model.pt"), "history_path": str(out / "history.json"),
        "run_history": history,  # with SESSION_FIELDS
    }
    print(f"best val accuracy {summary['best_val_accuracy']:.4f} at epoch {summary['best_epoch']} "
          f"({summary['epochs_run']} epochs, {summary['images_per_s']:.1f} img/s) -> {out / 'model.pt'}",
          flush=True)
    return summary
