"""The blocks every training loop is built from: the face-set loop (worker.py) and ImageNet-init's
streamed loop (imagenet.py) share them: schedule and optimiser, one step and one epoch, the
model built and wrapped for DDP, counts summed across workers, resume from a Ray checkpoint
(model, optimiser, schedule, per-rank RNG state) and the end of an epoch (one line, MLflow
metrics, one checkpoint every rank writes into). Public because two loops use them.
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import FerError
from pipeline.ray_workarounds import say
from pipeline.train.config import TrainConfig, WorkerConfig

CONFIG_FILE = "train_config.json"


def lr_lambda(steps_per_epoch: int, epochs: int, warmup_epochs: float, schedule: str,
              step_size: int, gamma: float) -> Callable[[int], float]:
    """Per-iteration LR factor: linear warm-up, then cosine to 0 or step decay; "onecycle":
    torch's OneCycleLR shape (cosine from 1/25 up to 1 over the first 30% of steps, then cosine
    down to 1/25e4; warmup_epochs unused)."""
    total = max(1, epochs * steps_per_epoch)
    if schedule == "onecycle":
        return _onecycle(total)
    warm = min(int(round(warmup_epochs * steps_per_epoch)), total - 1)

    def f(it: int) -> float:
        if it < warm:
            return (it + 1) / warm
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (it - warm) / max(1, total - warm))))
        return gamma ** (it // (step_size * steps_per_epoch))

    return f


def _onecycle(total: int, pct_start: float = 0.3, div: float = 25.0, final_div: float = 1e4
              ) -> Callable[[int], float]:
    up = max(1, int(pct_start * total))

    def cos(a: float, b: float, t: float) -> float:
        return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    def f(it: int) -> float:
        if it < up:
            return cos(1.0 / div, 1.0, it / up)
        return cos(1.0, 1.0 / (div * final_div), (it - up) / max(1, total - up))

    return f


def param_groups(model: nn.Module, run: TrainConfig) -> list[dict]:
    """The optimiser's parameter groups. ``decay_norms: false`` exempts the norms' gains and biases
    and every bias from weight decay (timm's and nanoGPT's practice: decaying a norm's gain only
    shrinks the scale the next layer sees); ``lip_lr_scale`` gives the LIP logit modules their own
    learning rate. Both at their defaults: one group, every parameter decayed (the recipe as it was)."""
    from pipeline.model.lip import LIPLogit

    decay_norms, lip_scale = run.decay_norms, float(run.lip_lr_scale)
    lip_params = {id(p) for m in model.modules() if isinstance(m, LIPLogit) for p in m.parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        exempt = not decay_norms and p.ndim <= 1  # norm gains/biases, conv/linear biases
        groups.setdefault((id(p) in lip_params and lip_scale != 1.0, exempt), []).append(p)
    return [{"params": ps, "lr": run.lr * (lip_scale if lip else 1.0),
             "weight_decay": 0.0 if exempt else run.weight_decay}
            for (lip, exempt), ps in groups.items()]


def make_optimizer(model: nn.Module, run: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, run)
    if run.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=run.lr, momentum=run.momentum, weight_decay=run.weight_decay)
    return torch.optim.AdamW(groups, lr=run.lr, weight_decay=run.weight_decay)


def train_step(model, x, y, criterion, optimizer, scheduler=None, *, amp: bool = False,
               channels_last: bool = False):
    """One optimisation step; returns (loss, logits) detached."""
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
        loss = criterion(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.detach(), logits.detach()


@torch.no_grad()
def count_correct(model, x_uint8: torch.Tensor, y: torch.Tensor, crop: int, *, batch_size: int = 256,
                  amp: bool = False, channels_last: bool = False) -> tuple[int, int]:
    """Centre-crop top-1 correct count and total over uint8 images [N,3,H,W] (on the model's device)."""
    from pipeline.data.loader import center_crop, normalize

    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        x = normalize(center_crop(x_uint8[i:i + batch_size], crop))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(x).argmax(1)
        correct += int((pred == y[i:i + batch_size]).sum())
    model.train(was_training)
    return correct, int(len(y))


def all_reduce(values: Iterable[float], op=None, device: torch.device | str = "cpu") -> list[float]:
    """Sum (or `op`) a few numbers across workers; `device` must suit the backend (NCCL: cuda)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's BN running stats. DDP broadcasts buffers at the start of each
    forward, so after the last training step each rank holds its own batch's update; without
    this, val accuracy would mix slightly different models instead of measuring the saved one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def _rng_state() -> dict[str, Any]:
    s: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def resume(ckpt, w: WorkerConfig, rank: int, raw: nn.Module, optimizer, scheduler) -> dict | None:
    """Seed this rank's RNGs (dropout etc. differ per rank), then continue from Ray's checkpoint
    (None: a fresh start): model, optimiser, schedule and this rank's RNG state are restored; the
    training state dict is returned for the loop's own fields."""
    from pipeline.model import checkpoint

    torch.manual_seed(int(w.run.seed) * 1000 + rank)
    random.seed(int(w.run.seed) * 1000 + rank)
    if ckpt is None and w.resume_from:
        # the newest intact epoch of a run whose latest checkpoint was damaged (launch.plan_resume):
        # Ray starts that run afresh, and its first report is the epoch after this one
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(w.resume_from)
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        st = checkpoint.read_state(d)
        rng_file = Path(d) / f"rng_rank{rank}.pt"
        rng = torch.load(rng_file, weights_only=True) if rng_file.exists() else None
    raw.load_state_dict(st["model"])
    optimizer.load_state_dict(st["optimizer"])
    scheduler.load_state_dict(st["scheduler"])
    if rng is not None:
        _set_rng_state(rng)
    if rank == 0:
        say(f"resumed from checkpoint after epoch {st['epoch']}")
    return st


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in unwrap(model).state_dict().items()}


