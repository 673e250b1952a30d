"""Procedurally drawn faces for the seven expressions, written in a real dataset layout.

The synthetic set is the embedded default: a fresh clone runs every stage with no licence-gated
data. The faces are drawn with PIL (2x supersampled, then downsampled) and finished with numpy
(lighting, blur, noise), one ``numpy.random.Generator`` per image seeded from
``(seed, layout, index)``, so the same seed writes the same bytes on any machine with the
pinned stack, whatever its CPU, thread count, locale or time zone: the 8-bit rounding happens in
float64 (CPU-specific math kernels differ by a few ULP), JPEGs use fixed settings and
libjpeg-turbo's integer DCT, PNGs are written here with stored (uncompressed) deflate blocks
(no compressor involved), and no file holds a timestamp or a path.

What is drawn (the cues of each class, the nuisances that vary) is in
:mod:`pipeline.data.face_drawing`; here, what the set holds and how it is encoded and written.

Layouts:

``rafdb``  100x100 JPEG (quality 90), tight aligned crops on soft backgrounds, RAF-DB basic layout
           (``EmoLabel/list_patition_label.txt`` + ``Image/aligned/train_00001_aligned.jpg``),
           about 80/20 train/test, default n=1500.
``sfew``   112x112 PNG (stored, uncompressed), a visibly different "movie still" domain: smaller face with neck and
           shoulders, dark cluttered backgrounds, strong side light, colour casts, more blur and
           noise, larger pose; ``Train/Train_Aligned_Faces/<Emotion>/*.png`` and
           ``Val/Val_Aligned_Faces/<Emotion>/*.png`` (about 70/30), default n=600.

Both use RAF-DB's train class frequencies (surprise 1290, fear 281, disgust 717, happiness 4772,
sadness 1982, anger 705, neutral 2524, as proportions).
"""
from __future__ import annotations

import io
import json
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.outputs import check_replaceable, output_lock, replacing
from pipeline.workers import default_workers, process_pool
from pipeline.data.classes import CLASSES, RAFDB_TRAIN_COUNTS, SFEW_FOLDERS
from pipeline.data.face_drawing import FacePainter, draw_face
from pipeline.errors import FerError

DEFAULT_N = {"rafdb": 1500, "sfew": 600}
_LAYOUT_ID = {"rafdb": 1, "sfew": 2}
_TRAIN_FRACTION = {"rafdb": 0.8, "sfew": 0.7}
_MARKER = ".synthetic.json"
_POOL_MIN_N = 300  # below this, a pool costs more than it saves
JPEG_QUALITY = 90


# --------------------------------------------------------------------------- class counts


def class_counts(n: int) -> list[int]:
    """Split ``n`` into per-class counts proportional to RAF-DB's train distribution
    (largest remainder; every class gets at least one image when n >= 7)."""
    total = sum(RAFDB_TRAIN_COUNTS)
    exact = [n * c / total for c in RAFDB_TRAIN_COUNTS]
    counts = [int(math.floor(e)) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    if n >= len(counts):
        for i in range(len(counts)):
            if counts[i] == 0:  # take one from the largest class
                j = max(range(len(counts)), key=lambda k: counts[k])
                counts[j] -= 1
                counts[i] += 1
    return counts


def plan(n: int, layout: str, seed: int) -> list[tuple[int, str, int]]:
    """(label, split, index-within-split) for every image, in writing order (train then test)."""
    counts = class_counts(n)
    frac = _TRAIN_FRACTION[layout]
    rng = np.random.default_rng([seed, _LAYOUT_ID[layout], 7])
    train, test = [], []
    for label, c in enumerate(counts):
        n_train = int(round(frac * c))
        if c >= 2:
            n_train = min(max(n_train, 1), c - 1)
        train += [label] * n_train
        test += [label] * (c - n_train)
    train = [int(v) for v in rng.permutation(train)] if train else []
    test = [int(v) for v in rng.permutation(test)] if test else []
    return ([(lab, "train", i + 1) for i, lab in enumerate(train)]
            + [(lab, "test", i + 1) for i, lab in enumerate(test)])


# --------------------------------------------------------------------------- encoding


def _png(img: Image.Image) -> bytes:
    """``img`` (RGB) as a PNG whose bytes depend on the pixels only: filter 0 and *stored*
    (uncompressed) deflate blocks, written here. A compressor's output is not fixed by its
    format: zlib and zlib-ng (Pillow's) differ, and zlib-ng does not promise the same bytes
    across versions or CPUs. Costs ~1.5x the size of a compressed PNG; any PNG reader reads it."""
    w, h = img.size
    px = np.asarray(img.convert("RGB"), dtype=np.uint8).reshape(h, w * 3)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), px], axis=1).tobytes()  # filter byte 0
    blocks = [b"\x78\x01"]  # zlib header: deflate, 32K window, no dictionary
    for i in range(0, len(raw), 0xFFFF):
        part = raw[i:i + 0xFFFF]
        last = int(i + 0xFFFF >= len(raw))
        blocks.append(struct.pack("<BHH", last, len(part), len(part) ^ 0xFFFF) + part)
    blocks.append(struct.pack(">I", zlib.adler32(raw)))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"".join(blocks)) + chunk(b"IEND", b""))


