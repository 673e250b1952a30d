"""ImageNet ingest: ILSVRC-2012 (or any ImageFolder) -> sharded parquet, written as it goes.

ImageNet-1k is ~140 GB of JPEG, so unlike the face sets it is never held in memory: files are
read and validated in a process pool a bounded window of chunks ahead of the writer, and each
validated image goes straight into the current shard (``<split>/part-NNNNN.parquet``), closed and
a new one opened every ``shard_mb`` megabytes. Peak memory is the window (a few chunks of
images) plus the file list, whatever the dataset's size. Validation is the face sets' own
(:func:`pipeline.data.validate.check_bytes`, i.e. the one :func:`~pipeline.data.decode.decode`
with its pixel cap), and the report has the face ingest's keys (counts, bad fractions, rejected
files), plus the shard list. Duplicate checks are left out (they would need every hash in memory).

Layouts: ``train/<wnid>/*.JPEG`` with ``val/`` either flat plus ``LOC_val_solution.csv``
(``ImageId,PredictionString``; the prediction string starts with the wnid) or ``val/<wnid>/``;
the Kaggle archive's ``ILSVRC/Data/CLS-LOC/`` root is found too. Anything else that is an
ImageFolder (``<train|val|test>/<class>/``) is read as one. Classes are indexed in sorted name
order (torchvision's ImageFolder order).

Training rows are written in a seeded random order, so every shard mixes all classes and a
streaming reader that shuffles only shard order and a local buffer
(:mod:`pipeline.data.imagenet_stream`) still sees mixed batches.
"""
from __future__ import annotations

import csv
import os
import sys
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import validate
from pipeline.outputs import check_replaceable, output_lock, replacing, write_marker
from pipeline.workers import Progress, default_workers, process_pool
from pipeline.data.ingest import write_json, parquet_schema
from pipeline.data.layouts import (Record, Rejected, Scan, child_dirs, rel_path, walk_files,
                                   read_imagefolder, shown)
from pipeline.errors import FerError

WRITTEN_BY = "fer ingest-imagenet"
VAL_CSV = "LOC_val_solution.csv"
SPLITS = ("train", "val", "test")
_CHUNK = 32
_GROUP_BYTES = 32 << 20     # a parquet row group every ~32 MB (or _GROUP_ROWS rows)
_GROUP_ROWS = 1024


# --------------------------------------------------------------------------- layout


def _ilsvrc_base(root: Path) -> Path:
    kaggle = root / "ILSVRC" / "Data" / "CLS-LOC"
    return kaggle if (kaggle / "train").is_dir() else root


def _find_csv(root: Path, base: Path) -> Path | None:
    for d in (root, base, base / "val", base.parent):
        if (d / VAL_CSV).is_file():
            return d / VAL_CSV
    return None


def read_imagenet(root: str | os.PathLike) -> Scan:
    """The records of an ILSVRC-2012 folder (flat ``val/`` + CSV, or ``val/<wnid>/``) or of
    any ImageFolder; bad entries are rejected, never fatal."""
    root = Path(root)
    if not root.is_dir():
        raise FerError(f"ImageNet folder not found: {root}")
    base = _ilsvrc_base(root)
    val = base / "val"
    flat_val = val.is_dir() and not child_dirs(val) and (base / "train").is_dir()
    if not flat_val:
        if base != root:
            raise FerError(f"{root}: ILSVRC/Data/CLS-LOC has no flat val/ folder")
        scan = read_imagefolder(root)
        scan.layout, scan.default_dataset = "imagefolder", "imagenet"
        return scan
    # train/<wnid>/ as an ImageFolder whose val split is read from the CSV
    real_root = os.path.realpath(root)
    wnids = sorted(child_dirs(base / "train"))
    if not wnids:
        raise FerError(f"{base / 'train'} has no class folders")
    index = {w: i for i, w in enumerate(wnids)}
    scan = Scan("ilsvrc2012", root, class_names=tuple(wnids), default_dataset="imagenet")
    for p in walk_files(root, base / "train", real_root, "train", scan.rejected, warnings=scan.warnings):
        parts = p.relative_to(base / "train").parts
        if len(parts) < 2:
            scan.rejected.append(Rejected(rel_path(root, p), "not inside a class folder", "train"))
            continue
        scan.records.append(Record(rel_path(root, p), index[parts[0]], "train"))
    csv_path = _find_csv(root, base)
    if csv_path is None:
        raise FerError(f"{root}: val/ is flat but {VAL_CSV} (ImageId,PredictionString) was not found "
                       f"beside it or in {root}")
    labels: dict[str, str] = {}
    try:
        with open(csv_path, newline="", encoding="utf-8", errors="replace") as fh:
            for lineno, row in enumerate(csv.DictReader(fh), 2):
                pred = (row.get("PredictionString") or "").split()
                if not row.get("ImageId") or not pred:
                    scan.rejected.append(Rejected(f"{rel_path(root, csv_path)}:{lineno}", "malformed line", "val"))
                    continue
                labels[row["ImageId"]] = pred[0]
    except (OSError, csv.Error) as e:
        raise FerError(f"cannot read {csv_path}: {e}") from e
    if not labels:
        raise FerError(f"{csv_path} has no ImageId,PredictionString rows")
    for p in walk_files(root, val, real_root, "val", scan.rejected):
        src = rel_path(root, p)
        wnid = labels.get(p.stem)
        if wnid is None:
            scan.rejected.append(Rejected(src, f"not listed in {VAL_CSV}", "val"))
        elif wnid not in index:
            scan.rejected.append(Rejected(src, f"class {wnid} has no train/ folder", "val"))
        else:
            scan.records.append(Record(src, index[wnid], "val"))
    return scan


