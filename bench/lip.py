"""LIP costs, measured side by side in one run (ratios, not absolute times: machines are noisy).

1. The pooling op, forward + backward on the same tensors: `lip2d` (window max shift, fp16-safe)
   vs `lip2d_bounded` (the paper's naive form, what LIPPool2d uses for SoftGate's [0, 12] logits
   outside fp16) vs `lip2d_bounded` under torch.compile (one fused C++ loop; --compile).
2. One AdamW training step of LIP-VGG16 (lip/conv/eca) vs torchvision's VGG16-BN (max/fc/none),
   plus max/conv/eca and lip/conv/eca with the old shifted pooling, in fp32 and bf16 autocast,
   interleaved round by round; ratios to VGG16-BN of the same dtype. Target: lip/conv/eca <= 1.2x.

    python bench/lip.py [--widths 0.25 1.0] [--size 90] [--batch 32] [--dtypes fp32 bf16]
"""
from __future__ import annotations

import argparse
import statistics
import time
import types

import torch
import torch.nn.functional as F

from pipeline.model import lip2d, lip_vgg16
from pipeline.model.lip import LIPPool2d, lip2d_bounded

TARGET = 1.2


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _once(fn, device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def interleaved(fns: dict, repeats: int, device: str) -> dict:
    """Median seconds of each fn after one warm-up call, the fns taking turns every round."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(_once(f, device))
    return {k: statistics.median(v) for k, v in times.items()}


def bench_op(device: str, repeats: int, compile: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, 56, 56, generator=g).to(device).requires_grad_()
    lg = (torch.rand(32, 64, 56, 56, generator=g) * 12).to(device).requires_grad_()

    def step(f):
        def run():
            x.grad = lg.grad = None
            f(x, lg).sum().backward()
        return run

    fns = {"lip2d (shifted)": step(lip2d), "lip2d_bounded": step(lip2d_bounded)}
    if compile:
        fns["lip2d_bounded compiled"] = step(torch.compile(lip2d_bounded))
    t = interleaved(fns, repeats, device)
    base = t["lip2d (shifted)"]
    print(f"LIP op fwd+bwd on {tuple(x.shape)} fp32:")
    for k, v in t.items():
        print(f"  {k:24} {v * 1e3:8.1f} ms  {v / base:5.2f}x of shifted")


def _shifted(m):
    """The model with every LIP pool on the old shifted form (for the before/after ratio)."""
    for p in m.modules():
        if isinstance(p, LIPPool2d):
            p.forward = types.MethodType(lambda s, x: lip2d(x, s.logit(x), s.kernel_size, s.stride), p)
    return m


VARIANTS = {  # name -> (pool, head, attention, shifted LIP)
    "VGG16-BN (max/fc/none)": ("max", "fc", "none", False),
    "max/conv/eca": ("max", "conv", "eca", False),
    "lip/conv/eca": ("lip", "conv", "eca", False),
    "lip/conv/eca, shifted LIP": ("lip", "conv", "eca", True),
}


def bench_models(device: str, width: float, size: int, batch: int, repeats: int, dtypes) -> dict:
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 7, (batch,), device=device)
    out = {}
    for dt in dtypes:
        fns = {}
        for name, (pool, head, att, shifted) in VARIANTS.items():
            torch.manual_seed(0)
            m = lip_vgg16(7, pool=pool, head=head, attention=att, width=width).to(device).train()
            if shifted:
                _shifted(m)
            opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

            def step(m=m, opt=opt):
                with torch.autocast(device, dtype=torch.bfloat16, enabled=dt == "bf16"):
                    loss = F.cross_entropy(m(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            fns[name] = step
        t = interleaved(fns, repeats, device)
        base = t["VGG16-BN (max/fc/none)"]
        print(f"training step (AdamW), width {width}, {size}x{size}, batch {batch}, {dt} "
              f"(ratio to VGG16-BN, >1 = slower; target lip/conv/eca <= {TARGET}x)")
        for name, v in t.items():
            print(f"  {name:28} {v * 1e3:8.1f} ms/step {batch / v:7.1f} img/s  {v / base:5.2f}x")
        r = t["lip/conv/eca"] / base
        print(f"  -> lip/conv/eca {r:.2f}x VGG16-BN: target {'MET' if r <= TARGET else 'NOT met'}; "
              f"bounded LIP form vs shifted: {t['lip/conv/eca'] / t['lip/conv/eca, shifted LIP']:.2f}x")
        out[dt] = t
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=float, nargs="+", default=[0.25, 1.0])
    p.add_argument("--size", type=int, default=90)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="also time the compiled LIP op (~30 s to compile)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, device {a.device}, threads {torch.get_num_threads()}")
    bench_op(a.device, a.repeats, a.compile)
    for w in a.widths:
        bench_models(a.device, w, a.size, a.batch, a.repeats, a.dtypes)


if __name__ == "__main__":
    main()
