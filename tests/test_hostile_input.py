"""Hostile and broken input, one row per case, run as a user runs it (a subprocess of `fer` or a
stage script): the exit code, exactly one error line and no traceback, and every pre-existing
output byte-identical afterwards. The malicious-model rows build their payload here and check
that it never ran."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.outputs import output_lock
from pipeline.data.synthetic import render, write_synthetic

from test_evaluate import make_assets

REPO = Path(__file__).resolve().parents[1]
PWNED = "pwned.txt"  # what a payload would create


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes); empty when it does not exist."""
    if not root.exists():
        return {}
    if root.is_file():
        return {"": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run(argv: list[str], cwd: Path, env: dict | None = None, timeout: float = 180,
        prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db",
         **(env or {})}
    return subprocess.run([*(prefix or []), sys.executable, *argv], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=timeout)


def fer(*args: str) -> list[str]:
    return ["-m", "pipeline.cli", *args]


def stage(name: str, item: str | None = None) -> list[str]:
    """The stage's command line as dvc.yaml writes it (``item``: the foreach key)."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][name]
    cmd = spec["do"]["cmd"] if "do" in spec else spec["cmd"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    keyed = "${key}" in cmd  # foreach over a mapping: ${key} is the name, ${item} its value
    value = params["datasets"].get(item, "x") if keyed else (item or "")
    cmd = cmd.replace("${key}", item or "").replace("${item}", value)
    return cmd.split()[1:]  # without "python"


# --------------------------------------------------------------------------- payloads


class _Payload:
    """Unpickling this runs ``touch`` of the marker: what a crafted model folder would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_model_folder(folder: Path, marker: Path, *, checkpoint_payload: bool = False) -> Path:
    """A logged-model folder whose MLmodel looks like ours; python_model.pkl (and, optionally,
    the checkpoint artifact itself) unpickle to a command."""
    (folder / "artifacts").mkdir(parents=True)
    (folder / "python_model.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    pyfunc = {"loader_module": "mlflow.pyfunc.model", "python_model": "python_model.pkl",
              "env": {"virtualenv": "python_env.yaml"}}
    if checkpoint_payload:
        pyfunc["artifacts"] = {"checkpoint": {"path": "artifacts/model.pt"}}
        (folder / "artifacts" / "model.pt").write_bytes(pickle.dumps(_Payload(marker)))
    (folder / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": pyfunc}}))
    return folder


def face_jpeg(path: Path, label: int = 3) -> Path:
    path.write_bytes(render(label, "rafdb", seed=9, index=label))
    return path


# --------------------------------------------------------------------------- the table


@dataclasses.dataclass
class Case:
    id: str
    setup: Callable[[Path], list[str]]       # builds the inputs, returns the argv
    rc: int                                  # 0, or 2 (a user error)
    says: str = ""                           # in the one error line (rc != 0)
    keep: tuple[str, ...] = ()               # paths whose bytes must not change
    check: Callable[[Path, subprocess.CompletedProcess], None] | None = None
    during: Callable[[Path], contextlib.AbstractContextManager] | None = None
    env: Callable[[Path], dict] | None = None
    prefix: list[str] | None = None


def _raf(tmp: Path, n: int = 40) -> Path:
    write_synthetic(tmp / "raf", layout="rafdb", n=n, seed=1)
    return tmp / "raf"


def _thesis(tmp: Path) -> Path:
    d = tmp / "thesis"
    (d / "sub").mkdir(parents=True)
    (d / "thesis.txt").write_text("three years of work")
    (d / "sub" / "notes.md").write_text("# notes")
    return d


def _project(tmp: Path, edit: Callable[[dict], object] | None = None, text: str | None = None,
             previous: tuple[str, ...] = ()) -> None:
    """A project folder: params.yaml (edited), plus previous outputs a stage must not lose."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["synth"]["rafdb"]["n"] = 30
    if edit:
        edit(params)
    (tmp / "params.yaml").write_text(text if text is not None else yaml.safe_dump(params))
    if "synthetic" in previous or "parquet" in previous:
        write_synthetic(tmp / "data/synthetic/rafdb", layout="rafdb", n=30, seed=0)
    if "parquet" in previous:
        from pipeline.data.ingest import ingest
        ingest(tmp / "data/synthetic/rafdb", tmp / "data/parquet/rafdb",
               report_path=tmp / "reports/ingest_rafdb.json", progress=False, workers=1)


def _set(path: str, value):
    def edit(params):
        d = params
        *head, last = path.split(".")
        for k in head:
            d = d[k]
        if value is _DELETE:
            del d[last]
        else:
            d[last] = value
    return edit


_DELETE = object()


def _predict_setup(model: Callable[[Path], str], photos: Callable[[Path], list[str]] | None = None):
    def setup(tmp: Path) -> list[str]:
        files = photos(tmp) if photos else [str(face_jpeg(tmp / "face.jpg"))]
        return fer("predict", *files, "--model", model(tmp), "--device", "cpu")
    return setup


def _evil_registry(tmp: Path, kind: str) -> str:
    """Register the crafted folder in a real SQLite registry (as a shared registry would hold it)."""
    from mlflow import MlflowClient

    evil = evil_model_folder(tmp / "evil", tmp / PWNED)
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    if kind == "runs":
        exp = c.create_experiment("e", artifact_location=(tmp / "art").as_uri())
        run = c.create_run(exp)
        c.log_artifacts(run.info.run_id, str(evil), artifact_path="model")
        return f"runs:/{run.info.run_id}/model"
    c.create_registered_model("evil")
    c.create_model_version("evil", source=evil.as_uri())
    c.set_registered_model_alias("evil", "champion", "1")
    return "models:/evil@champion" if kind == "alias" else "models:/evil/1"


def _no_payload_ran(tmp: Path, _res) -> None:
    assert not (tmp / PWNED).exists(), "the crafted model's pickle was executed"


def _photos_broken_among_good(tmp: Path) -> list[str]:
    (tmp / "broken.jpg").write_bytes(face_jpeg(tmp / "x.jpg").read_bytes()[:200])
    return [str(face_jpeg(tmp / "a.jpg", 0)), str(tmp / "broken.jpg"), str(face_jpeg(tmp / "c.jpg", 6))]


def _two_of_three_predicted(tmp: Path, res) -> None:
    out = res.stdout
    assert "a.jpg: " in out and "c.jpg: " in out and "broken.jpg: error:" in out
    assert "1 of 3 photos" in res.stderr


def _bomb(tmp: Path) -> list[str]:
    buf = io.BytesIO()
    Image.new("L", (10000, 10000)).save(buf, "PNG")
    (tmp / "bomb.png").write_bytes(buf.getvalue())
    return [str(tmp / "bomb.png")]


def _non_utf8(tmp: Path) -> list[str]:
    """A file name that is not UTF-8, in a folder layout (SFEW) and in RAF-DB's label list."""
    write_synthetic(tmp / "sfew", layout="sfew", n=40, seed=2)
    happy = tmp / "sfew/Train/Train_Aligned_Faces/Happy"
    shutil.copyfile(next(happy.iterdir()), os.fsencode(happy) + b"/caf\xe9.png")
    raf = _raf(tmp)
    labels = raf / "EmoLabel/list_patition_label.txt"
    shutil.copyfile(raf / "Image/aligned/train_00001_aligned.jpg",
                    os.fsencode(raf / "Image/aligned") + b"/train_\xff_aligned.jpg")
    labels.write_bytes(labels.read_bytes() + b"train_\xff.jpg 4\n")
    assert run(fer("ingest", str(raf), str(tmp / "pq_raf"), "--report", str(tmp / "r0.json")),
               tmp).returncode == 0
    return fer("ingest", str(tmp / "sfew"), str(tmp / "pq"), "--report", str(tmp / "r.json"))


def _non_utf8_recorded(tmp: Path, _res) -> None:
    def sources(folder):
        return [s for f in sorted(folder.glob("*.parquet"))
                for s in pq.read_table(f).column("source").to_pylist()]

    assert "Train/Train_Aligned_Faces/Happy/caf\\xe9.png" in sources(tmp / "pq")
    assert "Image/aligned/train_\\xff_aligned.jpg" in sources(tmp / "pq_raf")


def _sfew_with_holes(tmp: Path) -> list[str]:
    write_synthetic(tmp / "sfew", layout="sfew", n=60, seed=2)
    (tmp / "sfew/Train/Train_Aligned_Faces/Unread").mkdir()   # filled, then made unreadable
    for i in range(2):
        (tmp / f"sfew/Train/Train_Aligned_Faces/Unread/{i}.png").write_bytes(b"x")
    os.chmod(tmp / "sfew/Train/Train_Aligned_Faces/Unread", 0)
    shutil.rmtree(tmp / "sfew/Train/Train_Aligned_Faces/Fear")
    (tmp / "sfew/Train/Train_Aligned_Faces/Fear").mkdir()       # an empty class folder
    return fer("ingest", str(tmp / "sfew"), str(tmp / "pq"), "--report", str(tmp / "r.json"),
               "--max-bad-fraction", "1")


def _three_faces(tmp: Path) -> list[str]:
    """Three faces of one class: ingest once accepted it (rc 0, val 0 / test 0, no warning) and
    training then failed inside its Ray worker, retried, with two tracebacks."""
    write_synthetic(tmp / "raf", layout="rafdb", n=60, seed=4)
    lines = (tmp / "raf/EmoLabel/list_patition_label.txt").read_text().splitlines()
    keep = [ln for ln in lines if ln.startswith("train_")][:3]
    keep = [f"{ln.split()[0]} 4" for ln in keep]
    (tmp / "raf/EmoLabel/list_patition_label.txt").write_text("\n".join(keep) + "\n")
    return fer("ingest", str(tmp / "raf"), str(tmp / "pq"), "--report", str(tmp / "r.json"))


def _holes_reported(tmp: Path, _res) -> None:
    os.chmod(tmp / "sfew/Train/Train_Aligned_Faces/Unread", 0o755)  # let pytest clean up
    rep = json.loads((tmp / "r.json").read_text())
    unread = [r for r in rep["rejected"] if r["source"].endswith("Unread")]
    assert unread and unread[0]["reason"].startswith("unreadable folder")
    assert rep["bad"]["train"]["bad"] >= 1                        # counts toward max_bad_fraction
    assert {"source": "Train/Train_Aligned_Faces/Fear", "reason": "empty folder", "split": "train"} \
        in rep["warnings"]


# Root reads every folder whatever its mode: drop the capabilities that let it.
_NO_DAC = (["setpriv", "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-dac_override,-dac_read_search"] if os.geteuid() == 0 else None)


def _silent_server(tmp: Path) -> dict:
    """A TCP port on 127.0.0.1 that accepts connections and never answers (a hung server)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    _SOCKETS.append(s)
    return {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{s.getsockname()[1]}"}


_SOCKETS: list[socket.socket] = []


def _ckpt(tmp: Path) -> str:
    return str(make_assets(tmp.parent / "hostile_assets")["checkpoint"])


CASES = [
    # ---- data loss
    Case("ingest-into-a-foreign-folder", lambda t: fer("ingest", str(_raf(t)), str(_thesis(t))),
         2, "not written by fer ingest", keep=("thesis",)),
    Case("ingest-into-a-file", lambda t: (t / "out.txt").write_text("mine") and
         fer("ingest", str(_raf(t)), str(t / "out.txt")), 2, "is not a folder", keep=("out.txt",)),
    Case("synth-into-a-foreign-folder", lambda t: fer("synth", str(_thesis(t)), "--layout", "rafdb"),
         2, "not written by fer synth", keep=("thesis",)),
    Case("ingest-while-another-ingest-writes-out", lambda t: fer("ingest", str(_raf(t)), str(t / "pq")),
         2, "being written by another run (pid", during=lambda t: output_lock(t / "pq")),
    Case("stage-synth-n-not-a-number",
         lambda t: _project(t, _set("synth.rafdb.n", "ten"), previous=("synthetic",)) or stage("synth", "rafdb"),
         2, "synth.rafdb.n = 'ten'", keep=("data/synthetic/rafdb",)),
    Case("stage-train-into-a-foreign-folder",
         lambda t: (_project(t, previous=("parquet",)), (t / "models/rafdb").mkdir(parents=True),
                    (t / "models/rafdb/notes.txt").write_text("mine")) and stage("train_rafdb"),
         2, "not written by training", keep=("models/rafdb", "data/parquet/rafdb")),
    # ---- code execution
    Case("predict-crafted-folder-file-uri",
         _predict_setup(lambda t: evil_model_folder(t / "evil", t / PWNED).as_uri()),
         2, "not a model logged by this pipeline", check=_no_payload_ran),
    Case("predict-crafted-folder-path",
         _predict_setup(lambda t: str(evil_model_folder(t / "evil", t / PWNED))),
         2, "not a model logged by this pipeline", check=_no_payload_ran),
    Case("predict-crafted-checkpoint-artifact",
         _predict_setup(lambda t: evil_model_folder(t / "evil", t / PWNED, checkpoint_payload=True).as_uri()),
         2, "not a readable model checkpoint", check=_no_payload_ran),
    Case("predict-crafted-registry-version", _predict_setup(lambda t: _evil_registry(t, "version")),
         2, "not a model logged by this pipeline", check=_no_payload_ran),
    Case("predict-crafted-registry-alias", _predict_setup(lambda t: _evil_registry(t, "alias")),
         2, "not a model logged by this pipeline", check=_no_payload_ran),
    Case("predict-crafted-run-artifact", _predict_setup(lambda t: _evil_registry(t, "runs")),
         2, "not a model logged by this pipeline", check=_no_payload_ran),
    # ---- silent corruption / resource exhaustion
    Case("predict-pixel-bomb", _predict_setup(_ckpt, _bomb), 2, "megapixel"),
    Case("ingest-non-utf8-file-name", _non_utf8, 0, check=_non_utf8_recorded),
    # the emptied Fear folder leaves a class with no training face: refused (it could never be
    # learned), with the report still listing every hole
    Case("ingest-unreadable-and-empty-folders", _sfew_with_holes, 2, "fear have no training faces",
         check=_holes_reported, prefix=_NO_DAC),
    Case("ingest-too-few-faces-to-split", _three_faces, 2, "split 'val' has no faces (carved from train"),
    # ---- one clear line
    Case("stage-ingest-unknown-dataset",
         lambda t: _project(t, previous=("parquet",)) or stage("ingest", "fer2013"),
         2, "one of ['rafdb', 'sfew']; got 'fer2013'", keep=("data/parquet/rafdb",)),
    Case("stage-ingest-val-fraction-ten",
         lambda t: _project(t, _set("ingest.val_fraction", "ten"), previous=("parquet",)) or stage("ingest", "rafdb"),
         2, "ingest.val_fraction = 'ten'", keep=("data/parquet/rafdb",)),
    Case("stage-ingest-seed-missing",
         lambda t: _project(t, _set("ingest.seed", _DELETE), previous=("parquet",)) or stage("ingest", "rafdb"),
         2, "ingest.seed is required", keep=("data/parquet/rafdb",)),
    Case("stage-ingest-params-is-a-scalar",
         lambda t: _project(t, text="hello\n", previous=("parquet",)) or stage("ingest", "rafdb"),
         2, "must be a mapping of sections", keep=("data/parquet/rafdb",)),
    Case("stage-imagenet-init-pool-typo",
         lambda t: (_project(t, _set("model.pool", "lipp")), (t / "models").mkdir(),
                    (t / "models/imagenet_init.pt").write_bytes(b"previous")) and stage("imagenet_init"),
         2, "model.pool = 'lipp'", keep=("models",)),
    Case("stage-evaluate-batch-size-string",
         lambda t: _project(t, _set("evaluate.batch_size", "64")) or stage("evaluate", "rafdb"),
         2, "evaluate.batch_size = '64'"),
    Case("stage-evaluate-mlflow-empty",
         lambda t: _project(t, _set("mlflow", {})) or stage("evaluate", "rafdb"),
         2, "mlflow.experiment is required"),
    Case("predict-folder-without-model",
         _predict_setup(lambda t: (t / "folder").mkdir() or str(t / "folder")),
         2, "neither model.pt (a training output) nor MLmodel"),
    Case("predict-s3-uri-without-boto3", _predict_setup(lambda t: "s3://bucket/models/m"),
         2, "s3://bucket/models/m"),
    Case("predict-broken-photo-among-good", _predict_setup(_ckpt, _photos_broken_among_good),
         2, "1 of 3 photos could not be read", check=_two_of_three_predicted),
    # ---- cases that already worked, kept working
    Case("ingest-missing-source", lambda t: fer("ingest", str(t / "nope"), str(t / "pq")), 2, "not found"),
    Case("predict-missing-photo", _predict_setup(_ckpt, lambda t: [str(t / "nope.jpg")]), 2, "no such file"),
    Case("ingest-rerun-replaces-its-own-output",
         lambda t: (fer("ingest", str(_raf(t)), str(t / "pq"), "--report", str(t / "r1.json")),
                    run(fer("ingest", str(t / "raf"), str(t / "pq"), "--report", str(t / "r1.json")), t))[0],
         0),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path):
    argv = case.setup(tmp_path)
    before = {k: snapshot(tmp_path / k) for k in case.keep}
    assert all(before.values()), "a `keep` path must hold something to protect"
    env = case.env(tmp_path) if case.env else None
    with (case.during(tmp_path) if case.during else contextlib.nullcontext()):
        res = run(argv, tmp_path, env=env, prefix=case.prefix)
    err = res.stderr
    assert "Traceback" not in err, err
    assert res.returncode == case.rc, (res.returncode, err[-2000:])
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    if case.rc:
        assert len(errors) == 1, err[-2000:]
        assert case.says in errors[0], errors[0]
    else:
        assert errors == [], err[-2000:]
    for k, snap in before.items():
        assert snapshot(tmp_path / k) == snap, f"{k} changed"
    if case.check:
        case.check(tmp_path, res)


@pytest.mark.slow
def test_unreachable_tracking_server_fails_within_30_s(tmp_path):
    """A server that accepts and never answers: one line naming the URI, not a silent hang (the
    subprocess limit is the hang check, not a speed target)."""
    env = _silent_server(tmp_path)
    try:
        argv = fer("predict", str(face_jpeg(tmp_path / "f.jpg")), "--model", "models:/m@champion")
        t0 = time.monotonic()
        res = run(argv, tmp_path, env=env, timeout=60)
        took = time.monotonic() - t0
    finally:
        for s in _SOCKETS:
            s.close()
        _SOCKETS.clear()
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    line = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert len(line) == 1 and env["MLFLOW_TRACKING_URI"] in line[0], res.stderr[-2000:]
    assert took < 30, took


def test_killed_ingest_takes_its_decode_workers_with_it(tmp_path):
    import psutil

    raf = _raf(tmp_path, n=1500)
    proc = subprocess.Popen([sys.executable, *fer("ingest", str(raf), str(tmp_path / "pq"),
                                                   "--report", str(tmp_path / "r.json"), "--workers", "2")],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        children: list = []
        while time.monotonic() < deadline and len(children) < 2:
            children = parent.children(recursive=True)
            time.sleep(0.05)
        assert len(children) >= 2, "the decode pool never started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"orphaned pool workers: {[p.pid for p in alive]}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert not (tmp_path / "pq").exists()                       # nothing half-written in place


def test_failed_model_write_keeps_the_previous_model(tmp_path, monkeypatch):
    """A training run that dies while writing its output leaves the previous model.pt as it was."""
    import torch

    from pipeline.train import launch
    from pipeline.train.config import TrainConfig

    out = tmp_path / "models/rafdb"
    out.mkdir(parents=True)
    (out / "model.pt").write_bytes(b"previous model")
    (out / "history.json").write_text("[]")
    before = snapshot(out)
    cfg = TrainConfig.from_dict({"data": str(tmp_path), "output": str(out)})
    st = {"best_state": {}, "model_config": {}, "best_epoch": 1, "best_val_accuracy": 0.5,
          "history": [], "epoch": 1, "stopped": False, "image_size": 100}

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        launch.write_outputs(cfg, st, checkpoint_path="x", run_name="r", storage="s")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.joinpath("models").iterdir()) == ["rafdb"]  # no temp left
    monkeypatch.undo()
    launch.write_outputs(cfg, st, checkpoint_path="x", run_name="r", storage="s")
    assert (out / ".fer-output.json").is_file() and (out / "model.pt").read_bytes() != b"previous model"


def test_torch_floor_excludes_the_weights_only_bypass():
    """torch < 2.6 runs code in torch.load(weights_only=True) (CVE-2025-32434)."""
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_req = next(Requirement(d) for d in deps if Requirement(d).name == "torch")
    assert not torch_req.specifier.contains("2.5.1") and torch_req.specifier.contains("2.6.0")
