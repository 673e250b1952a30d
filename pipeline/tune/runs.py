"""A sweep's MLflow runs: one parent run per sweep, one child run per trial (tags ``sweep``,
``trial_id``, ``mlflow.parentRunId``), reused when an interrupted sweep resumes, and closed with
how each trial ended."""
from __future__ import annotations

import os
from typing import Any

STARTS_TAG = "executions"      # trial MLflow runs: how many times the trial function started


def find_runs(experiment_id: str, **tags: str) -> list:
    from pipeline.tracking import client

    flt = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    return client().search_runs([experiment_id], filter_string=flt, max_results=1000,
                                order_by=["attributes.start_time DESC"])


def parent_run(ctx: dict[str, Any], params: dict[str, Any], resumed: bool) -> str:
    from pipeline import tracking

    exp_id = tracking.get_or_create_experiment(ctx["experiment"])
    runs = find_runs(exp_id, sweep=ctx["sweep"], stage="tune") if resumed else []
    if runs:  # the interrupted sweep's own parent run (the newest with this name)
        run_id = runs[0].info.run_id
        tracking.client().set_tag(run_id, "pid", str(os.getpid()))
        tracking.client().update_run(run_id, status="RUNNING")
        tracking.client().set_tag(run_id, "resumed", "true")
        return run_id
    return tracking.start_run(ctx["experiment"], ctx["sweep"], stage="tune", dataset=ctx["dataset"],
                              params={"tune": params["tune"], "base": ctx["base"]},
                              tags={"sweep": ctx["sweep"], "sweep_path": ctx["experiment_path"]})


def trial_run(ctx: dict[str, Any], trial_id: str, cfg_dict: dict[str, Any], sampled: dict[str, Any]) -> str:
    """The trial's MLflow run (created once; a restarted trial reuses it and counts the start)."""
    from pipeline import tracking

    c = tracking.client()
    exp_id = tracking.get_or_create_experiment(ctx["experiment"])
    runs = find_runs(exp_id, sweep=ctx["sweep"], trial_id=trial_id)
    if runs:
        run = runs[0]
        starts = int(run.data.tags.get(STARTS_TAG, "1")) + 1
        c.set_tag(run.info.run_id, STARTS_TAG, str(starts))
        c.set_tag(run.info.run_id, "pid", str(os.getpid()))  # the process running it now
        c.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    return tracking.start_run(
        ctx["experiment"], f"{ctx['sweep']}-{trial_id}", stage="tune_trial", dataset=ctx["dataset"],
        params=cfg_dict,
        tags={"mlflow.parentRunId": ctx["parent_run_id"], "sweep": ctx["sweep"], "trial_id": trial_id,
              STARTS_TAG: "1", "searched": ",".join(sorted(sampled)), "git_commit": ctx["git_commit"],
              "mlflow.source.git.commit": ctx["git_commit"]},
        close_abandoned=False)


def trial_callback(ctx: dict[str, Any]):
    from ray.tune import Callback

    class MlflowTrialCallback(Callback):
        """Driver side: close each trial's MLflow run with how it ended (ASHA stop, error)."""

        def __init__(self, ctx: dict[str, Any]):
            self.ctx = ctx

        def _close(self, trial, status: str) -> None:
            from pipeline import tracking

            try:
                exp_id = tracking.get_or_create_experiment(self.ctx["experiment"])
                runs = find_runs(exp_id, sweep=self.ctx["sweep"], trial_id=trial.trial_id)
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
            self._close(trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial, "FAILED")

    return MlflowTrialCallback(ctx)
