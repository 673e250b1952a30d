"""Ingest: parquet schema, val stratification, bad inputs, report, atomicity, determinism, CLI."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.data.classes import CLASSES
from pipeline.data.ingest import SCHEMA, ingest
from pipeline.data.synthetic import write_synthetic
from pipeline.errors import FerError

COLUMNS = ["image", "label", "label_name", "split", "source", "sha256", "height", "width"]


@pytest.fixture(scope="module")
def raf300(tmp_path_factory) -> Path:
    """A synthetic RAF-DB set big enough to use the process pools (synth and validation)."""
    root = tmp_path_factory.mktemp("raf300") / "rafdb"
    write_synthetic(root, layout="rafdb", n=300, seed=11)
    return root


@pytest.fixture(scope="module")
def ingested(raf300, tmp_path_factory):
    base = tmp_path_factory.mktemp("ing")
    rep = ingest(raf300, base / "pq", report_path=base / "report.json", progress=False)
    return base, rep


def _bytes(p: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(p.glob("*.parquet"))}


def test_parquet_schema_and_content(raf300, ingested):
    base, rep = ingested
    out = base / "pq"
    assert sorted(f.name for f in out.iterdir()) == [".fer-output.json", "test.parquet", "train.parquet", "val.parquet"]
    dset = ds.dataset(out)
    assert dset.schema.names == COLUMNS
    assert dset.schema.equals(SCHEMA)
    assert dset.schema.field("label").type == pa.int8()
    assert dset.schema.field("height").type == pa.int32() and dset.schema.field("width").type == pa.int32()
    assert dset.schema.field("image").type == pa.binary()
    t = dset.to_table()
    assert t.num_rows == 300 == sum(rep["counts"].values())
    for f in ("train", "val", "test"):
        ft = pq.read_table(out / f"{f}.parquet")
        assert set(ft.column("split").to_pylist()) == {f}
        assert ft.num_rows == rep["counts"][f]
    rows = t.to_pylist()
    labels_file = (raf300 / "EmoLabel/list_patition_label.txt").read_text().split()
    truth = {f"Image/aligned/{n[:-4]}_aligned.jpg": int(l) - 1 for n, l in zip(labels_file[::2], labels_file[1::2])}
    for r in rows[:: 7]:
        raw = (raf300 / r["source"]).read_bytes()
        assert r["image"] == raw                                   # bytes untouched
        assert r["sha256"] == hashlib.sha256(raw).hexdigest()
        assert r["label"] == truth[r["source"]] and r["label_name"] == CLASSES[r["label"]]
        assert (r["height"], r["width"]) == (100, 100)
        assert r["split"] == ("test" if r["source"].split("/")[-1].startswith("test_") else r["split"])
    assert {r["source"] for r in rows} == set(truth)
    # test rows are exactly the test_ files; train/val exactly the train_ files
    assert {r["source"] for r in rows if r["split"] == "test"} == {s for s in truth if "/test_" in s}


def test_report_fields(ingested):
    base, rep = ingested
    on_disk = json.loads((base / "report.json").read_text())
    run = rep["run"]  # this run's own figures: returned, never written
    assert on_disk == json.loads(json.dumps({k: v for k, v in rep.items() if k != "run"}))
    assert not {"run", "seconds", "images_per_s", "workers", "report_path"} & set(on_disk)
    assert run["images_per_s"] > 0 and run["seconds"] >= 0 and run["workers"] >= 1
    assert run["report_path"] == str(base / "report.json") and Path(run["src"]).is_absolute()
    assert on_disk["out"] == str(base / "pq") and run["out"] == str((base / "pq").resolve())
    assert rep["dataset"] == "rafdb" and rep["layout"] == "rafdb_basic"
    assert set(rep["counts"]) == {"train", "val", "test"}
    for s in rep["counts"]:
        assert sum(rep["class_counts"][s].values()) == rep["counts"][s]
        assert list(rep["class_counts"][s]) == list(CLASSES)
    assert rep["rejected"] == [] and rep["converted"] == {}
    assert rep["duplicates"]["leakage"] == [] and rep["duplicates"]["within_split"] == []
    assert rep["bad"]["train"]["fraction"] == 0.0


def test_val_is_stratified_and_seeded(raf300, ingested, tmp_path):
    base, rep = ingested
    cc = rep["class_counts"]
    for c in CLASSES:
        n = cc["train"][c] + cc["val"][c]
        assert cc["val"][c] == round(0.1 * n), c
        if n >= 2:
            assert cc["train"][c] >= 1
    assert rep["counts"]["val"] > 0
    val1 = set(pq.read_table(base / "pq/val.parquet").column("source").to_pylist())
    rep2 = ingest(raf300, tmp_path / "pq2", report_path=tmp_path / "r.json", seed=1,
                  val_fraction=0.2, progress=False, workers=1)
    val2 = set(pq.read_table(tmp_path / "pq2/val.parquet").column("source").to_pylist())
    assert val1 != val2 and len(val2) > len(val1)
    for c in CLASSES:
        n = rep2["class_counts"]["train"][c] + rep2["class_counts"]["val"][c]
        assert rep2["class_counts"]["val"][c] == round(0.2 * n)


def test_same_seed_same_parquet_bytes(raf300, ingested, tmp_path):
    base, _ = ingested
    ingest(raf300, tmp_path / "again", report_path=tmp_path / "r.json", progress=False, workers=1)
    assert _bytes(tmp_path / "again") == _bytes(base / "pq")


# --------------------------------------------------------------------------- bad inputs


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_raf(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A small RAF-DB set with one file of every bad kind in train, and the expected reasons."""
    base = tmp_path_factory.mktemp("bad")
    root = base / "rafdb"
    write_synthetic(root, layout="rafdb", n=70, seed=5)
    img = root / "Image/aligned"
    names = sorted(p.name for p in img.glob("train_*"))
    src = lambda n: f"Image/aligned/{n}"  # noqa: E731
    expect = {}
    full = (img / names[0]).read_bytes()
    (img / names[0]).write_bytes(full[: len(full) // 2])
    expect[src(names[0])] = "truncated"
    (img / names[1]).write_bytes(b"")
    expect[src(names[1])] = "zero-byte"
    (img / names[2]).write_bytes(b"this is a text file, not a JPEG\n" * 20)
    expect[src(names[2])] = "not an image"
    # a real 20000x20000 image (400 megapixels), 1-bit PNG: small on disk
    (img / names[3]).write_bytes(_encode(Image.new("1", (20000, 20000)), "PNG"))
    expect[src(names[3])] = "decompression bomb"
    # converted, not rejected
    face = Image.open(img / names[4]).convert("RGB")
    (img / names[4]).write_bytes(_encode(face.convert("L"), "JPEG"))
    (img / names[5]).write_bytes(_encode(face.convert("CMYK"), "JPEG"))
    (img / names[6]).write_bytes(_encode(face.convert("P"), "PNG"))
    lines = (root / "EmoLabel/list_patition_label.txt").read_text()
    lines += "train_09001.jpg 3\n" + "train_09002.jpg 8\n" + "../../../x/train_09003.jpg 2\n"
    (root / "EmoLabel/list_patition_label.txt").write_text(lines)
    (base / "x").mkdir()
    (base / "x/train_09003_aligned.jpg").write_bytes((img / names[7]).read_bytes())
    expect["Image/aligned/train_09001_aligned.jpg"] = "missing"
    expect["Image/aligned/train_09002_aligned.jpg"] = "outside 1..7"
    expect["../x/train_09003_aligned.jpg"] = "escapes the dataset root"
    # duplicates: one train image copied over a test image (leakage), two train files identical
    tests = sorted(p.name for p in img.glob("test_*"))
    (img / tests[0]).write_bytes((img / names[8]).read_bytes())
    (img / names[10]).write_bytes((img / names[9]).read_bytes())
    return root, expect, (names, tests)


def test_every_bad_input_is_reported_by_name_and_reason(bad_raf, tmp_path, monkeypatch):
    import pipeline.data.ingest as ing

    monkeypatch.setattr(ing, "_CHUNK", 8)   # small chunks: the process pool path runs
    root, expect, (names, tests) = bad_raf
    t0 = time.perf_counter()
    rep = ingest(root, tmp_path / "pq", report_path=tmp_path / "r.json", max_bad_fraction=0.5,
                 progress=False, workers=2)
    assert time.perf_counter() - t0 < 20
    got = {r["source"]: r["reason"] for r in rep["rejected"]}
    assert set(got) == set(expect)
    for s, word in expect.items():
        assert word in got[s], (s, got[s])
    assert all(r["split"] == "train" for r in rep["rejected"])
    assert rep["converted"] == {"CMYK": 1, "L": 1, "P": 1}
    # converted images are kept with their bytes untouched and their real size
    t = ds.dataset(tmp_path / "pq").to_table().to_pylist()
    by_src = {r["source"]: r for r in t}
    for n in names[4:7]:
        r = by_src[f"Image/aligned/{n}"]
        assert r["image"] == (root / r["source"]).read_bytes() and (r["height"], r["width"]) == (100, 100)
    assert not any(s in by_src for s in expect)
    # duplicates
    leak = rep["duplicates"]["leakage"]
    assert len(leak) == 1
    assert {e["source"] for e in leak[0]["entries"]} == {f"Image/aligned/{names[8]}", f"Image/aligned/{tests[0]}"}
    assert "test" in leak[0]["splits"]
    within = rep["duplicates"]["within_split"]
    assert len(within) == 1 and len(within[0]["splits"]) == 1       # carved val keeps them together
    assert {e["source"] for e in within[0]["entries"]} == {f"Image/aligned/{names[9]}", f"Image/aligned/{names[10]}"}
    bad = rep["bad"]["train"]
    assert bad["bad"] == len(expect) and bad["fraction"] == pytest.approx(bad["bad"] / bad["total"], abs=1e-5)


def test_too_many_bad_files_fails_with_one_clear_line(bad_raf, tmp_path):
    root, expect, _ = bad_raf
    old = tmp_path / "pq"
    old.mkdir()
    (old / "keep.parquet").write_bytes(b"old")
    (old / ".fer-output.json").write_text("{}")  # a previous ingest output: may be replaced
    report = tmp_path / "reports" / "bad.json"
    with pytest.raises(FerError) as e:
        ingest(root, old, report_path=report, progress=False)   # default max_bad_fraction 0.05
    msg = str(e.value)
    assert "'train'" in msg and str(report) in msg and "max_bad_fraction" in msg and "%" in msg
    assert "\n" not in msg
    rep = json.loads(report.read_text())                         # report still written
    assert rep["failed"] is True and len(rep["rejected"]) == len(expect)
    assert sorted(p.name for p in old.iterdir()) == [".fer-output.json", "keep.parquet"]  # old OUT untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pq.")]


def test_sfew_unknown_emotion_folder_and_symlink_reported(tmp_path):
    root = tmp_path / "sfew"
    write_synthetic(root, layout="sfew", n=40, seed=4)
    faces = root / "Train/Train_Aligned_Faces"
    (faces / "Contempt").mkdir()
    shutil.copy(next((faces / "Happy").iterdir()), faces / "Contempt/c.png")
    outside = tmp_path / "outside.png"
    shutil.copy(next((faces / "Sad").iterdir()), outside)
    os.symlink(outside, faces / "Sad/link.png")
    rep = ingest(root, tmp_path / "pq", report_path=tmp_path / "r.json", max_bad_fraction=0.2,
                 progress=False)
    got = {r["source"]: r["reason"] for r in rep["rejected"]}
    assert got == {"Train/Train_Aligned_Faces/Contempt/c.png": "unknown emotion folder 'Contempt'",
                   "Train/Train_Aligned_Faces/Sad/link.png": "symlink escapes the dataset root"}
    assert rep["dataset"] == "sfew" and rep["layout"] == "sfew"
    t = ds.dataset(tmp_path / "pq").to_table(columns=["split", "height", "label", "source"]).to_pylist()
    assert {r["height"] for r in t} == {112}
    assert {r["split"] for r in t} == {"train", "val", "test"}
    assert all(r["split"] == "test" for r in t if r["source"].startswith("Val/"))


def test_imagefolder_keeps_its_own_val_and_class_names(tmp_path):
    root = tmp_path / "animals"
    for split, k in (("train", 6), ("val", 2)):
        for c, col in (("cat", (200, 10, 10)), ("dog", (10, 200, 10))):
            for i in range(k):
                p = root / split / c / f"{i}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (16 + i, 16), col).save(p)
    rep = ingest(root, tmp_path / "pq", report_path=tmp_path / "r.json", progress=False)
    assert rep["dataset"] == "animals" and rep["layout"] == "imagefolder"
    assert rep["counts"] == {"train": 12, "val": 4, "test": 0}
    assert rep["val"]["source"] == "folder"
    t = ds.dataset(tmp_path / "pq").to_table()
    assert set(zip(t.column("label").to_pylist(), t.column("label_name").to_pylist())) == {(0, "cat"), (1, "dog")}
    assert sorted(p.name for p in (tmp_path / "pq").iterdir()) == [".fer-output.json", "train.parquet", "val.parquet"]


# --------------------------------------------------------------------------- atomicity


def test_killed_ingest_leaves_no_parquet_and_keeps_old_out(raf300, tmp_path):
    """SIGKILL an ingest after its parquet is written but before the swap."""
    out = tmp_path / "pq"
    out.mkdir()
    (out / "train.parquet").write_bytes(b"previous")
    flag = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import os, time
        import pipeline.data.ingest as ing
        real = os.replace
        def slow(a, b):
            if str(a).find(".pq.tmp-") >= 0 or str(b).endswith("/x"):
                open({str(flag)!r}, "w").close()
                time.sleep(60)
            return real(a, b)
        os.replace = slow  # the swap (pipeline.outputs) renames with os.replace
        ing.ingest({str(raf300)!r}, {str(out)!r}, report_path={str(tmp_path / 'r.json')!r},
                   progress=False, workers=1)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(600):
            if flag.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert flag.exists(), "ingest never reached the swap"
        tmps = [p for p in tmp_path.iterdir() if p.name.startswith(".pq.tmp-")]
        assert len(tmps) == 1 and (tmps[0] / "train.parquet").stat().st_size > 0
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (out / "train.parquet").read_bytes() == b"previous"   # old OUT intact
    assert sorted(p.name for p in out.iterdir()) == ["train.parquet"]
    # the next run removes the dead run's temp folder and replaces OUT
    rep = ingest(raf300, out, report_path=tmp_path / "r.json", progress=False, workers=1)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pq.")]
    assert ds.dataset(out).count_rows() == sum(rep["counts"].values()) == 300


def test_failure_while_writing_cleans_up(raf300, tmp_path, monkeypatch):
    import pipeline.data.ingest as ing

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ing, "_write_split", boom)
    with pytest.raises(KeyboardInterrupt):
        ing.ingest(raf300, tmp_path / "pq", report_path=tmp_path / "r.json", progress=False, workers=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kw", [dict(val_fraction=1.0), dict(max_bad_fraction=-0.1)])
def test_bad_arguments(raf300, tmp_path, kw):
    with pytest.raises(FerError):
        ingest(raf300, tmp_path / "pq", report_path=tmp_path / "r.json", progress=False, **kw)


def test_out_must_not_contain_src(raf300, tmp_path):
    with pytest.raises(FerError, match="must not be the dataset folder"):
        ingest(raf300, raf300.parent, progress=False)


# --------------------------------------------------------------------------- CLI


def test_cli_synth_and_ingest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "faces", "--layout", "sfew", "--n", "21", "--seed", "3"]) == 0
    assert main(["ingest", "faces", "pq", "--workers", "1"]) == 0
    cap = capsys.readouterr()
    assert "ingested sfew (sfew)" in cap.out
    assert "ingest: validating 21/21" in cap.err and "img/s" in cap.err   # the progress bar
    assert "ingest: 21 files in " in cap.err and "1 worker)" in cap.err  # timing: printed only
    rep = json.loads(Path("reports/ingest_sfew.json").read_text())
    assert rep["src"] == "faces" and rep["out"] == "pq"  # as given: no machine's absolute path
    assert "seconds" not in rep and "run" not in rep
    assert ds.dataset("pq").count_rows() == 21


