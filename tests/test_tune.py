"""Ray Tune sweeps: search-space config, params.yaml line edits, concurrency, and (slow) a 4-trial
ASHA sweep on synthetic faces that is interrupted, resumed, tracked in MLflow and applied."""
from __future__ import annotations

import argparse
import os
import signal
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params
from pipeline.errors import FerError
from pipeline.cluster import ensure_ray
from pipeline.tune import settings as S
from pipeline.tune import sweep as T
from tiny_project import NETWORK_AND_RAY, make_project

PARAMS = textwrap.dedent("""\
    # tiny params for the sweep test
    datasets:
      rafdb: raw/rafdb
    """) + NETWORK_AND_RAY + textwrap.dedent("""\
    train_rafdb:
      image_size: 56
      crop: 48
      epochs: 3
      batch_size: 32
      lr: 0.01                 # the learning rate
      weight_decay: 0.0005     # L2
      warmup_epochs: 0
      label_smoothing: 0.1
      seed: 0
    mlflow:
      experiment: sweep-test
    tune:
      num_samples: 2
      max_epochs: 3
      grace_period: 1
      reduction_factor: 2
      max_concurrent: 2
      space:
        lr: {grid: [0.05, 1.0e-6]}
        weight_decay: {loguniform: [1.0e-5, 1.0e-3]}
    """)


def _params(**tune_over) -> dict:
    p = yaml.safe_load(PARAMS)
    p["tune"].update(tune_over)
    return p


# --------------------------------------------------------------------------- fast
def test_settings_defaults_and_validation(tmp_path):
    s = T.tune_settings(_params())
    assert s["dataset"] == "rafdb" and s["max_epochs"] == 3 and s["workers_per_trial"] == 1
    assert s["max_concurrent"] == 2 and s["fixed"] == {}
    p = _params()
    del p["tune"]["max_epochs"]
    assert T.tune_settings(p)["max_epochs"] == 3  # from train_rafdb.epochs
    bad = [
        ({"bogus": 1}, "unknown key"),
        ({"space": {}}, "non-empty mapping"),
        ({"space": {"data": {"choice": ["a"]}}}, "cannot be tuned"),
        ({"space": {"epochs": {"choice": [1, 2]}}}, "cannot be tuned"),
        ({"space": {"lr": {"normal": [0, 1]}}}, "must be one of"),
        ({"space": {"lr": {"loguniform": [0, 1]}}}, "low > 0"),
        ({"space": {"lr": {"uniform": [1, 0.5]}}}, "low < high"),
        ({"space": {"batch_size": {"randint": [8, 64.5]}}}, "integers"),
        ({"space": {"lr": {"choice": []}}}, "non-empty list"),
        ({"dataset": "imagenet"}, "tune.dataset"),
        ({"num_samples": 0}, "num_samples"),
        ({"grace_period": 5}, "exceeds max_epochs"),
        ({"reduction_factor": 1}, "reduction_factor"),
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"name": "a/b"}, "tune.name"),
        ({"fixed": {"storage_path": "x"}}, "cannot be set here"),
        ({"dataset": "sfew", "space": {"lip_bottleneck": {"choice": [0.25, 0.5]}}}, "architecture"),
    ]
    p_sfew = _params()
    p_sfew["finetune_sfew"] = {"epochs": 3}
    for over, msg in bad:
        p = _params(**over) if "dataset" not in over or over["dataset"] != "sfew" else {
            **p_sfew, "tune": {**p_sfew["tune"], **over}}
        f = tmp_path / "params.yaml"  # as `fer tune` reads it: checked once, by load_params
        f.write_text(yaml.safe_dump(p))
        with pytest.raises(FerError, match=msg):
            T.tune_settings(load_params(f))
    with pytest.raises(FerError, match="no 'tune' section"):
        T.tune_settings({k: v for k, v in _params().items() if k != "tune"})


def test_build_space_maps_distributions():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = T.build_space({"lr": {"loguniform": [1e-3, 1e-1]}, "label_smoothing": {"uniform": [0.0, 0.2]},
                           "batch_size": {"choice": [32, 64]}, "warmup_epochs": {"randint": [0, 3]},
                           "weight_decay": {"grid": [1e-4, 5e-4]}, "dropout": 0.2})
    assert isinstance(space["lr"], Float) and isinstance(space["label_smoothing"], Float)
    assert isinstance(space["batch_size"], Categorical) and isinstance(space["warmup_epochs"], Integer)
    assert space["weight_decay"] == {"grid_search": [1e-4, 5e-4]} and space["dropout"] == 0.2


