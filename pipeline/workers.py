"""Process pools for the PIL/numpy-only work (ingest, the loader, the synthetic writer) and the
progress line long work prints."""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor

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
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_die_with_parent,
                               initargs=(os.getpid(), initializer, tuple(initargs)))


def _die_with_parent(parent_pid: int, initializer, initargs) -> None:
    """Pool initializer: a SIGKILLed parent never gets to stop its pool, so on Linux the kernel
    is asked to SIGKILL each worker when its parent dies (prctl PR_SET_PDEATHSIG); a parent that
    died before that call is caught by the ppid check."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:
            os._exit(1)
    if initializer is not None:
        initializer(*initargs)


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