def subset(scan: Scan, *, max_classes: int | None = None, limit_per_class: int | None = None) -> Scan:
    """The first ``max_classes`` classes (sorted name order: labels stay 0..N-1) and the first
    ``limit_per_class`` files per class and split (sorted path order): ImageNet-100 or a smoke test."""
    keep = len(scan.class_names) if max_classes is None else min(max_classes, len(scan.class_names))
    taken: Counter = Counter()
    records = []
    for r in sorted(scan.records, key=lambda r: (r.split, r.label, r.source)):
        if r.label >= keep or (limit_per_class is not None and taken[r.split, r.label] >= limit_per_class):
            continue
        taken[r.split, r.label] += 1
        records.append(r)
    return Scan(scan.layout, scan.root, records=records, rejected=scan.rejected, warnings=scan.warnings,
                class_names=scan.class_names[:keep], default_dataset=scan.default_dataset)


# --------------------------------------------------------------------------- writing


def _read_check(args) -> list[tuple[dict, bytes | None]]:
    """Pool task: read and validate a chunk of files; the bytes come back with the verdict, so
    each file is read once."""
    paths, max_pixels = args
    out = []
    for p in paths:
        try:
            with open(p, "rb") as fh:
                data = fh.read()
        except OSError as e:
            out.append(({"ok": False, "reason": f"unreadable: {e.strerror or e}"}, None))
            continue
        res = validate.check_bytes(data, max_pixels)
        out.append((res, data if res["ok"] else None))
    return out


def _bounded_map(fn, tasks: list, workers: int, max_pixels: int):
    """``map(fn, tasks)`` in order, at most ``2 * workers`` tasks in flight: the results of a
    pool that runs ahead of the writer would otherwise pile up in memory."""
    if workers <= 1 or len(tasks) < 2:
        with validate.configured(max_pixels):
            for t in tasks:
                yield fn(t)
        return
    with process_pool(workers, validate.configure, (max_pixels,)) as ex:
        pending: deque = deque()
        it = iter(tasks)
        for t in it:
            pending.append(ex.submit(fn, t))
            if len(pending) >= 2 * workers:
                break
        while pending:
            res = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(ex.submit(fn, nxt))
            yield res


class ShardWriter:
    """Parquet files of about ``shard_bytes`` each in ``folder`` (``part-NNNNN.parquet``)."""

    def __init__(self, folder: Path, schema: pa.Schema, shard_bytes: int):
        self.folder, self.schema, self.shard_bytes = folder, schema, max(1, int(shard_bytes))
        self.files: list[str] = []
        self.rows: list[int] = []
        self._writer = None
        self._in_shard = 0
        self._buf: dict[str, list] = {k: [] for k in schema.names}
        self._buf_bytes = 0

    def add(self, row: dict) -> None:
        for k in self.schema.names:
            self._buf[k].append(row[k])
        self._buf_bytes += len(row["image"])
        if self._buf_bytes >= min(_GROUP_BYTES, self.shard_bytes) or len(self._buf["image"]) >= _GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        n = len(self._buf["image"])
        if not n:
            return
        if self._writer is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            name = f"part-{len(self.files):05d}.parquet"
            self._writer = pq.ParquetWriter(self.folder / name, self.schema,
                                            compression={k: ("NONE" if k == "image" else "ZSTD")
                                                         for k in self.schema.names})
            self.files.append(name)
            self.rows.append(0)
        self._writer.write_table(pa.table(self._buf, schema=self.schema))
        self.rows[-1] += n
        self._in_shard += self._buf_bytes
        self._buf = {k: [] for k in self.schema.names}
        self._buf_bytes = 0
        if self._in_shard >= self.shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer, self._in_shard = None, 0

    def close(self) -> None:
        self._flush()
        self._close_shard()


