"""Readers for the dataset layouts that ingest accepts (the contract: the layouts listed below).

Each reader walks a dataset root and returns a :class:`Scan`: the candidate images as
:class:`Record` (path relative to the root, class index in :data:`~pipeline.data.classes.CLASSES`
order or the ImageFolder's own order, split) and the entries it refused as :class:`Rejected`
(with a reason). Readers never open images; :mod:`pipeline.data.ingest` decodes and validates.

Layouts (names as reported):

``rafdb_basic``
    ``EmoLabel/list_patition_label.txt`` (lines ``train_00001.jpg 5``, labels 1..7) and
    ``Image/aligned/train_00001_aligned.jpg`` (``Image/original/<name>`` when there is no
    ``aligned`` folder). The split comes from the ``train_``/``test_`` prefix.
``rafdb_repackaged``
    ``DATASET/{train,test}/{1..7}/*`` (or ``{train,test}/{1..7}`` at the root): folder = label.
``sfew``
    ``Train/.../<Emotion>/*`` and ``Val/.../<Emotion>/*`` at any depth; emotion folders
    (Surprise, Fear, Disgust, Happy, Sad, Angry, Neutral, any case) map by name. ``Val`` is our
    ``test`` split (as in the paper); an unlabelled ``Test`` folder is ignored.
``imagefolder``
    ``<split>/<class>/*`` with split ``train``, ``val`` (``valid``/``validation``) or ``test``.
    Classes named after the seven expressions use the FER order; any other class set is indexed
    by sorted class name.

Bad entries are rejected, never fatal: label lines naming missing files, labels outside 1..7,
malformed lines, unknown emotion/class folders, files outside any class folder, and any path
that escapes the root (``../`` in a label line, or a symlink pointing outside).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.classes import CLASSES, sfew_index
from pipeline.errors import FerError

LAYOUTS: tuple[str, ...] = ("rafdb_basic", "rafdb_repackaged", "sfew", "imagefolder")

RAFDB_LABEL_FILE = "EmoLabel/list_patition_label.txt"
_IMAGEFOLDER_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                       "test": "test"}
_SKIP_FILES = {"thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class Record:
    """One candidate image: ``source`` is relative to the dataset root (POSIX separators)."""

    source: str
    label: int
    split: str


@dataclass(frozen=True)
class Rejected:
    """An entry the reader refused. ``split`` is None when it cannot be told."""

    source: str
    reason: str
    split: str | None = None


@dataclass
class Scan:
    layout: str
    root: Path
    records: list[Record] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    warnings: list[Rejected] = field(default_factory=list)  # e.g. empty class folders
    class_names: tuple[str, ...] = CLASSES
    default_dataset: str = ""


# --------------------------------------------------------------------------- helpers


def rel_path(root: Path, p: Path) -> str:
    return os.path.relpath(p, root).replace(os.sep, "/")


def shown(source: str) -> str:
    """A path as text that any UTF-8 writer accepts: bytes of a file name that are not valid
    UTF-8 (kept by Python as surrogate escapes, so the file can still be opened) become
    ``\\xNN``. Used wherever a path is written into parquet or JSON."""
    return source.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _inside(real_root: str, p: Path) -> bool:
    rp = os.path.realpath(p)
    return rp == real_root or rp.startswith(real_root + os.sep)


def _skip(name: str) -> bool:
    return name.startswith(".") or name.lower() in _SKIP_FILES


def child_dirs(d: Path) -> dict[str, Path]:
    try:
        return {c.name: c for c in d.iterdir() if c.is_dir() and not _skip(c.name)}
    except OSError:
        return {}


def walk_files(root: Path, top: Path, real_root: str, split: str | None,
                rejected: list[Rejected], _seen: set[str] | None = None,
                warnings: list[Rejected] | None = None):
    """Yield files under ``top`` (sorted, dotfiles skipped).

    Symlinks (files or folders) that resolve outside the root are rejected here; symlinked
    folders inside the root are walked once (no cycles). A folder that cannot be listed is
    rejected (it counts as bad: its images are missing); an empty folder is a warning.
    """
    _seen = set() if _seen is None else _seen
    real_top = os.path.realpath(top)
    if real_top in _seen:
        return
    _seen.add(real_top)

    def unreadable(e: OSError) -> None:
        where = rel_path(root, Path(e.filename)) if e.filename else rel_path(root, top)
        rejected.append(Rejected(where, f"unreadable folder: {e.strerror or e}", split))

    for dirpath, dirnames, filenames in os.walk(top, followlinks=False, onerror=unreadable):
        dirnames.sort()
        d = Path(dirpath)
        if warnings is not None and not dirnames and not [f for f in filenames if not _skip(f)]:
            warnings.append(Rejected(rel_path(root, d), "empty folder", split))
        keep = []
        for dn in dirnames:
            if _skip(dn):
                continue
            p = d / dn
            if p.is_symlink():
                if not _inside(real_root, p):
                    rejected.append(Rejected(rel_path(root, p), "symlink escapes the dataset root", split))
                    continue
                # a symlinked folder inside the root: walk it (os.walk would not)
                yield from walk_files(root, p, real_root, split, rejected, _seen, warnings)
                continue
            keep.append(dn)
        dirnames[:] = keep
        for fn in sorted(filenames):
            if _skip(fn):
                continue
            p = d / fn
            if p.is_symlink() and not _inside(real_root, p):
                rejected.append(Rejected(rel_path(root, p), "symlink escapes the dataset root", split))
                continue
            yield p


def _find_ci(d: Path, name: str) -> Path | None:
    """Child folder of ``d`` called ``name`` in any letter case."""
    for n, p in child_dirs(d).items():
        if n.lower() == name.lower():
            return p
    return None


# --------------------------------------------------------------------------- detection


def _rafdb_basic_root(root: Path) -> Path | None:
    if (root / RAFDB_LABEL_FILE).is_file():
        return root
    # the official archive nests everything in basic/
    b = root / "basic"
    if (b / RAFDB_LABEL_FILE).is_file():
        return b
    return None


def _repackaged_base(root: Path) -> Path | None:
    for base in (root / "DATASET", root):
        if not base.is_dir():
            continue
        splits = [p for n, p in child_dirs(base).items() if n.lower() in ("train", "test")]
        if not splits:
            continue
        classes = [n for s in splits for n in child_dirs(s)]
        if classes and all(n.isdigit() for n in classes):
            return base
        if base.name == "DATASET" and classes:
            return base
    return None


def _sfew_splits(root: Path) -> dict[str, Path]:
    out = {}
    for n, p in child_dirs(root).items():
        if n.lower() == "train":
            out["train"] = p
        elif n.lower() == "val":
            out["test"] = p
    return out


def _has_emotion_dir(top: Path, max_depth: int = 4) -> tuple[bool, bool]:
    """(an emotion-named folder exists under top, one exists deeper than top/<emotion>)."""
    found, deep = False, False
    for dirpath, dirnames, _ in os.walk(top):
        depth = len(Path(dirpath).relative_to(top).parts)
        if depth >= max_depth:
            dirnames[:] = []
        for dn in dirnames:
            if sfew_index(dn) is not None:
                found = True
                deep = deep or depth >= 1
    return found, deep


def _is_sfew(root: Path) -> bool:
    splits = _sfew_splits(root)
    if not splits:
        return False
    for p in splits.values():
        found, deep = _has_emotion_dir(p)
        # The official archives spell the split folders Train/Val and nest the emotion folders
        # (Train/Train_Aligned_Faces/Angry). A lower-case train/<class> is an ImageFolder.
        if found and (deep or p.name in ("Train", "Val")):
            return True
    return False


def _imagefolder_splits(root: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for n, p in sorted(child_dirs(root).items()):
        s = _IMAGEFOLDER_SPLITS.get(n.lower())
        if s is not None and child_dirs(p):
            out.setdefault(s, []).append(p)
    return out


def detect_layout(root: str | os.PathLike) -> str:
    """The layout of the dataset at ``root`` (one of :data:`LAYOUTS`); FerError if none fits."""
    root = Path(root)
    if not root.is_dir():
        raise FerError(f"dataset folder not found: {root}")
    if _rafdb_basic_root(root) is not None:
        return "rafdb_basic"
    if _repackaged_base(root) is not None:
        return "rafdb_repackaged"
    if _is_sfew(root):
        return "sfew"
    if _imagefolder_splits(root):
        return "imagefolder"
    raise FerError(
        f"{root}: no known dataset layout; looked for RAF-DB basic ({RAFDB_LABEL_FILE} + "
        "Image/aligned/), RAF-DB re-packaged (DATASET/{train,test}/{1..7}/), SFEW 2.0 "
        "(Train/ and Val/ with emotion folders) and ImageFolder (<train|val|test>/<class>/)")


# --------------------------------------------------------------------------- readers


def read_rafdb_basic(root: str | os.PathLike) -> Scan:
    root = Path(root)
    base = _rafdb_basic_root(root)
    if base is None:
        raise FerError(f"{root}: {RAFDB_LABEL_FILE} not found")
    real_root = os.path.realpath(root)
    scan = Scan("rafdb_basic", root, default_dataset="rafdb")
    img_dir = base / "Image" / "aligned"
    aligned = img_dir.is_dir() or not (base / "Image" / "original").is_dir()
    if not aligned:
        img_dir = base / "Image" / "original"
    label_file = base / RAFDB_LABEL_FILE
    try:
        text = label_file.read_text(encoding="utf-8", errors="surrogateescape")  # names as on disk
    except OSError as e:
        raise FerError(f"cannot read {label_file}: {e}") from e
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        where = f"{rel_path(root, label_file)}:{lineno}"
        if len(parts) != 2:
            scan.rejected.append(Rejected(where, f"{where}: malformed label line {line!r}"))
            continue
        name, lab = parts
        base_name = name.replace("\\", "/").rsplit("/", 1)[-1]
        split = "train" if base_name.startswith("train_") else "test" if base_name.startswith("test_") else None
        stem, ext = os.path.splitext(name)
        img = img_dir / (f"{stem}_aligned{ext}" if aligned else name)
        src = rel_path(root, img)
        if split is None:
            scan.rejected.append(Rejected(src, f"{where}: name {name!r} has neither a train_ nor a test_ prefix"))
            continue
        try:
            label = int(lab)
        except ValueError:
            scan.rejected.append(Rejected(src, f"{where}: label {lab!r} is not an integer", split))
            continue
        if not 1 <= label <= 7:
            scan.rejected.append(Rejected(src, f"{where}: label {label} outside 1..7", split))
            continue
        if os.path.isabs(name) or not _inside(real_root, img):
            scan.rejected.append(Rejected(src, f"{where}: path escapes the dataset root", split))
            continue
        if not img.is_file():
            scan.rejected.append(Rejected(src, f"{where}: file named in the label list is missing", split))
            continue
        if src in seen:
            scan.rejected.append(Rejected(src, f"{where}: listed twice in the label file", split))
            continue
        seen.add(src)
        scan.records.append(Record(src, label - 1, split))
    return scan


def read_rafdb_repackaged(root: str | os.PathLike) -> Scan:
    root = Path(root)
    base = _repackaged_base(root)
    if base is None:
        raise FerError(f"{root}: no DATASET/{{train,test}}/{{1..7}}/ folders")
    real_root = os.path.realpath(root)
    scan = Scan("rafdb_repackaged", root, default_dataset="rafdb")
    for sname, sdir in sorted(child_dirs(base).items()):
        split = sname.lower()
        if split not in ("train", "test"):
            continue
        for p in walk_files(root, sdir, real_root, split, scan.rejected, warnings=scan.warnings):
            rel_parts = p.relative_to(sdir).parts
            src = rel_path(root, p)
            if len(rel_parts) < 2:
                scan.rejected.append(Rejected(src, "not inside a label folder 1..7", split))
                continue
            folder = rel_parts[0]
            if not folder.isdigit():
                scan.rejected.append(Rejected(src, f"unknown label folder {folder!r} (expected 1..7)", split))
                continue
            label = int(folder)
            if not 1 <= label <= 7:
                scan.rejected.append(Rejected(src, f"label {label} outside 1..7", split))
                continue
            scan.records.append(Record(src, label - 1, split))
    return scan


def read_sfew(root: str | os.PathLike) -> Scan:
    root = Path(root)
    real_root = os.path.realpath(root)
    splits = _sfew_splits(root)
    if not splits:
        raise FerError(f"{root}: no Train/ or Val/ folder")
    scan = Scan("sfew", root, default_dataset="sfew")
    for split in ("train", "test"):
        sdir = splits.get(split)
        if sdir is None:
            continue
        for p in walk_files(root, sdir, real_root, split, scan.rejected, warnings=scan.warnings):
            src = rel_path(root, p)
            parents = p.relative_to(sdir).parts[:-1]
            label = None
            for folder in reversed(parents):  # nearest emotion folder wins
                label = sfew_index(folder)
                if label is not None:
                    break
            if label is None:
                reason = (f"unknown emotion folder {parents[-1]!r}" if parents
                          else "not inside an emotion folder")
                scan.rejected.append(Rejected(src, reason, split))
                continue
            scan.records.append(Record(src, label, split))
    return scan


def read_imagefolder(root: str | os.PathLike) -> Scan:
    root = Path(root)
    real_root = os.path.realpath(root)
    splits = _imagefolder_splits(root)
    if not splits:
        raise FerError(f"{root}: no <train|val|test>/<class>/ folders")
    class_dirs = sorted({n for dirs in splits.values() for d in dirs for n in child_dirs(d)})
    fer = [sfew_index(n) for n in class_dirs]
    if all(i is not None for i in fer) and len(set(fer)) == len(fer):
        index = dict(zip(class_dirs, fer))
        names = CLASSES
    else:
        index = {n: i for i, n in enumerate(class_dirs)}
        names = tuple(class_dirs)
    scan = Scan("imagefolder", root, class_names=names, default_dataset=root.resolve().name)
    for split, dirs in splits.items():
        for sdir in dirs:
            for p in walk_files(root, sdir, real_root, split, scan.rejected, warnings=scan.warnings):
                rel_parts = p.relative_to(sdir).parts
                src = rel_path(root, p)
                if len(rel_parts) < 2:
                    scan.rejected.append(Rejected(src, "not inside a class folder", split))
                    continue
                scan.records.append(Record(src, index[rel_parts[0]], split))
    return scan


READERS = {
    "rafdb_basic": read_rafdb_basic,
    "rafdb_repackaged": read_rafdb_repackaged,
    "sfew": read_sfew,
    "imagefolder": read_imagefolder,
}


def read_layout(root: str | os.PathLike, layout: str | None = None) -> Scan:
    """Detect (or take) the layout of ``root`` and read it."""
    layout = layout or detect_layout(root)
    if layout not in READERS:
        raise FerError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return READERS[layout](root)
