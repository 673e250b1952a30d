"""What pinning the CPU kernels costs: one LIP-VGG16 training step (the default network and crop)
with FER_CPU_KERNELS=portable (AVX2 everywhere, the default) vs native (this CPU's best), each in
its own process (the variables are read when torch loads), the two taking turns round by round.

    python bench/kernels.py [--rounds 3] [--steps 8] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time
import pipeline
import torch, torch.nn.functional as F
from pipeline.model import lip_vgg16
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
m = lip_vgg16(7, width=0.25, dropout=0.1)
opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
x, y = torch.rand(32, 3, 48, 48), torch.randint(0, 7, (32,))
def step():
    loss = F.cross_entropy(m(x), y); opt.zero_grad(); loss.backward(); opt.step()
step(); step()
ts = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "step_s": statistics.median(ts)}))
"""


def run(mode: str, threads: int, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}
    env["FER_CPU_KERNELS"] = mode
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(steps)], env=env, check=True,
                         capture_output=True, text=True, timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    times: dict[str, list[float]] = {"portable": [], "native": []}
    caps = {}
    for _ in range(a.rounds):
        for mode in times:
            r = run(mode, a.threads, a.steps)
            times[mode].append(r["step_s"])
            caps[mode] = r["capability"]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"LIP-VGG16 training step, width 0.25, 48x48 crops, batch 32, fp32, {a.threads} threads, "
          f"median of {a.rounds} rounds x {a.steps} steps:")
    for mode, v in med.items():
        print(f"  {mode:8} ({caps[mode]:6}) {v * 1e3:7.1f} ms/step")
    print(f"  -> pinned (portable) / native = {med['portable'] / med['native']:.2f}x")


if __name__ == "__main__":
    main()
