"""Workaround: Ray Train V2 placement groups that outlive a stopped Tune trial.

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

import time
from pathlib import Path

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
    """``TorchTrainer``, or (``pg_file`` given) a subclass that records its placement groups
    there instead of starting Ray's cleaner."""
    from ray.train.torch import TorchTrainer

    if not pg_file:
        return TorchTrainer
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

    class RecordingTorchTrainer(TorchTrainer):
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
