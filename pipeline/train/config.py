"""A training run's config: `TrainConfig`, validated once, in the driver, before Ray starts.

Its fields, defaults and rules are `pipeline.params_schema.TrainRun` (model + ray + a training
section of params.yaml, plus the paths and run ids the stages add), the same schema that checks
params.yaml; a bad value is a one-line FerError naming the key. It is frozen: a stage that learns
its MLflow run id makes a changed copy (`cfg.model_copy(update=...)`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ConfigDict, ValidationError

from pipeline.errors import FerError
from pipeline.params_schema import TrainRun, run_problems


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
        # only when off, as the model records it: the paper's module keeps its checkpoints' config
        return {**net, "lip_norm": False} if not self.lip_norm else net

    @property
    def resolved_run_name(self) -> str:
        if self.run_name:
            return self.run_name
        return "train-" + (Path(self.output).resolve().name or "run")
