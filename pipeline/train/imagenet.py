"""ImageNet-init training (stage imagenet_init, modes ``adapt`` and ``pretrain``), streamed with Ray Data.

ImageNet does not fit in a worker's memory, so unlike the face stages nothing is loaded up front:
:func:`pipeline.data.imagenet_stream.streaming_datasets` reads the parquet shards and decodes and crops
them in Ray Data tasks; Ray Train splits each dataset across the workers
(``streaming_split(equal=True)``: every worker gets the same number of rows, so DDP steps match),
and each worker pulls batches with ``iter_torch_batches``. A worker holds a few batches, never
the set.

Modes:

* ``adapt``: start from the ImageNet ``vgg16_bn`` mapping (``source``), freeze every tensor the
  mapping copied (the VGG convs and their BatchNorm, whose running statistics stay as well) and
  train the parts VGG16-BN does not have (LIP logits, conv head, ECA, classifier); then, when
  ``finetune_epochs`` > 0, a second run trains everything at ``finetune_lr``. Two Ray Train runs,
  because DDP registers the trainable parameters once.
* ``pretrain``: the whole LIP-VGG16 from its seeded random init.

Each phase is one :func:`pipeline.train.launch.fit` (the one TorchTrainer), checkpointed every
epoch: a rerun with the same settings resumes after the last finished epoch (a finished phase is
not run again). The output is an init checkpoint like ``map``'s, with the ImageNet classifier;
RAF-DB training re-initialises it because the class count differs (``checkpoint.load_init``).
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
from torch import nn

from pipeline import code_deps
from pipeline.outputs import write_file_atomic
from pipeline.errors import FerError

#: imagenet_init keys that are not TrainConfig fields (the rest are passed through to it).
_SECTION_ONLY = ("source", "mode", "data", "finetune_epochs", "finetune_lr", "min_scale",
                 "shuffle_buffer")


def frozen_names(model: nn.Module) -> list[str]:
    """The parameters ``adapt`` freezes: what the vgg16_bn mapping copies (every conv and BN of
    ``features`` except the LIP logits; for head "fc" also VGG's two hidden FC layers)."""
    names = [k for k, _ in model.named_parameters() if k.startswith("features.") and ".logit." not in k]
    if model.config["head"] == "fc":
        names += [k for k, _ in model.named_parameters()
                  if k.startswith("classifier.") and not k.startswith(model.classifier_prefix)]
    return names


def _freeze(model: nn.Module) -> list[nn.Module]:
    """Freeze :func:`frozen_names`; returns the BatchNorm modules whose statistics must stay."""
    frozen = set(frozen_names(model))
    for k, p in model.named_parameters():
        if k in frozen:
            p.requires_grad_(False)
    return [m for name, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d) and f"{name}.weight" in frozen]


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB."""
    with open("/proc/self/statm") as fh:
        cur = int(fh.read().split()[1]) * resource.getpagesize() / 2**20
    return cur, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------- the worker loop
def imagenet_loop_per_worker(config: dict) -> None:
    """The face loop's building blocks (pipeline.train.steps) around streamed batches and a
    top-1/top-5 validation; no early stopping, so no best state."""
    import ray.train
    import torch.distributed as dist

    from pipeline.data.loader import normalize
    from pipeline.ray_workarounds import say
    from pipeline.train.config import WorkerConfig
    from pipeline.train.steps import (all_reduce, build_model, cpu_state, end_epoch, epoch_logger, maybe_fail,
                                      resume, setup_worker, sync_buffers, train_epoch)

    w = WorkerConfig.from_loop(config)
    run = w.run
    rank, world, device, amp, channels_last = setup_worker(w)
    steps = int(w.steps_per_epoch)
    frozen_bn: list[nn.Module] = []  # adapt: these keep ImageNet's running statistics
    freeze = (lambda m: frozen_bn.extend(_freeze(m))) if w.freeze else None
    model, raw, optimizer, scheduler, ckpt = build_model(w, rank, steps, channels_last, before_ddp=freeze)
    criterion = nn.CrossEntropyLoss(label_smoothing=run.label_smoothing)
    start, history = 1, []
    if (st := resume(ckpt, w, rank, raw, optimizer, scheduler)) is not None:
        start, history = st["epoch"] + 1, st["history"]
    on_epoch = epoch_logger(w, rank, prefix=f"{w.phase}_")

    dtypes = {"image": torch.uint8, "label": torch.int64}
    as_xy = lambda batches: ((normalize(b["image"].permute(0, 3, 1, 2)), b["label"]) for b in batches)  # noqa: E731
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start, run.epochs + 1):
        maybe_fail(w, epoch, rank)
        model.train()
        for m in frozen_bn:
            m.eval()
        rss_before, _ = _rss_mb()
        t0 = time.perf_counter()
        loss_sum, correct_g, seen_g, lr, done = train_epoch(
            model, as_xy(train_shard.iter_torch_batches(
                batch_size=run.batch_size // world, drop_last=True, dtypes=dtypes, device=device,
                local_shuffle_buffer_size=w.shuffle_buffer or None)),
            criterion, optimizer, scheduler, device=device, amp=amp, channels_last=channels_last)
        if done != steps:  # equal splits and drop_last make this exact; say so if not
            say(f"warning: rank {rank} ran {done} steps, expected {steps}")
        train_time = time.perf_counter() - t0
        sync_buffers(raw)
        raw.eval()
        top1 = top5 = n_val = 0
        with torch.no_grad():
            for x, y in as_xy(val_shard.iter_torch_batches(batch_size=256, dtypes=dtypes, device=device)):
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = raw(x).float()
                k = min(5, logits.shape[1])
                top = logits.topk(k, dim=1).indices
                top1 += int((top[:, 0] == y).sum())
                top5 += int((top == y[:, None]).any(1).sum())
                n_val += len(y)
        top1, top5, n_val = all_reduce([top1, top5, n_val], device=device)
        rss_now, rss_peak = _rss_mb()
        rss_growth = max(0.0, rss_peak - rss_before) if epoch == start else rss_now - rss_before
        peak, growth = all_reduce([rss_peak, rss_growth], op=dist.ReduceOp.MAX, device=device)
        metrics = {
            "epoch": epoch, "train_loss": loss_sum / max(seen_g, 1), "train_accuracy": correct_g / max(seen_g, 1),
            "top1": top1 / max(n_val, 1), "top5": top5 / max(n_val, 1), "n_val": int(n_val),
            "n_train_seen": int(seen_g), "lr": lr, "images_per_s": seen_g / train_time,
            "worker_rss_peak_mb": peak, "worker_rss_growth_mb": growth,
        }
        history.append(metrics)
        end_epoch(rank, epoch, metrics, on_epoch, w, line=(
            f"{w.phase} epoch {epoch}/{run.epochs}  loss {metrics['train_loss']:.4f}  "
            f"acc {metrics['train_accuracy']:.3f}  top1 {metrics['top1']:.3f}  top5 "
            f"{metrics['top5']:.3f}  {metrics['images_per_s']:.1f} img/s  worker RSS peak "
            f"{peak:.0f} MB"),
            state=lambda: {
                "model": cpu_state(raw), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                "model_config": dict(w.network),
            })


# ---------------------------------------------------------------------------- the driver
def settings(section: dict) -> dict:
    """The imagenet_init section with the schema's defaults filled in (FerError on a bad value)."""
    from pipeline.params_schema import ImagenetInit, problems

    found = problems({"imagenet_init": section})
    if found:
        raise FerError("; ".join(found))
    return ImagenetInit.model_validate(section).model_dump()