def ingest_imagenet(src, out, *, report_path=None, shard_mb: float = 256.0,
                    limit_per_class: int | None = None, max_classes: int | None = None,
                    seed: int = 0, max_bad_fraction: float = 0.05, workers: int | None = None,
                    progress: bool = True, max_pixels: int = validate.MAX_PIXELS) -> dict:
    """Ingest an ImageNet-layout folder into sharded parquet at ``out``; returns the report.

    ``out`` is replaced only when it is missing, empty or an earlier ingest's output, and only
    once the last shard is written (a killed ingest leaves it as it was). Raises
    :class:`FerError` when a split has more than ``max_bad_fraction`` bad files (as soon as it
    is certain, with the report written)."""
    t0 = time.perf_counter()
    if not shard_mb > 0:
        raise FerError(f"shard_mb must be > 0, got {shard_mb}")
    for name, v in (("limit_per_class", limit_per_class), ("max_classes", max_classes)):
        if v is not None and v < 1:
            raise FerError(f"{name} must be >= 1, got {v}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise FerError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FerError(f"ImageNet folder not found: {src}")
    rsrc, rout = src.resolve(), out.resolve()
    if rsrc == rout or rout in rsrc.parents or rsrc in rout.parents:
        raise FerError(f"OUT ({out}) and the ImageNet folder ({src}) must not contain each other")
    check_replaceable(out, what=WRITTEN_BY)
    report_path = Path(report_path) if report_path else Path("reports") / "ingest_imagenet.json"
    with output_lock(out, "the ImageNet parquet"):
        check_replaceable(out, what=WRITTEN_BY)
        scan = subset(read_imagenet(src), max_classes=max_classes, limit_per_class=limit_per_class)
        if not scan.records:
            raise FerError(f"{src}: {scan.layout} layout but no images found")
        names = scan.class_names
        by_split = {s: [r for r in scan.records if r.split == s] for s in SPLITS}
        order = np.random.default_rng([seed, 29]).permutation(len(by_split["train"]))
        by_split["train"] = [by_split["train"][i] for i in order]  # every shard mixes the classes
        report = {
            "dataset": "imagenet", "layout": scan.layout, "src": shown(str(src)), "out": shown(str(out)),
            "classes": list(names), "counts": {s: 0 for s in SPLITS},
            "class_counts": {s: {} for s in SPLITS},
            "subset": {"max_classes": max_classes, "limit_per_class": limit_per_class},
            "seed": seed, "shard_mb": shard_mb, "scanned": len(scan.records) + len(scan.rejected),
            "bad": {}, "max_bad_fraction": max_bad_fraction,
            "rejected": [{"source": shown(r.source), "reason": r.reason, "split": r.split}
                         for r in scan.rejected],
            "warnings": [{"source": shown(w.source), "reason": w.reason, "split": w.split}
                         for w in scan.warnings],
            "converted": {}, "shards": {},
        }
        schema = parquet_schema(pa.int8() if len(names) <= 127 else pa.int16())
        workers = default_workers(workers)
        try:
            with replacing(out) as tmp:
                for s in SPLITS:
                    if by_split[s]:
                        _write_split(s, by_split[s], src, tmp, names, schema, int(shard_mb * 2**20),
                                     workers, max_pixels, progress, report, report_path)
                write_marker(tmp, WRITTEN_BY, classes=list(names))  # training reads them here
        except OSError as e:
            raise FerError(f"cannot write the ImageNet parquet at {out}: {e}") from e
        report["converted"] = dict(sorted(report["converted"].items()))
        write_json(report_path, report)
    seconds = time.perf_counter() - t0
    report["run"] = {"seconds": round(seconds, 3), "images_per_s": round(report["scanned"] / max(seconds, 1e-9), 1),
                     "workers": workers, "report_path": str(report_path)}
    if progress:
        print(f"ingest-imagenet: {report['scanned']} files in {seconds:.1f} s "
              f"({report['run']['images_per_s']:.0f} img/s, {workers} workers); report {report_path}",
              file=sys.stderr, flush=True)
    return report


def _write_split(split: str, records: list[Record], src: Path, tmp: Path, names, schema,
                 shard_bytes: int, workers: int, max_pixels: int, progress: bool, report: dict,
                 report_path: Path) -> None:
    n_bad_before = sum(1 for r in report["rejected"] if r["split"] == split)
    total = len(records) + n_bad_before
    allowed = int(np.floor(max(report["max_bad_fraction"], 0.0) * total + 1e-9))
    bad = n_bad_before
    counts: Counter = Counter()
    writer = ShardWriter(tmp / split, schema, shard_bytes)
    bar = Progress(len(records), f"ingest-imagenet: {split}", enabled=progress)
    chunks = [records[i:i + _CHUNK] for i in range(0, len(records), _CHUNK)]
    tasks = [([str(src / r.source) for r in c], max_pixels) for c in chunks]
    try:
        for chunk, results in zip(chunks, _bounded_map(_read_check, tasks, workers, max_pixels)):
            for rec, (res, data) in zip(chunk, results):
                if data is None:
                    bad += 1
                    report["rejected"].append({"source": shown(rec.source), "reason": res["reason"], "split": split})
                    if bad > allowed:
                        report["bad"][split] = {"bad": bad, "total": total, "fraction": round(bad / total, 6)}
                        report["failed"] = True
                        write_json(report_path, report)
                        raise FerError(f"more than {report['max_bad_fraction']:.1%} of the {total} files of "
                                       f"split '{split}' are bad ({bad} so far); see {report_path}")
                    continue
                if res["mode"] != "RGB":
                    report["converted"][res["mode"]] = report["converted"].get(res["mode"], 0) + 1
                writer.add({"image": data, "label": rec.label, "label_name": names[rec.label],
                            "split": split, "source": shown(rec.source), "sha256": res["sha256"],
                            "height": res["height"], "width": res["width"]})
                counts[rec.label] += 1
            bar.update(len(chunk))
        writer.close()
    finally:
        bar.close()
        writer._close_shard()
    report["counts"][split] = sum(counts.values())
    report["class_counts"][split] = {names[i]: counts[i] for i in range(len(names))}
    report["bad"][split] = {"bad": bad, "total": total, "fraction": round(bad / total, 6) if total else 0.0}
    report["shards"][split] = [{"file": f"{split}/{f}", "rows": n} for f, n in zip(writer.files, writer.rows)]


# --------------------------------------------------------------------------- a generated set


def write_sample(root: str | os.PathLike, *, classes: int = 10, train_per_class: int = 40,
                 val_per_class: int = 10, size: int = 32, noise: float = 24.0, seed: int = 0,
                 quality: int = 90, pad_kb: int = 0) -> Path:
    """A small ILSVRC-2012-layout set for tests and smoke runs: ``train/<wnid>/*.JPEG``, a flat
    ``val/`` and ``LOC_val_solution.csv``. Class k is a colour (hue k/classes) with a bright
    square at a class-dependent corner, plus Gaussian pixel noise. ``pad_kb`` pads every file
    with JPEG comment segments up to that size (ImageNet's mean is ~110 KB): a set as many bytes
    as a large one, for the streaming test, that costs little to decode."""
    import colorsys

    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    wnids = [f"n{10000000 + 7919 * k:08d}" for k in range(classes)]
    yy, xx = np.mgrid[0:size, 0:size]

    def image(k: int) -> bytes:
        rgb = np.array(colorsys.hsv_to_rgb(k / classes, 0.8, 0.8)) * 255
        a = np.broadcast_to(rgb, (size, size, 3)).astype(np.float32).copy()
        cy, cx = (k % 2) * size // 2, (k // 2 % 2) * size // 2
        a[(yy >= cy) & (yy < cy + size // 2) & (xx >= cx) & (xx < cx + size // 2)] += 60
        a += rng.normal(0, noise, a.shape)
        import io

        buf = io.BytesIO()
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
        data = buf.getvalue()
        pad, left = [], pad_kb * 1024 - len(data)
        while left > 4:  # COM segments (FF FE, 2-byte length) right after SOI
            n = min(left - 4, 65533)
            pad.append(b"\xff\xfe" + (n + 2).to_bytes(2, "big") + b"\x00" * n)
            left -= n + 4
        return data[:2] + b"".join(pad) + data[2:]

    for k, w in enumerate(wnids):
        d = root / "train" / w
        d.mkdir(parents=True, exist_ok=True)
        for i in range(train_per_class):
            (d / f"{w}_{i}.JPEG").write_bytes(image(k))
    (root / "val").mkdir(parents=True, exist_ok=True)
    lines = ["ImageId,PredictionString"]
    n = 0
    for k, w in enumerate(wnids):
        for _ in range(val_per_class):
            n += 1
            name = f"ILSVRC2012_val_{n:08d}"
            (root / "val" / f"{name}.JPEG").write_bytes(image(k))
            lines.append(f"{name},{w} 1 1 {size - 1} {size - 1}")
    (root / VAL_CSV).write_text("\n".join(lines) + "\n")
    return root
