"""Training-batch throughput: the device-side loader vs the usual FER repo input pipeline.

Both sides produce the same thing from the same synthetic RAF-DB images: shuffled batches of
normalised float32 ``[B, 3, 90, 90]`` random crops of the 100x100 faces, mirrored half the time.

* usual: torchvision ``ImageFolder`` on a folder of JPEGs + ``DataLoader(num_workers=W)`` +
  PIL transforms ``RandomCrop(90), RandomHorizontalFlip(), ToTensor(), Normalize(...)``
  (workers restart every epoch, as in those repos);
* ours: ``load_split`` decodes the split once into a uint8 tensor, then ``DeviceBatches`` crops,
  mirrors and normalises whole batches as tensor ops on the device.

Run: ``.venv/bin/python bench/data.py [--n 1500] [--epochs 3] [--device cpu|cuda]``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def _consume(batches, device) -> int:
    n = 0
    for x, y in batches:
        x = x.to(device, non_blocking=True)
        n += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n


def _best_epoch_rate(make_iter, epochs: int, device) -> float:
    """Images/s of the best of ``epochs`` timed epochs (after one warm-up epoch)."""
    _consume(make_iter(0), device)
    best = 0.0
    for e in range(1, epochs + 1):
        t0 = time.perf_counter()
        n = _consume(make_iter(e), device)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1500, help="synthetic images (RAF-DB layout)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--crop", type=int, default=90)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per side (best counts)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the usual pipeline")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)

    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms as T

    from pipeline.data.classes import CLASSES
    from pipeline.data.ingest import ingest
    from pipeline.data.loader import IMAGENET_MEAN, IMAGENET_STD, DeviceBatches, load_split
    from pipeline.data.synthetic import write_synthetic

    device = torch.device(a.device)
    tmp = Path(tempfile.mkdtemp(prefix="fer-bench-data-"))
    try:
        t0 = time.perf_counter()
        write_synthetic(tmp / "raf", layout="rafdb", n=a.n, seed=0)
        ingest(tmp / "raf", tmp / "pq", report_path=tmp / "report.json", progress=False)
        setup_s = time.perf_counter() - t0

        # the same train images as an ImageFolder of JPEGs (the usual repos' input)
        import pyarrow.parquet as pq

        t = pq.read_table(tmp / "pq" / "train.parquet", columns=["image", "label"])
        for i, (img, lab) in enumerate(zip(t.column("image").to_pylist(), t.column("label").to_pylist())):
            d = tmp / "folder" / "train" / CLASSES[lab]
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:05d}.jpg").write_bytes(img)
        n_train = t.num_rows

        # ---- usual pipeline
        tf = T.Compose([T.RandomCrop(a.crop), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        folder = datasets.ImageFolder(str(tmp / "folder" / "train"), transform=tf)
        assert len(folder) == n_train

        def usual(epoch):
            g = torch.Generator().manual_seed(epoch)
            return DataLoader(folder, batch_size=a.batch_size, shuffle=True, generator=g,
                              num_workers=a.workers, pin_memory=device.type == "cuda")

        usual_rate = _best_epoch_rate(usual, a.epochs, device)

        # ---- ours: decode once, then batches on the device
        t0 = time.perf_counter()
        x, y = load_split(tmp / "pq", "train")
        decode_rate = len(x) / (time.perf_counter() - t0)
        db = DeviceBatches(x, y, batch_size=a.batch_size, crop=a.crop, train=True, device=device)
        db_rot = DeviceBatches(x, y, batch_size=a.batch_size, crop=a.crop, train=True, device=device,
                               max_rotate_deg=10)

        def ours(epoch, b=db):
            b.set_epoch(epoch)
            return b

        ours_rate = _best_epoch_rate(ours, a.epochs, device)
        ours_rot_rate = _best_epoch_rate(lambda e: ours(e, db_rot), a.epochs, device)

        threads = torch.get_num_threads()
        print(f"data loader benchmark: {n_train} train images 100x100 -> batches of {a.batch_size} "
              f"x 3x{a.crop}x{a.crop} float32, device {device}, {os.cpu_count()} CPUs, "
              f"torch threads {threads} (setup {setup_s:.1f} s)")
        w = 58
        print(f"{'pipeline':<{w}} {'images/s':>10} {'ratio':>7}")
        print(f"{'usual: ImageFolder + DataLoader(%d workers) + PIL transforms' % a.workers:<{w}} "
              f"{usual_rate:>10.0f} {1.0:>7.2f}")
        print(f"{'ours: DeviceBatches crop+flip (tensor ops on device)':<{w}} {ours_rate:>10.0f} "
              f"{ours_rate / usual_rate:>7.2f}")
        print(f"{'ours: DeviceBatches crop+flip+rotate(10 deg)':<{w}} {ours_rot_rate:>10.0f} "
              f"{ours_rot_rate / usual_rate:>7.2f}")
        print(f"{'ours: one-time decode of the split (load_split)':<{w}} {decode_rate:>10.0f}")
        print(f"ratio ours/usual (crop+flip): {ours_rate / usual_rate:.1f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