def test_cli_bad_folder_exits_nonzero_with_one_line(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk/a.txt").write_text("x")
    assert main(["ingest", str(tmp_path / "junk"), str(tmp_path / "pq")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("fer ingest: error:") and "\n" not in err and "ImageFolder" in err
    assert main(["ingest", str(tmp_path / "nope"), str(tmp_path / "pq")]) != 0
    assert "not found" in capsys.readouterr().err
    (tmp_path / "notempty").mkdir()
    (tmp_path / "notempty/mine.txt").write_text("keep")
    assert main(["synth", str(tmp_path / "notempty"), "--layout", "rafdb", "--n", "5"]) != 0
    err = capsys.readouterr().err.strip()
    assert "not empty" in err and "\n" not in err
    assert (tmp_path / "notempty/mine.txt").read_text() == "keep"
    # an OUT that cannot be created (its parent is a file): one line, no traceback
    assert main(["synth", str(tmp_path / "notempty/mine.txt/faces"), "--layout", "rafdb", "--n", "5"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("fer synth: error: cannot write") and "\n" not in err
    assert main(["synth", str(tmp_path / "ok"), "--layout", "rafdb", "--n", "5"]) == 0
    assert main(["ingest", str(tmp_path / "ok"), str(tmp_path / "notempty/mine.txt/pq"),
                 "--report", str(tmp_path / "r.json")]) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fer ingest: error: cannot write the parquet dataset")


def test_serial_validation_leaves_pil_settings_alone(bad_raf, tmp_path):
    from PIL import ImageFile

    before = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    root, expect, _ = bad_raf
    rep = ingest(root, tmp_path / "pq", report_path=tmp_path / "r.json", max_bad_fraction=0.5,
                 progress=False, workers=1)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before
    assert {r["source"] for r in rep["rejected"]} == set(expect)   # same verdicts without a pool
