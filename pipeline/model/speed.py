"""How a model runs fast on a device: bf16 autocast, channels_last and torch.compile, each
true/false/"auto". Training and evaluation resolve them the same way, so a model trains and is
evaluated with the same kernels on a given machine."""
from __future__ import annotations

import os

from pipeline.errors import FerError


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX): only there bf16 autocast
    beats fp32 on CPU; elsewhere oneDNN emulates it and is slower (reports/bf16_cpu.json). Only
    the benchmark reads it: `amp: auto` no longer depends on it (:func:`resolve_amp`).
    ``FER_CPU_BF16=0`` (or ``1``) overrides the detection."""
    forced = os.environ.get("FER_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    from pipeline.kernels import cpu_flags

    flags = cpu_flags()
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return True
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and not flags
    except (AttributeError, RuntimeError):
        return False


def resolve_amp(amp: bool | str, device) -> bool:
    """bf16 autocast for `amp` = true/false/"auto". auto: on CUDA only (the paper's configuration);
    fp32 on every CPU, native bf16 or not. Over 3 seeds of the default recipe bf16 was within the
    seed noise of fp32 (reports/bf16_recipe.md), so the rule rests on reproducibility: a machine
    with native bf16 would write other figures than every other machine, and with the CPU kernels
    pinned to AVX2 (pipeline.kernels) bf16 has no native kernels anyway. bf16 on a CPU is an
    explicit `amp: true`."""
    import torch

    if amp != "auto":
        return bool(amp)
    return torch.device(device).type == "cuda"


def describe_precision(amp: bool | str, device) -> str:
    """One phrase: the precision a stage runs in and why (the first line of every stage)."""
    import torch

    kind = torch.device(device).type
    on = resolve_amp(amp, device)
    if amp == "auto":
        why = "amp auto: bf16 autocast on CUDA" if on else "amp auto: fp32 on CPU, bf16 only on CUDA"
    else:
        why = f"amp: {str(bool(amp)).lower()}"
    return f"precision {'bf16 autocast' if on else 'fp32'} on {kind} ({why})"


def stage_banner(stage: str, amp: bool | str, use_gpu: bool | str = "auto") -> str:
    """The first line of a training or evaluation stage: precision and CPU kernels, and why."""
    import torch

    from pipeline import kernels

    cuda = torch.cuda.is_available() and use_gpu is not False
    line = f"{stage}: {describe_precision(amp, 'cuda' if cuda else 'cpu')}; {kernels.describe()}"
    print(line, flush=True)
    return line


def resolve_channels_last(channels_last: bool | str, device) -> bool:
    """channels_last for true/false/"auto" (auto: CUDA only; on CPU it measured no faster)."""
    import torch

    if channels_last != "auto":
        return bool(channels_last)
    return torch.device(device).type == "cuda"


def maybe_compile(model, compile: bool):
    """torch.compile(model) when asked; a missing C++ compiler (inductor's CPU backend) is a FerError."""
    if not compile:
        return model
    import shutil

    import torch

    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")) and not torch.cuda.is_available():
        raise FerError("model.compile: true needs a C++ compiler (g++) for torch.compile on CPU; "
                       "install one or set compile: false")
    return torch.compile(model)
