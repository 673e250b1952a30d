"""The per-worker training loop on the face sets: plain PyTorch plus `ray.train` (prepare_model,
report, checkpoints), built from the blocks in steps.py.

Read `train_loop_per_worker` top to bottom: data -> model -> optimiser/schedule -> resume ->
epochs (train, validate, checkpoint, early stop). Each worker holds its shard of train and val as
uint8 tensors on its device and augments there (`DeviceBatches`); no Python image transforms.

Validation uses the single centre crop (fast; the ten-crop protocol belongs to evaluation, on
`test`). Correct/total counts are summed across workers, and shards are not padded, so the val
accuracy is exact whatever the number of workers. Model selection and early stopping use it.

Every epoch each worker writes into one checkpoint directory (Ray merges them): rank 0 the
training state (`state.pt`: model, optimiser, scheduler, epoch, best state, history) and every
rank its RNG states (`rng_rank<r>.pt`). A restart (FailureConfig) or a rerun of the same run
name picks it up through `ray.train.get_checkpoint()` and continues with the next epoch.
"""
from __future__ import annotations

import functools
import itertools
import time

import torch
import torch.distributed as dist

from pipeline.train.config import WorkerConfig
from pipeline.train.steps import (CONFIG_FILE, all_reduce, build_model, count_correct, cpu_state, end_epoch,
                                  epoch_logger, maybe_fail, resume, setup_worker, sync_buffers, train_epoch)

__all__ = ["CONFIG_FILE", "train_loop_per_worker"]


def train_loop_per_worker(config: dict) -> None:
    from pipeline import LOG_LEVEL
    from pipeline.ray_workarounds import quiet_ray_train_logger
    from pipeline.data.loader import load_split
    from pipeline.train.imbalance import make_batches, make_criterion
    from pipeline.train.progress import step_reporter

    w = WorkerConfig.from_loop(config)
    run = w.run
    rank, world, device, amp, channels_last = setup_worker(w)
    quiet_ray_train_logger(LOG_LEVEL)
    seed = int(run.seed)

    # ---- data: this worker's shard of train and val, kept on the device as uint8
    tx, ty = load_split(run.data, "train", size=run.image_size, rank=rank, world_size=world)
    vx, vy = load_split(run.data, "val", size=run.image_size, rank=rank, world_size=world)
    vx, vy = vx.to(device), vy.to(device)
    local_bs = run.batch_size // world
    batches = make_batches(run, tx, ty, batch_size=local_bs, crop=run.crop, train=True, device=device,
                            seed=seed * 100_003 + rank * 10_007, max_rotate_deg=run.max_rotate_deg,
                            drop_last=True)
    # Every worker must run the same number of steps (DDP); shards differ by at most one image.
    steps = int(all_reduce([len(ty) // local_bs], op=dist.ReduceOp.MIN, device=device)[0])
    if steps < 1:
        raise ValueError(f"train shard of {len(ty)} images is smaller than the per-worker batch "
                         f"{local_bs}: lower batch_size or num_workers")
    counts = torch.bincount(ty, minlength=run.num_classes).double()
    counts = torch.tensor(all_reduce(counts.tolist(), device=device), dtype=torch.float64)

    # ---- model, optimiser, schedule, loss; then resume
    model, raw, optimizer, scheduler, ckpt = build_model(w, rank, steps, channels_last)
    criterion = make_criterion(run, counts, device)  # plain / class-weighted / logit-adjusted
    start, best_acc, best_epoch, best_state, bad, stopped, history = 1, -1.0, 0, None, 0, False, []
    if (st := resume(ckpt, w, rank, raw, optimizer, scheduler)) is not None:
        start = st["epoch"] + 1
        best_acc, best_epoch, best_state = st["best_val_accuracy"], st["best_epoch"], st["best_state"]
        bad, stopped, history = st["bad_epochs"], st["stopped"], st["history"]
    if stopped:
        return  # early-stopped before: the last checkpoint already holds the final state
    on_epoch = epoch_logger(w, rank)

    # ---- epochs
    show_step = step_reporter(w.progress_queue, rank, steps, run.epochs)  # the driver's bar (a terminal)
    for epoch in range(start, run.epochs + 1):
        maybe_fail(w, epoch, rank)
        model.train()
        batches.set_epoch(epoch)
        t0 = time.perf_counter()
        loss_sum, correct_g, seen_g, lr, _ = train_epoch(
            model, itertools.islice(batches, steps), criterion, optimizer, scheduler, device=device,
            amp=amp, channels_last=channels_last,
            on_step=None if show_step is None else functools.partial(show_step, epoch))
        train_time = time.perf_counter() - t0
        sync_buffers(raw)
        vc, vn = count_correct(raw, vx, vy, run.crop, amp=amp, channels_last=channels_last)
        vc, vn = all_reduce([vc, vn], device=device)
        val_acc = vc / max(vn, 1)
        if val_acc > best_acc:
            best_acc, best_epoch, bad = val_acc, epoch, 0
            best_state = cpu_state(raw) if rank == 0 else None  # only rank 0 saves it
        else:
            bad += 1
        stopped = bool(run.patience) and bad >= run.patience
        metrics = {
            "epoch": epoch, "train_loss": loss_sum / seen_g, "train_accuracy": correct_g / seen_g,
            "val_accuracy": val_acc, "lr": lr, "images_per_s": seen_g / train_time,
            "epoch_time_s": time.perf_counter() - t0, "best_val_accuracy": best_acc,
            "best_epoch": best_epoch, "n_val": int(vn), "session_start_epoch": start,
        }
        history.append(metrics)
        end_epoch(rank, epoch, metrics, on_epoch, w, line=(
            f"epoch {epoch}/{run.epochs}  loss {metrics['train_loss']:.4f}  "
            f"acc {metrics['train_accuracy']:.3f}  val_acc {val_acc:.3f}  lr {lr:.2e}  "
            f"{metrics['images_per_s']:.1f} img/s" + ("  (early stop)" if stopped else "")),
            state=lambda: {
                "model": cpu_state(raw), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch,
                "best_val_accuracy": best_acc, "best_epoch": best_epoch, "best_state": best_state,
                "bad_epochs": bad, "stopped": stopped, "history": history,
                "model_config": dict(w.network), "image_size": int(tx.shape[-1]),
            })
        if stopped:
            break