def end_epoch(rank: int, epoch: int, metrics: dict, on_epoch, w: WorkerConfig, *, line: str,
              state: Callable[[], dict]) -> None:
    """The end of every training loop's epoch: rank 0 prints ``line`` and logs the metrics
    (tracking never kills training); then one Ray checkpoint that every rank writes into (Ray
    merges them): each rank its RNG state, rank 0 the training ``state()`` and the run's config."""
    from pipeline.model import checkpoint

    if rank == 0:
        say(line)
        if on_epoch is not None:
            try:
                on_epoch(metrics, epoch)
            except Exception as e:
                say(f"warning: MLflow logging failed: {type(e).__name__}: {e}")
    import ray.train

    try:
        with tempfile.TemporaryDirectory() as d:
            checkpoint.save_checked(_rng_state(), Path(d) / f"rng_rank{rank}.pt")
            if rank == 0:
                checkpoint.save_state(d, state())
                (Path(d) / CONFIG_FILE).write_text(json.dumps(w.train_config, indent=1))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"epoch_{epoch:04d}")
    except OSError as e:  # a full disk fails the same way on every retry: the user must act
        if getattr(e, "errno", None) != errno.ENOSPC and "No space left on device" not in str(e):
            raise
        raise FerError(f"no space left on device writing epoch {epoch}'s checkpoint (the temp folder "
                       f"{tempfile.gettempdir()}, then ray.storage_path {w.run.storage_path}): free some "
                       "space or point ray.storage_path elsewhere, then rerun to resume from the last "
                       "checkpoint") from e


def maybe_fail(w: WorkerConfig, epoch: int, rank: int) -> None:
    """Test hook: fail once at `fail_at_epoch` on `fail_rank`, remembered by a marker file, as a
    bug (RuntimeError) or as a user error (FerError) per `fail_as`."""
    at, marker = w.fail_at_epoch, w.fail_marker
    if at is None or epoch != at or rank != w.fail_rank:
        return
    if marker and Path(marker).exists():
        return
    if marker:
        Path(marker).write_text(f"failed at epoch {epoch}\n")
    if w.fail_as == "user":
        raise FerError(f"injected user error at epoch {epoch} on rank {rank}")
    raise RuntimeError(f"injected failure at epoch {epoch} on rank {rank}")


