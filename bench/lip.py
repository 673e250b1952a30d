"""LIP costs, measured side by side in one run (ratios, not absolute times: machines are noisy).

1. The pooling op, forward + backward on the same tensors: `lip2d` (window max shift, fp16-safe)
   vs `lip2d_bounded` (the paper's naive form, what LIPPool2d uses for SoftGate's [0, 12] logits
   outside fp16) vs `lip2d_bounded` under torch.compile (one fused C++ loop; --compile).
2. One AdamW training step of LIP-VGG16 (lip/conv/eca) vs torchvision's VGG16-BN (max/fc/none)
   and vs its max-pool twin (max/conv/eca), plus lip/conv/eca with the old shifted pooling and
   with `lip_norm: false` (the logit module without InstanceNorms), and with the other `lip_start`
   (lip/conv/eca is params.yaml's: `max`, the soft max-pooling start, costs one more
   full-resolution multiply-add per pool than `avg`), in fp32 and bf16 autocast,
   interleaved round by round, and lip/conv/eca before its fast forms (torch's InstanceNorm2d,
   autograd through the pool). Targets: lip/conv/eca <= 1.2x VGG16-BN and <= 1.3x the twin.
3. Where LIP's extra time goes (--breakdown, fp32): the step of the twin, then LIP with only its
   pooling op (logits constant, logit module skipped), with only its logit module (max pooling
   kept), whole, and without the logit module's InstanceNorms; printed as shares of LIP's step.

    python bench/lip.py [--widths 0.25 1.0] [--size 90] [--batch 32] [--dtypes fp32 bf16]
"""
from __future__ import annotations

import argparse
import statistics
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from pipeline.model import lip2d, lip_vgg16
from pipeline.model.lip import LIPPool2d, lip2d_bounded
from pipeline.params_schema import LIP_STARTS

TARGET = 1.2       # lip/conv/eca vs VGG16-BN
TWIN_TARGET = 1.3  # lip/conv/eca vs max/conv/eca


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


def _autograd_lip(m):
    """The model as LIP ran before its fast forms: torch's InstanceNorm2d, autograd through the pool."""
    from torch import nn

    from pipeline.model.lip import InstanceNorm

    for mod in list(m.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, InstanceNorm):
                ref = nn.InstanceNorm2d(child.num_channels, affine=True)
                ref.load_state_dict(child.state_dict())
                setattr(mod, name, ref)
    for p in m.modules():
        if isinstance(p, LIPPool2d):
            def fwd(s, x):
                w = torch.exp(s.logit(x))
                return F.avg_pool2d(x * w, s.kernel_size, s.stride) / F.avg_pool2d(w, s.kernel_size, s.stride)
            p.forward = types.MethodType(fwd, p)
    return m


def _shifted(m):
    """The model with every LIP pool on the old shifted form (for the before/after ratio)."""
    for p in m.modules():
        if isinstance(p, LIPPool2d):
            p.forward = types.MethodType(lambda s, x: lip2d(x, s.logit(x), s.kernel_size, s.stride), p)
    return m


def _default_start() -> str:
    """params.yaml's `model.lip_start`: the bench's lip/conv/eca is the network the pipeline trains."""
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text()) or {}
    return (params.get("model") or {}).get("lip_start", "avg")


START = _default_start()
OTHER_START = next(s for s in LIP_STARTS if s != START)
OTHER = f"lip/conv/eca, lip_start {OTHER_START}"

VARIANTS = {  # name -> (pool, head, attention, how LIP runs: None | "shifted" | "autograd" | "no_norm", start)
    "VGG16-BN (max/fc/none)": ("max", "fc", "none", None, "avg"),
    "max/conv/eca": ("max", "conv", "eca", None, "avg"),
    "lip/conv/eca": ("lip", "conv", "eca", None, START),
    "lip/conv/eca, before its fast forms": ("lip", "conv", "eca", "autograd", START),
    "lip/conv/eca, shifted LIP": ("lip", "conv", "eca", "shifted", START),
    "lip/conv/eca, lip_norm false": ("lip", "conv", "eca", "no_norm", START),
    OTHER: ("lip", "conv", "eca", None, OTHER_START),
}