def run_imagenet_init(out: Path, report_path: Path, params: dict, *, worker_options=None) -> dict:
    """Train per ``imagenet_init.mode`` (adapt | pretrain) on the streamed ImageNet parquet and
    write the init checkpoint ``out`` and the report (top-1/top-5 on val); returns the report."""
    from pipeline import tracking
    from pipeline.config import section
    from pipeline.data.imagenet_stream import dataset_info, streaming_datasets
    from pipeline.model import checkpoint
    from pipeline.train.config import TrainConfig
    from pipeline.train.launch import storage_location, fit, latest_checkpoint_dir

    s = settings(section(params, "imagenet_init"))
    data = str(Path(s["data"]))
    info = dataset_info(data)
    classes = info["classes"]
    seed = s["seed"] if s["seed"] is not None else section(params, "train_rafdb").get("seed", 0)
    common = TrainConfig.options(
        params, {k: v for k, v in s.items() if k not in _SECTION_ONLY and k not in ("epochs", "lr", "seed")},
        {"seed": seed, "num_classes": len(classes), "data": data})
    probe = TrainConfig.from_dict({**common, "epochs": max(1, s["epochs"]), "lr": s["lr"]})
    local_bs = probe.batch_size // probe.num_workers
    steps = info["rows"]["train"] // probe.num_workers // local_bs
    if steps < 1:
        raise FerError(f"{info['rows']['train']} training images give no full batch of {local_bs} per "
                       f"worker: lower imagenet_init.batch_size or ray.num_workers")
    phases = ([("adapt", s["epochs"], s["lr"], True)] if s["mode"] == "adapt" else
              [("pretrain", s["epochs"], s["lr"], False)])
    if s["mode"] == "adapt" and s["finetune_epochs"]:
        phases.append(("finetune", s["finetune_epochs"], s["finetune_lr"], False))
    # the run names hash the settings, the data and the code the stage runs (its import closure,
    # which its dvc.yaml deps also are): a rerun resumes, a change restarts
    digest = code_deps.digest("stages.imagenet_init", json.dumps(
        {**common, **s, "seed": seed, "data": info["fingerprint"]}, sort_keys=True, default=str).encode())[:10]
    storage = storage_location(probe)
    model_config = probe.network()
    experiment = section(params, "mlflow")["experiment"] if "mlflow" in params else "lip-vgg16"

    init = "none"
    if s["mode"] == "adapt":
        init_path = Path(storage) / f"imagenet_init-{digest}-vgg16bn.pt"
        checkpoint.write_imagenet_init(init_path, model_config, str(s["source"]), seed=seed)
        init = str(init_path)
    final: dict = {}
    t0 = time.perf_counter()
    with tracking.tracked_run(experiment, f"imagenet_init-{s['mode']}-{digest}", stage="imagenet_init",
                              dataset="imagenet", params={**s, "seed": seed, **info["rows"],
                                                          "classes": len(classes)}) as run_id:
        for phase, epochs, lr, freeze in phases:
            cfg = TrainConfig.from_dict({**common, "epochs": epochs, "lr": lr, "init": init,
                                         "run_name": f"imagenet_init-{digest}-{phase}",
                                         "output": str(out.parent / f".{out.name}.{phase}"),
                                         "mlflow_run_id": run_id})
            st = _finished(latest_checkpoint_dir(storage, cfg.resolved_run_name), epochs)
            if st is None:
                result = fit(cfg, train_loop=imagenet_loop_per_worker,
                             datasets=lambda: streaming_datasets(data, crop=cfg.crop, min_scale=s["min_scale"],
                                                                 seed=seed),
                             worker_options={"freeze": freeze, "steps_per_epoch": steps, "phase": phase,
                                             "shuffle_buffer": s["shuffle_buffer"], **(worker_options or {})})
                if result.checkpoint is None:
                    raise FerError(f"ImageNet run {cfg.resolved_run_name!r} reported no checkpoint")
                with result.checkpoint.as_directory() as d:
                    st = checkpoint.read_state(d)
            else:
                print(f"imagenet_init: phase {phase} already finished in {storage}/{cfg.resolved_run_name}")
            final[phase] = {k: st["history"][-1][k] for k in ("top1", "top5", "train_accuracy", "images_per_s",
                                                               "worker_rss_peak_mb", "worker_rss_growth_mb")}
            final[phase]["epochs"] = epochs
            phase_init = Path(storage) / f"imagenet_init-{digest}-{phase}.pt"
            checkpoint.save_init(phase_init, st["model"], model_config, classes, {"phase": phase})
            init = str(phase_init)  # the next phase starts here
            state = st["model"]
        last = final[phases[-1][0]]
        report = {"mode": s["mode"], "source": str(s["source"]), "pretrained": 1,
                  "top1": last["top1"], "top5": last["top5"], "classes": len(classes),
                  "n_train": info["rows"]["train"], "n_val": info["rows"]["val"],
                  "data_fingerprint": info["fingerprint"], "phases": final,
                  "seconds": round(time.perf_counter() - t0, 1)}
        checkpoint.save_init(out, state, model_config, classes,
                             {k: report[k] for k in ("mode", "source", "top1", "top5", "classes",
                                                      "data_fingerprint")})
        report_path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(report_path, json.dumps(report, indent=2) + "\n")
        tracking.log_metrics(run_id, {"top1": report["top1"], "top5": report["top5"]})
        tracking.log_artifacts(run_id, [report_path])
    print(f"imagenet_init ({s['mode']}): top-1 {report['top1']:.3f}, top-5 {report['top5']:.3f} on "
          f"{info['rows']['val']} val images -> {out}")
    return report


def _finished(ckpt_dir: Path | None, epochs: int) -> dict | None:
    """The training state of a phase whose last checkpoint is its final epoch, else None."""
    from pipeline.model import checkpoint

    if ckpt_dir is None:
        return None
    st = checkpoint.read_state(ckpt_dir)
    return st if st.get("epoch") == epochs and "top1" in (st.get("history") or [{}])[-1] else None