def render(label: int, layout: str = "rafdb", seed: int = 0, index: int = 0, *,
           painter: type[FacePainter] = FacePainter) -> bytes:
    """The encoded bytes (JPEG for rafdb, PNG for sfew) of one synthetic face. ``painter``
    draws it: a subclass can watch the drawing (the face benchmark takes its landmarks so)."""
    rng = np.random.default_rng([seed, _LAYOUT_ID[layout], index])
    img = draw_face(rng, label, layout, painter)
    if layout == "sfew":
        return _png(img)
    buf = io.BytesIO()  # libjpeg-turbo: integer DCT, the same bytes with or without its SIMD
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False,
             progressive=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- writing


def _relpath(layout: str, label: int, split: str, k: int) -> str:
    if layout == "rafdb":
        return f"Image/aligned/{split}_{k:05d}_aligned.jpg"
    top = "Train" if split == "train" else "Val"
    return f"{top}/{top}_Aligned_Faces/{SFEW_FOLDERS[label]}/sfew_{split}_{k:05d}.png"


def _write_chunk(args) -> int:
    root, layout, seed, jobs = args
    for index, label, rel in jobs:
        p = os.path.join(root, rel)
        with open(p, "wb") as fh:
            fh.write(render(label, layout, seed, index))
    return len(jobs)


def write_synthetic(out: str | os.PathLike, layout: str = "rafdb", n: int | None = None,
                    seed: int = 0, workers: int | None = None) -> dict:
    """Write ``n`` synthetic faces at ``out`` in the real ``layout`` ("rafdb" or "sfew").

    The folder is written next to ``out`` and renamed into place at the end. An existing
    ``out`` is replaced only if it is empty or a previous synthetic set (it holds the
    ``.synthetic.json`` marker); anything else is an error. Returns a summary dict with
    ``counts`` (split -> class name -> images).
    """
    if layout not in DEFAULT_N:
        raise FerError(f"unknown synthetic layout {layout!r}; use 'rafdb' or 'sfew'")
    n = DEFAULT_N[layout] if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise FerError(f"n = {n!r}: the number of images must be an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FerError(f"seed = {seed!r}: must be an integer")
    out = Path(out)
    check_replaceable(out, what="fer synth", markers=(_MARKER,))
    try:
        with output_lock(out, "the synthetic set"):
            check_replaceable(out, what="fer synth", markers=(_MARKER,))
            return _write(out, layout, n, seed, workers)
    except OSError as e:
        raise FerError(f"cannot write the synthetic set at {out}: {e}") from e


def _write(out: Path, layout: str, n: int, seed: int, workers: int | None) -> dict:
    items = plan(n, layout, seed)
    jobs = [(i, lab, _relpath(layout, lab, split, k)) for i, (lab, split, k) in enumerate(items)]
    counts: dict[str, dict[str, int]] = {"train": {c: 0 for c in CLASSES}, "test": {c: 0 for c in CLASSES}}
    for lab, split, _ in items:
        counts[split][CLASSES[lab]] += 1

    with replacing(out) as tmp:
        for d in sorted({os.path.dirname(rel) for _, _, rel in jobs}):
            (tmp / d).mkdir(parents=True, exist_ok=True)
        if layout == "rafdb":
            (tmp / "EmoLabel").mkdir()
            lines = [f"{split}_{k:05d}.jpg {lab + 1}\n" for lab, split, k in items]
            (tmp / "EmoLabel" / "list_patition_label.txt").write_text("".join(lines))
        else:
            for top in ("Train/Train_Aligned_Faces", "Val/Val_Aligned_Faces"):
                for folder in SFEW_FOLDERS:
                    (tmp / top / folder).mkdir(parents=True, exist_ok=True)
        workers = min(default_workers(workers), 8)
        chunks = [jobs[i:i + 64] for i in range(0, len(jobs), 64)]
        if workers > 1 and n >= _POOL_MIN_N:
            with process_pool(workers) as ex:
                list(ex.map(_write_chunk, [(str(tmp), layout, seed, c) for c in chunks]))
        else:
            for c in chunks:
                _write_chunk((str(tmp), layout, seed, c))
        summary = {"layout": layout, "n": n, "seed": seed, "counts": counts}
        (tmp / _MARKER).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    summary["path"] = str(out)
    return summary
