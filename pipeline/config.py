"""params.yaml -> validated sections. Unknown keys are errors: a typo must never be a silent default."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import FerError

# section -> allowed keys (None: free-form mapping checked by its own consumer)
SECTIONS: dict[str, set[str] | None] = {
    "datasets": {"rafdb", "sfew"},
    "synth": {"rafdb", "sfew"},
    "ingest": {"val_fraction", "seed", "max_bad_fraction", "workers"},
    "model": {"pool", "head", "attention", "width", "lip_bottleneck", "dropout"},
    "imagenet_init": {"source"},
    "ray": {"num_workers", "use_gpu", "cpus_per_worker", "storage_path", "max_failures"},
    "train_rafdb": None,
    "finetune_sfew": None,
    "evaluate": {"batch_size", "num_workers"},
    "mlflow": {"experiment"},
    "tune": None,
}


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FerError(f"{path} not found (run from the repository root)")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise FerError(f"{path} is not valid YAML: {e}") from None
    unknown = set(params) - set(SECTIONS)
    if unknown:
        raise FerError(f"{path}: unknown section(s) {sorted(unknown)}; known: {sorted(SECTIONS)}")
    for name, keys in SECTIONS.items():
        section = params.get(name)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise FerError(f"{path}: section '{name}' must be a mapping")
        if keys is not None and set(section) - keys:
            raise FerError(f"{path}: unknown key(s) {sorted(set(section) - keys)} in '{name}'; "
                           f"known: {sorted(keys)}")
    return params


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    if name not in params:
        raise FerError(f"params.yaml has no '{name}' section")
    return dict(params[name])