def setup_worker(w: WorkerConfig):
    """(rank, world size, device, amp, channels_last) of this worker, its torch threads set."""
    import ray.train
    import ray.train.torch

    from pipeline.model.speed import resolve_amp, resolve_channels_last

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    if w.torch_threads:
        torch.set_num_threads(int(w.torch_threads))
    return (ctx.get_world_rank(), ctx.get_world_size(), device, resolve_amp(w.run.amp, device),
            resolve_channels_last(w.run.channels_last, device))


def build_model(w: WorkerConfig, rank: int, steps: int, channels_last: bool, before_ddp=None):
    """The seeded network (identical on every rank; the init checkpoint on a fresh start),
    ``before_ddp(model)`` (ImageNet adapt freezes there), DDP, torch.compile when asked, and its
    optimiser and per-step LR schedule: ``(model, raw, optimizer, scheduler, Ray checkpoint)``.
    ``raw`` is the uncompiled, unwrapped module that state dicts and validation use."""
    import ray.train
    import ray.train.torch

    from pipeline.model import checkpoint, lip_vgg16
    from pipeline.model.speed import maybe_compile

    run = w.run
    torch.manual_seed(int(run.seed))
    model = lip_vgg16(**w.network)
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and run.init != "none":
        rep = checkpoint.load_init(model, run.init)
        if rank == 0:
            say(f"init from {run.init}: copied {len(rep['copied'])} tensors, "
                 f"re-initialised {len(rep['reinit'])} (classifier), {len(rep['missing'])} not in file")
    if before_ddp is not None:
        before_ddp(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    raw = unwrap(model)
    # compiled after DDP wraps it (DDPOptimizer splits the graph at bucket boundaries)
    model = maybe_compile(model, bool(run.compile))
    optimizer = make_optimizer(model, run)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
        steps, run.epochs, run.warmup_epochs, run.schedule, run.step_size, run.gamma))
    return model, raw, optimizer, scheduler, ckpt


def train_epoch(model, batches: Iterable, criterion, optimizer, scheduler, *, device, amp: bool,
                channels_last: bool, on_step=None) -> tuple[float, float, float, float, int]:
    """One pass over ``(x, y)`` batches: (loss sum, correct, images) summed over the workers, the
    lr of the last step and the steps this worker ran. ``on_step(step)`` after each step."""
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = steps = 0
    lr = optimizer.param_groups[0]["lr"]
    for x, y in batches:
        lr = optimizer.param_groups[0]["lr"]  # reported: the lr of the epoch's last step
        loss, logits = train_step(model, x, y, criterion, optimizer, scheduler, amp=amp,
                                  channels_last=channels_last)
        loss_sum += loss.double() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        steps += 1
        if on_step is not None:
            on_step(steps)
    loss_sum, correct, seen = all_reduce([float(loss_sum), float(correct), seen], device=device)
    return loss_sum, correct, seen, lr, steps


def epoch_logger(w: WorkerConfig, rank: int, prefix: str = ""):
    """Rank 0's per-epoch MLflow logging ``(metrics, epoch)`` into the driver's store, or None."""
    if rank != 0 or not w.run.mlflow_run_id:
        return None
    if w.tracking_uri:  # workers run elsewhere: log to the driver's store
        os.environ["MLFLOW_TRACKING_URI"] = w.tracking_uri
    try:
        from pipeline.tracking import log_epoch
    except ImportError as e:
        say(f"warning: no per-epoch MLflow logging ({e})")
        return None
    return lambda metrics, epoch: log_epoch(w.run.mlflow_run_id, {prefix + k: v for k, v in metrics.items()},
                                            epoch)


# ---------------------------------------------------------------------------- the loop
