"""Ten-crop evaluation: one-pass equals ten forwards, exact under 2 Ray workers, metrics contract.

``tiny_assets`` (also used by test_tracking / test_infer) builds a small synthetic RAF-DB parquet
set whose test split has an ODD number of images, and a width-1/16 LIP-VGG16 checkpoint in the
training contract (BatchNorm statistics calibrated on the train split, so its predictions vary
from image to image; no training needed).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import evaluate as E
from pipeline.model.checkpoint import load_model
from pipeline.data.classes import CLASSES
from pipeline.data.loader import center_crop, load_split, normalize, ten_crop
from pipeline.errors import FerError

IMAGE_SIZE, CROP = 56, 48


def make_assets(base: Path) -> dict:
    """Build (once per test session: reused when already there) the tiny dataset + checkpoint."""
    from pipeline.data.ingest import ingest
    from pipeline.data.synthetic import write_synthetic
    from pipeline.model import lip_vgg16

    base = Path(base)
    paths = {"raw": base / "raf", "parquet": base / "pq", "checkpoint": base / "model.pt"}
    if paths["checkpoint"].is_file():
        return paths
    base.mkdir(parents=True, exist_ok=True)
    write_synthetic(paths["raw"], layout="rafdb", n=90, seed=3)
    ingest(paths["raw"], paths["parquet"], report_path=base / "ingest.json", progress=False)
    torch.manual_seed(0)
    model = lip_vgg16(width=0.0625)
    x, _ = load_split(paths["parquet"], "train", size=IMAGE_SIZE)
    for m in model.modules():  # calibrate BN: cumulative average over the train split
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(normalize(center_crop(x, CROP)))
    model.eval()
    tmp = paths["checkpoint"].with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "model_config": model.config,
                "classes": list(CLASSES), "image_size": IMAGE_SIZE, "crop": CROP,
                "epoch": 0, "val_accuracy": 0.0}, tmp)
    tmp.rename(paths["checkpoint"])
    return paths


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict:
    return make_assets(tmp_path_factory.getbasetemp() / "tiny_assets")


@pytest.fixture(scope="module")
def model_meta(tiny_assets):
    return load_model(tiny_assets["checkpoint"])


def test_checkpoint_roundtrip(model_meta):
    model, meta = model_meta
    assert not model.training
    assert meta["classes"] == list(CLASSES) and meta["crop"] == CROP and meta["image_size"] == IMAGE_SIZE
    assert "state_dict" not in meta


def test_one_pass_ten_crop_equals_ten_separate_forwards(tiny_assets, model_meta):
    model, _ = model_meta
    x, _ = load_split(tiny_assets["parquet"], "test", size=IMAGE_SIZE)
    x = x[:6]
    mean, center = E.ten_crop_probabilities(model, x, CROP)
    crops = ten_crop(x, CROP)
    with torch.no_grad():
        per_crop = torch.stack([model(normalize(crops[:, k])).softmax(-1) for k in range(10)], 1)
        ref_center = model(normalize(center_crop(x, CROP))).softmax(-1)
    assert mean.shape == (6, len(CLASSES))
    assert torch.allclose(mean, per_crop.mean(1), atol=1e-5)
    assert torch.allclose(center, per_crop[:, E.CENTER], atol=1e-5)
    assert torch.allclose(center, ref_center, atol=1e-5)  # index 4 is the centre crop
    assert torch.allclose(mean.sum(1), torch.ones(6), atol=1e-5)


def test_evaluate_arrays_counts_match_per_sample_predictions(tiny_assets, model_meta):
    model, _ = model_meta
    x, y = load_split(tiny_assets["parquet"], "test", size=IMAGE_SIZE)
    counts = E.evaluate_arrays(model, x, y, crop=CROP, batch_size=4)  # several batches, ragged last
    mean, center = E.ten_crop_probabilities(model, x, CROP)
    ref = torch.zeros(7, 7, dtype=torch.int64)
    ref_c = torch.zeros(7, 7, dtype=torch.int64)
    for a, p, pc in zip(y.tolist(), mean.argmax(1).tolist(), center.argmax(1).tolist()):
        ref[a, p] += 1
        ref_c[a, pc] += 1
    assert counts.ten_crop.dtype == torch.int64
    assert torch.equal(counts.ten_crop, ref) and torch.equal(counts.center, ref_c)
    assert counts.n == len(y)
    assert len(set(mean.argmax(1).tolist())) > 1, "tiny model should not predict one class for all"
    both = E.EvalCounts.from_stacked(counts.stacked() * 2)
    assert torch.equal((counts + counts).ten_crop, both.ten_crop)


def test_metrics_from_counts_by_hand():
    cm = torch.zeros(7, 7, dtype=torch.int64)
    cm[0, 0], cm[0, 1], cm[1, 1], cm[3, 3], cm[3, 6] = 3, 1, 2, 1, 3  # classes 2,4,5,6 absent
    cc = torch.eye(7, dtype=torch.int64) * 0
    cc[0, 0] = 10
    m = E.metrics_from_counts(E.EvalCounts(cm, cc), CLASSES)
    assert m["n_test"] == 10
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["accuracy_center"] == pytest.approx(1.0)
    assert m["per_class"]["surprise"] == pytest.approx(0.75)
    assert m["per_class"]["happiness"] == pytest.approx(0.25)
    assert m["per_class"]["disgust"] is None
    assert m["mean_class_accuracy"] == pytest.approx((0.75 + 1.0 + 0.25) / 3)
    with pytest.raises(FerError):
        E.metrics_from_counts(E.EvalCounts.zeros(7), CLASSES)


def test_metrics_json_contract_and_plots(tiny_assets, tmp_path):
    metrics, confusion = E.evaluate_checkpoint(tiny_assets["checkpoint"], tiny_assets["parquet"],
                                               batch_size=8, device="cpu")
    n = len(load_split(tiny_assets["parquet"], "test", size=IMAGE_SIZE)[1])
    out = E.write_outputs(metrics, confusion, CLASSES, metrics_path=tmp_path / "metrics",
                          plots_dir=tmp_path / "plots", dataset="rafdb")
    data = json.loads((tmp_path / "metrics" / "eval_rafdb.json").read_text())
    assert out["metrics"] == tmp_path / "metrics" / "eval_rafdb.json"
    assert set(data) == {"accuracy", "accuracy_center", "mean_class_accuracy", "per_class", "n_test"}
    assert data["n_test"] == n and isinstance(data["n_test"], int)
    assert list(data["per_class"]) == list(CLASSES)
    for k in ("accuracy", "accuracy_center", "mean_class_accuracy"):
        assert 0.0 <= data[k] <= 1.0
    assert all(v is None or 0.0 <= v <= 1.0 for v in data["per_class"].values())
    assert confusion.shape == (7, 7) and confusion.dtype == np.int64 and confusion.sum() == n
    assert data["accuracy"] == pytest.approx(np.trace(confusion) / n)
    # the DVC confusion template: one row per test image, actual,predicted
    rows = (tmp_path / "plots" / "confusion_rafdb.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == n + 1
    assert all(a in CLASSES and p in CLASSES for a, p in (r.split(",") for r in rows[1:]))
    assert sum(a == p for a, p in (r.split(",") for r in rows[1:])) == np.trace(confusion)
    png = (tmp_path / "plots" / "confusion_rafdb.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # a .json metrics_path is the file itself
    E.write_outputs(metrics, confusion, CLASSES, metrics_path=tmp_path / "m.json",
                    plots_dir=tmp_path / "plots", dataset="rafdb")
    assert json.loads((tmp_path / "m.json").read_text()) == data


def test_plot_history(tmp_path):
    hist = [{"epoch": e, "train_loss": 2 / (e + 1), "val_loss": 2.2 / (e + 1),
             "train_accuracy": 0.2 + e / 10, "val_accuracy": 0.15 + e / 12, "lr": 0.01}
            for e in range(4)]
    p = E.plot_history(hist, tmp_path / "curves.png")
    assert p.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FerError):
        E.plot_history([], tmp_path / "none.png")


def test_evaluate_checkpoint_bad_inputs(tiny_assets, tmp_path):
    with pytest.raises(FerError, match="not found"):
        E.evaluate_checkpoint(tmp_path / "missing.pt", tiny_assets["parquet"])
    with pytest.raises(FerError, match="not found"):
        E.evaluate_checkpoint(tiny_assets["checkpoint"], tmp_path / "nodata")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(FerError, match="not a readable"):
        load_model(junk)


@pytest.mark.slow
def test_two_ray_workers_equal_single_process(tiny_assets, monkeypatch):
    """Exact under sharding: the odd-sized test split is split 2 ways with no padding."""
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    pq, ckpt = tiny_assets["parquet"], tiny_assets["checkpoint"]
    n = len(load_split(pq, "test", size=IMAGE_SIZE)[1])
    assert n % 2 == 1, "the test split must be odd-sized to expose padded duplicates"
    shards = [len(load_split(pq, "test", size=IMAGE_SIZE, rank=r, world_size=2)[1]) for r in (0, 1)]
    assert sum(shards) == n and shards[0] == shards[1] + 1

    ref_metrics, ref_cm = E.evaluate_checkpoint(ckpt, pq, num_workers=1, device="cpu")
    assert not ray.is_initialized()
    metrics, cm = E.evaluate_checkpoint(ckpt, pq, num_workers=2)
    assert not ray.is_initialized(), "a Ray instance started by evaluation is shut down"
    assert metrics["n_test"] == n
    np.testing.assert_array_equal(cm, ref_cm)
    assert metrics == ref_metrics
