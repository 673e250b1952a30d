"""bf16 autocast vs fp32 on this CPU, for the configured network: the measurement behind
`amp: auto` on CPU (pipeline.model.speed.resolve_amp), written to reports/bf16_cpu.json.

Times, interleaved round by round on the same model and batch: one AdamW training step (batch =
train_rafdb.batch_size / ray.num_workers, the per-worker batch) and one ten-crop evaluation forward
(evaluate.batch_size images x 10 crops, no grad). The rule `auto` applies: bf16 on a CPU with
native bf16 (avx512_bf16 / amx_bf16), fp32 elsewhere, where oneDNN emulates bf16.

    python bench/bf16_cpu.py [--params params.yaml] [--threads 1] [--out reports/bf16_cpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from pipeline.model import lip_vgg16
from pipeline.model.speed import cpu_has_native_bf16, resolve_amp


def _cpu() -> dict:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
                 platform.processor())
    flags = set(info.split())
    return {"model": model, "capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "native_bf16": cpu_has_native_bf16()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--threads", type=int, default=None, help="default: the threads each worker gets")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="reports/bf16_cpu.json")
    a = ap.parse_args()
    p = yaml.safe_load(Path(a.params).read_text())
    model_cfg = {k: v for k, v in p["model"].items() if k != "compile"}
    tr, ray = p["train_rafdb"], p["ray"]
    threads = a.threads or max(1, int(ray.get("cpus_per_worker") or 1))
    torch.set_num_threads(threads)
    crop, batch = tr["crop"], max(2, tr["batch_size"] // ray["num_workers"])
    eval_batch = p["evaluate"]["batch_size"]
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, crop, crop), torch.randint(0, 7, (batch,))
    xe = torch.randn(min(eval_batch, 16) * 10, 3, crop, crop)
    runs = {}
    for dt in ("fp32", "bf16"):
        torch.manual_seed(0)
        m = lip_vgg16(**model_cfg)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

        def train(m=m, opt=opt, on=dt == "bf16"):
            m.train()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
                loss = F.cross_entropy(m(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        @torch.inference_mode()
        def evaluate(m=m, on=dt == "bf16"):
            m.eval()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=on):
                m(xe)
        runs[dt] = (train, evaluate)
    times = {(dt, k): [] for dt in runs for k in ("train", "eval")}
    for dt, (tf, ef) in runs.items():
        tf(), ef()
    for _ in range(a.repeats):
        for dt, (tf, ef) in runs.items():
            for k, f in (("train", tf), ("eval", ef)):
                t = time.perf_counter()
                f()
                times[(dt, k)].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "cpu": _cpu(), "torch": torch.__version__, "threads": threads,
        "load_average_1min": os.getloadavg()[0],  # other work on the machine: absolute rates vary "network": model_cfg,
        "crop": crop, "train_batch": batch, "eval_images": len(xe),
        "train_images_per_s": {dt: batch / med[(dt, "train")] for dt in runs},
        "eval_crops_per_s": {dt: len(xe) / med[(dt, "eval")] for dt in runs},
        "bf16_over_fp32_time": {"train": med[("bf16", "train")] / med[("fp32", "train")],
                                "eval": med[("bf16", "eval")] / med[("fp32", "eval")]},
        "amp_auto_on_this_cpu": resolve_amp("auto", "cpu"),
        "rule": "amp auto = bf16 on CUDA and on CPUs with native bf16 (avx512_bf16 or amx_bf16); "
                "fp32 on other CPUs, where bf16 is emulated",
    }
    faster = res["bf16_over_fp32_time"]["train"] < 1.0
    res["measurement_agrees_with_rule"] = faster == res["amp_auto_on_this_cpu"]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"{res['cpu']['model']} ({res['cpu']['capability']}, native bf16: {res['cpu']['native_bf16']}), "
          f"{threads} thread(s), width {model_cfg.get('width')}:")
    for k in ("train", "eval"):
        print(f"  {k:5} bf16/fp32 time {res['bf16_over_fp32_time'][k]:.2f}x")
    print(f"  amp auto on this CPU: {res['amp_auto_on_this_cpu']} "
          f"(measurement agrees: {res['measurement_agrees_with_rule']}) -> {out}")


if __name__ == "__main__":
    main()
