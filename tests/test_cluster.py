"""How many CPUs/GPUs a training run's workers get, and how many runs fit side by side."""
import pytest

from pipeline.cluster import concurrency, worker_resources
from pipeline.errors import FerError


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
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a cluster may autoscale: no CPU check
    assert worker_resources("auto", 1, 4, {"CPU": 2})["cpus_per_worker"] == 4
