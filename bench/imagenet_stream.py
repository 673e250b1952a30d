"""ImageNet streaming throughput: decode + random-resized crop + flip, images/s per CPU.

What ``imagenet_init`` (adapt/pretrain) runs in Ray Data ``map_batches`` tasks
(:func:`pipeline.data.imagenet_stream.transform_batch`), on ImageNet-sized JPEGs drawn here (500x375,
the ILSVRC median, smooth colour fields plus noise: ~70 KB at quality 90; ImageNet's files
average ~110 KB). Two figures:

* ``in-process``: one Python process, one CPU: the per-CPU rate a cluster multiplies, as images
  per second of the process's own CPU time (on a shared machine wall-clock rates fall with load);
* ``ray data``: the same images written as parquet shards and streamed through
  ``streaming_datasets`` on a local Ray instance with all cores (read + decode + crop), the rate
  a training worker would be fed; divided by the cores for a per-CPU figure.

Run: ``.venv/bin/python bench/imagenet_stream.py [--n 512] [--crop 224] [--no-ray]``.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _jpegs(n: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        low = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
        a = np.asarray(Image.fromarray(low).resize((500, 375), Image.Resampling.BICUBIC), np.float32)
        a = np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def in_process(blobs: list[bytes], crop: int, batch: int = 64) -> dict:
    from pipeline.data.decode import decode
    from pipeline.data.imagenet_stream import transform_batch

    t, c = time.perf_counter(), time.process_time()
    for b in blobs:
        decode(b)
    decode_s, decode_cpu = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    for i in range(0, len(blobs), batch):
        chunk = np.array(blobs[i:i + batch], dtype=object)
        transform_batch({"image": chunk, "label": np.zeros(len(chunk))}, crop=crop, train=True)
    aug_s, aug_cpu = time.perf_counter() - t, time.process_time() - c
    # per CPU-second: what one dedicated core does (wall-clock rates fall on a shared machine)
    return {"decode_only_img_per_cpu_s": len(blobs) / decode_cpu,
            "decode_crop_flip_img_per_cpu_s": len(blobs) / aug_cpu,
            "decode_crop_flip_img_s_wall": len(blobs) / aug_s, "decode_only_img_s_wall": len(blobs) / decode_s}


def ray_data(blobs: list[bytes], crop: int, cpus: int) -> dict:
    import pyarrow as pa
    import ray

    from pipeline.data.imagenet_ingest import ShardWriter
    from pipeline.data.imagenet_stream import streaming_datasets
    from pipeline.outputs import write_marker
    from pipeline.data.ingest import parquet_schema

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for split in ("train", "val"):
            w = ShardWriter(d / split, parquet_schema(pa.int16()), 8 << 20)
            for i, b in enumerate(blobs if split == "train" else blobs[:8]):
                w.add({"image": b, "label": i % 10, "label_name": str(i % 10), "split": split,
                       "source": f"{i}.JPEG", "sha256": "", "height": 375, "width": 500})
            w.close()
        write_marker(d, "fer ingest-imagenet", classes=[str(i) for i in range(10)])
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        try:
            ds = streaming_datasets(d, crop=crop)["train"]
            for _ in ds.iter_batches(batch_size=64):  # warm-up: workers started, files cached
                pass
            t = time.perf_counter()
            n = sum(len(b["label"]) for b in ds.iter_batches(batch_size=64))
            s = time.perf_counter() - t
        finally:
            ray.shutdown()
    return {"ray_data_img_s": n / s, "ray_data_img_s_per_cpu": n / s / cpus, "cpus": cpus}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--no-ray", action="store_true")
    a = ap.parse_args()
    blobs = _jpegs(a.n)
    res = {"images": a.n, "mean_jpeg_kb": round(sum(map(len, blobs)) / len(blobs) / 1024, 1),
           "crop": a.crop, "load_average_1min": round(os.getloadavg()[0], 2)}
    res.update(in_process(blobs, a.crop))
    if not a.no_ray:
        res.update(ray_data(blobs, a.crop, len(os.sched_getaffinity(0))))
    for k, v in res.items():
        print(f"{k:32s} {v:.1f}" if isinstance(v, float) else f"{k:32s} {v}")


if __name__ == "__main__":
    main()
