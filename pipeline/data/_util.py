"""Shared by ingest, the loader and the synthetic writer: process pools, a progress bar and
atomic folder replacement."""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def default_workers(workers: int | None = None) -> int:
    if workers is not None:
        return max(1, int(workers))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def process_pool(workers: int, initializer=None, initargs=()) -> ProcessPoolExecutor:
    """A process pool for the PIL/numpy-only work of ingest, the loader and the synthetic writer.

    ``fork`` where the platform has it (Linux): workers start in milliseconds and do not
    re-import the caller's ``__main__`` (forkserver/spawn would, and with it torch or Ray: several
    seconds per pool). The workers only run PIL, hashlib and numpy, never torch, CUDA or Ray, so
    the caller's threads are no hazard (the same reasoning as torch's own DataLoader workers).
    Elsewhere the platform's default (spawn on macOS and Windows)."""
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods and sys.platform.startswith("linux") else None)
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=initializer,
                               initargs=initargs)


class Progress:
    """``desc done/total [#####.....] rate/s`` on stderr: redrawn in place on a terminal,
    a single summary line otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "img"):
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.done = 0
        self.t0 = time.perf_counter()
        self._last = 0.0

    def update(self, k: int = 1) -> None:
        self.done += k
        if self.tty:
            now = time.perf_counter()
            if now - self._last >= 0.1 or self.done >= self.total:
                self._last = now
                sys.stderr.write("\r" + self._line())
                sys.stderr.flush()

    def _line(self) -> str:
        el = max(time.perf_counter() - self.t0, 1e-9)
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(frac * 24) + "." * (24 - int(frac * 24))
        return f"{self.desc} {self.done}/{self.total} [{bar}] {self.done / el:.0f} {self.unit}/s"

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write(("\r" if self.tty else "") + self._line() + "\n")
            sys.stderr.flush()


def umask_mode(mode: int = 0o777) -> int:
    """``mode`` with the process umask applied (mkdtemp/mkstemp create 0700/0600)."""
    old = os.umask(0)
    os.umask(old)
    return mode & ~old


def cleanup_stale(out: Path) -> None:
    """Tidy up after killed runs (whose pid is gone): remove ``.OUT.tmp-<pid>-*`` folders, and
    for ``.OUT.old-<pid>-*`` put the previous OUT back if the run died mid-swap, else remove."""
    for p in sorted(out.parent.glob(f".{out.name}.tmp-*")) + sorted(out.parent.glob(f".{out.name}.old-*")):
        try:
            pid = int(p.name.split(".tmp-" if ".tmp-" in p.name else ".old-", 1)[1].split("-", 1)[0])
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except (ValueError, IndexError, PermissionError, OSError):
            continue
        if ".old-" in p.name and (p / "x").exists() and not out.exists():
            os.replace(p / "x", out)
        shutil.rmtree(p, ignore_errors=True)


def swap_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished folder ``tmp`` (two renames; the previous ``out`` is kept
    aside until the new one is in place)."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
