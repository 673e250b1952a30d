"""Every workaround for a Ray behaviour, in one place, each naming what it is for.

They were written against Ray 2.60.0 (:data:`CHECKED_WITH_RAY`); tests/test_ray_workarounds.py
fails when requirements.lock moves Ray, so that each is rechecked (still needed? still works?)
and this pin moved with it.

1. **Placement groups that outlive a stopped Tune trial** (Ray Train V2, 2.5x-2.60;
   ray-project/ray#58515, #54305, #53921): ``needed``, ``trainer_class``, ``release``,
   ``release_all``, ``release_stopped_trials_callback``.
2. **Ray Train's per-report log line** ("Reporting training result ...", each epoch on every
   worker): its logger is named after its file path, so ``LoggingConfig`` misses it
   (``quiet_report_logger``, called when :mod:`pipeline` is imported, in every process).
3. **Tracebacks for an expected node loss**: dozens of lines per dead worker and per surviving
   peer before Ray restarts the group, and the controller's traceback when no node is left that
   can hold a worker (``PeerFailureFilter``, installed in every process of the job by Ray's
   ``worker_process_setup_hook`` = ``one_line_peer_failures``).
4. **Lines printed twice in a worker**: Ray Train V2 patches ``print`` to tee into its logger
   (``say`` writes to stdout directly); its per-report INFO lines also reach the console through
   the root logger (``quiet_ray_train_logger``, in the face-set loop).
5. **Ray Train's preemption watcher on one machine**: it follows nodes being drained; a private
   one-machine instance has none, and the watcher only logs a core_worker error
   (``no_preemption_watcher_on_one_machine``, before a private ``ray.init``).
6. **A user error inside a worker is retried and printed as a traceback**: Ray Train's
   ``DefaultFailurePolicy`` retries every worker-group error up to ``max_failures`` (it has no
   notion of an error that will fail the same way again), and each worker logs "Error in training
   function" with the whole traceback. Our own :class:`~pipeline.errors.FerError` (bad data, a bad
   setting: deterministic) fails the run at once (``UserErrorsFailAtOnce``, through the trainer
   ``trainer_class`` returns) and its worker log record is dropped (``PeerFailureFilter``): the
   driver prints its one line (``user_error``). Bugs keep their traceback and their retries.

The placement-group workaround in detail:

Ray Train V2 (Ray 2.5x-2.60) removes a run's worker-group placement group through a detached
``PlacementGroupCleaner`` actor (ray-project/ray#58515, for the leak of ray-project/ray#54305 and
#53921). That cleaner polls the controller's liveness through the State API, which needs the
dashboard; a ``ray[train,tune]`` install without it logs "Failed to query Ray Train Controller
actor state" every few seconds and never cleans up. So when ASHA stops a trial (its actor is
killed, and the Train controller with it, before it can remove its placement group), the trial's
CPUs/GPUs stay reserved until Ray shuts down and later trials wait forever.

Here the cleaner callback is replaced by one that records each worker group's placement group in
a file; :class:`ReleaseStoppedTrials` (a Tune callback on the sweep's driver) removes them once
the trial has ended. The workaround turns itself off where it is not needed: on a Ray without
that callback class, or on a cluster whose State API answers (Ray's own cleaner works there).
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path

CHECKED_WITH_RAY = "2.60.0"


# --------------------------------------------------------------------------- 2. the report line


def quiet_report_logger(level: str) -> None:
    """Ray Train 2.x names the logger of its per-report line after its file path, not its
    module, so ``LoggingConfig`` misses it and every worker prints "Reporting training result
    ..." each epoch. Called when :mod:`pipeline` is imported, which every Ray worker that runs
    our code does; the file is found without importing Ray."""
    import importlib.util

    spec = importlib.util.find_spec("ray")
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(base, "train", "v2", "_internal", "execution", "context.py")
        logging.getLogger(path).setLevel(level)



# --------------------------------------------------------------------------- 3. node-loss tracebacks


class PeerFailureFilter(logging.Filter):
    """When a node dies, Ray Train logs a traceback in its controller for every dead worker
    (``ActorDiedError ... its node has died``) and the surviving workers log their collective's
    ``Connection reset by peer`` traceback, dozens of lines per failure, before it restarts the
    group from the last checkpoint. Those records become one line each; any other error (a bug in
    the training code) keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__name__ in PLACEMENT_ERRORS:
            # the controller's traceback for a worker group it cannot place: the driver says it
            # in one line (pipeline.cluster.placement_failure), so here its first line only
            record.msg = record.getMessage().splitlines()[0][:300]
        elif exc is not None and type(exc).__name__ in ("ActorDiedError", "ActorUnavailableError", "RayActorError"):
            why = [ln.strip() for ln in str(exc).splitlines()
                   if ln.strip().startswith(("pid:", "ip:", "The actor died because", "the actor's node"))]
            record.msg = f"{record.getMessage()} [{type(exc).__name__}: {'; '.join(why) or str(exc)[:200]}]"
        else:
            text = record.getMessage()
            if text.startswith("Error in training function") and USER_ERROR.search(text):
                return False  # workaround 6: the driver prints the FerError's line
            if not (text.startswith("Error in training function") and PEER_GONE.search(text)):
                return True
            last = [ln.strip() for ln in text.splitlines() if ln.strip()][-1]
            record.msg = f"a peer worker went away during a collective ({last[:200]}); Ray Train restarts the group"
        record.args, record.exc_info, record.exc_text = (), None, None
        return True


#: Ray Train's errors for a worker group that cannot be placed (no node has what a worker asks for).
PLACEMENT_ERRORS = ("WorkerGroupStartupTimeoutError", "WorkerGroupStartupFailedError")

