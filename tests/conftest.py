"""Session-wide test environment: importing the package first sets its environment defaults (no
MLflow telemetry, no Ray auth token, MLflow network timeouts) before either library is used;
MLflow stores are per-test temp dirs, never the repo root."""
import pipeline  # noqa: F401


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