def bench_models(device: str, width: float, size: int, batch: int, repeats: int, dtypes) -> dict:
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 7, (batch,), device=device)
    out = {}
    for dt in dtypes:
        fns = {}
        for name, (pool, head, att, how, start) in VARIANTS.items():
            torch.manual_seed(0)
            m = lip_vgg16(7, pool=pool, head=head, attention=att, width=width,
                          lip_norm=how != "no_norm", lip_start=start).to(device).train()
            if how == "shifted":
                _shifted(m)
            elif how == "autograd":
                _autograd_lip(m)
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
              f"(ratio to VGG16-BN, >1 = slower; target lip/conv/eca <= {TARGET}x; "
              f"lip/conv/eca is params.yaml's lip_start: {START})")
        for name, v in t.items():
            print(f"  {name:28} {v * 1e3:8.1f} ms/step {batch / v:7.1f} img/s  {v / base:5.2f}x")
        twin = t["max/conv/eca"]
        for lip in ("lip/conv/eca", OTHER, "lip/conv/eca, lip_norm false"):
            r, rt = t[lip] / base, t[lip] / twin
            print(f"  -> {lip}: {r:.2f}x VGG16-BN (target <= {TARGET}: {'MET' if r <= TARGET else 'NOT met'}), "
                  f"{rt:.2f}x its max-pool twin (target <= {TWIN_TARGET}: {'MET' if rt <= TWIN_TARGET else 'NOT met'})")
        print(f"  bounded LIP form vs shifted: {t['lip/conv/eca'] / t['lip/conv/eca, shifted LIP']:.2f}x; "
              f"fast forms vs before: {t['lip/conv/eca'] / t['lip/conv/eca, before its fast forms']:.2f}x")
        out[dt] = t
    return out


def _constant_logits(p):
    """LIP's pooling op on constant logits: the logit module's cost left out."""
    def fwd(s, x):
        return lip2d_bounded(x, torch.zeros_like(x), s.kernel_size, s.stride)
    p.forward = types.MethodType(fwd, p)


def _logit_only(p):
    """The logit module computed (and back-propagated), max pooling kept: the pooling op left out."""
    def fwd(s, x):
        return F.max_pool2d(x, s.kernel_size, s.stride) + 0 * F.max_pool2d(s.logit(x), s.kernel_size, s.stride)
    p.forward = types.MethodType(fwd, p)


def breakdown(device: str, width: float, size: int, batch: int, repeats: int) -> None:
    """LIP's step split into the twin network, the pooling op, the logit module and its norms."""
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 7, (batch,), device=device)

    def make(pool, patch=None, lip_norm=True):
        torch.manual_seed(0)
        m = lip_vgg16(7, pool=pool, width=width, lip_norm=lip_norm, lip_start=START).to(device).train()
        for p in m.modules():
            if patch and isinstance(p, LIPPool2d):
                patch(p)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

        def step():
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    t = interleaved({"twin": make("max"), "pool op": make("lip", _constant_logits),
                     "logit module": make("lip", _logit_only), "lip": make("lip"),
                     "lip, no norms": make("lip", lip_norm=False)}, repeats, device)
    lip = t["lip"]
    parts = {"the max-pool twin's network (convs, BN, head, ECA)": t["twin"],
             "LIP's pooling op (exp, weighted avg pools; vs max pool)": t["pool op"] - t["twin"],
             "logit modules' InstanceNorms": t["lip"] - t["lip, no norms"],
             "logit modules' convs, ReLUs, SoftGate": t["logit module"] - t["twin"] - (t["lip"] - t["lip, no norms"])}
    print(f"where LIP-VGG16's training step goes (lip_start: {START}), width {width}, {size}x{size}, batch {batch}, fp32 "
          f"({lip * 1e3:.1f} ms/step; forward and backward of each part):")
    for k, v in parts.items():
        print(f"  {k:58} {v * 1e3:8.1f} ms  {v / lip:6.1%}")
    rest = lip - sum(parts.values())
    print(f"  {'(interaction / noise)':58} {rest * 1e3:8.1f} ms  {rest / lip:6.1%}")


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
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false", help="skip the step breakdown")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, device {a.device}, threads {torch.get_num_threads()}")
    bench_op(a.device, a.repeats, a.compile)
    for w in a.widths:
        if a.breakdown:
            breakdown(a.device, w, a.size, a.batch, a.repeats)
        bench_models(a.device, w, a.size, a.batch, a.repeats, a.dtypes)


if __name__ == "__main__":
    main()