def test_sweep_name_stable_under_apply_and_cap():
    s = T.tune_settings(_params())
    base = {"lr": 0.01, "weight_decay": 5e-4, "batch_size": 32}
    n1 = T.sweep_name(s, base, "/x", "none")
    assert n1 == T.sweep_name(s, {**base, "lr": 0.05, "weight_decay": 1e-5}, "/x", "none")  # searched keys
    assert n1 == T.sweep_name({**s, "max_concurrent": 1}, base, "/x", "none")
    assert n1 != T.sweep_name(s, {**base, "batch_size": 64}, "/x", "none")
    assert n1 != T.sweep_name({**s, "num_samples": 3}, base, "/x", "none")
    assert T.sweep_name({**s, "name": "mine"}, base, "/x", "none") == "mine"


def test_set_yaml_values_keeps_comments_and_layout():
    text = PARAMS
    out = S.set_yaml_values(text, {"train_rafdb": {"lr": 0.0123, "weight_decay": 1.5e-05,
                                                   "max_rotate_deg": 5.0},
                                   "model": {"lip_bottleneck": 0.5}})
    before, after = text.splitlines(), out.splitlines()
    i = after.index("  max_rotate_deg: 5.0")  # appended after the section's last key
    assert after[i - 1].startswith("  seed: 0") and after[i + 1] == "mlflow:"
    changed = [(a, b) for a, b in zip(before, after[:i] + after[i + 1:]) if a != b]
    assert changed == [
        ("  lip_bottleneck: 0.25     # LIP logit bottleneck", "  lip_bottleneck: 0.5      # LIP logit bottleneck"),
        ("  lr: 0.01                 # the learning rate", "  lr: 0.0123               # the learning rate"),
        ("  weight_decay: 0.0005     # L2", "  weight_decay: 1.5e-05    # L2"),
    ]
    assert len(after) == len(before) + 1
    assert after[0] == "# tiny params for the sweep test"
    p = yaml.safe_load(out)
    assert p["train_rafdb"]["lr"] == 0.0123 and p["train_rafdb"]["weight_decay"] == 1.5e-05
    assert p["train_rafdb"]["max_rotate_deg"] == 5.0 and p["model"]["lip_bottleneck"] == 0.5
    assert {k: v for k, v in p.items() if k not in ("train_rafdb", "model")} == \
        {k: v for k, v in yaml.safe_load(text).items() if k not in ("train_rafdb", "model")}
    # a missing section is appended; a flow-style section keeps its style
    assert yaml.safe_load(S.set_yaml_values("a: 1\n", {"b": {"c": 2}})) == {"a": 1, "b": {"c": 2}}
    assert S.set_yaml_values("train_rafdb: {lr: 0.1}  # x\n", {"train_rafdb": {"lr": 0.2}}) == \
        "train_rafdb: {lr: 0.2}  # x\n"


def test_targets_best_and_table():
    assert T.targets({"lr": 0.1, "lip_bottleneck": 0.5}, "rafdb") == {
        "train_rafdb": {"lr": 0.1}, "model": {"lip_bottleneck": 0.5}}
    rows = [
        {"trial_id": "a", "params": {"lr": 0.1}, "epochs": 3, "val_accuracy": 0.4, "best_val_accuracy": 0.5,
         "status": "completed", "mlflow_run_id": "r1"},
        {"trial_id": "b", "params": {"lr": 0.2}, "epochs": 1, "val_accuracy": 0.9, "best_val_accuracy": 0.9,
         "status": "stopped", "mlflow_run_id": "r2"},
        {"trial_id": "c", "params": {"lr": 0.3}, "epochs": 3, "val_accuracy": 0.6, "best_val_accuracy": 0.6,
         "status": "completed", "mlflow_run_id": "r3"},
    ]
    assert T.pick_best(rows)["trial_id"] == "c"  # survivors of the full budget first
    assert T.pick_best(rows[1:2])["trial_id"] == "b"
    table = T.format_table(rows, "c").splitlines()
    assert table[0].split() == ["trial", "lr", "epochs", "val_acc", "best_val_acc", "status"]
    assert table[2].startswith("*  c") and "stopped" in table[3]


