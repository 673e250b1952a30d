"""Which CPU kernels torch runs: pinned to AVX2 by default, so that a run writes the same bytes on
every x86-64 CPU with AVX2 (an AVX-512 or AMX machine included), not only on the one that made
the committed figures.

torch picks its vector kernels by CPU at run time, and so does oneDNN under it:
``ATEN_CPU_CAPABILITY`` caps torch's own kernels (default, avx2, avx512), ``ONEDNN_MAX_CPU_ISA``
caps oneDNN (convolutions, pooling). Each is read once, when its library first runs, so
:func:`pin_cpu_kernels` runs before torch is imported (``pipeline/__init__``), and the values
travel to Ray workers in the job's environment (``pipeline.cluster.job_env``).

Measured: with these two pinned, an AMD EPYC with AVX-512 and native bf16 ran the whole 60-epoch
``train_rafdb`` of the code that made the figures committed before the pin (on an AVX2-only AMD
EPYC) and wrote a byte-identical ``history_rafdb.json`` and ``curves_rafdb.png``; unpinned, its
first epoch already differed (loss 1.8925 vs 1.8921). MKL (``MKL_CBWR``) is left alone: pinning
it to AVX2 there moved that first epoch off (1.8928), MKL's default path on AMD not being its
AVX2 one. Intel CPUs are untested (with AVX-512, MKL may need ``MKL_CBWR`` set by the user).

``FER_CPU_KERNELS``: ``portable`` (default: AVX2 everywhere) or ``native`` (each machine's best:
faster on AVX-512/AMX, bench/kernels.py measures by how much, but its bytes are that machine's
own). A variable the user sets themselves wins over the pin. On a CPU without AVX2 (or not
x86-64) nothing is pinned: the run is then reproducible on that kind of machine only.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

#: What ``portable`` sets (unless the user already set the variable).
PORTABLE = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def mode() -> str:
    m = os.environ.get("FER_CPU_KERNELS", "portable").strip().lower() or "portable"
    return m if m in ("portable", "native") else "portable"


def pinnable() -> bool:
    """x86-64 with AVX2: the pin then selects kernels this CPU has."""
    return platform.machine().lower() in ("x86_64", "amd64") and "avx2" in cpu_flags()


def pin_cpu_kernels() -> dict[str, str]:
    """Set :data:`PORTABLE` in this process's environment (``portable`` mode, AVX2 CPU), keeping
    any variable the user set; returns what is in force. Before torch is imported."""
    if mode() != "portable" or not pinnable():
        return {}
    for k, v in PORTABLE.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in PORTABLE}


def kernel_env() -> dict[str, str]:
    """The dispatch variables set in this process, for Ray workers (``job_env``)."""
    return {k: os.environ[k] for k in (*PORTABLE, "MKL_CBWR", "FER_CPU_KERNELS") if os.environ.get(k)}


def describe() -> str:
    """One phrase: which kernels run and why, for the first line of a stage."""
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    if mode() == "native":
        return f"CPU kernels {cap} (FER_CPU_KERNELS=native: this machine's own; its bytes are its own)"
    if not pinnable():
        return f"CPU kernels {cap} (no AVX2 here: not pinned; bytes reproduce on this kind of CPU only)"
    pinned = os.environ.get("ATEN_CPU_CAPABILITY", "")
    if pinned.lower() != "avx2" or os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() != "AVX2":
        return (f"CPU kernels {cap} (ATEN_CPU_CAPABILITY={pinned or 'unset'}, "
                f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}: set by you)")
    return f"CPU kernels {cap} pinned (FER_CPU_KERNELS=portable: torch's and oneDNN's AVX2 kernels on any x86-64 CPU)"
