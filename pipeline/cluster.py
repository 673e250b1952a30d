"""Ray for every entry point (training stages, Tune trials, ablation rows, evaluation): how Ray is
started or joined, and how many CPUs/GPUs a run's workers get.

The rule: ``RAY_ADDRESS`` set -> join that cluster; unset -> a private local instance
(``address="local"``), never a cluster that ``ray start`` left on this machine (its address file
would otherwise be picked up, and ``ray.init(num_cpus=...)`` then fails). One line says which.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any

from pipeline import LOG_LEVEL, ray_workarounds
from pipeline.workers import default_workers
from pipeline.errors import FerError


def ensure_ray(num_cpus: float = 0) -> bool:
    """Start (or join) Ray once per process; True when this call did it, so the caller shuts it
    down. A local instance gets ``max(cores, num_cpus)`` logical CPUs. The job's environment
    carries the MLflow store, so workers (which run in their own folders, maybe on other
    machines) log to the driver's store."""
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": job_env(), "worker_process_setup_hook": "pipeline.ray_workarounds.one_line_peer_failures"}
    address = os.environ.get("RAY_ADDRESS", "").strip()
    quiet = {"logging_level": logging.getLevelName(LOG_LEVEL), "log_to_driver": True}
    if address:
        ray.init(address=address, runtime_env=runtime_env, **quiet)
        where = f"joined the Ray cluster at {address}"
    else:
        ray_workarounds.no_preemption_watcher_on_one_machine()
        ray.init(address="local", num_cpus=max(default_workers(), math.ceil(num_cpus)),
                 include_dashboard=False, runtime_env=runtime_env, **quiet)
        where = "started a private local Ray instance (set RAY_ADDRESS to join a cluster)"
    res = ray.cluster_resources()
    print(f"ray: {where}: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs; "
          f"its logs: {_logs_dir()}", flush=True)
    return True


#: Object-storage settings a worker needs to write checkpoints (``ray.storage_path: s3://...``)
#: and MLflow artifacts to the same bucket as the driver; passed on when set.
OBJECT_STORE_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                    "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


def job_env() -> dict[str, str]:
    """What every Ray worker and Tune trial needs from the driver's environment: its MLflow store,
    its CPU kernel pin (a node started by `ray start` elsewhere has its own environment) and, when set, the object-storage credentials and endpoint (:data:`OBJECT_STORE_ENV`)."""
    from pipeline.kernels import kernel_env
    from pipeline.tracking import tracking_uri

    return {"MLFLOW_TRACKING_URI": tracking_uri(), **kernel_env(),
            "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true"),
            **{k: os.environ[k] for k in OBJECT_STORE_ENV if os.environ.get(k)}}


def _logs_dir() -> str:
    try:
        from ray._private.worker import _global_node

        return _global_node.get_logs_dir_path()
    except Exception:  # noqa: BLE001 - a private API that may move: the usual place
        return "/tmp/ray/session_latest/logs"


def auto_cpus_per_worker(total_cpus: float, num_workers: int) -> float:
    """Leave one CPU to Ray itself (the driver, the Train controller, the object store), split the
    rest; at most 4 per worker, at least 0.25."""
    return max(0.25, min(4.0, (total_cpus - 1) / num_workers))


def planned_cpus_per_worker(cpus_per_worker: float | None, num_workers: int) -> float:
    """``ray.cpus_per_worker``, or its automatic value on this machine's cores: what a local
    instance is sized by before Ray starts (a training stage, a sweep, the ablation)."""
    return cpus_per_worker or auto_cpus_per_worker(default_workers(), num_workers)


#: CPUs a Tune trial's driver function holds for its whole life (Ray rejects 0). Its Ray Train
#: worker group must fit *beside* it: on a 2-CPU instance a 2-CPU worker next to a 0.01-CPU trial
#: never fits, and Ray Train then retries the placement every 60 s for ever.
TRIAL_CPU = 0.01


