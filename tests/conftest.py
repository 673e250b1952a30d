"""Session-wide test environment: importing the package first sets its environment defaults (no
MLflow telemetry, no Ray auth token, MLflow network timeouts) before either library is used;
MLflow stores are per-test temp dirs, never the repo root."""
import os

import pytest

# No precision override: amp "auto" is fp32 on every CPU (native bf16 or not), so the suite's exact
# comparisons (batch-size independence, ONNX vs torch, resumed runs) run the machine as it is; the
# bf16 paths are tested by forcing amp on (tests/test_gpu_paths.py).

import pipeline  # noqa: E402,F401


def stop_process_group(proc, timeout: float = 30) -> None:
    """End a server or cluster a test started with ``start_new_session=True``: SIGTERM to its
    whole process group, SIGKILL if it has not exited within ``timeout`` seconds."""
    import os
    import signal
    import subprocess

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], env: dict, log_path, ready_url: str | None = None,
                 timeout: float = 180):
    """Start ``cmd`` in its own process group (output to ``log_path``) and wait until
    ``ready_url`` answers HTTP 200 (each probe with a 5 s timeout); the Popen, to be ended with
    :func:`stop_process_group`. A server that exits or does not answer in ``timeout`` seconds
    is ended and fails the test with its log's tail."""
    import subprocess

    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    if ready_url:
        wait_ready(proc, ready_url, log_path, timeout)
    return proc


def wait_ready(proc, ready_url: str, log_path, timeout: float = 180) -> None:
    """Until ``ready_url`` answers HTTP 200 (each probe with a 5 s timeout); a server that exits or
    does not answer in ``timeout`` seconds is ended and fails the test with its log's tail."""
    import time
    import urllib.request
    from pathlib import Path

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(ready_url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                stop_process_group(proc)
            raise AssertionError(f"{ready_url} did not answer:\n" + Path(log_path).read_text()[-3000:])
        time.sleep(0.5)


#: Where a Chromium is looked for: the Debian package's binary (what `.ci/run` installs), then the
#: names other distributions give it. Playwright's own downloaded browsers are not used: nothing is
#: downloaded at test time.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """``FER_CHROMIUM`` when set, else the first Chromium on ``PATH`` or in ``/usr/bin``."""
    import shutil

    if os.environ.get("FER_CHROMIUM"):
        return os.environ["FER_CHROMIUM"]
    for name in CHROMIUM_NAMES:
        found = shutil.which(name) or shutil.which(name, path="/usr/bin")
        if found:
            return found
    return None



@pytest.fixture
def browser():
    """A headless Chromium driven by Playwright, for the pages a user looks at (the MLflow UI, the
    DVC plots page). Skipped, in one line, only where no Chromium binary exists; Playwright itself
    is a dev dependency, so its absence is an error, not a skip."""
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set FER_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()
