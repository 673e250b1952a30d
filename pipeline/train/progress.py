"""A progress bar within each epoch, drawn by the driver on a terminal.

Workers run in other processes (on a cluster, other machines) and Ray forwards their stdout line
by line, so a carriage-return bar cannot be drawn from there. Rank 0 instead puts its step count
on a small Ray queue (an actor of 0 CPUs, a put every ~5% of the epoch, never waiting) and a
thread of the driver draws it with tqdm on stderr; the per-epoch summary lines stay as they are.

On by default only when stderr is a terminal; ``FER_PROGRESS=1`` forces it on (a log file then
gets tqdm's lines), ``FER_PROGRESS=0`` off.
"""
from __future__ import annotations

import os
import sys
import threading

def wanted() -> bool:
    forced = os.environ.get("FER_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty()


class EpochBar:
    """Driver side: ``bar.start()``, hand ``bar.queue`` to the workers (``WorkerConfig.progress_queue``;
    None when no bar is drawn), ``bar.close()``."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = wanted() if enabled is None else enabled
        self.queue = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "EpochBar":
        if self.enabled:
            from ray.util.queue import Queue

            self.queue = Queue(maxsize=1000, actor_options={"num_cpus": 0})
            self._thread = threading.Thread(target=self._draw, name="fer-epoch-bar", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)  # drains what the last steps put (slow under load)
        if self.queue is not None:
            try:
                self.queue.shutdown(force=True)
            except Exception:  # the cluster may already be gone
                pass

    def _draw(self) -> None:
        from ray.util.queue import Empty
        from tqdm import tqdm

        bar, epoch = None, None
        try:
            while True:
                try:
                    e, step, steps, epochs = self.queue.get(timeout=0.5)
                except Empty:
                    if self._stop.is_set():  # drained after the run ended
                        break
                    continue
                if e != epoch:
                    if bar is not None:
                        bar.close()
                    epoch = e
                    bar = tqdm(total=steps, desc=f"epoch {e}/{epochs}", unit="step", leave=False,
                               file=sys.stderr, dynamic_ncols=True)
                bar.n = step
                bar.refresh()
        except Exception:  # the queue's actor went away (cluster shut down): no bar, no error
            pass
        finally:
            if bar is not None:
                bar.close()


def step_reporter(queue, rank: int, steps: int, epochs: int):
    """Worker side: a function ``(epoch, step)`` for rank 0 when the driver draws a bar (``queue``,
    the worker config's ``progress_queue``), else None."""
    if queue is None or rank != 0:
        return None
    every = max(1, steps // 20)

    def report(epoch: int, step: int) -> None:
        if step % every and step != steps:
            return
        try:
            queue.put_nowait((epoch, step, steps, epochs))
        except Exception:  # full or gone: the bar is only a display
            pass

    return report
