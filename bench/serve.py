"""Load on `mlflow models serve`: requests/s and p50/p95 latency of single-image requests (one
base64 JPEG per POST, the documented `dataframe_split` body) from a bounded load generator: a fixed
number of client threads, each sending its next request when the last one is answered, for a
fixed time. Every request has a timeout; an error or non-200 answer is counted, not retried.

Against a server that is already up:

    .venv/bin/python bench/serve.py --url http://127.0.0.1:5001/invocations [--seconds 20] [--clients 2]

or let it start one on a registered model (127.0.0.1, a free port; ended when the bench ends):

    MLFLOW_TRACKING_URI=... .venv/bin/python bench/serve.py --model models:/lip-vgg16-rafdb@champion

Prints one JSON line: {"requests", "errors", "seconds", "requests_per_s", "p50_ms", "p95_ms", ...}.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np


def body(jpeg: bytes) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"],
                                           "data": [[base64.b64encode(jpeg).decode()]]}}).encode()


def load(url: str, payload: bytes, *, seconds: float = 20.0, clients: int = 2,
         timeout: float = 30.0, warmup: int = 2) -> dict:
    """``clients`` threads POST ``payload`` to ``url`` back to back for ``seconds``; latency
    percentiles over the answered (HTTP 200) requests."""
    def post() -> bool:
        req = urllib.request.Request(url, data=payload, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                r.read()
                return r.status == 200
        except (OSError, urllib.error.HTTPError):
            return False

    for _ in range(warmup):  # the first requests load the model and warm the caches
        post()
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    t_end = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < t_end:
            t = time.perf_counter()
            ok = post()
            dt = time.perf_counter() - t
            with lock:
                if ok:
                    lat.append(dt)
                else:
                    errors[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(seconds + timeout + 5)
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000
    return {"requests": len(lat), "errors": errors[0], "seconds": round(wall, 2), "clients": clients,
            "requests_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
            "p95_ms": round(float(np.percentile(ms, 95)), 1) if len(ms) else None}


def serve(model_uri: str, log_path: str, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """Start `mlflow models serve` on 127.0.0.1 in its own process group; (process, invocations URL)
    once /ping answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bindir = Path(sys.executable).parent  # uvicorn must be on PATH for `--env-manager local`
    env = {**os.environ, "PATH": f"{bindir}:{os.environ.get('PATH', '')}"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(bindir / "mlflow"), "models", "serve", "-m", model_uri, "--host", "127.0.0.1",
                                 "--port", str(port), "--env-manager", "local"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                if r.status == 200:
                    return proc, f"http://127.0.0.1:{port}/invocations"
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise SystemExit(f"mlflow models serve did not come up; its log: {log_path}")
        time.sleep(1)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="the server's /invocations URL")
    where.add_argument("--model", help="a model URI to serve for the bench (models:/NAME@champion)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=2, help="concurrent client threads (the load bound)")
    ap.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    ap.add_argument("--image", help="a JPEG to send (default: a synthetic 100x100 face)")
    ap.add_argument("--log", default="serve-bench.log", help="the started server's log (with --model)")
    a = ap.parse_args(argv)
    if a.image:
        jpeg = Path(a.image).read_bytes()
    else:
        from pipeline.data.synthetic import render

        jpeg = render(3, "rafdb", seed=0, index=0)
    proc, url = serve(a.model, a.log) if a.model else (None, a.url)
    try:
        res = load(url, body(jpeg), seconds=a.seconds, clients=a.clients, timeout=a.timeout)
    finally:
        if proc is not None:
            stop(proc)
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
