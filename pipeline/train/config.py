"""A training run's config: `TrainConfig`, validated once, in the driver, before Ray starts.

Its fields, defaults and rules are `pipeline.params_schema.TrainRun` (model + ray + a training
section of params.yaml, plus the paths and run ids the stages add), the same schema that checks
params.yaml; a bad value is a one-line FerError naming the key. It is frozen: a stage that learns
its MLflow run id makes a changed copy (`cfg.model_copy(update=...)`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, ValidationError

from pipeline.config import section
from pipeline.errors import FerError
from pipeline.params_schema import TrainRun, recorded_lip_switches, run_problems


class TrainConfig(TrainRun):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def __init__(self, **values: Any) -> None:
        try:  # pydantic validates once; its errors become the schema's one-line messages
            super().__init__(**values)
            found = run_problems(self.model_dump())
        except ValidationError as e:
            found = run_problems(values, e)
        if found:
            raise FerError("bad training config: " + "; ".join(found))

    @staticmethod
    def options(params: dict[str, Any], training: str | dict[str, Any], *overlays: dict[str, Any]) -> dict[str, Any]:
        """The one merge of params.yaml into a run's options: ``model`` + ``ray`` + a training
        section (its name, or the section itself when the caller has resolved it, as
        imagenet_init does), then each overlay (later wins). The sections share no key (the
        schema keeps them apart), so the order only matters for the overlays."""
        sec = section(params, training) if isinstance(training, str) else dict(training)
        out = {**section(params, "model"), **section(params, "ray"), **sec}
        for o in overlays:
            out.update(o)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        if not isinstance(d, dict):
            raise FerError(f"training config must be a mapping, got {type(d).__name__}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def network(self) -> dict[str, Any]:
        """kwargs of `pipeline.model.lip_vgg16` for this run."""
        net = dict(num_classes=self.num_classes, pool=self.pool, head=self.head,
                   attention=self.attention, width=float(self.width),
                   lip_bottleneck=float(self.lip_bottleneck), dropout=float(self.dropout))
        # only where they change the paper's module, as the model records them
        return {**net, **recorded_lip_switches(self.pool, self.lip_norm, self.lip_start)}

    @property
    def resolved_run_name(self) -> str:
        if self.run_name:
            return self.run_name
        return "train-" + (Path(self.output).resolve().name or "run")


@dataclass(frozen=True)
class WorkerConfig:
    """What each Ray Train worker runs with. Ray hands the loop a plain dict
    (``train_loop_config``: it must pickle, and a pydantic model is pinned to its class's
    module version); the loop rebuilds this from it once (:meth:`from_loop`) and reads attributes,
    so a mistyped key is an AttributeError at once, not a silent ``None`` many epochs in."""

    run: TrainConfig                   # data and init as absolute paths (workers may run elsewhere)
    network: dict                      # `pipeline.model.lip_vgg16` kwargs (`run.network()`)
    train_config: dict                 # the run's config as the stage gave it: recorded per checkpoint
    torch_threads: int = 0             # 0: leave torch's default
    tracking_uri: str = ""             # the driver's MLflow store
    resume_from: str | None = None     # the newest intact epoch when Ray's own latest is damaged
    progress_queue: Any = None         # the driver's in-epoch bar (a Ray queue actor) or None
    # test hook: fail once at this epoch on this rank, remembered by the marker file
    fail_at_epoch: int | None = None
    fail_rank: int = 0
    fail_marker: str | None = None
    fail_as: str = "bug"  # "bug": a RuntimeError (retried); "user": a FerError (fails the run at once)
    # imagenet_init's streamed loop
    freeze: bool = False
    steps_per_epoch: int = 0
    phase: str = ""
    shuffle_buffer: int | None = None

    def to_loop(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "run": self.run.to_dict()}

    @classmethod
    def from_loop(cls, d: dict[str, Any]) -> "WorkerConfig":
        return cls(**{**d, "run": TrainConfig.from_dict(d["run"])})
