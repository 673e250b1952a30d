"""MLflow: runs, per-epoch metrics and artifacts (it knows nothing of the model; the logged model
and the registry are :mod:`pipeline.infer.registry`'s).

Tracking URI (contract): ``MLFLOW_TRACKING_URI`` when set, else a SQLite store at the repo root
(``sqlite:///<root>/mlflow.db``, artifacts in ``<root>/mlartifacts/``), so that the registry
works with no server. Every function here takes an explicit ``run_id`` and talks to the store
through ``MlflowClient``: callers (Ray workers, DVC stages) never depend on MLflow's global
"active run".
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

from pipeline.errors import FerError

#: MLflow's limit on a param value's length.
_PARAM_MAX = 6000


# --------------------------------------------------------------------------- store


def repo_root(cwd: str | os.PathLike | None = None) -> Path:
    """The git top-level of ``cwd`` (default: the current directory), else ``cwd`` itself."""
    cwd = Path(cwd or os.getcwd())
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return Path(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return cwd.resolve()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<repo root>/mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    return "sqlite:///" + str(repo_root() / "mlflow.db")


def sqlite_file(uri: str) -> Path | None:
    """A ``sqlite:///`` store's database file (None for other stores and in-memory ones)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///"):]
    if not db or db == ":memory:":
        return None
    return Path(db).resolve()


def sqlite_root(uri: str) -> Path | None:
    """The folder holding a ``sqlite:///`` store's database file (None for other stores)."""
    db = sqlite_file(uri)
    return db.parent if db is not None else None


_READY: set[str] = set()


def _create_sqlite_store_once(uri: str) -> None:
    """MLflow creates a new SQLite store's tables on first use, and two processes doing that at
    once (``dvc queue start -j 2`` on a fresh store) fail in its migrations: the first use in each
    process takes an exclusive lock on ``<db>.lock`` beside the file."""
    db = None if uri in _READY else sqlite_file(uri)
    if db is None:
        return
    import fcntl

    from mlflow import MlflowClient

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        check_sqlite_store(db)
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # creates or migrates
    _READY.add(uri)


def check_sqlite_store(db: Path) -> None:
    """A store file that exists must be a whole SQLite database: a truncated one made MLflow raise
    a raw ``DatabaseError`` traceback, and an empty one was silently made a new, empty store (by a
    read-only ``fer predict`` too). Either is one line naming the file and what to do."""
    if not db.exists():
        return
    what = None
    try:
        with open(db, "rb") as fh:
            head = fh.read(16)
        if head != b"SQLite format 3\x00":
            what = "empty" if not head else "not an SQLite database"
        else:
            import sqlite3

            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
            try:
                ok = con.execute("PRAGMA quick_check(1)").fetchone()[0]
            finally:
                con.close()
            if ok != "ok":
                what = f"damaged ({ok})"
    except Exception as e:  # noqa: BLE001 - sqlite3.DatabaseError and OSError alike
        what = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if what:
        raise FerError(f"the MLflow store {db} is {what}: move it aside (mv {db} {db}.damaged) to start "
                       "a new store, or put back a copy of it")


def client():
    """An ``MlflowClient`` on :func:`tracking_uri` (the registry follows it unless
    ``MLFLOW_REGISTRY_URI`` says otherwise)."""
    from mlflow import MlflowClient

    uri = tracking_uri()
    _create_sqlite_store_once(uri)
    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def using_store():
    """Point MLflow's fluent API (model logging and loading only exist there) at
    :func:`tracking_uri` for the duration, then restore the previous global URI and the
    ``MLFLOW_TRACKING_URI`` variable (MLflow's own setter rewrites it): no state leaks."""
    import mlflow

    uri = tracking_uri()
    try:
        from mlflow.tracking._tracking_service import utils as _tu
        old = _tu._tracking_uri
    except (ImportError, AttributeError):  # pragma: no cover - MLflow internals moved
        old = None
    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(old)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"


#: Records that ours are model-training experiments (MLflow's own tag for it). MLflow 3.17.2's UI
#: does not read it: the UI opens in its GenAI view until the user clicks "Model training" once
#: (the browser remembers it), as docs/mlflow.md says and the browser test does.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"


def _check_artifact_root(exp) -> None:
    """The default local store records each experiment's artifact folder as an absolute path: in a
    copied or moved clone it still names the original folder, so runs would write there. Refused
    in one line for a ``sqlite:///`` store whose artifacts lie outside the store's folder."""
    uri = tracking_uri()
    root = sqlite_root(uri)
    loc = exp.artifact_location or ""
    if root is None or not loc.startswith("file://"):
        return
    from urllib.parse import unquote, urlparse

    path = Path(unquote(urlparse(loc).path))
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        raise FerError(f"the MLflow store {sqlite_file(uri)} keeps experiment {exp.name!r}'s artifacts in "
                       f"{path}, outside {root} (a copied or moved clone?): runs here would write there. "
                       f"Move mlflow.db and mlartifacts/ aside to start a store of this clone's own, or set "
                       f"MLFLOW_TRACKING_URI to the original store") from None


