"""The README's `mlflow models serve` command on the registry's champion, for real: a server on
127.0.0.1 started here (and ended by PID), a real JPEG posted as base64, bad payloads answered
with HTTP 400 and a readable message while the server stays up."""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.classes import CLASSES
from pipeline.data.synthetic import render

from conftest import stop_process_group
from test_evaluate import make_assets

NAME = "lip-vgg16-served"


def _post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _frame(*images: str) -> dict:
    """The documented request: a dataframe_split with one `image` column of base64 strings."""
    return {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from pipeline import tracking
    from pipeline.infer import registry

    d = tmp_path_factory.mktemp("serve")
    assets = make_assets(d.parent / "serve_assets")
    uri = f"sqlite:///{d}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        run = tracking.start_run("serve-test", "evaluate", stage="evaluate", dataset="t")
        registry.log_and_register_model(run, assets["checkpoint"], registered_name=NAME, test_accuracy=0.5)
        tracking.end_run(run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bindir = Path(sys.executable).parent  # uvicorn must be on PATH for `--env-manager local`
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bindir}:{os.environ['PATH']}"}
    log = open(d / "server.log", "w")
    proc = subprocess.Popen([str(bindir / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
                             "--host", "127.0.0.1", "--port", str(port), "--env-manager", "local"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (d / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "server did not answer /ping in 180 s"
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/invocations", assets
    finally:
        stop_process_group(proc)
        log.close()


@pytest.mark.slow
def test_served_champion_equals_fer_predict(served, tmp_path):
    from pipeline.infer.predictor import Predictor

    url, assets = served
    jpegs = [render(label, "rafdb", seed=21, index=label) for label in (0, 3, 6)]
    status, out = _post(url, _frame(*(base64.b64encode(j).decode() for j in jpegs)))
    assert status == 200, out
    served_p = np.array([[p[c] for c in CLASSES] for p in out["predictions"]])
    local = Predictor(str(assets["checkpoint"]), device="cpu").predict_faces(jpegs)
    np.testing.assert_allclose(served_p, [[p["probabilities"][c] for c in CLASSES] for p in local], atol=1e-5)
    assert [p["label"] for p in out["predictions"]] == [p["label"] for p in local]


@pytest.mark.slow
@pytest.mark.parametrize("payload, says", [
    (_frame("this is not base64!"), "base64"),
    (_frame(base64.b64encode(b"plain text, not an image").decode()), "not an image"),
    (_frame(""), "zero-byte file"),
    (_frame(*[base64.b64encode(b"x").decode()] * 65), "at most 64 (FER_SERVE_MAX_IMAGES)"),
    (_frame(base64.b64encode(b"\0" * (33 * 2**20)).decode()), "MiB (FER_SERVE_MAX_BYTES)"),
])
def test_bad_payload_is_a_400_and_the_server_stays_up(served, payload, says):
    url, _ = served
    status, out = _post(url, payload)
    assert status == 400, out
    assert says in out.get("message", ""), out
    ok = base64.b64encode(render(3, "rafdb", seed=2, index=1)).decode()
    status, out = _post(url, _frame(ok))
    assert status == 200 and len(out["predictions"]) == 1


@pytest.mark.slow
def test_bench_serve_measures_load(served):
    """bench/serve.py against the served champion: a bounded load (2 client threads, 20 s) of
    single-image requests, every one answered; requests/s and p50/p95 latency printed."""
    url, _ = served
    bench = Path(__file__).resolve().parents[1] / "bench" / "serve.py"
    r = subprocess.run([sys.executable, str(bench), "--url", url, "--seconds", "20", "--clients", "2",
                        "--timeout", "30"], capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print("serving bench:", res)
    assert res["requests"] > 0 and res["errors"] == 0, res
    assert 0 < res["p50_ms"] <= res["p95_ms"], res
    assert res["requests_per_s"] == pytest.approx(res["requests"] / res["seconds"], rel=0.01)


@pytest.mark.slow
def test_wrong_payload_is_refused_by_the_signature(served):
    """The logged signature (an `image` string column) is enforced by the server itself: a frame
    without `image` is a 400 naming the missing input (numbers in it, a 400 too); the server
    stays up."""
    url, _ = served
    ok = base64.b64encode(render(3, "rafdb", seed=2, index=1)).decode()
    for payload, says in [({"dataframe_split": {"columns": ["img"], "data": [[ok]]}}, "missing inputs ['image']"),
                          ({"dataframe_split": {"columns": ["image"], "data": [[123]]}}, "")]:
        status, out = _post(url, payload)
        assert status == 400, out
        assert says in out.get("message", ""), out
    status, out = _post(url, _frame(ok))
    assert status == 200 and len(out["predictions"]) == 1


def test_request_caps_are_one_line(monkeypatch):
    """Over the images-per-request or bytes-per-request cap: refused before anything is decoded."""
    from pipeline.infer.pyfunc import check_request

    check_request([b"x"] * 64)
    with pytest.raises(ValueError, match="65 images in one request: at most 64"):
        check_request([b"x"] * 65)
    monkeypatch.setenv("FER_SERVE_MAX_BYTES", "10")
    with pytest.raises(ValueError, match="MiB of images in one request"):
        check_request([b"x" * 11])