def autoscaling() -> bool:
    """True when the user says the cluster can grow (``FER_RAY_AUTOSCALING=1``): a worker group
    that does not fit now is then waited for; otherwise it is an error at once."""
    return os.environ.get("FER_RAY_AUTOSCALING", "").strip() in ("1", "true", "yes")


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def worker_resources(use_gpu: bool | str, num_workers: int, cpus_per_worker: float | None,
                     cluster: dict[str, float] | None = None, *, overhead: float = 0.0,
                     nodes: list[dict[str, float]] | None = None) -> dict[str, Any]:
    """``{"use_gpu", "cpus_per_worker"}`` of one training run on the running cluster.
    ``use_gpu="auto"`` uses GPUs when there is one per worker. ``overhead``: CPUs the caller holds
    beside the workers (a Tune trial's :data:`TRIAL_CPU`). What cannot be placed is refused in one
    line: on a local instance by the total; on a cluster (``RAY_ADDRESS``) when no live node can
    hold one worker, unless the cluster may grow (:func:`autoscaling`): then it says once what it
    waits for."""
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    gpus, cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 0))
    gpu = gpus >= num_workers if use_gpu == "auto" else bool(use_gpu)
    if gpu and gpus < num_workers and not autoscaling():
        raise FerError(f"use_gpu: {num_workers} workers need {num_workers} GPUs, the Ray cluster has "
                       f"{gpus:g}; lower num_workers or set use_gpu: false")
    cpw = float(cpus_per_worker or auto_cpus_per_worker(cpus, num_workers))
    need = num_workers * cpw + overhead
    beside = f" beside the {overhead:g} CPU a Tune trial holds itself" if overhead else ""
    if not os.environ.get("RAY_ADDRESS"):
        if need > cpus + 1e-9:
            raise FerError(f"{num_workers} workers x {cpw:g} CPUs{beside} do not fit the local Ray "
                           f"instance ({cpus:g} CPUs); lower ray.cpus_per_worker or num_workers")
        return {"use_gpu": gpu, "cpus_per_worker": cpw}
    if nodes is None:
        nodes = _alive_nodes()
    if not any(float(n.get("CPU", 0)) >= cpw and (not gpu or float(n.get("GPU", 0)) >= 1) for n in nodes):
        largest = max((float(n.get("CPU", 0)) for n in nodes), default=0.0)
        what = f"{cpw:g} CPUs{' + 1 GPU' if gpu else ''}"
        if not autoscaling():
            raise FerError(f"no node of the Ray cluster can hold a worker of {what} (largest node: "
                           f"{largest:g} CPUs, {len(nodes)} nodes alive); lower ray.cpus_per_worker, "
                           f"add a node, or set FER_RAY_AUTOSCALING=1 if the cluster grows by itself")
        print(f"ray: waiting for the cluster to add a node that can hold a worker of {what} "
              f"(largest node now: {largest:g} CPUs)", flush=True)
    return {"use_gpu": gpu, "cpus_per_worker": cpw}


def placement_failure(error: BaseException) -> str | None:
    """The one line for a worker group Ray Train could not place (``WorkerGroupStartupTimeoutError``
    anywhere in ``error``'s chain or text), naming what the cluster has; None for other errors."""
    seen, todo, text = set(), [error], ""
    while todo:  # the chain, and what Ray Train's ControllerError wraps (its text omits the type)
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        text += f" {type(e).__name__} {e}"
        todo += [e.__cause__, e.__context__, getattr(e, "controller_failure", None)]
    if not any(name in text for name in ray_workarounds.PLACEMENT_ERRORS):
        return None
    try:
        nodes = _alive_nodes()
        have = ", ".join(f"{float(n.get('CPU', 0)):g} CPU" + (f" + {float(n['GPU']):g} GPU" if n.get("GPU") else "")
                         for n in nodes) or "none"
    except Exception:  # noqa: BLE001 - Ray may be going down; the line still says what happened
        have = "unknown"
    return (f"Ray could not place the training workers (the cluster's live nodes: {have}); lower "
            f"ray.cpus_per_worker or ray.num_workers, or add a node (FER_RAY_AUTOSCALING=1 waits for one)")


def concurrency(cluster: dict[str, float], workers: int, cpus_per_worker: float, use_gpu: bool,
                num_runs: int, cap: int | None = None, *, overhead: float = 0.0) -> int:
    """How many training runs (Tune trials, ablation rows) fit side by side: by GPUs when they
    use them, else by CPUs, one CPU left to Ray for its workers, and the runs' ``overhead``
    (:data:`TRIAL_CPU` per Tune trial) fitting beside them in the instance; at least 1
    (:func:`worker_resources` has checked that one fits), at most ``num_runs``/``cap``."""
    cpus = float(cluster.get("CPU", 0))
    free = cpus - 1 if cpus > 1 else cpus
    n = int(math.floor(free / (workers * cpus_per_worker) + 1e-9))
    while n > 1 and n * (workers * cpus_per_worker + overhead) > cpus + 1e-9:
        n -= 1
    if use_gpu:
        n = min(n, int(float(cluster.get("GPU", 0)) // workers))
    n = max(1, min(n, num_runs))
    return min(n, cap) if cap else n