def get_or_create_experiment(name: str) -> str:
    """The id of experiment ``name``, created if missing. On a SQLite store its artifacts go
    to ``<store folder>/mlartifacts/<name>`` (the repo root's ``mlartifacts/`` by default)."""
    from mlflow.exceptions import MlflowException

    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        _check_artifact_root(exp)
        if exp.tags.get(KIND_TAG) is None:
            c.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
        return exp.experiment_id
    root = sqlite_root(tracking_uri())
    location = (root / "mlartifacts" / _safe_name(name)).as_uri() if root else None
    try:
        return c.create_experiment(name, artifact_location=location, tags={KIND_TAG: KIND})
    except MlflowException:
        exp = c.get_experiment_by_name(name)  # created concurrently by another process
        if exp is None:
            raise
        return exp.experiment_id


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """``HEAD``'s commit hash (``-dirty`` appended when tracked files changed), or "unknown"."""
    try:
        kw = dict(cwd=cwd or os.getcwd(), capture_output=True, text=True, timeout=10)
        head = subprocess.run(["git", "rev-parse", "HEAD"], **kw)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **kw)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --------------------------------------------------------------------------- runs


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": "0.1"}`` (values as MLflow param strings)."""
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            s = str(v)
            out[key] = s if len(s) <= _PARAM_MAX else s[:_PARAM_MAX - 3] + "..."
    return out


def start_run(experiment: str, run_name: str, *, stage: str, dataset: str,
              params: dict | None = None, tags: dict | None = None, close_abandoned: bool = True) -> str:
    """Create a run (status RUNNING) in ``experiment``, tagged with the git commit, the DVC stage
    and the dataset, with ``params`` flattened; returns its id. Close it with :func:`end_run`.
    ``close_abandoned=False`` for runs whose life another owner manages (a sweep's trial runs:
    Tune restarts an interrupted trial in a new process and reuses its run, so a dead ``pid``
    there does not mean abandoned, and closing it would race the restart)."""
    from mlflow.entities import Param

    c = client()
    commit = git_commit()
    all_tags = {"git_commit": commit, "mlflow.source.git.commit": commit, "stage": stage,
                "dataset": dataset, "pid": os.getpid(), "host": socket.gethostname(), **(tags or {})}
    experiment_id = get_or_create_experiment(experiment)
    run = c.create_run(experiment_id, run_name=run_name, tags={k: str(v) for k, v in all_tags.items()})
    if close_abandoned:
        close_abandoned_runs(experiment_id, stage, dataset, by=run.info.run_id)
    flat = [Param(k, v) for k, v in flatten(params or {}).items()]
    for i in range(0, len(flat), 100):  # MLflow caps a batch at 100 params
        c.log_batch(run.info.run_id, params=flat[i:i + 100])
    return run.info.run_id


def close_abandoned_runs(experiment_id: str, stage: str, dataset: str, *, by: str) -> list[str]:
    """Runs of this stage and dataset left RUNNING by a process that is gone (killed: it never
    closed them) become KILLED, MLflow's status for it, with a tag saying why. Only runs this
    host started are judged (their ``pid`` tag); a run whose process still lives (a second
    `dvc exp` worker, say) is left alone. Returns the ids closed."""
    from pipeline.outputs import pid_alive

    c = client()
    host = socket.gethostname()
    closed = []
    try:
        runs = c.search_runs([experiment_id], max_results=200, filter_string=(
            f"attributes.status = 'RUNNING' and tags.stage = '{stage}' and tags.dataset = '{dataset}'"))
    except Exception:  # noqa: BLE001 - bookkeeping: never fail a stage over it
        return closed
    for r in runs:
        tags = r.data.tags
        if r.info.run_id == by or tags.get("host") != host or not str(tags.get("pid", "")).isdigit():
            continue
        pid = int(tags["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        c.set_tag(r.info.run_id, "killed_reason",
                  f"its process (pid {pid} on {host}) ended without closing the run; closed by run {by}")
        c.set_terminated(r.info.run_id, status="KILLED")
        closed.append(r.info.run_id)
    if closed:
        print(f"mlflow: marked {len(closed)} earlier {stage} run(s) of a killed process KILLED", flush=True)
    return closed


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """Mark a run FINISHED (or FAILED / KILLED)."""
    client().set_terminated(run_id, status=status)


@contextlib.contextmanager
def tracked_run(experiment: str, run_name: str, **kwargs):
    """:func:`start_run` for the block, yielding the run id; FINISHED when the block ends,
    FAILED when it raises (Ctrl-C included)."""
    run_id = start_run(experiment, run_name, **kwargs)
    try:
        yield run_id
    except BaseException:
        end_run(run_id, "FAILED")
        raise
    end_run(run_id)


def _numeric(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:  # numpy / torch scalars
        v = v.item()
    if isinstance(v, (int, float)) and not math.isnan(float(v)):
        return float(v)
    return None


def log_epoch(run_id: str, metrics: dict, epoch: int) -> None:
    """Log the numeric entries of ``metrics`` at ``step=epoch`` (others, and NaN, are skipped).
    Called by training rank 0 only."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, x, now, int(epoch)) for k, v in metrics.items()
             if (x := _numeric(v)) is not None]
    if batch:
        client().log_batch(run_id, metrics=batch)


def log_metrics(run_id: str, metrics: dict, step: int = 0, prefix: str = "") -> None:
    """Numeric entries of a (possibly nested) metrics dict, e.g. the evaluation JSON."""
    flat: dict[str, Any] = {}

    def walk(d: dict, p: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{p}{k}.")
            else:
                flat[f"{p}{k}"] = v

    walk(metrics, prefix)
    log_epoch(run_id, flat, step)


def log_artifacts(run_id: str, paths: Iterable[str | os.PathLike], artifact_path: str | None = None) -> None:
    """Upload files (and whole folders) to the run's artifacts."""
    c = client()
    for p in paths:
        p = Path(p)
        if p.is_dir():
            c.log_artifacts(run_id, str(p), artifact_path=artifact_path)
        elif p.is_file():
            c.log_artifact(run_id, str(p), artifact_path=artifact_path)
        else:
            raise FerError(f"artifact {p} not found")
