"""torch.compile vs eager training step of LIP-VGG16 (lip/conv/eca), side by side: the
measurement behind `model.compile`'s default.

Per width: the compile time (the first compiled step, forward + backward kernels), then eager
and compiled AdamW steps interleaved round by round; prints the speed-up and how many steps it
takes to pay the compile time back.

    python bench/compile.py [--widths 0.125 0.5] [--size 90] [--batch 16]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline.model import lip_vgg16
from pipeline.model.speed import maybe_compile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=float, nargs="+", default=[0.125, 0.5])
    ap.add_argument("--size", type=int, default=90)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    dev = a.device
    print(f"torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}, "
          f"{a.size}x{a.size}, batch {a.batch}, lip/conv/eca")
    x = torch.randn(a.batch, 3, a.size, a.size, device=dev)
    y = torch.randint(0, 7, (a.batch,), device=dev)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    for w in a.widths:
        steps = {}
        for compiled in (False, True):
            torch.manual_seed(0)
            m = lip_vgg16(width=w).to(dev).train()
            run = maybe_compile(m, compiled)
            opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

            def step(run=run, opt=opt):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(run(x), y).backward()
                opt.step()
            sync()
            t = time.perf_counter()
            step()
            sync()
            steps[compiled] = (step, time.perf_counter() - t)
        times = {c: [] for c in steps}
        for _ in range(a.repeats):
            for c, (f, _) in steps.items():
                sync()
                t = time.perf_counter()
                f()
                sync()
                times[c].append(time.perf_counter() - t)
        e, c = statistics.median(times[False]), statistics.median(times[True])
        first = steps[True][1] - steps[False][1]
        pay = first / (e - c) if e > c else float("inf")
        print(f"width {w}: compile {first:6.1f} s; step eager {e * 1e3:7.1f} ms, compiled {c * 1e3:7.1f} ms "
              f"(compiled/eager {c / e:.2f}x); pays back after {pay:,.0f} steps")


if __name__ == "__main__":
    main()
