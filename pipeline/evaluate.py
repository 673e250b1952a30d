"""Ten-crop evaluation (the paper's protocol), metrics, confusion matrix and plots.

All ten crops of a batch go through the network in ONE forward pass (``[B*10, 3, c, c]``); the
centre-crop prediction comes from the same pass (crop index 4 of torchvision's TenCrop order).
Counts are int64 confusion matrices, so shards add up exactly: under several workers every test
image is seen by exactly one shard (``load_split(rank, world_size)`` takes rows
``i % world_size == rank``, no padding), and the summed counts equal a single-process run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.outputs import replacing_file, write_file_atomic
from pipeline.errors import FerError
from pipeline.model import checkpoint

#: The keys of ``metrics/eval_<dataset>.json`` (contract), in order.
METRIC_KEYS = ("accuracy", "accuracy_center", "mean_class_accuracy", "per_class", "n_test")
#: Index of the centre crop in torchvision's TenCrop order (4 corners, centre, then flipped).
CENTER = 4


def default_device(device: str | None = None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- ten-crop


@torch.inference_mode()
def ten_crop_probabilities(model: torch.nn.Module, images_uint8: torch.Tensor, crop: int,
                           device: str | torch.device = "cpu", *, amp: bool | str = "auto",
                           channels_last: bool | str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities ``(ten-crop mean [B, C], centre crop [B, C])`` of uint8 images
    ``[B, 3, H, W]`` (already at the model's image size), from one forward pass of all ten crops.

    This is the one preprocessing path shared by evaluation, the predictor and the MLflow model.
    ``amp`` (bf16 autocast) and ``channels_last``: true/false/"auto", resolved as in training
    (``pipeline.model.speed.resolve_amp``), so either path runs on any device.
    """
    from pipeline.data.loader import normalize, ten_crop
    from pipeline.model.speed import resolve_amp, resolve_channels_last

    device = torch.device(device)
    x = images_uint8.to(device, non_blocking=device.type == "cuda")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected uint8 images [B, 3, H, W], got {tuple(x.shape)}")
    b = x.shape[0]
    crops = ten_crop(x, crop)  # [B, 10, 3, c, c]
    flat = normalize(crops.reshape(b * 10, *crops.shape[2:]))
    if resolve_channels_last(channels_last, device):
        flat = flat.contiguous(memory_format=torch.channels_last)
    # "auto" is a runtime choice: a graph traced for export (ONNX) stays fp32
    use_amp = resolve_amp(amp, device) and not (amp == "auto" and torch.compiler.is_compiling())
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        logits = model(flat)
    probs = logits.float().softmax(-1).view(b, 10, -1)
    return probs.mean(1), probs[:, CENTER]


@dataclass
class EvalCounts:
    """Confusion matrices ``[C, C]`` (rows actual, columns predicted), int64: sum over shards."""

    ten_crop: torch.Tensor
    center: torch.Tensor

    @classmethod
    def zeros(cls, num_classes: int) -> "EvalCounts":
        z = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        return cls(z, z.clone())

    def __add__(self, other: "EvalCounts") -> "EvalCounts":
        return EvalCounts(self.ten_crop + other.ten_crop.to(self.ten_crop.device),
                          self.center + other.center.to(self.center.device))

    @property
    def n(self) -> int:
        return int(self.ten_crop.sum())

    def stacked(self) -> torch.Tensor:
        """``[2, C, C]``: one tensor to all-reduce (``torch.distributed.all_reduce``)."""
        return torch.stack([self.ten_crop, self.center])

    @classmethod
    def from_stacked(cls, t: torch.Tensor) -> "EvalCounts":
        return cls(t[0].clone(), t[1].clone())


