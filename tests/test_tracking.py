"""MLflow on a temporary SQLite store: runs, params, per-epoch metrics, artifacts, the registry,
the ``champion`` alias and the pyfunc model loaded back through ``models:/NAME@champion``."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import tracking as T
from pipeline.errors import FerError
from pipeline.infer import registry as R
from pipeline.data.classes import CLASSES
from pipeline.data.synthetic import render

from test_evaluate import make_assets

NAME = "lip-vgg16-testset"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh SQLite store for this module, via MLFLOW_TRACKING_URI (never the repo root)."""
    d = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{d}/mlflow.db")
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        yield d


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.getbasetemp() / "tiny_assets")


def test_tracking_uri_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////somewhere/else.db")
    assert T.tracking_uri() == "sqlite:////somewhere/else.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    monkeypatch.chdir(repo / "sub")
    assert T.tracking_uri() == f"sqlite:///{repo.resolve()}/mlflow.db"
    monkeypatch.chdir(tmp_path)  # not a git repo: the current directory
    assert T.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_flatten_params():
    assert T.flatten({"train": {"lr": 0.1, "opt": {"name": "sgd"}}, "seed": 1}) == {
        "train.lr": "0.1", "train.opt.name": "sgd", "seed": "1"}


def test_run_params_tags_metrics_artifacts(store, tmp_path):
    c = T.client()
    run_id = T.start_run("fer-tests", "train-1", stage="train_rafdb", dataset="rafdb",
                         params={"train": {"lr": 0.01, "epochs": 3}, "model": {"width": 0.0625}})
    for epoch in range(3):
        T.log_epoch(run_id, {"train_loss": 1.0 / (epoch + 1), "val_accuracy": 0.3 + 0.1 * epoch,
                             "images_per_s": np.float32(12.5), "note": "text is skipped",
                             "bad": float("nan")}, epoch)
    f = tmp_path / "curves.png"
    f.write_bytes(b"\x89PNG fake")
    T.log_artifacts(run_id, [f])
    run = c.get_run(run_id)
    assert run.info.status == "RUNNING"
    assert run.data.params == {"train.lr": "0.01", "train.epochs": "3", "model.width": "0.0625"}
    assert run.data.tags["stage"] == "train_rafdb" and run.data.tags["dataset"] == "rafdb"
    assert run.data.tags["git_commit"] == T.git_commit()
    assert set(run.data.metrics) == {"train_loss", "val_accuracy", "images_per_s"}
    hist = c.get_metric_history(run_id, "val_accuracy")
    assert [m.step for m in hist] == [0, 1, 2]
    assert [round(m.value, 6) for m in hist] == [0.3, 0.4, 0.5]
    assert [a.path for a in c.list_artifacts(run_id)] == ["curves.png"]
    exp = c.get_experiment(run.info.experiment_id)
    assert exp.name == "fer-tests"
    assert exp.artifact_location.startswith((store / "mlartifacts").as_uri())
    assert T.get_or_create_experiment("fer-tests") == run.info.experiment_id
    T.end_run(run_id)
    assert c.get_run(run_id).info.status == "FINISHED"
    with pytest.raises(FerError, match="missing.png not found"):
        T.log_artifacts(run_id, [tmp_path / "missing.png"])


@pytest.fixture(scope="module")
def registry(store, assets):
    """v1 acc 0.5 -> champion v1; v2 0.4 -> stays v1; v3 0.6 -> v3; v4 0.6 (tie) -> stays v3."""
    run_id = T.start_run("fer-tests", "evaluate", stage="evaluate", dataset="testset", params={})
    history = []
    for acc in (0.5, 0.4, 0.6, 0.6):
        v = R.log_and_register_model(run_id, assets["checkpoint"], registered_name=NAME,
                                     test_accuracy=acc)
        history.append((v, R.champion(NAME)))
    return run_id, history