def test_cli_arguments():
    p = argparse.ArgumentParser()
    T.add_tune_arguments(p)
    a = p.parse_args(["--num-samples", "3", "--apply", "--no-resume", "--output", "x.yaml"])
    assert (a.num_samples, a.apply, a.resume, a.output, a.params) == (3, True, False, "x.yaml", "params.yaml")
    a = p.parse_args([])
    assert a.resume and not a.apply and a.num_samples is None and a.max_concurrent is None


def test_run_sweep_user_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(PARAMS)
    with pytest.raises(FerError, match="data/parquet/rafdb"):
        T.run_sweep("params.yaml")
    with pytest.raises(FerError, match="not found"):
        T.run_sweep("nope.yaml")
    Path("params.yaml").write_text(PARAMS.replace("  num_samples: 2", "  num_sample: 2"))
    with pytest.raises(FerError, match="unknown key"):
        T.run_sweep("params.yaml")


# --------------------------------------------------------------------------- slow: a real sweep
@pytest.fixture
def sweep_repo(tmp_path, monkeypatch):
    yield make_project(tmp_path, monkeypatch, PARAMS, {"rafdb": (300, 0)})


def _trial_runs(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string="tags.stage = 'tune_trial'") if exp else []


@pytest.mark.slow
def test_sweep_asha_mlflow_interrupt_resume_apply(sweep_repo):
    """4 trials (lr 0.05 / 1e-6 x 2 samples), 2 at a time: a 1e-6 trial that reaches a rung after
    a 0.05 trial is below the cutoff, so ASHA stops at least one trial early. The sweep is
    interrupted (SIGUSR1, as Ctrl-C) once a trial has finished, then resumed: finished trials are
    not executed again, the interrupted ones are."""
    import ray
    from mlflow import MlflowClient

    root = sweep_repo
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    ensure_ray()  # one Ray instance for all three calls (the sweep reuses it)
    try:
        at_interrupt: dict[str, dict] = {}
        done = threading.Event()

        def interrupt_after_first_trial():
            while not done.is_set():
                runs = _trial_runs(client, "sweep-test")
                finished = [r for r in runs if r.info.status == "FINISHED"]
                if finished:
                    for r in runs:
                        at_interrupt[r.info.run_id] = {
                            "status": r.info.status,
                            "steps": [m.step for m in client.get_metric_history(r.info.run_id, "val_accuracy")]}
                    os.kill(os.getpid(), signal.SIGUSR1)  # Tune's interrupt signal (as Ctrl-C)
                    return
                time.sleep(0.5)

        watcher = threading.Thread(target=interrupt_after_first_trial, daemon=True)
        watcher.start()
        t0 = time.perf_counter()
        with pytest.raises(FerError, match="interrupted"):
            T.run_sweep("params.yaml", output="reports/tune_best.yaml")
        done.set()
        watcher.join(timeout=10)
        assert any(v["status"] == "FINISHED" for v in at_interrupt.values())
        original = (root / "params.yaml").read_text()

        # resume: only unfinished trials run; then apply the best config
        r = T.run_sweep("params.yaml", output="reports/tune_best.yaml", apply=True)
        wall = time.perf_counter() - t0
        print(f"\nsweep wall time (interrupted + resumed): {wall:.0f} s; best {r['params']} "
              f"val_accuracy {r['best_val_accuracy']}\n{r['table']}")
        assert r["resumed"] and r["trials"] == 4 and r["concurrency"] == 2
        rows = {row["trial_id"]: row for row in r["rows"]}
        assert len(rows) == 4 and all(row["status"] != "error" for row in rows.values())
        # ASHA stopped at least one trial before max_epochs (3); at least one ran the full budget
        epochs = sorted(row["epochs"] for row in rows.values())
        assert epochs[0] < 3 and epochs[-1] == 3, epochs
        assert r["stopped_early"] == sum(e < 3 for e in epochs) >= 1

        # MLflow: one run per trial, all under the sweep's parent run
        exp = client.get_experiment_by_name("sweep-test")
        parents = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'tune'")
        assert [p.info.run_id for p in parents] == [r["mlflow_parent_run_id"]]
        trials = _trial_runs(client, "sweep-test")
        assert len(trials) == 4
        assert {t.data.tags["trial_id"] for t in trials} == set(rows)
        assert all(t.data.tags["mlflow.parentRunId"] == r["mlflow_parent_run_id"] for t in trials)
        assert all(t.info.status == "FINISHED" for t in trials)
        by_id = {t.info.run_id: t for t in trials}
        stopped = [t for t in trials if t.data.tags.get("stopped_early") == "true"]
        assert {t.data.tags["trial_id"] for t in stopped} == {k for k, v in rows.items() if v["status"] == "stopped"}
        # finished before the interrupt: not executed again (one start, same epochs logged)
        for run_id, before in at_interrupt.items():
            steps = [m.step for m in client.get_metric_history(run_id, "val_accuracy")]
            if before["status"] == "FINISHED":
                assert by_id[run_id].data.tags["executions"] == "1"
                assert steps == before["steps"]
            else:  # interrupted mid-run: restarted by the resume, from its Train checkpoint
                assert by_id[run_id].data.tags["executions"] == "2"
        for run_id in set(by_id) - set(at_interrupt):  # not started before the interrupt
            assert by_id[run_id].data.tags["executions"] == "1"

        # the best-config file, the model, and --apply
        best = yaml.safe_load((root / "reports" / "tune_best.yaml").read_text())
        assert best["best_trial"] in rows and best["sweep"] == r["sweep"]
        assert set(best["params"]) == {"lr", "weight_decay"}
        assert best["best_val_accuracy"] == pytest.approx(rows[best["best_trial"]]["best_val_accuracy"], abs=1e-6)
        assert best["mlflow_run_id"] == rows[best["best_trial"]]["mlflow_run_id"]
        assert Path(best["model_path"]).is_file()
        assert best["apply"] == {"train_rafdb": best["params"]}
        new = (root / "params.yaml").read_text()
        applied = yaml.safe_load(new)["train_rafdb"]
        assert applied["lr"] == best["params"]["lr"] and applied["weight_decay"] == best["params"]["weight_decay"]
        diff = [(a, b) for a, b in zip(original.splitlines(), new.splitlines()) if a != b]
        assert len(new.splitlines()) == len(original.splitlines())
        assert all(a.split(":")[0] in ("  lr", "  weight_decay") for a, _ in diff)
        assert "# the learning rate" in new and "# L2" in new and new.startswith("# tiny params")

        # a rerun (same settings after --apply) finds the finished sweep: nothing executes again
        before = {t.info.run_id: t.data.tags["executions"] for t in trials}
        r3 = T.run_sweep("params.yaml", output="reports/tune_best2.yaml")
        assert r3["sweep"] == r["sweep"] and r3["resumed"] and r3["best_trial"] == r["best_trial"]
        after = {t.info.run_id: t.data.tags["executions"] for t in _trial_runs(client, "sweep-test")}
        assert after == before
        assert ray.is_initialized() and ray.available_resources().get("CPU", 0) >= 1.9  # no leaked reservations
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- slow: the shipped params
@pytest.mark.slow
def test_fer_tune_runs_on_the_shipped_params(tmp_path, monkeypatch):
    """`fer tune` on the repository's own params.yaml, its `ray:` section as shipped
    (cpus_per_worker 2 on this 2-core machine): only the sweep's budget and the data are small.
    This once hung for ever: the trial's own CPU share left 1.99 of 2 CPUs for a 2-CPU worker."""
    import subprocess
    import sys

    shipped = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    root = make_project(tmp_path, monkeypatch, "", {"rafdb": (160, 0)})
    p = dict(shipped)
    p["tune"] = {**shipped["tune"], "num_samples": 2, "max_epochs": 1, "grace_period": 1}
    p["datasets"] = {"rafdb": "raw/rafdb"}
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    assert p["ray"] == shipped["ray"]
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "tune", "--params", "params.yaml"],
                          cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 trials on rafdb, 1 at a time" in proc.stdout
    best = yaml.safe_load((root / "reports" / "tune_best.yaml").read_text())
    assert 0 <= best["best_val_accuracy"] <= 1 and Path(best["model_path"]).is_file()
    assert "Traceback" not in proc.stderr and "WorkerGroupStartupTimeoutError" not in proc.stderr