#: What a collective raises in the survivors when a peer process or its node died (gloo, NCCL).
PEER_GONE = re.compile(r"Connection (reset|closed) by peer|NCCL communicator was aborted"
                        r"|remote process exited or there was a network error")


#: The last line of a worker traceback that ends in our own user-facing error.
USER_ERROR = re.compile(r"^pipeline\.errors\.FerError: ", re.M)


def one_line_peer_failures() -> None:
    """Ray's ``worker_process_setup_hook`` for every process of the job (Train controller and
    workers included): :class:`PeerFailureFilter` on the handlers that print Ray's logs."""
    for name in ("ray", "ray.train", ""):
        for h in logging.getLogger(name).handlers:
            if not any(isinstance(f, PeerFailureFilter) for f in h.filters):
                h.addFilter(PeerFailureFilter())
    for name in ("ray.train.v2._internal.util", "ray.train.v2._internal.callbacks.backend_setup",
                 "ray.train.v2._internal.execution.controller.controller"):
        lg = logging.getLogger(name)  # also on the loggers themselves: handlers may be added later
        if not any(isinstance(f, PeerFailureFilter) for f in lg.filters):
            lg.addFilter(PeerFailureFilter())


# --------------------------------------------------------------------------- 4. lines twice


def say(msg: str) -> None:
    """Print once from a Ray Train worker (``print`` there shows every line twice)."""
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def quiet_ray_train_logger(level: str) -> None:
    logging.getLogger("ray.train").setLevel(level)


# --------------------------------------------------------------------------- 5. preemption watcher


def no_preemption_watcher_on_one_machine() -> None:
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


# --------------------------------------------------------------------------- 6. user errors


def user_error(e: BaseException) -> str | None:
    """The FerError line a worker failed with (``e`` from ``trainer.fit()``), or None."""
    from pipeline.errors import FerError

    for failure in (getattr(e, "worker_failures", None) or {}).values():
        base = getattr(failure, "_base_exc", failure)  # UserExceptionWithTraceback wraps it
        if isinstance(base, FerError):
            return str(base)
    return None


def _user_errors_fail_at_once():
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

    class UserErrorsFailAtOnce(DefaultFailurePolicy):
        """Ray's policy, but a worker's FerError is raised, not retried: it would fail again."""

        def make_decision(self, training_failed_error):
            if user_error(training_failed_error) is not None:
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    return UserErrorsFailAtOnce


# --------------------------------------------------------------------------- 1. placement groups



PG_FILE = "placement_groups.txt"


def needed() -> bool:
    """True when Ray's own cleaner cannot work: its callback exists but the State API does not
    answer (no dashboard). Asked once, on the driver, after ``ray.init``."""
    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import (  # noqa: F401
            PlacementGroupCleanerCallback)
    except ImportError:
        return False
    try:
        from ray.util.state import list_actors

        list_actors(limit=1, timeout=5, raise_on_missing_output=False)
        return False
    except Exception:  # noqa: BLE001 - any failure means: no State API here
        return True


def trainer_class(pg_file: str | None):
    """``TorchTrainer`` whose worker FerErrors fail at once (workaround 6), and (``pg_file``
    given) that records its placement groups there instead of starting Ray's cleaner."""
    from ray.train.torch import TorchTrainer

    policy = _user_errors_fail_at_once()

    class FailAtOnceTorchTrainer(TorchTrainer):
        def _initialize_and_run_controller(self, **kwargs):
            kwargs["failure_policy"] = policy(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**kwargs)

    if not pg_file:
        return FailAtOnceTorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class _Record(PlacementGroupCleanerCallback):
        def __init__(self):
            super().__init__()

        def after_controller_start(self, train_run_context) -> None:
            pass  # no detached cleaner actor

        def after_worker_group_start(self, worker_group) -> None:
            pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
            with open(pg_file, "a") as f:
                f.write(pg.id.hex() + "\n")

    class RecordingTorchTrainer(FailAtOnceTorchTrainer):
        def _create_default_callbacks(self):
            return [_Record() if type(c) is PlacementGroupCleanerCallback else c
                    for c in super()._create_default_callbacks()]

    return RecordingTorchTrainer


def release(pg_file: str | Path) -> int:
    """Remove the placement groups listed in ``pg_file`` that still exist; returns how many."""
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
        except Exception:  # noqa: BLE001 - already gone, or the cluster is shutting down
            pass
    return n


def release_stopped_trials_callback(trials_dir: str):
    """A Tune callback that releases an ended trial's placement groups (its file is
    ``<trials_dir>/<trial id>/placement_groups.txt``). The trial's actor and its Train controller
    go away a moment after the trial ends, so each is re-checked every 2 s for a minute, in case
    a dying controller had started another worker group."""
    from ray.tune import Callback

    class ReleaseStoppedTrials(Callback):
        def __init__(self):
            self.pending: dict[str, float] = {}   # trial id -> when it ended
            self.checked: dict[str, float] = {}

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.pending[trial.trial_id] = time.monotonic()

        on_trial_error = on_trial_complete

        def on_step_begin(self, iteration, trials, **info):
            now = time.monotonic()
            for trial_id, ended in list(self.pending.items()):
                if now - ended < 2 or now - self.checked.get(trial_id, 0) < 2:
                    continue
                self.checked[trial_id] = now
                release(Path(trials_dir) / trial_id / PG_FILE)
                if now - ended > 60:
                    del self.pending[trial_id]

    return ReleaseStoppedTrials()


def release_all(trials_dir: str | Path) -> None:
    """After a sweep (finished or interrupted: every trial actor is gone), release what is left."""
    time.sleep(1.0)
    for f in Path(trials_dir).glob(f"*/{PG_FILE}"):
        release(f)
