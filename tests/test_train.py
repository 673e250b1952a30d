"""Ray Train end to end on a real local Ray instance (2 CPU workers, gloo DDP), synthetic faces.

One Ray instance and one synthetic parquet dataset are shared by the module.
"""
from __future__ import annotations

import json
import os
import re

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.errors import FerError  # noqa: E402
from pipeline.model import lip_vgg16  # noqa: E402
from pipeline.train.config import TrainConfig  # noqa: E402
from pipeline.train.launch import run_training  # noqa: E402

pytestmark = pytest.mark.slow

# Small and CPU-sized: width 0.125, 56 px stored, 48 px crops.
SMALL = dict(image_size=56, crop=48, width=0.125, dropout=0.0, batch_size=32, optimizer="adamw",
             lr=0.003, weight_decay=0.01, warmup_epochs=1, max_rotate_deg=0.0, num_workers=2,
             use_gpu=False, max_failures=0, seed=0)
# With these settings the learning run reaches val accuracy ~0.67 at 12 epochs on this machine
# (majority class: 0.39), about 110 s on 2 cores.
LEARN_EPOCHS = 12


def _write(root, n, val_fraction):
    from pipeline.data.ingest import ingest
    from pipeline.data.synthetic import write_synthetic

    write_synthetic(root / "raw", layout="rafdb", n=n, seed=0, workers=1)
    ingest(root / "raw", root / "parquet", report_path=root / "ingest.json", val_fraction=val_fraction,
           seed=0, workers=1, progress=False)
    return root / "parquet"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Big enough to learn from on CPU: ~2040 train / 360 val images."""
    return _write(tmp_path_factory.mktemp("train_data"), n=3000, val_fraction=0.15)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """For the fault-tolerance mechanics: ~260 train / 60 val images (seconds per epoch)."""
    return _write(tmp_path_factory.mktemp("train_tiny"), n=400, val_fraction=0.2)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipeline.cluster import ensure_ray

    started = ensure_ray(2)  # as the stages start it: 2 CPUs here, Ray's log filters installed
    yield ray
    if started:
        ray.shutdown()


# the resume tests compare runs whose `epochs` differ: an LR that does not depend on it
CONSTANT_LR = dict(schedule="step", step_size=100, gamma=0.5)


def _cfg(dataset, tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{**SMALL, "data": str(dataset), "storage_path": str(tmp_path / "ray"),
                          "output": str(tmp_path / "out"), **kw})


def _history(tmp_path):
    return json.loads((tmp_path / "out" / "history.json").read_text())


def test_two_worker_ddp_run_learns(dataset, tmp_path, ray_local):
    cfg = _cfg(dataset, tmp_path, epochs=LEARN_EPOCHS, run_name="learn")
    s = run_training(cfg)
    hist = _history(tmp_path)
    assert [h["epoch"] for h in hist] == list(range(1, LEARN_EPOCHS + 1))
    # majority class ("happiness") is 0.39 of val; a model that learned nothing sits there
    assert s["best_val_accuracy"] > 0.6, hist
    assert s["best_val_accuracy"] == max(h["val_accuracy"] for h in hist)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert all(h["n_val"] == hist[0]["n_val"] for h in hist)
    # the session's speed is in the summary (and MLflow), not in the DVC-tracked history
    assert all(h["images_per_s"] > 0 for h in s["run_history"]) and "images_per_s" not in hist[0]
    # model.pt holds the best epoch, loadable into a fresh network, and reproduces its val accuracy
    ck = torch.load(tmp_path / "out" / "model.pt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == s["best_epoch"] and ck["val_accuracy"] == s["best_val_accuracy"]
    assert ck["crop"] == 48 and ck["image_size"] == 56 and len(ck["classes"]) == 7
    model = lip_vgg16(**ck["model_config"])
    model.load_state_dict(ck["state_dict"])
    from pipeline.data.loader import load_split
    from pipeline.train.steps import count_correct

    vx, vy = load_split(dataset, "val", size=56)
    correct, n = count_correct(model, vx, vy, 48)
    assert correct / n == pytest.approx(s["best_val_accuracy"], abs=2 / n)


@pytest.fixture(scope="module")
def failed_run(tiny, tmp_path_factory, ray_local):
    """A 3-epoch run whose rank 1 fails in epoch 3 once; Ray Train restarts the worker group."""
    tmp_path = tmp_path_factory.mktemp("failed")
    marker = tmp_path / "failed_once"
    cfg = _cfg(tiny, tmp_path, epochs=3, run_name="fail", max_failures=1, **CONSTANT_LR)
    s = run_training(cfg, worker_options={"fail_at_epoch": 3, "fail_rank": 1,
                                             "fail_marker": str(marker)})
    return s, s["run_history"], tmp_path, marker


@pytest.fixture(scope="module")
def resumed_run(tiny, tmp_path_factory, ray_local):
    """A 2-epoch run that dies in epoch 2 with no retries left, then rerun for 3 epochs."""
    tmp_path = tmp_path_factory.mktemp("resumed")
    marker = tmp_path / "crashed_once"
    cfg = _cfg(tiny, tmp_path, epochs=2, run_name="resume", **CONSTANT_LR)
    with pytest.raises(FerError, match="rerun to resume"):
        run_training(cfg, worker_options={"fail_at_epoch": 2, "fail_rank": 0,
                                             "fail_marker": str(marker)})
    # rerun, same run name and storage, now for 3 epochs: continues after epoch 1
    s = run_training(_cfg(tiny, tmp_path, epochs=3, run_name="resume", **CONSTANT_LR))
    return s, s["run_history"], tmp_path


def test_worker_failure_recovers_from_checkpoint(failed_run):
    s, hist, tmp_path, marker = failed_run
    assert marker.exists()  # the failure did happen
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    # epochs 1-2 ran in the first worker group; the restarted group began at epoch 3
    assert [h["session_start_epoch"] for h in hist] == [1, 1, 3]
    assert s["epochs_run"] == 3 and s["last_epoch"] == 3
    # each rank's RNG state went into the same (merged) checkpoint directory; 2 kept
    ckpts = sorted(p.name for p in (tmp_path / "ray" / "fail").glob("epoch_*"))
    assert ckpts == ["epoch_0002", "epoch_0003"]
    assert {p.name for p in (tmp_path / "ray" / "fail" / "epoch_0003").iterdir()} >= {
        "state.pt", "rng_rank0.pt", "rng_rank1.pt", "train_config.json"}


def test_a_workers_user_error_fails_the_run_at_once_in_one_line(tiny, tmp_path, ray_local, capfd):
    """A FerError in a worker (bad data, a bad setting) would fail the same way again: it is not
    retried although max_failures allows it (the hook fails once only, so a retry would succeed),
    the driver raises its line without "rerun to resume", and no worker traceback is printed."""
    marker = tmp_path / "told_once"
    cfg = _cfg(tiny, tmp_path, epochs=2, run_name="user-error", max_failures=1, num_workers=1, **CONSTANT_LR)
    with pytest.raises(FerError) as err:
        run_training(cfg, worker_options={"fail_at_epoch": 1, "fail_rank": 0, "fail_as": "user",
                                          "fail_marker": str(marker)})
    assert marker.exists()
    assert str(err.value) == "injected user error at epoch 1 on rank 0"
    out = capfd.readouterr()
    printed = out.err + out.out
    assert "Traceback" not in printed and "Error in training function" not in printed, printed[-3000:]
    assert not (tmp_path / "out" / "model.pt").exists()


def test_a_full_disk_stops_training_in_one_line(tiny, tmp_path, ray_local, capfd):
    """Checkpoints to a 64 KiB tmpfs: the first one fills it. The run stops at once with one line
    naming the full place and what to do (a retry would fill it again), no traceback."""
    import subprocess

    full = tmp_path / "full"
    full.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], capture_output=True,
                       text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    try:
        cfg = _cfg(tiny, tmp_path, epochs=2, run_name="full-disk", max_failures=1, num_workers=1,
                   storage_path=str(full), **CONSTANT_LR)
        with pytest.raises(FerError, match="no space left on device writing epoch 1's checkpoint") as err:
            run_training(cfg)
        assert str(full) in str(err.value) and "rerun to resume" in str(err.value)
        printed = "".join(capfd.readouterr())
        assert "Traceback" not in printed, printed[-3000:]
    finally:
        subprocess.run(["umount", "-l", str(full)], capture_output=True, timeout=30)


def test_interrupted_run_resumes_on_rerun(resumed_run, tiny):
    s, hist, tmp_path = resumed_run
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert [h["session_start_epoch"] for h in hist] == [1, 2, 2]
    assert s["last_epoch"] == 3
    # resuming with another network under the same name is refused before Ray starts
    with pytest.raises(FerError, match="another network"):
        run_training(_cfg(tiny, tmp_path, epochs=3, run_name="resume", width=0.25, **CONSTANT_LR))


def test_resumed_runs_repeat_an_uninterrupted_schedule_exactly(failed_run, resumed_run):
    """The failed-and-restarted run (resumed after epoch 2) and the crashed-and-rerun run (resumed
    after epoch 1, with epochs changed 2 -> 3) follow one 3-epoch trajectory: same seed, same
    data, restored model/optimiser/schedule/RNG state, deterministic CPU DDP."""
    failed, resumed = failed_run[1], resumed_run[1]
    assert len(failed) == len(resumed) == 3
    for a, b in zip(failed, resumed):
        assert a["val_accuracy"] == b["val_accuracy"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


@pytest.mark.parametrize("harm", ["truncated", "deleted"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(harm, tiny, tmp_path, ray_local,
                                                                         resumed_run, capfd):
    """The latest checkpoint torn (state.pt cut in half: a kill mid-write, a full disk) or gone
    (deleted by hand, which Ray refuses with 'delete the existing folder'): the rerun says in one
    line which epoch it resumes from, keeps the damaged run folder aside, and continues from the
    newest intact epoch, on the same trajectory as a run that crashed there and was rerun."""
    import shutil

    from pipeline.train.launch import plan_resume

    run_training(_cfg(tiny, tmp_path, epochs=2, run_name="torn", **CONSTANT_LR))
    run = tmp_path / "ray" / "torn"
    state = run / "epoch_0002" / "state.pt"
    # the resume names what Ray registered, not the newest folder (a failed upload leaves one)
    shutil.copytree(run / "epoch_0002", run / "epoch_0003")
    assert plan_resume(str(tmp_path / "ray"), "torn") == (state.parent, None)
    shutil.rmtree(run / "epoch_0003")
    if harm == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    else:
        shutil.rmtree(state.parent)
    capfd.readouterr()
    s = run_training(_cfg(tiny, tmp_path, epochs=3, run_name="torn", **CONSTANT_LR))
    out = capfd.readouterr().out
    lines = [ln for ln in out.splitlines() if "checkpoint epoch_0002 is damaged" in ln]
    assert len(lines) == 1 and "resuming from epoch_0001" in lines[0], out[-3000:]
    assert "Traceback" not in out
    hist = s["run_history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert [h["session_start_epoch"] for h in hist] == [1, 2, 2]
    for a, b in zip(hist, resumed_run[1]):
        assert a["val_accuracy"] == b["val_accuracy"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    aside = tmp_path / "ray" / "torn.damaged-1"
    assert (aside / "epoch_0001" / "state.pt").is_file()  # kept, not deleted
    assert (aside / "epoch_0002").exists() == (harm == "truncated")


def test_checkpoint_damage_is_told_by_checksum(tmp_path):
    """Every .pt of a checkpoint folder has a checksum written after it; a torn file, a missing
    checksum on a file that does not load, or a missing state are damage; a folder written before
    checksums existed is judged by whether it loads."""
    from pipeline.model import checkpoint

    d = tmp_path / "epoch_0001"
    d.mkdir()
    checkpoint.save_state(d, {"epoch": 1, "w": torch.ones(1000)})
    checkpoint.save_checked({"torch": torch.get_rng_state()}, d / "rng_rank0.pt")
    assert checkpoint.damage(d) is None
    rng = d / "rng_rank0.pt"
    good = rng.read_bytes()
    rng.write_bytes(good[:-10])
    assert "rng_rank0.pt does not match its checksum" in checkpoint.damage(d)
    rng.write_bytes(good)
    (d / "state.pt.sha256").unlink()  # an older checkpoint: no checksum, loads
    assert checkpoint.damage(d) is None
    (d / "state.pt").write_bytes((d / "state.pt").read_bytes()[:100])
    assert "state.pt is unreadable" in checkpoint.damage(d)
    (d / "state.pt").unlink()
    assert checkpoint.damage(d) == "state.pt is missing"
    assert checkpoint.damage(tmp_path / "nowhere") == "its folder is missing"


def test_driver_draws_a_progress_bar_within_each_epoch(tiny, tmp_path, ray_local, capfd, monkeypatch):
    # on a terminal this is on by itself; FER_PROGRESS=1 forces it for a captured stream
    monkeypatch.setenv("FER_PROGRESS", "1")
    run_training(_cfg(tiny, tmp_path, epochs=2, run_name="bar"))
    err = capfd.readouterr().err
    done = re.findall(r"epoch (\d)/2: 100%\|[^|]*\| (\d+)/(\d+)", err)
    assert {e for e, _, _ in done} == {"1", "2"}, err[-2000:]
    assert all(a == b and int(a) >= 1 for _, a, b in done)
