"""The ``tune:`` section of params.yaml with its defaults (checked by the params schema), the
trials' base training options, the sweep's name, and ``--apply`` (values written back, comments kept).

The ``tune:`` section of params.yaml (all keys optional except ``space``)::

    tune:
      dataset: rafdb            # rafdb (train_rafdb settings) | sfew (finetune_sfew, from models/rafdb)
      num_samples: 8            # trials (a `grid` entry multiplies them, as in Ray Tune)
      max_epochs: 12            # ASHA max_t; every trial's cosine schedule spans this many epochs
      grace_period: 1           # ASHA: epochs before a trial can be stopped
      reduction_factor: 2       # ASHA: keep the top 1/reduction_factor at each rung
      workers_per_trial: 1      # Ray Train workers per trial (ray.cpus_per_worker CPUs each)
      max_concurrent: null      # cap on concurrent trials; null: from the cluster's resources
      seed: 0                   # search seed (sampled configs are reproducible)
      name: null                # sweep name; null: "sweep-<hash of the settings>"
      fixed: {}                 # training keys fixed for the sweep only (e.g. {epochs...})
      space:                    # key: {loguniform|uniform|randint: [lo, hi]} | {choice|grid: [...]} | value
        lr: {loguniform: [1.0e-3, 1.0e-1]}
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.config import load_params, section
from pipeline.errors import FerError
from pipeline.params_schema import TUNE_DATASETS as DATASETS
from pipeline.params_schema import Model, Tune, tune_max_epochs

#: Searched keys that `--apply` writes into the model section (the rest: the training section).
MODEL_KEYS = tuple(Model.model_fields)


def tune_settings(params: dict[str, Any]) -> dict[str, Any]:
    """The ``tune:`` section of params that :func:`pipeline.config.load_params` has checked (the
    schema's fields and `tune_problems`: the search space, ``fixed``, grace period, SFEW's fixed
    architecture; checked once per process, there), with its defaults filled in."""
    if "tune" not in params or not isinstance(params.get("tune"), dict):
        raise FerError("params.yaml has no 'tune' section (see `fer tune --help` for its keys)")
    s = {**{k: f.get_default(call_default_factory=True) for k, f in Tune.model_fields.items()}, **params["tune"]}
    section(params, DATASETS[s["dataset"]])  # the trials' training section must be there
    s["max_epochs"] = tune_max_epochs(params)
    return s


def resolve_path(root: Path, p: str) -> str:
    """``p`` relative to the params file's folder (a URI as it is)."""
    return p if "://" in p else str((root / p).resolve())


def base_options(params: dict[str, Any], settings: dict[str, Any], root: Path) -> dict[str, Any]:
    """The TrainConfig options every trial starts from: model + ray + the dataset's training
    section (as the DVC stage reads them) + ``tune.fixed``."""
    from pipeline.train.config import TrainConfig

    opts = TrainConfig.options(params, DATASETS[settings["dataset"]], settings["fixed"])
    opts.pop("storage_path", None)
    opts.update(epochs=settings["max_epochs"], num_workers=settings["workers_per_trial"])
    return opts


def sweep_name(settings: dict[str, Any], base: dict[str, Any], storage: str, init_source: str) -> str:
    """A stable name: the same settings resume the same sweep, changed ones start a new one."""
    if settings["name"]:
        return settings["name"]
    # Searched keys are overridden in every trial (so `--apply` keeps the name: a rerun finds the
    # finished sweep), and the concurrency cap does not change what the sweep computes.
    ident = {k: v for k, v in settings.items() if k != "max_concurrent"}
    fixed_base = {k: v for k, v in base.items() if k not in settings["space"]}
    blob = json.dumps({"tune": ident, "base": fixed_base, "storage": storage, "init": init_source},
                      sort_keys=True, default=str)
    return "sweep-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


# --------------------------------------------------------------------------- params.yaml edit
def set_yaml_values(text: str, updates: dict[str, dict[str, Any]]) -> str:
    """Set ``section.key`` values in YAML ``text`` by a ruamel.yaml round trip, which keeps the
    comments, key order and layout of everything else; a missing key or section is added."""
    import io

    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    rt = YAML()  # round-trip mode
    rt.width = 10_000
    doc = rt.load(text) or CommentedMap()
    for sec, values in updates.items():
        if doc.get(sec) is None:
            doc[sec] = CommentedMap()
        for k, v in values.items():
            doc[sec][k] = v
    buf = io.StringIO()
    rt.dump(doc, buf)
    return buf.getvalue()


def apply_best(params_path: str | os.PathLike, updates: dict[str, dict[str, Any]]) -> None:
    path = Path(params_path)
    new = set_yaml_values(path.read_text(), updates)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(new)
    tmp.replace(path)
    load_params(path)  # still a valid params.yaml
