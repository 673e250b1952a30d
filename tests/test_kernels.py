"""CPU kernel pinning (pipeline.kernels): the pinned run's bytes against a committed reference.

tests/kernel_probe.py trains a tiny LIP-VGG16 for 4 steps in a fresh process; pinned
(FER_CPU_KERNELS=portable, the default) and native, on the training stage's own batches. The reference was made pinned on an AMD EPYC
with AVX-512 and native bf16, where the native kernels (AVX512) give other bytes.

What is guaranteed, and so checked strictly: two pinned processes agree, and on a CPU of the
reference's model the pinned bytes equal the reference. On another CPU model the comparison is
the open question the README states (a whole 60-epoch training stage of an AVX2-only AMD EPYC was
reproduced byte for byte on an AVX-512 one; Intel is untested, oneDNN documents no cross-CPU
guarantee, and MKL is left unpinned): the test then prints the outcome and does not fail on it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REFERENCE = json.loads((HERE / "data" / "kernel_reference.json").read_text())


def _probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}  # the pytest process's own pin
    env["FER_CPU_KERNELS"] = mode
    r = subprocess.run([sys.executable, str(HERE / "kernel_probe.py")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _cpu_model() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def _same_cpu_as_reference() -> bool:
    """The reference's CPU: its model name (a virtual machine may only say "AMD EPYC") and the
    same AVX-512 / native bf16 flags."""
    from pipeline.kernels import cpu_flags

    flags, made = cpu_flags(), REFERENCE["made_on"]
    return (_cpu_model() == made["cpu_model"] and ("avx512f" in flags) == made["avx512f"]
            and ("avx512_bf16" in flags) == made["avx512_bf16"])


def test_pinned_kernels_reproduce_the_reference():
    from pipeline import kernels

    if not kernels.pinnable():
        pytest.skip("not an x86-64 CPU with AVX2: nothing is pinned here")
    first, second, native = _probe("portable"), _probe("portable"), _probe("native")
    assert first["capability"] == "AVX2" and first == second  # pinned, and reproducible
    if native["capability"] == "AVX2":
        assert native["sha256"] == first["sha256"]  # an AVX2 machine: pinning changes nothing
    same_model = _same_cpu_as_reference()
    matches = first["sha256"] == REFERENCE["pinned_sha256"]
    print(f"\nCPU {_cpu_model()!r} (native {native['capability']}): pinned bytes "
          f"{'match' if matches else 'DIFFER from'} the reference made on "
          f"{REFERENCE['made_on']['cpu_model']!r}; native {'=' if native['sha256'] == first['sha256'] else '!='} pinned")
    if same_model:
        # other bytes from other code is a stale reference, not lost reproducibility: say which
        assert matches or first["code"] == REFERENCE["code"], (
            "the code the probe runs changed since tests/data/kernel_reference.json was made, and its "
            "bytes with it: rerun `python tests/kernel_probe.py --write-reference` here and commit it")
        assert matches, (first, REFERENCE)
        assert first["losses"] == REFERENCE["pinned_losses"]
