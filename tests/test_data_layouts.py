"""Layout readers and detection, on folders the tests write (the synthetic writer included)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.classes import CLASSES, SFEW_TO_INDEX, sfew_index
from pipeline.data.layouts import (LAYOUTS, detect_layout, read_layout, read_rafdb_basic,
                                   read_sfew)
from pipeline.data.synthetic import write_synthetic
from pipeline.errors import FerError


def _jpeg(color=(120, 80, 60), size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _put(p: Path, data: bytes | None = None) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(_jpeg() if data is None else data)
    return p


def _reasons(scan) -> dict[str, str]:
    return {r.source: r.reason for r in scan.rejected}


# --------------------------------------------------------------------------- classes


def test_class_order_is_rafdb_minus_one_and_sfew_maps_by_name():
    assert CLASSES == ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")
    folders = ["Surprise", "Fear", "Disgust", "Happy", "Sad", "Angry", "Neutral"]
    assert [SFEW_TO_INDEX[f] for f in folders] == list(range(7))
    assert [SFEW_TO_INDEX[f.upper()] for f in folders] == list(range(7))
    assert "happy" in SFEW_TO_INDEX and "HAPPY" in SFEW_TO_INDEX
    # never alphabetical: sorted(folders)[0] is Angry, which must be anger (5), not 0
    assert SFEW_TO_INDEX[sorted(folders)[0]] == CLASSES.index("anger")
    assert sfew_index("Contempt") is None


# --------------------------------------------------------------------------- RAF-DB basic


@pytest.fixture(scope="module")
def raf_synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raf") / "rafdb"
    write_synthetic(root, layout="rafdb", n=40, seed=3)
    return root


def test_rafdb_basic_reads_synthetic_set(raf_synth):
    assert detect_layout(raf_synth) == "rafdb_basic"
    scan = read_layout(raf_synth)
    assert scan.layout == "rafdb_basic" and scan.default_dataset == "rafdb"
    assert not scan.rejected
    assert len(scan.records) == 40
    lines = (raf_synth / "EmoLabel/list_patition_label.txt").read_text().split("\n")
    expect = {}
    for line in filter(None, lines):
        name, lab = line.split()
        expect[f"Image/aligned/{name[:-4]}_aligned.jpg"] = (int(lab) - 1, name.split("_")[0])
    assert {r.source: (r.label, r.split) for r in scan.records} == expect
    assert {r.split for r in scan.records} == {"train", "test"}
    assert all((raf_synth / r.source).is_file() for r in scan.records)


def test_rafdb_basic_bad_label_lines(tmp_path):
    root = tmp_path / "raf"
    outside = _put(tmp_path / "secret" / "train_00009_aligned.jpg")
    assert outside.is_file()
    _put(root / "Image/aligned/train_00001_aligned.jpg")
    _put(root / "Image/aligned/test_00001_aligned.jpg")
    _put(root / "Image/aligned/train_00002_aligned.jpg")
    (root / "EmoLabel").mkdir(parents=True)
    (root / "EmoLabel/list_patition_label.txt").write_text(
        "train_00001.jpg 4\n"
        "test_00001.jpg 7\n"
        "train_00002.jpg 9\n"          # label outside 1..7
        "train_00003.jpg 0\n"          # label outside 1..7 (and missing)
        "train_00004.jpg 2\n"          # missing file
        "../../../secret/train_00009.jpg 3\n"  # escapes the root (the file exists out there)
        "train_00001.jpg 4\n"          # listed twice
        "photo_1.jpg 3\n"              # no split prefix
        "train_00005.jpg\n"            # malformed
        "train_00006.jpg x\n")         # not an integer
    scan = read_rafdb_basic(root)
    assert [(r.source, r.label, r.split) for r in scan.records] == [
        ("Image/aligned/train_00001_aligned.jpg", 3, "train"),
        ("Image/aligned/test_00001_aligned.jpg", 6, "test")]
    why = _reasons(scan)
    assert "outside 1..7" in why["Image/aligned/train_00002_aligned.jpg"]
    assert "outside 1..7" in why["Image/aligned/train_00003_aligned.jpg"]
    assert "missing" in why["Image/aligned/train_00004_aligned.jpg"]
    esc = [s for s in why if "secret" in s]
    assert len(esc) == 1 and "escapes the dataset root" in why[esc[0]]
    assert any("listed twice" in r for r in why.values())
    assert any("neither a train_ nor a test_ prefix" in r for r in why.values())
    assert any("malformed" in r for r in why.values())
    assert any("not an integer" in r for r in why.values())
    assert all(":" in r and "list_patition_label.txt" in r for r in why.values())  # names the line
    assert {r.split for r in scan.rejected} >= {"train"}


def test_rafdb_basic_symlink_escape(tmp_path):
    root = tmp_path / "raf"
    target = _put(tmp_path / "elsewhere.jpg")
    (root / "Image/aligned").mkdir(parents=True)
    os.symlink(target, root / "Image/aligned/train_00001_aligned.jpg")
    os.symlink(target, root / "Image/aligned/train_00002_aligned.jpg")
    _put(root / "Image/aligned/train_00003_aligned.jpg")
    os.symlink(root / "Image/aligned/train_00003_aligned.jpg", root / "Image/aligned/train_00004_aligned.jpg")
    (root / "EmoLabel").mkdir()
    (root / "EmoLabel/list_patition_label.txt").write_text(
        "train_00001.jpg 1\ntrain_00003.jpg 1\ntrain_00004.jpg 2\n")
    scan = read_layout(root)
    assert [r.source for r in scan.records] == ["Image/aligned/train_00003_aligned.jpg",
                                                "Image/aligned/train_00004_aligned.jpg"]
    assert "escapes" in _reasons(scan)["Image/aligned/train_00001_aligned.jpg"]


def test_rafdb_basic_nested_in_basic_folder(tmp_path):
    root = tmp_path / "RAF"
    write_synthetic(root / "basic", layout="rafdb", n=8, seed=1)
    assert detect_layout(root) == "rafdb_basic"
    scan = read_layout(root)
    assert len(scan.records) == 8 and all(r.source.startswith("basic/Image/aligned/") for r in scan.records)


# --------------------------------------------------------------------------- RAF-DB re-packaged


def test_rafdb_repackaged(tmp_path):
    root = tmp_path / "raf2"
    for split in ("train", "test"):
        for lab in range(1, 8):
            _put(root / "DATASET" / split / str(lab) / f"{split}_{lab}_a.jpg")
    _put(root / "DATASET/train/8/x.jpg")
    _put(root / "DATASET/train/0/y.jpg")
    _put(root / "DATASET/train/misc/z.jpg")
    _put(root / "DATASET/test/loose.jpg")
    _put(root / "DATASET/train/3/.DS_Store", b"junk")  # dotfiles are skipped, not rejected
    assert detect_layout(root) == "rafdb_repackaged"
    scan = read_layout(root)
    assert scan.layout == "rafdb_repackaged"
    got = sorted((r.split, r.label, r.source) for r in scan.records)
    assert len(got) == 14
    assert ("train", 0, "DATASET/train/1/train_1_a.jpg") in got
    assert ("test", 6, "DATASET/test/7/test_7_a.jpg") in got
    why = _reasons(scan)
    assert "outside 1..7" in why["DATASET/train/8/x.jpg"]
    assert "outside 1..7" in why["DATASET/train/0/y.jpg"]
    assert "unknown label folder" in why["DATASET/train/misc/z.jpg"]
    assert "not inside a label folder" in why["DATASET/test/loose.jpg"]
    assert len(why) == 4


# --------------------------------------------------------------------------- SFEW


@pytest.fixture(scope="module")
def sfew_synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sfew") / "sfew"
    write_synthetic(root, layout="sfew", n=30, seed=2)
    return root


def test_sfew_reads_synthetic_set_by_name(sfew_synth):
    assert detect_layout(sfew_synth) == "sfew"
    scan = read_layout(sfew_synth)
    assert not scan.rejected and len(scan.records) == 30
    for r in scan.records:
        parts = r.source.split("/")
        assert r.label == SFEW_TO_INDEX[parts[-2]]
        assert r.split == {"Train": "train", "Val": "test"}[parts[0]]
        assert parts[1] in ("Train_Aligned_Faces", "Val_Aligned_Faces")
    assert {r.split for r in scan.records} == {"train", "test"}


def test_sfew_bad_folders_any_depth_and_symlinks(tmp_path):
    root = tmp_path / "SFEW"
    _put(root / "Train/Train_Aligned_Faces/Angry/a.png")
    _put(root / "Train/Train_Aligned_Faces/happy/b.png")           # any letter case
    _put(root / "Train/deeper/still/Sad/sub/c.png")                 # nested below the emotion
    _put(root / "Train/Train_Aligned_Faces/Contempt/d.png")         # unknown emotion
    _put(root / "Train/readme.png")                                 # no emotion folder at all
    _put(root / "Val/Surprise/e.png")                               # emotion directly in Val
    _put(root / "Test/Test_Aligned_Faces/f.png")                    # unlabelled: ignored
    outside = _put(tmp_path / "outside.png")
    os.symlink(outside, root / "Val/Surprise/link.png")
    (tmp_path / "outdir").mkdir()
    _put(tmp_path / "outdir" / "g.png")
    os.symlink(tmp_path / "outdir", root / "Train/Train_Aligned_Faces/Neutral", target_is_directory=True)
    assert detect_layout(root) == "sfew"
    scan = read_sfew(root)
    got = {r.source: (r.label, r.split) for r in scan.records}
    assert got == {
        "Train/Train_Aligned_Faces/Angry/a.png": (CLASSES.index("anger"), "train"),
        "Train/Train_Aligned_Faces/happy/b.png": (CLASSES.index("happiness"), "train"),
        "Train/deeper/still/Sad/sub/c.png": (CLASSES.index("sadness"), "train"),
        "Val/Surprise/e.png": (CLASSES.index("surprise"), "test"),
    }
    why = _reasons(scan)
    assert why["Train/Train_Aligned_Faces/Contempt/d.png"] == "unknown emotion folder 'Contempt'"
    assert why["Train/readme.png"] == "not inside an emotion folder"
    assert "escapes" in why["Val/Surprise/link.png"]
    assert "escapes" in why["Train/Train_Aligned_Faces/Neutral"]
    assert not any("Test" in s for s in why) and not any("Test" in s for s in got)


# --------------------------------------------------------------------------- ImageFolder


def test_imagefolder_fer_names_use_fer_order(tmp_path):
    root = tmp_path / "faces"
    for split in ("train", "test"):
        for name in ("happy", "Angry", "neutral", "surprise"):
            _put(root / split / name / "1.jpg")
    assert detect_layout(root) == "imagefolder"
    scan = read_layout(root)
    assert scan.class_names == CLASSES and scan.default_dataset == "faces"
    got = {r.source: r.label for r in scan.records}
    assert got["train/happy/1.jpg"] == 3 and got["test/Angry/1.jpg"] == 5
    assert got["train/surprise/1.jpg"] == 0 and got["train/neutral/1.jpg"] == 6


def test_imagefolder_generic_classes_sorted(tmp_path):
    root = tmp_path / "animals"
    _put(root / "train/zebra/1.jpg")
    _put(root / "train/cat/1.jpg")
    _put(root / "train/dog/sub/2.jpg")
    _put(root / "validation/dog/3.jpg")
    _put(root / "train/stray.jpg")
    scan = read_layout(root)
    assert scan.layout == "imagefolder"
    assert scan.class_names == ("cat", "dog", "zebra")
    got = {r.source: (r.label, r.split) for r in scan.records}
    assert got == {"train/cat/1.jpg": (0, "train"), "train/dog/sub/2.jpg": (1, "train"),
                   "train/zebra/1.jpg": (2, "train"), "validation/dog/3.jpg": (1, "val")}
    assert _reasons(scan) == {"train/stray.jpg": "not inside a class folder"}


def test_lowercase_train_with_emotion_classes_is_imagefolder_not_sfew(tmp_path):
    root = tmp_path / "x"
    _put(root / "train/Happy/1.jpg")
    _put(root / "val/Sad/1.jpg")
    assert detect_layout(root) == "imagefolder"
    root2 = tmp_path / "y"
    _put(root2 / "train/Train_Aligned_Faces/Happy/1.jpg")
    assert detect_layout(root2) == "sfew"


# --------------------------------------------------------------------------- detection errors


@pytest.mark.parametrize("make", ["empty", "flat", "missing"])
def test_unrecognised_folder_names_the_layouts(tmp_path, make):
    root = tmp_path / "junk"
    if make != "missing":
        root.mkdir()
    if make == "flat":
        _put(root / "a.jpg")
        (root / "notes").mkdir()
    with pytest.raises(FerError) as e:
        detect_layout(root)
    msg = str(e.value)
    if make == "missing":
        assert "not found" in msg
    else:
        for name in ("RAF-DB basic", "RAF-DB re-packaged", "SFEW", "ImageFolder"):
            assert name in msg
    assert "\n" not in msg
    assert set(LAYOUTS) == {"rafdb_basic", "rafdb_repackaged", "sfew", "imagefolder"}
