"""How many CPUs/GPUs a training run's workers get, and how many runs fit side by side."""
import logging
import pytest

from pipeline.cluster import concurrency, worker_resources
from pipeline.errors import FerError

from conftest import stop_process_group


def test_concurrency_from_resources():
    # 2 CPUs, one left to Ray, 0.5 CPU per run -> 2 runs
    assert concurrency({"CPU": 2}, 1, 0.5, False, num_runs=4) == 2
    assert concurrency({"CPU": 2}, 1, 0.5, False, num_runs=4, cap=1) == 1
    assert concurrency({"CPU": 2}, 1, 2.0, False, num_runs=4) == 1     # never below 1
    assert concurrency({"CPU": 64}, 2, 1.0, False, num_runs=8) == 8    # at most num_runs
    assert concurrency({"CPU": 64, "GPU": 4}, 2, 4.0, True, num_runs=8) == 2  # GPUs limit


def test_worker_resources(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert worker_resources("auto", 1, 0.5, {"CPU": 2}) == {"use_gpu": False, "cpus_per_worker": 0.5}
    assert worker_resources("auto", 1, None, {"CPU": 8, "GPU": 1})["use_gpu"]
    assert not worker_resources("auto", 2, None, {"CPU": 8, "GPU": 1})["use_gpu"]  # one per worker
    assert worker_resources(False, 2, None, {"CPU": 5}) == {"use_gpu": False, "cpus_per_worker": 2.0}
    with pytest.raises(FerError, match="GPUs"):
        worker_resources(True, 2, None, {"CPU": 8, "GPU": 1})
    with pytest.raises(FerError, match="CPUs"):
        worker_resources("auto", 1, 4, {"CPU": 2})
    # a cluster: some live node must hold one worker; the total does not matter
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.delenv("FER_RAY_AUTOSCALING", raising=False)
    two_nodes = [{"CPU": 1.0}, {"CPU": 4.0}]
    assert worker_resources("auto", 2, 4, {"CPU": 5}, nodes=two_nodes)["cpus_per_worker"] == 4
    with pytest.raises(FerError, match=r"no node of the Ray cluster can hold a worker of 4 CPUs \(largest node: 2"):
        worker_resources("auto", 1, 4, {"CPU": 3}, nodes=[{"CPU": 1.0}, {"CPU": 2.0}])
    monkeypatch.setenv("FER_RAY_AUTOSCALING", "1")  # the cluster may grow: said once, then waited for
    assert worker_resources("auto", 1, 4, {"CPU": 3}, nodes=[{"CPU": 2.0}])["cpus_per_worker"] == 4


def test_a_tune_trials_own_share_is_counted(monkeypatch):
    """The shipped ray section (2 CPUs per worker) on a 2-CPU instance: the trial's own 0.01 CPU
    left 1.99 for the worker, which Ray then retried placing for ever. Now refused up front, and
    the sweep's instance is sized to fit one trial (workers + its share)."""
    from pipeline.cluster import TRIAL_CPU

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(FerError, match="beside the 0.01 CPU a Tune trial holds itself"):
        worker_resources("auto", 1, 2, {"CPU": 2}, overhead=TRIAL_CPU)
    assert worker_resources("auto", 1, 2, {"CPU": 3}, overhead=TRIAL_CPU)["cpus_per_worker"] == 2
    assert concurrency({"CPU": 3}, 1, 2.0, False, num_runs=8, overhead=TRIAL_CPU) == 1
    assert concurrency({"CPU": 9}, 1, 2.0, False, num_runs=8, overhead=TRIAL_CPU) == 4  # 4 x 2.01 <= 9
    assert concurrency({"CPU": 2}, 1, 0.5, False, num_runs=8, overhead=TRIAL_CPU) == 2  # 2 x 0.51 <= 2
    assert concurrency({"CPU": 4}, 1, 1.0, False, num_runs=8, overhead=TRIAL_CPU) == 3  # 3 x 1.01 <= 4
    assert concurrency({"CPU": 4}, 2, 1.0, False, num_runs=8, overhead=TRIAL_CPU) == 1


def test_placement_failure_is_one_line():
    from pipeline.cluster import placement_failure

    class WorkerGroupStartupTimeoutError(Exception):
        pass

    try:
        try:
            raise WorkerGroupStartupTimeoutError("timed out after 60 s")
        except Exception as inner:
            raise RuntimeError("Training failed") from inner
    except RuntimeError as e:
        line = placement_failure(e)
    assert line and "\n" not in line and "could not place the training workers" in line
    assert placement_failure(RuntimeError("a bug")) is None


def test_placement_failure_is_told_through_ray_trains_controller_error():
    """What `trainer.fit()` really raises after a lost node: Ray Train's ControllerError, whose text
    holds the timeout's message but not its type (found on a two-node cluster)."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2.api.exceptions import ControllerError

    from pipeline.cluster import placement_failure

    e = ControllerError(WorkerGroupStartupTimeoutError(1))
    assert "WorkerGroupStartupTimeoutError" not in str(e)
    line = placement_failure(e)
    assert line and "could not place the training workers" in line


def _ray_cli():
    import shutil
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "ray"
    return str(exe) if exe.exists() else shutil.which("ray")


@pytest.mark.slow
def test_private_instance_unless_ray_address(tmp_path):
    """A cluster left by `ray start --head` on this machine (its address file in Ray's temp
    folder) is joined only when RAY_ADDRESS names it; otherwise a private local instance."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([_ray_cli(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--port", str(port), "--num-cpus", "1", "--include-dashboard", "false"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    probe = ("from pipeline.cluster import ensure_ray; import ray; ensure_ray(); "
             "print('CPUS', ray.cluster_resources()['CPU']); ray.shutdown()")
    try:
        import time

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # wait until the head answers
            r = subprocess.run([_ray_cli(), "status", "--address", f"127.0.0.1:{port}"], env=env,
                               capture_output=True, text=True, timeout=60)
            if r.returncode == 0:
                break
            time.sleep(1)
        assert r.returncode == 0, r.stderr[-1000:]
        local = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                               timeout=180, cwd=tmp_path)
        assert local.returncode == 0, local.stderr[-2000:]
        assert "started a private local Ray instance" in local.stdout
        assert "Traceback" not in local.stderr
        joined = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                                env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, timeout=180)
        assert joined.returncode == 0, joined.stderr[-2000:]
        assert f"joined the Ray cluster at 127.0.0.1:{port}" in joined.stdout
        assert "CPUS 1.0" in joined.stdout  # the head's one CPU, not this machine's
    finally:
        stop_process_group(head)
        # what `ray stop` would do: forget the head's address, if it is still ours
        from pathlib import Path

        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def _record(msg: str, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord("ray.train.x", logging.WARNING, __file__, 1, msg, (), exc_info)


def test_peer_failures_become_one_line_and_other_errors_keep_their_traceback():
    import ray.exceptions

    from pipeline.ray_workarounds import PeerFailureFilter

    f, fmt = PeerFailureFilter(), logging.Formatter()
    died = ray.exceptions.ActorDiedError()
    rec = _record("Graceful shutdown of backend failed.", died)
    assert f.filter(rec) and rec.exc_info is None
    out = fmt.format(rec)
    assert "\n" not in out and out.startswith("Graceful shutdown of backend failed. [ActorDiedError")

    gloo = ("Error in training function:\nTraceback (most recent call last):\n  File \"w.py\", line 1\n"
            "RuntimeError: [gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:63628: "
            "Connection reset by peer.\n")
    rec = _record(gloo)
    assert f.filter(rec)
    out = fmt.format(rec)
    assert "\n" not in out and "a peer worker went away" in out and "Connection reset by peer" in out

    bug = "Error in training function:\nTraceback (most recent call last):\nZeroDivisionError: division by zero\n"
    rec = _record(bug)
    assert f.filter(rec) and fmt.format(rec) == bug  # a bug in the loop keeps its traceback
    try:
        raise ValueError("boom")
    except ValueError as e:
        rec = logging.LogRecord("ray.train.x", logging.ERROR, __file__, 1, "failed", (), (ValueError, e, e.__traceback__))
    assert f.filter(rec) and "Traceback" in fmt.format(rec)


def test_an_unplaceable_worker_group_and_a_workers_user_error_print_no_traceback():
    """The controller's record for a worker group no node can hold keeps its first line only (the
    driver's one line says the rest); a worker's FerError record is dropped (the driver prints it)."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    from pipeline.ray_workarounds import PeerFailureFilter

    f, fmt = PeerFailureFilter(), logging.Formatter()
    e = WorkerGroupStartupTimeoutError(1)
    rec = logging.LogRecord("ray.train.x", logging.ERROR, __file__, 1, "Error in control loop iteration: %s",
                            (e,), (type(e), e, None))
    assert f.filter(rec)
    out = fmt.format(rec)
    assert "\n" not in out and out.startswith("Error in control loop iteration: The worker group startup timed out")
    told = ("Error in training function:\nTraceback (most recent call last):\n  File \"w.py\", line 1\n"
            "pipeline.errors.FerError: cannot read split 'val'\n")
    assert not f.filter(_record(told))
