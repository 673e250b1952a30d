"""onnxruntime vs PyTorch on this CPU: images/s and latency of the exported ten-crop graph at
batch 1 and 32, printed as ratios (onnxruntime / PyTorch). Run by hand or from `make bench`:

    .venv/bin/python bench/onnx.py [--width 1.0] [--size 100 --crop 90] [--seconds 3] [--batches 1 32]

The model is an untrained LIP-VGG16 (the default variant: LIP, conv head, ECA) at the given
width; speed does not depend on the weights.
"""
from __future__ import annotations

import sys
from pathlib import Path

# run as `python bench/onnx.py`, this file's folder comes first on sys.path and its name would
# shadow the onnx package: drop the folder before anything imports onnx
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.data.classes import CLASSES
from pipeline.infer.export import OnnxPredictor, export_onnx
from pipeline.infer.predictor import Predictor
from pipeline.model import lip_vgg16


def timed(fn, seconds: float) -> float:
    """Seconds per call (median of calls over about ``seconds``, after one warm-up)."""
    fn()
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--crop", type=int, default=90)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], metavar="N")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model = lip_vgg16(width=a.width).eval()
    meta = {"classes": list(CLASSES), "crop": a.crop, "image_size": a.size, "model_config": model.config}
    pt = Predictor((model, meta), device="cpu")
    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(pt, Path(d) / "model.onnx")
        ox = OnnxPredictor(path)
        from pipeline.evaluate import ten_crop_probabilities

        print(f"LIP-VGG16 width {a.width}, {a.size}px images, ten crops of {a.crop}, "
              f"torch {torch.__version__} ({torch.get_num_threads()} threads), CPU")
        print(f"{'batch':>5}  {'torch ms':>9}  {'onnx ms':>8}  {'torch img/s':>11}  {'onnx img/s':>10}  {'speed-up':>8}")
        for b in a.batches:
            x = np.random.default_rng(b).integers(0, 256, (b, 3, a.size, a.size), dtype=np.uint8)
            xt = torch.from_numpy(x)
            t_pt = timed(lambda: ten_crop_probabilities(pt.model, xt, pt.crop, "cpu"), a.seconds)
            t_ox = timed(lambda: ox.run(x), a.seconds)
            diff = float(np.abs(ten_crop_probabilities(pt.model, xt, pt.crop, "cpu")[0].numpy() - ox.run(x)).max())
            print(f"{b:>5}  {t_pt * 1e3:>9.1f}  {t_ox * 1e3:>8.1f}  {b / t_pt:>11.1f}  {b / t_ox:>10.1f}  "
                  f"{t_pt / t_ox:>7.2f}x   (max |diff| {diff:.1e})")


if __name__ == "__main__":
    main()
