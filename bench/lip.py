"""LIP costs, measured side by side in one run (ratios, not absolute times: machines are noisy).

1. lip2d (window softmax, shift-safe) vs the LIP paper's naive formula
   avg_pool(x * e^G) / avg_pool(e^G), forward + backward on the same tensors.
2. One training step of LIP-VGG16 variants vs VGG16-BN (pool=max, head=fc, attention=none).

    python bench/lip.py [--width 0.5] [--size 90] [--batch 16] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from pipeline.model import lip2d, lip_vgg16


def naive_lip(x, logits):
    w = logits.exp()
    return F.avg_pool2d(x * w, 2) / F.avg_pool2d(w, 2)


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of `fn` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def bench_op(device: str, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, 56, 56, generator=g).to(device).requires_grad_()
    lg = (torch.rand(32, 64, 56, 56, generator=g) * 12).to(device).requires_grad_()

    def step(f):
        def run():
            x.grad = lg.grad = None
            f(x, lg).sum().backward()
        return run

    t_ours, t_naive = timed(step(lip2d), repeats, device), timed(step(naive_lip), repeats, device)
    print(f"lip2d fwd+bwd on {tuple(x.shape)}: ours {t_ours * 1e3:.1f} ms, naive {t_naive * 1e3:.1f} ms, "
          f"ours/naive = {t_ours / t_naive:.2f}x")


def bench_models(device: str, width: float, size: int, batch: int, repeats: int) -> None:
    variants = [("max", "fc", "none"), ("lip", "fc", "none"), ("max", "conv", "eca"), ("lip", "conv", "eca")]
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 7, (batch,), device=device)
    results = {}
    for pool, head, att in variants:
        torch.manual_seed(0)
        m = lip_vgg16(7, pool=pool, head=head, attention=att, width=width).to(device).train()
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()

        results[(pool, head, att)] = timed(step, repeats, device)
    base = results[("max", "fc", "none")]
    print(f"training step, width {width}, {size}x{size}, batch {batch} (ratio to VGG16-BN, >1 = slower)")
    for (pool, head, att), t in results.items():
        print(f"  pool={pool:3} head={head:4} attention={att:4}: {t * 1e3:8.1f} ms/step "
              f"{batch / t:7.1f} img/s  {t / base:5.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--size", type=int, default=90)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    print(f"torch {torch.__version__}, device {a.device}, threads {torch.get_num_threads()}")
    bench_op(a.device, a.repeats)
    bench_models(a.device, a.width, a.size, a.batch, a.repeats)


if __name__ == "__main__":
    main()
