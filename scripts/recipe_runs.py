"""Recipe and rare-class comparison runs on the embedded data, one process each, no Ray.

Each run is the training loop of `pipeline.train.worker` with world size 1 (the same building
blocks: `lr_lambda`, `train_step`, `count_correct`, the augmentation of `DeviceBatches`, the
criteria and sampler of `pipeline.train.imbalance`), so many configurations fit on a 2-core CPU.
The pipeline's default also trains at world size 1 (one Ray worker of 2 threads); with more
workers the batch is split and each worker's BatchNorm sees its share only.

    python scripts/recipe_runs.py --data data/parquet/rafdb --init models/imagenet_init.pt \\
        --name onecycle --seeds 0 1 2 --set schedule=onecycle lr=0.01 --out reports/runs

writes one JSON per (name, seed), rewritten after every epoch (an interrupted run keeps what it
reached; `status` is "running" until the last epoch): the config, the per-epoch history (val
accuracy, per-class and mean class val accuracy), the best val epoch and, once done, the
centre-crop test accuracy of the best-val model (reported only, never used to choose). `scripts/results.py` reads these files.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml


def _parse_value(v: str):
    return yaml.safe_load(v)


def per_class(model, x, y, crop: int, num_classes: int, amp: bool = False) -> tuple[float, list[float]]:
    from pipeline.data.loader import center_crop, normalize
    import torch

    model.eval()
    preds = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        for i in range(0, len(y), 128):
            preds.append(model(normalize(center_crop(x[i:i + 128], crop))).argmax(1))
    p = torch.cat(preds)
    acc = float((p == y).float().mean())
    cls = []
    for c in range(num_classes):
        m = y == c
        cls.append(float((p[m] == c).float().mean()) if m.any() else float("nan"))
    return acc, cls


def run(base: dict, seed: int, out: Path, name: str) -> dict:
    import random

    import torch

    from pipeline.data.loader import load_split
    from pipeline.model import checkpoint, lip_vgg16
    from pipeline.model.speed import resolve_amp
    from pipeline.train.config import TrainConfig
    from pipeline.train.imbalance import make_batches, make_criterion
    from pipeline.train.steps import lr_lambda, make_optimizer, train_step

    d = dict(base, seed=seed)
    tc = TrainConfig.from_dict(d)
    cfg = {**tc.to_dict(), "model_config": tc.network()}  # for this script's own reads
    tx, ty = load_split(cfg["data"], "train", size=cfg["image_size"], workers=1)
    vx, vy = load_split(cfg["data"], "val", size=cfg["image_size"], workers=1)
    ex, ey = load_split(cfg["data"], "test", size=cfg["image_size"], workers=1)
    batches = make_batches(tc, tx, ty, batch_size=cfg["batch_size"], crop=cfg["crop"], train=True,
                           seed=seed * 100_003, max_rotate_deg=cfg["max_rotate_deg"], drop_last=True)
    steps = len(ty) // cfg["batch_size"]
    counts = torch.bincount(ty, minlength=cfg["num_classes"]).double()
    torch.manual_seed(seed)
    model = lip_vgg16(**cfg["model_config"])
    if cfg["init"] != "none":
        checkpoint.load_init(model, cfg["init"])
    opt = make_optimizer(model, tc)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(
        steps, cfg["epochs"], cfg["warmup_epochs"], cfg["schedule"], cfg["step_size"], cfg["gamma"]))
    crit = make_criterion(tc, counts, "cpu")
    amp = resolve_amp(cfg["amp"], "cpu")  # `amp: true` trains and evaluates under bf16 autocast
    torch.manual_seed(seed * 1000)
    random.seed(seed * 1000)
    best, best_state, hist = -1.0, None, []
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}__s{seed}.json"
    rec = {"name": name, "seed": seed, "epochs": cfg["epochs"], "status": "running",
           "init": base["init"], "overrides": {k: v for k, v in base.items() if k not in ("data", "init")},
           "torch_threads": torch.get_num_threads(), "precision": "bf16 autocast" if amp else "fp32",
           "cpu_kernels": torch.backends.cpu.get_cpu_capability()}
    for epoch in range(1, cfg["epochs"] + 1):
        model.train()
        batches.set_epoch(epoch)
        t0 = time.perf_counter()
        ls, corr, seen = 0.0, 0, 0
        for _, (x, y) in zip(range(steps), batches):
            loss, logits = train_step(model, x, y, crit, opt, sched, amp=amp)
            ls += float(loss) * len(y)
            corr += int((logits.argmax(1) == y).sum())
            seen += len(y)
        va, vcls = per_class(model, vx, vy, cfg["crop"], cfg["num_classes"], amp)
        hist.append({"epoch": epoch, "train_loss": ls / seen, "train_accuracy": corr / seen,
                     "val_accuracy": va, "val_mean_class_accuracy": sum(vcls) / len(vcls),
                     "val_per_class": vcls, "epoch_time_s": time.perf_counter() - t0})
        print(f"{name} s{seed} ep{epoch} loss {ls / seen:.3f} acc {corr / seen:.3f} val {va:.3f} "
              f"mca {sum(vcls) / len(vcls):.3f} {time.perf_counter() - t0:.0f}s", flush=True)
        if va > best:
            best = va
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
            rec.update(best_epoch=epoch, best_val_accuracy=va, val_per_class=vcls,
                       val_mean_class_accuracy=sum(vcls) / len(vcls))
        # written every epoch: an interrupted run still names what it reached
        rec.update(history=hist, epochs_done=epoch, final_train_accuracy=hist[-1]["train_accuracy"],
                   wall_s=time.perf_counter() - t_start)
        path.write_text(json.dumps(rec, indent=1))
    model.load_state_dict(best_state)
    ta, tcls = per_class(model, ex, ey, cfg["crop"], cfg["num_classes"], amp)
    rec.update(status="done", test_accuracy_center=ta, test_per_class_center=tcls,
               test_mean_class_accuracy_center=sum(tcls) / len(tcls), wall_s=time.perf_counter() - t_start)
    path.write_text(json.dumps(rec, indent=1))
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="train_rafdb + model sections as the base")
    p.add_argument("--data", required=True)
    p.add_argument("--init", default="none")
    p.add_argument("--name", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="reports/runs")
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    params = yaml.safe_load(Path(a.params).read_text())
    model = {k: v for k, v in params["model"].items() if k != "compile"}
    tr = {k: v for k, v in params["train_rafdb"].items()}
    base = dict(model, **tr, data=a.data, init=a.init)
    for kv in a.set:
        k, v = kv.split("=", 1)
        base[k] = _parse_value(v)
    for s in a.seeds:
        run(base, s, Path(a.out), a.name)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