def _confusion(actual: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    idx = actual.to(torch.int64) * num_classes + predicted.to(torch.int64)
    return torch.bincount(idx.cpu(), minlength=num_classes * num_classes).view(num_classes, num_classes)


def evaluate_arrays(model: torch.nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor, *,
                    crop: int, batch_size: int = 64, device: str = "cpu",
                    num_classes: int | None = None, amp: bool | str = "auto",
                    channels_last: bool | str = "auto", compile: bool = False) -> EvalCounts:
    """Ten-crop and centre-crop confusion counts of ``images_uint8 [N, 3, H, W]`` with ``labels [N]``."""
    from pipeline.model.speed import maybe_compile, resolve_channels_last

    labels = torch.as_tensor(labels, dtype=torch.int64)
    if len(images_uint8) != len(labels):
        raise ValueError(f"{len(images_uint8)} images but {len(labels)} labels")
    if num_classes is None:
        num_classes = int(getattr(model, "config", {}).get("num_classes", 0)) or int(labels.max()) + 1
    counts = EvalCounts.zeros(num_classes)
    was_training = model.training
    model.eval()
    model.to(device)
    if resolve_channels_last(channels_last, device):
        model.to(memory_format=torch.channels_last)
    run = maybe_compile(model, compile)
    try:
        for i in range(0, len(labels), batch_size):
            p10, pc = ten_crop_probabilities(run, images_uint8[i:i + batch_size], crop, device,
                                             amp=amp, channels_last=channels_last)
            y = labels[i:i + batch_size]
            counts.ten_crop += _confusion(y, p10.argmax(1), num_classes)
            counts.center += _confusion(y, pc.argmax(1), num_classes)
    finally:
        model.train(was_training)
    return counts


# --------------------------------------------------------------------------- metrics


def metrics_from_counts(counts: EvalCounts, classes: Sequence[str]) -> dict:
    """The contract metrics: ``accuracy`` (ten-crop), ``accuracy_center``, ``mean_class_accuracy``
    (mean over the classes present in the test set), ``per_class`` (name -> ten-crop accuracy, None
    for a class with no test image), ``n_test``."""
    cm = counts.ten_crop.to(torch.int64).cpu()
    cc = counts.center.to(torch.int64).cpu()
    if cm.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion matrix {tuple(cm.shape)} does not match {len(classes)} classes")
    n = int(cm.sum())
    if n == 0:
        raise FerError("the test split is empty: nothing to evaluate")
    rows = cm.sum(1)
    per_class = {name: (float(cm[i, i]) / float(rows[i]) if rows[i] > 0 else None)
                 for i, name in enumerate(classes)}
    present = [v for v in per_class.values() if v is not None]
    return {
        "accuracy": float(cm.diag().sum()) / n,
        "accuracy_center": float(cc.diag().sum()) / n,
        "mean_class_accuracy": float(sum(present) / len(present)),
        "per_class": per_class,
        "n_test": n,
    }


# --------------------------------------------------------------------------- whole checkpoint


def _shard_counts(ckpt_bytes: bytes, parquet_dir: str, split: str, rank: int, world_size: int,
                  batch_size: int, device: str, threads: int | None = None,
                  speed: dict | None = None) -> EvalCounts:
    """Counts of one shard (rows ``i % world_size == rank``); runs in-process or as a Ray task."""
    from pipeline.data.loader import load_split

    if threads:
        torch.set_num_threads(threads)
    model, meta = checkpoint.load_model(ckpt_bytes)
    x, y = load_split(parquet_dir, split, size=meta["image_size"], rank=rank, world_size=world_size)
    if len(y) == 0:
        return EvalCounts.zeros(len(meta["classes"]))
    return evaluate_arrays(model, x, y, crop=meta["crop"], batch_size=batch_size, device=device,
                           num_classes=len(meta["classes"]), **(speed or {}))


def _ray_counts(ckpt_bytes: bytes, parquet_dir: str, split: str, num_workers: int,
                batch_size: int, device: str | None, speed: dict) -> EvalCounts:
    import ray

    from pipeline.cluster import ensure_ray

    started = ensure_ray()
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        use_gpu = device != "cpu" and gpus >= num_workers
        cpus = ray.cluster_resources().get("CPU", 1)
        per_cpu = max(0.1, min(1.0, cpus / num_workers))
        task = ray.remote(_shard_counts).options(num_cpus=per_cpu, num_gpus=1 if use_gpu else 0,
                                                 max_retries=2)
        ref = ray.put(ckpt_bytes)
        threads = max(1, int(cpus // num_workers))
        refs = [task.remote(ref, str(Path(parquet_dir).resolve()), split, rank, num_workers,
                            batch_size, "cuda" if use_gpu else "cpu", threads, speed)
                for rank in range(num_workers)]
        total = None
        for c in ray.get(refs):
            total = c if total is None else total + c
        return total
    finally:
        if started:
            ray.shutdown()


def evaluate_checkpoint(model_path, parquet_dir, *, split: str = "test", num_workers: int = 1,
                        batch_size: int = 64, device: str | None = None, amp: bool | str = "auto",
                        channels_last: bool | str = "auto", compile: bool = False
                        ) -> tuple[dict, np.ndarray]:
    """Ten-crop evaluation of ``model_path`` on ``parquet_dir``'s ``split``.

    ``num_workers > 1`` shards the split over Ray tasks (joins ``RAY_ADDRESS`` when set, else a
    local instance); the counts are summed, exactly. Returns ``(metrics, confusion)`` where
    ``confusion`` is the ten-crop matrix (int64 ``[C, C]``, rows actual, columns predicted).
    """
    path = Path(model_path)
    if not path.is_file():
        raise FerError(f"checkpoint {path} not found (train the model first, or pass its model.pt)")
    if not Path(parquet_dir).exists():
        raise FerError(f"dataset {parquet_dir} not found (run `fer ingest` first)")
    if num_workers < 1:
        raise FerError(f"num_workers must be at least 1, got {num_workers}")
    for name, v in (("amp", amp), ("channels_last", channels_last)):
        if not (isinstance(v, bool) or v == "auto"):
            raise FerError(f"evaluate: {name}={v!r} must be true, false or \"auto\"")
    speed = dict(amp=amp, channels_last=channels_last, compile=bool(compile))
    ckpt_bytes = path.read_bytes()
    classes = checkpoint.read(ckpt_bytes)["classes"]
    if num_workers == 1:
        counts = _shard_counts(ckpt_bytes, str(parquet_dir), split, 0, 1, batch_size,
                               default_device(device), speed=speed)
    else:
        counts = _ray_counts(ckpt_bytes, str(parquet_dir), split, num_workers, batch_size, device, speed)
    return metrics_from_counts(counts, classes), counts.ten_crop.cpu().numpy()


# --------------------------------------------------------------------------- outputs


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    fig.tight_layout()
    path = Path(path)
    try:
        with replacing_file(path) as tmp:  # a failed run keeps the previous plot
            fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    finally:
        _plt().close(fig)
    return path


def write_confusion_csv(confusion, classes: Sequence[str], path) -> Path:
    """One row per test image, ``actual,predicted`` class names: what DVC's confusion template
    (``dvc plots show --template confusion -x actual -y predicted``) expects."""
    cm = np.asarray(confusion, dtype=np.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["actual,predicted"]
    for i, a in enumerate(classes):
        for j, p in enumerate(classes):
            lines.extend([f"{a},{p}"] * int(cm[i, j]))
    return write_file_atomic(path, "\n".join(lines) + "\n")


def plot_confusion(confusion, classes: Sequence[str], path, *, title: str = "") -> Path:
    """Heatmap PNG: row-normalised colours, raw counts written in the cells."""
    plt = _plt()
    cm = np.asarray(confusion, dtype=np.int64)
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), labels=classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), labels=classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if frac[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of actual class")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def write_outputs(metrics: dict, confusion, classes: Sequence[str], *, metrics_path, plots_dir,
                  dataset: str) -> dict[str, Path]:
    """Write ``metrics_path`` (the JSON file, or a folder to hold ``eval_<dataset>.json``), and
    ``<plots_dir>/confusion_<dataset>.csv`` and ``.png``. Returns the paths written."""
    mp = Path(metrics_path)
    if mp.suffix != ".json":
        mp = mp / f"eval_{dataset}.json"
    write_file_atomic(mp, json.dumps({k: metrics[k] for k in METRIC_KEYS}, indent=2) + "\n")
    pd_ = Path(plots_dir)
    csv = write_confusion_csv(confusion, classes, pd_ / f"confusion_{dataset}.csv")
    png = plot_confusion(confusion, classes, pd_ / f"confusion_{dataset}.png",
                         title=f"{dataset}: ten-crop accuracy {metrics['accuracy']:.3f} "
                               f"(n={metrics['n_test']})")
    return {"metrics": mp, "confusion_csv": csv, "confusion_png": png}


def plot_history(history: list[dict], path) -> Path:
    """Training curves PNG: losses (left) and accuracies (right) per epoch.

    ``history`` is one dict per epoch, e.g. ``{"epoch": 3, "train_loss": .., "val_loss": ..,
    "train_accuracy": .., "val_accuracy": ..}``; any numeric key with ``loss`` / ``acc`` in its
    name is drawn.
    """
    plt = _plt()
    if not history:
        raise FerError("no training history to plot")
    epochs = [h.get("epoch", i) for i, h in enumerate(history)]
    keys = sorted({k for h in history for k, v in h.items()
                   if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    for k in keys:
        ax = ax_l if "loss" in k else ax_a if "acc" in k else None
        if ax is None:
            continue
        pts = [(e, h[k]) for e, h in zip(epochs, history) if isinstance(h.get(k), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=k)
    from matplotlib.ticker import MaxNLocator

    for ax, name in ((ax_l, "loss"), (ax_a, "accuracy")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return _save(fig, path)
