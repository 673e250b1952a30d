"""Training-step throughput: the worker's full step vs the raw model step, side by side.

full: what `train_loop_per_worker` runs per batch: `DeviceBatches` (permutation, random crop,
      mirror, rotation, normalisation, on the device) + forward + loss + backward + optimiser
      + per-iteration LR schedule.
raw:  forward + loss + backward + optimiser on pre-made normalised tensors (the ceiling).

Steps alternate (full, raw, full, ...) so both see the same machine load; the median step time
is reported. The ratio full/raw is the share of model speed the input pipeline keeps (1.0 =
free input).

    python bench/train.py                      # CPU-sized: width 0.125, 56 px -> crop 48
    python bench/train.py --threads 1          # one thread, as each of 2 workers on 2 cores
    python bench/train.py --width 1 --size 100 --crop 90 --batch 64 --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from pipeline.data.loader import DeviceBatches
from pipeline.model import lip_vgg16
from pipeline.train.config import TrainConfig
from pipeline.train.steps import lr_lambda, make_optimizer, train_step


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--size", type=int, default=56, help="stored image size (uint8 on the device)")
    ap.add_argument("--crop", type=int, default=48)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rotate", type=float, default=10.0, help="max rotation (deg) of the augmentation")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", choices=["auto", "on", "off"], default="auto", help="bf16 autocast (auto: GPU)")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    on_gpu = device.type == "cuda"
    amp = on_gpu if a.amp == "auto" else a.amp == "on"
    cl = on_gpu
    torch.manual_seed(0)

    n_img = a.batch * (a.steps + a.warmup)
    images = torch.randint(0, 256, (n_img, 3, a.size, a.size), dtype=torch.uint8)
    labels = torch.randint(0, 7, (n_img,))
    batches = DeviceBatches(images, labels, batch_size=a.batch, crop=a.crop, train=True, device=device,
                            seed=0, max_rotate_deg=a.rotate, drop_last=True)
    x_raw = torch.randn(a.batch, 3, a.crop, a.crop, device=device)
    y_raw = torch.randint(0, 7, (a.batch,), device=device)

    model = lip_vgg16(width=a.width).to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, TrainConfig(data="-", optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(len(batches), 10, 1, "cosine", 10, 0.1))
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)

    def step(x, y):
        train_step(model, x, y, crit, opt, sched, amp=amp, channels_last=cl)

    # Alternate one full step and one raw step, so both see the same machine load; median per step.
    it = iter(batches)
    for _ in range(a.warmup):
        step(*next(it))
        step(x_raw, y_raw)
    full_s, raw_s = [], []
    for _ in range(a.steps):
        full_s.append(_timed(lambda: step(*next(it)), device))
        raw_s.append(_timed(lambda: step(x_raw, y_raw), device))
    full = a.batch / statistics.median(full_s)
    raw = a.batch / statistics.median(raw_s)
    print(f"device {device}  threads {torch.get_num_threads()}  width {a.width}  images {a.size}->{a.crop}  "
          f"batch {a.batch}  amp {amp}  channels_last {cl}  rotate {a.rotate}")
    print(f"full training step (DeviceBatches + fwd/bwd/step): {full:8.1f} img/s")
    print(f"raw model step (pre-made tensors):                 {raw:8.1f} img/s")
    print(f"ratio full/raw: {full / raw:.3f}")


if __name__ == "__main__":
    main()
