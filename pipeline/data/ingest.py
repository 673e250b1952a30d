"""Ingest: a dataset folder in any known layout -> validated parquet + a JSON report.

Steps: detect and read the layout (:mod:`pipeline.data.layouts`), decode-and-validate every
candidate in a process pool (both cores by default, chunked, progress bar on stderr), carve a
stratified, seeded ``val`` split out of train (duplicates kept on one side), check the bad
fraction per split, then stream the original encoded bytes into one parquet file per split in a
temporary folder next to OUT, renamed into place only at the end. A killed ingest leaves OUT as
it was (an orphaned ``.OUT.tmp-*`` folder at most, removed by the next run). OUT is replaced
only if it is missing, empty or a previous ingest output (its marker file), and only by one
ingest at a time (a lock beside it): a user's folder named as OUT is never touched.

Parquet schema (contract): image (binary, bytes untouched), label (int8; int16 only for
ImageFolder sets with more than 127 classes), label_name, split (train/val/test), source (path
relative to the dataset root), sha256, height, width (int32).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import validate
from pipeline.outputs import check_replaceable, output_lock, write_file_atomic, replacing, write_marker
from pipeline.workers import Progress, default_workers, process_pool
from pipeline.data.layouts import Record, Scan, read_layout, shown
from pipeline.errors import FerError

SPLITS = ("train", "val", "test")
#: An OUT holding only these (written before the marker existed) is a previous ingest output.
_LEGACY_FILES = frozenset(f"{s}.parquet" for s in SPLITS)
_CHUNK = 48
_ROWS_PER_GROUP = 1024


def parquet_schema(label_type: pa.DataType = pa.int8()) -> pa.Schema:
    return pa.schema([
        ("image", pa.binary()),
        ("label", label_type),
        ("label_name", pa.string()),
        ("split", pa.string()),
        ("source", pa.string()),
        ("sha256", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
    ])


SCHEMA = parquet_schema()


# --------------------------------------------------------------------------- validation


def _validate_all(paths: list[str], workers: int, progress: bool, max_pixels: int) -> list[dict]:
    bar = Progress(len(paths), "ingest: validating", enabled=progress)
    chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    results: list[dict] = []
    try:
        if workers > 1 and len(paths) >= 4 * _CHUNK:
            with process_pool(workers, validate.configure, (max_pixels,)) as ex:
                for res in ex.map(validate.check_files, chunks, [max_pixels] * len(chunks)):
                    results += res
                    bar.update(len(res))
        else:
            with validate.configured(max_pixels):  # PIL globals restored afterwards
                for c in chunks:
                    res = validate.check_files(c, max_pixels)
                    results += res
                    bar.update(len(res))
    finally:
        bar.close()
    return results


# --------------------------------------------------------------------------- val split


def carve_val(train: list[tuple[Record, dict]], val_fraction: float, seed: int) -> set[int]:
    """Positions (into ``train``) that move to val: per class, a seeded random
    ``round(val_fraction * n_class)`` images, whole duplicate groups (same sha256) at a time,
    leaving at least one image of each class in train."""
    if val_fraction <= 0 or not train:
        return set()
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (_, res) in enumerate(train):
        groups[res["sha256"]].append(i)
    by_class: dict[int, list[list[int]]] = defaultdict(list)
    n_class: Counter = Counter(r.label for r, _ in train)
    for members in groups.values():
        by_class[train[members[0]][0].label].append(members)
    chosen: set[int] = set()
    for label in sorted(by_class):
        units = sorted(by_class[label], key=lambda m: train[m[0]][0].source)
        target = int(round(val_fraction * n_class[label]))
        rng = np.random.default_rng([seed, label, 17])
        taken = 0
        for k in rng.permutation(len(units)):
            if taken >= target:
                break
            u = units[int(k)]
            if n_class[label] - taken - len(u) < 1:
                continue
            chosen.update(u)
            taken += len(u)
    return chosen


# --------------------------------------------------------------------------- writing


def _write_split(path: Path, rows: list[tuple[Record, dict]], root: Path, class_names, schema,
                 bar: Progress, changed: list[dict]) -> int:
    writer = pq.ParquetWriter(
        path, schema, compression={"image": "NONE", "label": "ZSTD", "label_name": "ZSTD",
                                   "split": "ZSTD", "source": "ZSTD", "sha256": "ZSTD",
                                   "height": "ZSTD", "width": "ZSTD"},
        write_statistics=["label", "label_name", "split", "source", "height", "width"])
    n = 0
    try:
        for i in range(0, len(rows), _ROWS_PER_GROUP):
            cols: dict[str, list] = {k: [] for k in schema.names}
            for rec, res in rows[i:i + _ROWS_PER_GROUP]:
                try:
                    data = (root / rec.source).read_bytes()
                except OSError as e:
                    changed.append({"source": shown(rec.source), "reason": f"unreadable on second read: {e}",
                                    "split": res["split"]})
                    continue
                if hashlib.sha256(data).hexdigest() != res["sha256"]:
                    changed.append({"source": shown(rec.source), "reason": "file changed during ingest",
                                    "split": res["split"]})
                    continue
                cols["image"].append(data)
                cols["label"].append(rec.label)
                cols["label_name"].append(class_names[rec.label])
                cols["split"].append(res["split"])
                cols["source"].append(shown(rec.source))
                cols["sha256"].append(res["sha256"])
                cols["height"].append(res["height"])
                cols["width"].append(res["width"])
            bar.update(min(_ROWS_PER_GROUP, len(rows) - i))
            if cols["image"]:
                writer.write_table(pa.table(cols, schema=schema))
                n += len(cols["image"])
    finally:
        writer.close()
    return n


def _write_all(out: Path, good, src: Path, names, schema, progress: bool, changed: list) -> None:
    with replacing(out) as tmp:
        bar = Progress(sum(map(len, good.values())), "ingest: writing", enabled=progress)
        try:
            for s in SPLITS:
                if good[s]:
                    _write_split(tmp / f"{s}.parquet", good[s], src, names, schema, bar, changed)
        finally:
            bar.close()
        write_marker(tmp, "fer ingest")  # pyarrow.dataset skips dot-files: not read as data


def write_json(path: Path, obj) -> None:
    try:
        write_file_atomic(path, json.dumps(obj, indent=1) + "\n")
    except OSError as e:
        raise FerError(f"cannot write the report {path}: {e}") from e


# --------------------------------------------------------------------------- ingest


def ingest(src, out, *, report_path=None, dataset: str | None = None, val_fraction: float = 0.1,
           seed: int = 0, max_bad_fraction: float = 0.05, workers: int | None = None,
           progress: bool = True, max_pixels: int = validate.MAX_PIXELS) -> dict:
    """Ingest the dataset at ``src`` into a parquet dataset at ``out``; returns the report.

    The report file holds only what follows from the dataset and the parameters (``src`` and
    ``out`` as given, never resolved; no timings), so the same inputs write the same bytes on any
    machine. The returned dict adds ``run``: this run's seconds, images/s, worker count and
    absolute paths (also printed on stderr when ``progress``).

    ``val`` is carved from train (stratified by class, seeded) unless the source already has a
    ``val`` split (ImageFolder). Raises :class:`FerError` when more than ``max_bad_fraction`` of
    any split is bad (the report is still written; ``out`` is left untouched).
    """
    t0 = time.perf_counter()
    if not 0.0 <= val_fraction < 1.0:
        raise FerError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise FerError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FerError(f"dataset folder not found: {src}")
    rsrc, rout = src.resolve(), out.resolve()
    if rsrc == rout or rout in rsrc.parents:
        raise FerError(f"OUT ({out}) must not be the dataset folder or contain it")
    check_replaceable(out, what="fer ingest", legacy_names=_LEGACY_FILES)
    with output_lock(out, "the parquet dataset"):
        check_replaceable(out, what="fer ingest", legacy_names=_LEGACY_FILES)  # may have changed
        return _ingest(src, out, report_path, dataset, val_fraction, seed, max_bad_fraction,
                       workers, progress, max_pixels, t0)


def _ingest(src: Path, out: Path, report_path, dataset, val_fraction, seed, max_bad_fraction,
            workers, progress, max_pixels, t0) -> dict:
    rsrc, rout = src.resolve(), out.resolve()
    scan: Scan = read_layout(src)
    dataset = dataset or scan.default_dataset
    report_path = Path(report_path) if report_path else Path("reports") / f"ingest_{dataset}.json"
    workers = default_workers(workers)
    if not scan.records and not scan.rejected:
        raise FerError(f"{src}: {scan.layout} layout but no images found")

    results = _validate_all([str(src / r.source) for r in scan.records], workers, progress, max_pixels)
    good, rejected, converted = _sort_out(scan, results)
    bad = _bad_fractions(good, rejected)  # as found in the source, before val is carved
    val_source = "folder" if good["val"] else "carved"
    if not good["val"]:
        _move_to_val(good, carve_val(good["train"], val_fraction, seed))
    report = _report(scan, good, src, out, dataset, rejected, converted, bad,
                     {"source": val_source, "fraction": val_fraction, "seed": seed}, max_bad_fraction)

    refusal = _refusal(report, val_source, src, report_path)
    if refusal:  # the report says why (``failed``), OUT is left as it was
        report["failed"] = True
        write_json(report_path, report)
        _finish(report, t0, workers, rsrc, rout, report_path, progress)
        raise FerError(refusal)

    # write parquet into a temp folder next to OUT, then swap it in
    changed: list[dict] = []
    label_type = pa.int8() if len(scan.class_names) <= 127 else pa.int16()
    try:
        _write_all(out, good, src, scan.class_names, parquet_schema(label_type), progress, changed)
    except OSError as e:
        raise FerError(f"cannot write the parquet dataset at {out}: {e}") from e
    if changed:  # rare: a file changed between validation and writing
        _uncount(report, good, changed, scan.class_names)
    write_json(report_path, report)
    return _finish(report, t0, workers, rsrc, rout, report_path, progress)


def _sort_out(scan: Scan, results: list[dict]) -> tuple[dict, list[dict], Counter]:
    """(good records by split, rejected entries, count of converted colour modes): what the
    layout reader refused comes first in ``rejected``, then what failed validation."""
    rejected = [{"source": shown(r.source), "reason": r.reason, "split": r.split} for r in scan.rejected]
    converted: Counter = Counter()
    good: dict[str, list[tuple[Record, dict]]] = {s: [] for s in SPLITS}
    for rec, res in zip(scan.records, results):
        if res["ok"]:
            res["split"] = rec.split
            good[rec.split].append((rec, res))
            if res["mode"] != "RGB":
                converted[res["mode"]] += 1
        else:
            rejected.append({"source": shown(rec.source), "reason": res["reason"], "split": rec.split})
    return good, rejected, converted


def _bad_fractions(good: dict, rejected: list[dict]) -> dict:
    """Bad files per split (and ``unassigned``: files the layout could place in no split)."""
    bad_n = Counter(r["split"] for r in rejected)
    bad = {}
    for s in [*SPLITS, None]:
        n_bad = bad_n.get(s, 0)
        total = (len(good[s]) + n_bad) if s is not None else (sum(map(len, good.values())) + len(rejected))
        if s is None and n_bad == 0:
            continue
        if total:
            bad[s or "unassigned"] = {"bad": n_bad, "total": total, "fraction": round(n_bad / total, 6)}
    return bad


def _move_to_val(good: dict, moved: set[int]) -> None:
    for i in sorted(moved):
        rec, res = good["train"][i]
        res["split"] = "val"
        good["val"].append((rec, res))
    good["train"] = [x for i, x in enumerate(good["train"]) if i not in moved]


def _duplicates(good: dict) -> tuple[list[dict], list[dict]]:
    """Groups of identical files (same sha256): (across splits, i.e. leakage; within one split)."""
    by_sha: dict[str, list[dict]] = defaultdict(list)
    for s in SPLITS:
        for rec, res in good[s]:
            by_sha[res["sha256"]].append({"split": s, "source": shown(rec.source)})
    leakage, within = [], []
    for sha, entries in sorted(by_sha.items(), key=lambda kv: kv[1][0]["source"]):
        if len(entries) > 1:
            g = {"sha256": sha, "splits": sorted({e["split"] for e in entries}), "entries": entries}
            (leakage if len(g["splits"]) > 1 else within).append(g)
    return leakage, within


def _report(scan: Scan, good: dict, src: Path, out: Path, dataset: str, rejected: list[dict],
            converted: Counter, bad: dict, val: dict, max_bad_fraction: float) -> dict:
    names = scan.class_names
    leakage, within = _duplicates(good)
    report = {
        "dataset": dataset,
        "layout": scan.layout,
        "src": shown(str(src)),   # as given (params), never resolved: no machine's paths
        "out": shown(str(out)),
        "classes": list(names),
        "counts": {s: len(good[s]) for s in SPLITS},
        "class_counts": {s: {n: 0 for n in names} for s in SPLITS},
        "val": val,
        "scanned": len(scan.records) + len(scan.rejected),
        "bad": bad,
        "max_bad_fraction": max_bad_fraction,
        "rejected": rejected,
        "warnings": [{"source": shown(w.source), "reason": w.reason, "split": w.split}
                     for w in scan.warnings],
        "converted": dict(sorted(converted.items())),
        "duplicates": {"leakage": leakage, "within_split": within,
                       "n_leakage_groups": len(leakage), "n_within_split_groups": len(within)},
    }
    for s in SPLITS:
        for rec, _ in good[s]:
            report["class_counts"][s][names[rec.label]] += 1
    return report


def _refusal(report: dict, val_source: str, src: Path, report_path: Path) -> str | None:
    """Why OUT is not written, or None: a set that cannot train (:func:`cannot_train`) or a
    split with more bad files than ``max_bad_fraction``."""
    refusal = cannot_train(report, val_source)
    if refusal:
        return f"{shown(str(src))}: {refusal}; OUT is unchanged (see {report_path})"
    limit = report["max_bad_fraction"]
    over = {s: b for s, b in report["bad"].items() if b["fraction"] > limit}
    if over:
        s, b = max(over.items(), key=lambda kv: kv[1]["fraction"])
        return (f"{b['bad']} of {b['total']} files of split '{s}' are bad "
                f"({b['fraction']:.1%} > max_bad_fraction {limit:.1%}); see {report_path}")
    return None


def _uncount(report: dict, good: dict, changed: list[dict], names) -> None:
    """Move the files that changed after validation from the counts to ``rejected``."""
    report["rejected"] += changed
    for c in changed:
        report["counts"][c["split"]] -= 1
    gone = {(c["split"], c["source"]) for c in changed}
    for s in SPLITS:
        for rec, _ in good[s]:
            if (s, shown(rec.source)) in gone:
                report["class_counts"][s][names[rec.label]] -= 1


def cannot_train(report: dict, val_source: str) -> str | None:
    """Why a dataset cannot be trained and evaluated, or None: an empty split (the worker would fail
    on it after Ray has started, and be retried; a face dataset needs a test split too), or a class
    with no training face (it could never be learned, and its test accuracy would read 0% for no
    fault of the model)."""
    counts = report["counts"]
    # a generic ImageFolder (ImageNet-style, for pretraining) may have no test split
    needed = ("train", "val") if report["layout"] == "imagefolder" else SPLITS
    for s in needed:
        if counts.get(s, 0) == 0:
            carved = " (carved from train: too few train faces)" if s == "val" and val_source == "carved" else ""
            return (f"split '{s}' has no faces{carved}; counts {counts}: a dataset needs train, val and "
                    "test faces to train and be evaluated")
    missing = [n for n, k in report["class_counts"]["train"].items() if k == 0]
    if missing:
        return (f"class(es) {', '.join(missing)} have no training faces (train counts "
                f"{report['class_counts']['train']}): every class needs some")
    return None


def _finish(report: dict, t0: float, workers: int, rsrc: Path, rout: Path, report_path: Path,
            progress: bool) -> dict:
    """Add this run's own figures (time, speed, worker count, absolute paths) to the returned
    report as ``run`` and print them; they are never written to the report file, whose bytes
    are a function of the dataset and the parameters only (a DVC output)."""
    seconds = time.perf_counter() - t0
    report["run"] = {"seconds": round(seconds, 3),
                     "images_per_s": round(report["scanned"] / max(seconds, 1e-9), 1),
                     "workers": workers, "src": str(rsrc), "out": str(rout),
                     "report_path": str(report_path)}
    if progress:
        r = report["run"]
        print(f"ingest: {report['scanned']} files in {r['seconds']:.1f} s ({r['images_per_s']:.0f} "
              f"img/s, {workers} worker{'s' if workers != 1 else ''}); report {report_path}",
              file=sys.stderr, flush=True)
    return report
