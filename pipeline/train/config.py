"""Typed, validated training configuration (one run of the Ray Train launcher).

`TrainConfig.from_dict` is what stage scripts call with a params.yaml section: unknown keys are
errors (a typo must never silently fall back to a default), and every value is checked here, in
the driver, before Ray starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import os
from pathlib import Path
from typing import Any

from pipeline.errors import FerError

POOLS, HEADS, ATTENTIONS = ("lip", "max"), ("conv", "fc"), ("eca", "none")
OPTIMIZERS, SCHEDULES = ("sgd", "adamw"), ("cosine", "step", "onecycle")
SAMPLERS = ("shuffle", "balanced")       # pipeline.train.imbalance
MIN_SIZE, MAX_SIZE = 48, 224  # what LIP-VGG16 accepts


@dataclass
class TrainConfig:
    # data
    data: str                               # parquet dataset dir with train/val splits
    image_size: int | None = None           # resize to this square size at load; None = native
    crop: int = 90                          # random crop (train) / centre crop (val) size
    num_classes: int = 7
    # model (pipeline.model.lip_vgg16 kwargs)
    pool: str = "lip"
    head: str = "conv"
    attention: str = "eca"
    width: float = 1.0
    lip_bottleneck: float = 0.25
    dropout: float = 0.5
    init: str = "none"                      # "none" or a .pt with "state_dict" + "model_config"
    # optimisation
    epochs: int = 30
    batch_size: int = 64                    # global: split evenly across workers
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    step_size: int = 10                     # schedule "step": decay every step_size epochs
    gamma: float = 0.1                      # ... by this factor
    label_smoothing: float = 0.0
    class_weighted: bool = False
    sampler: str = "shuffle"                # "balanced": class-balanced draws (pipeline.train.imbalance)
    logit_adjust: float = 0.0               # tau of the logit-adjusted loss (imbalance); 0 = off
    max_rotate_deg: float = 10.0
    patience: int = 0                       # early stopping on val accuracy; 0 = off
    seed: int = 0
    # Ray
    num_workers: int = 2
    use_gpu: bool | str = "auto"            # "auto": GPUs if the cluster has them
    cpus_per_worker: float | None = None    # None: auto, one CPU left to Ray (pipeline.cluster)
    storage_path: str = "runs/ray"
    run_name: str | None = None             # None: "train-<output dir name>"
    max_failures: int = 2
    # outputs and speed
    output: str = "models/train"            # model.pt + history.json go here
    amp: bool | str = "auto"                # "auto": bf16 autocast on GPU and native-bf16 CPUs
    channels_last: bool | str = "auto"      # "auto": on GPU only
    compile: bool = False                   # torch.compile the model (bench/compile.py: off pays on CPU)
    mlflow_run_id: str | None = None

    def __post_init__(self) -> None:
        errors = self._problems()
        if errors:
            raise FerError("bad training config: " + "; ".join(errors))

    # ------------------------------------------------------------------ validation
    def _problems(self) -> list[str]:
        p: list[str] = []

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        def need(cond: bool, msg: str) -> None:
            if not cond:
                p.append(msg)

        def choice(name: str, allowed) -> None:
            v = getattr(self, name)
            need(v in allowed, f"{name}={v!r} must be one of {list(allowed)}")

        def auto_bool(name: str) -> None:
            v = getattr(self, name)
            need(isinstance(v, bool) or v == "auto", f"{name}={v!r} must be true, false or \"auto\"")

        need(isinstance(self.data, str) and self.data != "", f"data={self.data!r} must be a directory path")
        need(self.image_size is None or (is_int(self.image_size) and MIN_SIZE <= self.image_size <= 1024),
             f"image_size={self.image_size!r} must be null (native) or an integer >= {MIN_SIZE}")
        need(is_int(self.crop) and MIN_SIZE <= self.crop <= MAX_SIZE,
             f"crop={self.crop!r} must be an integer in {MIN_SIZE}..{MAX_SIZE}")
        if is_int(self.image_size) and is_int(self.crop):
            need(self.crop <= self.image_size, f"crop={self.crop} is larger than image_size={self.image_size}")
        need(is_int(self.num_classes) and self.num_classes >= 2, f"num_classes={self.num_classes!r} must be >= 2")
        choice("pool", POOLS)
        choice("head", HEADS)
        choice("attention", ATTENTIONS)
        need(is_num(self.width) and 0 < self.width <= 4, f"width={self.width!r} must be in (0, 4]")
        need(is_num(self.lip_bottleneck) and 0 < self.lip_bottleneck <= 1,
             f"lip_bottleneck={self.lip_bottleneck!r} must be in (0, 1]")
        need(is_num(self.dropout) and 0 <= self.dropout < 1, f"dropout={self.dropout!r} must be in [0, 1)")
        need(isinstance(self.init, str) and self.init != "",
             f"init={self.init!r} must be \"none\" or a checkpoint path")
        need(is_int(self.epochs) and self.epochs >= 1, f"epochs={self.epochs!r} must be an integer >= 1")
        need(is_int(self.batch_size) and self.batch_size >= 2, f"batch_size={self.batch_size!r} must be >= 2")
        choice("optimizer", OPTIMIZERS)
        need(is_num(self.lr) and self.lr > 0, f"lr={self.lr!r} must be > 0")
        need(is_num(self.momentum) and 0 <= self.momentum < 1, f"momentum={self.momentum!r} must be in [0, 1)")
        need(is_num(self.weight_decay) and self.weight_decay >= 0, f"weight_decay={self.weight_decay!r} must be >= 0")
        choice("schedule", SCHEDULES)
        need(is_num(self.warmup_epochs) and self.warmup_epochs >= 0,
             f"warmup_epochs={self.warmup_epochs!r} must be >= 0")
        need(is_int(self.step_size) and self.step_size >= 1, f"step_size={self.step_size!r} must be >= 1")
        need(is_num(self.gamma) and 0 < self.gamma <= 1, f"gamma={self.gamma!r} must be in (0, 1]")
        need(is_num(self.label_smoothing) and 0 <= self.label_smoothing < 1,
             f"label_smoothing={self.label_smoothing!r} must be in [0, 1)")
        need(isinstance(self.class_weighted, bool), f"class_weighted={self.class_weighted!r} must be true/false")
        choice("sampler", SAMPLERS)
        need(is_num(self.logit_adjust) and self.logit_adjust >= 0,
             f"logit_adjust={self.logit_adjust!r} must be >= 0 (0 = off)")
        need(not (self.logit_adjust and self.class_weighted),
             "logit_adjust and class_weighted both correct for the class prior: choose one")
        need(is_num(self.max_rotate_deg) and 0 <= self.max_rotate_deg <= 180,
             f"max_rotate_deg={self.max_rotate_deg!r} must be in [0, 180]")
        need(is_int(self.patience) and self.patience >= 0, f"patience={self.patience!r} must be >= 0 (0 = off)")
        need(is_int(self.seed), f"seed={self.seed!r} must be an integer")
        need(is_int(self.num_workers) and self.num_workers >= 1, f"num_workers={self.num_workers!r} must be >= 1")
        if is_int(self.num_workers) and is_int(self.batch_size) and self.num_workers >= 1:
            need(self.batch_size // self.num_workers >= 2,
                 f"batch_size={self.batch_size} leaves fewer than 2 images per worker "
                 f"for num_workers={self.num_workers}")
        auto_bool("use_gpu")
        need(self.cpus_per_worker is None or (is_num(self.cpus_per_worker) and self.cpus_per_worker > 0),
             f"cpus_per_worker={self.cpus_per_worker!r} must be null (auto) or > 0")
        need(isinstance(self.storage_path, str) and self.storage_path != "",
             f"storage_path={self.storage_path!r} must be a path or URI")
        need(self.run_name is None or (isinstance(self.run_name, str) and self.run_name.strip() != ""
                                       and "/" not in self.run_name),
             f"run_name={self.run_name!r} must be null or a name without '/'")
        need(is_int(self.max_failures) and self.max_failures >= -1,
             f"max_failures={self.max_failures!r} must be >= 0 (or -1 = unlimited)")
        need(isinstance(self.output, str) and self.output != "", f"output={self.output!r} must be a directory path")
        auto_bool("amp")
        auto_bool("channels_last")
        need(isinstance(self.compile, bool), f"compile={self.compile!r} must be true/false")
        need(self.mlflow_run_id is None or isinstance(self.mlflow_run_id, str),
             f"mlflow_run_id={self.mlflow_run_id!r} must be null or a run id")
        return p

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        if not isinstance(d, dict):
            raise FerError(f"training config must be a mapping, got {type(d).__name__}")
        known = set(cls.field_names())
        unknown = sorted(k for k in d if k not in known)
        if unknown:
            raise FerError(f"unknown training config key(s): {', '.join(map(str, unknown))} "
                           f"(known: {', '.join(sorted(known))})")
        if "data" not in d:
            raise FerError("training config needs `data` (the parquet dataset directory)")
        try:
            return cls(**d)
        except TypeError as e:  # pragma: no cover - guarded above
            raise FerError(f"bad training config: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.field_names()}

    def model_config(self) -> dict[str, Any]:
        """kwargs of `pipeline.model.lip_vgg16` for this run."""
        return dict(num_classes=self.num_classes, pool=self.pool, head=self.head,
                    attention=self.attention, width=float(self.width),
                    lip_bottleneck=float(self.lip_bottleneck), dropout=float(self.dropout))

    @property
    def resolved_run_name(self) -> str:
        if self.run_name:
            return self.run_name
        return "train-" + (Path(self.output).resolve().name or "run")


# ---------------------------------------------------------------------------- speed switches
def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX): only there bf16 autocast
    beats fp32 on CPU; elsewhere oneDNN emulates it and is slower (reports/bf16_cpu.json).
    ``FER_CPU_BF16=0`` (or ``1``) overrides the detection: the test suite sets 0, so that its
    exact comparisons run the same fp32 kernels on every CI machine."""
    forced = os.environ.get("FER_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return True
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and not flags
    except (AttributeError, RuntimeError):
        return False


def resolve_amp(amp: bool | str, device) -> bool:
    """bf16 autocast for `amp` = true/false/"auto" (auto: CUDA, or a CPU with native bf16)."""
    import torch

    if amp != "auto":
        return bool(amp)
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16())


def resolve_channels_last(channels_last: bool | str, device) -> bool:
    """channels_last for true/false/"auto" (auto: CUDA only; on CPU it measured no faster)."""
    import torch

    if channels_last != "auto":
        return bool(channels_last)
    return torch.device(device).type == "cuda"


def maybe_compile(model, compile: bool):
    """torch.compile(model) when asked; a missing C++ compiler (inductor's CPU backend) is a FerError."""
    if not compile:
        return model
    import shutil

    import torch

    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")) and not torch.cuda.is_available():
        raise FerError("model.compile: true needs a C++ compiler (g++) for torch.compile on CPU; "
                       "install one or set compile: false")
    return torch.compile(model)
