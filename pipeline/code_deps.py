"""The project files a stage can run: the static import closure of its entry module.

Two things must agree with what a stage imports, or an edit silently reuses a stale result: its
`dvc.yaml` code deps (DVC reruns the stage when one changes) and the hash in a training run's name
(a rerun with changed code starts a fresh Ray run instead of resuming). Both come from here.
The closure follows every ``import`` / ``from ... import`` in a file, including those inside
functions (lazy imports run too), and counts each imported module's package ``__init__.py``
(importing ``pipeline.train.launch`` runs ``pipeline/__init__.py`` first). Only modules of this
repository (``pipeline``, ``stages``) are followed; third-party code is pinned by
requirements.lock. Read with ``ast``: nothing is imported, so it is cheap and side-effect free.
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages")


def module_file(name: str) -> Path | None:
    """The file of project module ``name`` (a package's ``__init__.py``), None when not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _imported(path: Path, name: str) -> set[str]:
    """Module names ``path`` (module ``name``) imports; ``from pkg import x`` counts ``pkg.x``
    too, which is a module when ``x`` is one."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@lru_cache(maxsize=None)
def closure(entry: str) -> tuple[str, ...]:
    """Repo-relative paths of every project file module ``entry`` can import, sorted."""
    seen: dict[str, Path] = {}
    todo = list(_with_parents(entry))
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        f = module_file(name)
        if f is None:
            continue
        seen[name] = f
        for imp in _imported(f, name):
            todo.extend(n for n in _with_parents(imp) if n not in seen)
    return tuple(sorted({str(f.relative_to(ROOT)) for f in seen.values()}))


def digest(entry: str, *extra: bytes) -> str:
    """sha256 over the files of :func:`closure` (path and bytes) and ``extra``: what a training
    run's name hashes, so that any edit to code the stage runs starts a fresh run."""
    h = hashlib.sha256()
    for e in extra:
        h.update(e)
    for rel in closure(entry):
        h.update(rel.encode() + b"\0" + (ROOT / rel).read_bytes())
    return h.hexdigest()
