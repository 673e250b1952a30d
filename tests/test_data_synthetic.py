"""The synthetic face writer: layouts, class frequencies, determinism, domains, speed."""
from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.classes import CLASSES, RAFDB_TRAIN_COUNTS, SFEW_FOLDERS
from pipeline.data.layouts import read_layout
from pipeline.data.synthetic import DEFAULT_N, class_counts, plan, render, write_synthetic
from pipeline.errors import FerError


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_class_counts_follow_rafdb_proportions():
    assert DEFAULT_N == {"rafdb": 1500, "sfew": 600}
    c = class_counts(1500)
    assert sum(c) == 1500 and c == [158, 34, 88, 583, 242, 86, 309]
    total = sum(RAFDB_TRAIN_COUNTS)
    for got, ref in zip(class_counts(12271), RAFDB_TRAIN_COUNTS):
        assert got == ref
    for n in (7, 20, 101):
        cc = class_counts(n)
        assert sum(cc) == n and min(cc) >= 1
        assert max(cc) == cc[CLASSES.index("happiness")]
    assert abs(c[3] / 1500 - RAFDB_TRAIN_COUNTS[3] / total) < 0.001


def test_plan_split_is_about_80_20_per_class():
    items = plan(1500, "rafdb", 0)
    assert len(items) == 1500
    for lab in range(7):
        tr = sum(1 for l, s, _ in items if l == lab and s == "train")
        te = sum(1 for l, s, _ in items if l == lab and s == "test")
        assert tr >= 1 and te >= 1 and abs(tr / (tr + te) - 0.8) < 0.03
    assert plan(50, "rafdb", 1) == plan(50, "rafdb", 1) != plan(50, "rafdb", 2)


def test_rafdb_layout_files(tmp_path):
    s = write_synthetic(tmp_path / "raf", layout="rafdb", n=30, seed=0)
    root = tmp_path / "raf"
    lines = (root / "EmoLabel/list_patition_label.txt").read_text().splitlines()
    assert len(lines) == 30
    for line in lines:
        name, lab = line.split()
        assert name.startswith(("train_", "test_")) and name.endswith(".jpg") and 1 <= int(lab) <= 7
        with Image.open(root / "Image/aligned" / f"{name[:-4]}_aligned.jpg") as im:
            assert im.format == "JPEG" and im.size == (100, 100) and im.mode == "RGB"
    n_train = sum(1 for l in lines if l.startswith("train_"))
    assert 20 <= n_train <= 26
    assert sum(sum(v.values()) for v in s["counts"].values()) == 30
    assert sorted(p.name for p in (root / "Image/aligned").iterdir())[0] == "test_00001_aligned.jpg"


def test_sfew_layout_files_and_different_domain(tmp_path):
    write_synthetic(tmp_path / "sfew", layout="sfew", n=28, seed=0)
    root = tmp_path / "sfew"
    files = sorted(root.rglob("*.png"))
    assert len(files) == 28
    for p in files:
        top, faces, emo = p.relative_to(root).parts[:3]
        assert (top, faces) in (("Train", "Train_Aligned_Faces"), ("Val", "Val_Aligned_Faces"))
        assert emo in SFEW_FOLDERS
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (112, 112)
    # visibly different domain: darker, lower contrast faces on dark cluttered backgrounds
    raf = np.stack([np.asarray(Image.open(io.BytesIO(render(i % 7, "rafdb", 0, i)))) for i in range(40)])
    sf = np.stack([np.asarray(Image.open(io.BytesIO(render(i % 7, "sfew", 0, i)))) for i in range(40)])
    assert sf.mean() < raf.mean() - 25


def test_same_seed_same_bytes_other_seed_differs(tmp_path, monkeypatch):
    write_synthetic(tmp_path / "a", layout="rafdb", n=25, seed=4)
    write_synthetic(tmp_path / "b", layout="rafdb", n=25, seed=4)
    write_synthetic(tmp_path / "c", layout="rafdb", n=25, seed=5)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    ta, tc = _tree(tmp_path / "a"), _tree(tmp_path / "c")
    imgs = [k for k in ta if k.endswith(".jpg")]
    assert sum(ta[k] != tc.get(k) for k in imgs) == len(imgs)
    # the pooled writer (both cores) writes what the serial one writes
    import pipeline.data.synthetic as syn

    monkeypatch.setattr(syn, "_POOL_MIN_N", 1)
    write_synthetic(tmp_path / "p", layout="sfew", n=30, seed=1, workers=2)
    write_synthetic(tmp_path / "s", layout="sfew", n=30, seed=1, workers=1)
    assert _tree(tmp_path / "p") == _tree(tmp_path / "s")


def _arr(label, index, layout="rafdb"):
    return np.asarray(Image.open(io.BytesIO(render(label, layout, 0, index))), dtype=np.float32)


def test_images_vary_and_only_the_expression_depends_on_the_label():
    # identity, pose, lighting and noise vary from image to image
    same_class = [_arr(3, i) for i in range(12)]
    assert len({a.tobytes() for a in same_class}) == 12
    assert np.mean([np.abs(a - same_class[0]).mean() for a in same_class[1:]]) > 15
    # the same (seed, index) under another label: same person and background, new expression
    for index in range(4):
        neutral = _arr(CLASSES.index("neutral"), index)
        for c in range(6):
            d = np.abs(_arr(c, index) - neutral).mean(axis=2)
            corners = max(d[:12, :12].mean(), d[:12, -12:].mean(), d[-12:, :12].mean(), d[-12:, -12:].mean())
            assert corners < 0.5, (index, CLASSES[c])           # background untouched
            assert d[30:90, 25:75].mean() > 2.0, (index, CLASSES[c])  # the face changed
    # surprise opens the mouth: a dark region under the nose that neutral does not have
    darker = [(_arr(0, i)[65:90, 35:65].mean() < _arr(6, i)[65:90, 35:65].mean()) for i in range(8)]
    assert sum(darker) >= 7


def test_rerun_replaces_own_output_and_refuses_foreign_folder(tmp_path):
    out = tmp_path / "raf"
    write_synthetic(out, layout="rafdb", n=20, seed=0)
    write_synthetic(out, layout="rafdb", n=10, seed=0)          # replaces, no stale files
    assert len(list((out / "Image/aligned").iterdir())) == 10
    assert len(read_layout(out).records) == 10
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".raf.")]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(FerError, match="not empty"):
        write_synthetic(foreign, layout="rafdb", n=5)
    with pytest.raises(FerError):
        write_synthetic(tmp_path / "z", layout="fer2013")
    with pytest.raises(FerError):
        write_synthetic(tmp_path / "z", layout="rafdb", n=0)


def test_fast_enough():
    t0 = time.process_time()   # CPU time: robust to other jobs sharing the machine
    for i in range(60):
        render(i % 7, "rafdb", 0, i)
    per_image = (time.process_time() - t0) / 60
    assert per_image < 0.015   # 1500 images in well under 30 s on one core (measured ~6 ms)