def test_champion_moves_only_to_a_better_version(registry):
    _, history = registry
    assert [v for v, _ in history] == [1, 2, 3, 4]
    assert [champ for _, champ in history] == [(1, 0.5), (1, 0.5), (3, 0.6), (3, 0.6)]
    mv = T.client().get_model_version(NAME, "2")
    assert float(mv.tags[R.ACCURACY_TAG]) == pytest.approx(0.4)
    assert R.champion("no-such-model") is None


def test_logged_model_belongs_to_the_run(registry):
    run_id, _ = registry
    c = T.client()
    mv = c.get_model_version(NAME, "3")
    assert mv.run_id == run_id
    run = c.get_run(run_id)
    assert any(o.model_id for o in run.outputs.model_outputs)


def test_champion_loads_with_pyfunc_and_predicts_raw_faces(registry, assets):
    import mlflow.pyfunc

    from pipeline.infer.predictor import Predictor

    assert os.environ["MLFLOW_TRACKING_URI"].startswith("sqlite:///")
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    jpegs = [render(label, "rafdb", seed=5, index=label) for label in (0, 3, 6)]
    arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpegs]

    out_bytes = model.predict(pd.DataFrame({"image": jpegs}))
    assert list(out_bytes.columns) == ["label", *CLASSES]
    assert len(out_bytes) == 3 and set(out_bytes["label"]) <= set(CLASSES)
    probs = out_bytes[list(CLASSES)].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (out_bytes["label"] == [CLASSES[i] for i in probs.argmax(1)]).all()

    # uint8 HxWx3 arrays: the same preprocessing (the signature declares the served base64
    # column, so arrays go to the unwrapped model)
    out_arrays = model.unwrap_python_model().predict(None, arrays)
    np.testing.assert_allclose(out_arrays[list(CLASSES)].to_numpy(), probs, atol=1e-6)
    out_b64 = model.predict(pd.DataFrame({"image": [base64.b64encode(b).decode() for b in jpegs]}))
    np.testing.assert_allclose(out_b64[list(CLASSES)].to_numpy(), probs, atol=1e-6)

    # what `mlflow models serve` does with a JSON request (binary columns travel as base64)
    from mlflow.pyfunc import scoring_server

    body = json.dumps({"dataframe_split": {"columns": ["image"],
                                           "data": [[base64.b64encode(b).decode()] for b in jpegs]}})
    resp = scoring_server.invocations(body, "application/json", model, None)
    assert resp.status == 200, resp.response
    served = json.loads(resp.response)["predictions"]
    np.testing.assert_allclose([[p[c] for c in CLASSES] for p in served], probs, atol=1e-6)

    local = Predictor(assets["checkpoint"], device="cpu").predict_faces(jpegs)
    np.testing.assert_allclose([[p["probabilities"][c] for c in CLASSES] for p in local], probs,
                               atol=1e-6)


def test_a_killed_stages_run_is_marked_killed_by_the_next_one(store):
    """A stage killed with SIGKILL leaves its MLflow run RUNNING; the next run of the same stage
    and dataset marks it KILLED with a tag saying why. A RUNNING run whose process lives is kept."""
    import signal
    import sys
    import time

    from mlflow import MlflowClient

    code = ("import sys, time; from pipeline import tracking as T; "
            "print(T.start_run('kill-test', 'train-x', stage='train_rafdb', dataset='rafdb'), flush=True); "
            "time.sleep(600)")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        ids = [p.stdout.readline().strip() for p in procs]
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=30)
        c = MlflowClient()
        assert [c.get_run(i).info.status for i in ids] == ["RUNNING", "RUNNING"]
        other = T.start_run("kill-test", "evaluate-x", stage="evaluate", dataset="rafdb")
        assert c.get_run(ids[0]).info.status == "RUNNING"  # another stage judges only its own runs
        new = T.start_run("kill-test", "train-y", stage="train_rafdb", dataset="rafdb")
        killed, alive = c.get_run(ids[0]), c.get_run(ids[1])
        assert killed.info.status == "KILLED" and new in killed.data.tags["killed_reason"]
        assert f"pid {procs[0].pid}" in killed.data.tags["killed_reason"]
        assert alive.info.status == "RUNNING"  # its process still runs
        for i in (other, new):
            T.end_run(i)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


def test_a_sweeps_interrupted_trial_run_is_left_to_its_resume(store):
    """An interrupted sweep leaves its trial runs RUNNING with the pid of a trial process that is
    gone; Tune restarts the trial in a new process and reuses the run. A second trial starting
    meanwhile must not mark the first KILLED (that raced the restart and left a resumed trial's
    run KILLED after it finished), and the resumed trial takes the run over with its own pid."""
    import os
    import sys

    from mlflow import MlflowClient

    from pipeline.tune import runs as sweep_runs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    ctx = {"experiment": "sweep-race", "sweep": "sweep-x", "dataset": "rafdb", "git_commit": "abc",
           "parent_run_id": T.start_run("sweep-race", "sweep-x", stage="tune", dataset="rafdb")}
    first = sweep_runs.trial_run(ctx, "t0", {"lr": 0.1}, {"lr": 0.1})
    c = MlflowClient()
    c.set_tag(first, "pid", str(dead.pid))  # as if its trial process had been interrupted
    second = sweep_runs.trial_run(ctx, "t1", {"lr": 0.2}, {"lr": 0.2})
    assert c.get_run(first).info.status == "RUNNING"
    assert sweep_runs.trial_run(ctx, "t0", {"lr": 0.1}, {"lr": 0.1}) == first  # the resume
    run = c.get_run(first)
    assert run.info.status == "RUNNING" and run.data.tags["pid"] == str(os.getpid())
    assert run.data.tags[sweep_runs.STARTS_TAG] == "2"
    for i in (first, second, ctx["parent_run_id"]):
        T.end_run(i)


def test_a_damaged_or_empty_store_is_one_line_and_left_as_it_is(tmp_path, monkeypatch):
    """A store truncated to half its size, or a 0-byte one: every entry point says so in one line
    naming the file (the stages through `client()`, `fer predict` before touching the store),
    and the file is not replaced by a fresh store."""
    import sys

    from mlflow import MlflowClient

    good = tmp_path / "good.db"
    MlflowClient(tracking_uri=f"sqlite:///{good}").search_experiments(max_results=1)
    data = good.read_bytes()
    for name, content in (("half", data[: len(data) // 2]), ("empty", b"")):
        db = tmp_path / f"{name}.db"
        db.write_bytes(content)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
        T._READY.discard(f"sqlite:///{db}")
        with pytest.raises(FerError, match=rf"the MLflow store {db} is .*mv {db} {db}.damaged"):
            T.client()
        photo = tmp_path / "face.png"
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(photo)
        r = subprocess.run([sys.executable, "-m", "pipeline.cli", "predict", str(photo), "--model",
                            "models:/lip-vgg16-rafdb@champion"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert f"the MLflow store {db} is" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert db.read_bytes() == content  # not re-created, not touched


def test_experiment_kind_and_a_copied_store_pointing_outside(tmp_path, monkeypatch):
    """New experiments are model-training ones (MLflow's UI then opens on runs and models, not
    GenAI traces); a store copied with its repo still names the original artifact folder, which
    is refused in one line instead of written into."""
    import shutil

    orig, copy = tmp_path / "orig", tmp_path / "copy"
    orig.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{orig}/mlflow.db")
    exp_id = T.get_or_create_experiment("kind-test")
    c = T.client()
    assert c.get_experiment(exp_id).tags[T.KIND_TAG] == "custom_model_development"
    assert T.get_or_create_experiment("kind-test") == exp_id  # inside its own folder: fine
    shutil.copytree(orig, copy)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{copy}/mlflow.db")
    with pytest.raises(FerError, match=rf"keeps experiment 'kind-test'.s artifacts in {orig}/mlartifacts"):
        T.get_or_create_experiment("kind-test")
