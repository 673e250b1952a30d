"""The ``tune:`` section of params.yaml: its keys, their checks, the trials' base training
options, the sweep's name, and ``--apply`` (best values written back, comments kept).

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
from pipeline.params_schema import Tune, problems

DATASETS = {"rafdb": "train_rafdb", "sfew": "finetune_sfew"}
MODEL_KEYS = ("pool", "head", "attention", "width", "lip_bottleneck", "dropout")
ARCH_KEYS = ("pool", "head", "attention", "width", "lip_bottleneck")
#: TrainConfig fields a sweep owns itself (paths, Ray sizing, the epoch budget): not tunable.
NOT_TUNABLE = {"data", "output", "storage_path", "run_name", "mlflow_run_id", "num_workers", "use_gpu",
               "cpus_per_worker", "max_failures", "init", "epochs", "num_classes", "amp", "channels_last"}
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")


# --------------------------------------------------------------------------- settings
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def tunable_keys() -> list[str]:
    from pipeline.train.config import TrainConfig

    return [k for k in TrainConfig.field_names() if k not in NOT_TUNABLE]


def validate_space(space: dict[str, Any]) -> dict[str, Any]:
    """Check the ``space`` mapping's keys and distributions (see the module doc; the schema has
    already checked that it is a non-empty mapping); returns it unchanged."""
    allowed = tunable_keys()
    for key, spec in space.items():
        if key not in allowed:
            raise FerError(f"tune.space: {key!r} cannot be tuned; tunable keys: {', '.join(allowed)}")
        if not isinstance(spec, dict):
            continue  # a constant
        if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise FerError(f"tune.space.{key}: {spec!r} must be one of "
                           + ", ".join(f"{{{d}: [...]}}" for d in DISTRIBUTIONS) + " or a plain value")
        (kind, args), = spec.items()
        if not isinstance(args, list) or not args:
            raise FerError(f"tune.space.{key}.{kind} needs a non-empty list, got {args!r}")
        if kind in ("loguniform", "uniform", "randint"):
            if len(args) != 2 or not all(_is_num(a) for a in args) or not args[0] < args[1]:
                raise FerError(f"tune.space.{key}.{kind} needs [low, high] numbers with low < high, got {args!r}")
            if kind == "loguniform" and args[0] <= 0:
                raise FerError(f"tune.space.{key}.loguniform needs low > 0, got {args!r}")
            if kind == "randint" and not all(_is_int(a) for a in args):
                raise FerError(f"tune.space.{key}.randint needs integers, got {args!r}")
    return space


def tune_settings(params: dict[str, Any]) -> dict[str, Any]:
    """The ``tune:`` section with its defaults filled in: types, ranges and unknown keys are
    checked by the params schema (pipeline.params_schema.Tune), the sweep's own rules here."""
    if "tune" not in params or not isinstance(params.get("tune"), dict):
        raise FerError("params.yaml has no 'tune' section (see `fer tune --help` for its keys)")
    found = problems({"tune": params["tune"]})
    if found:
        raise FerError("; ".join(found))
    s = {**{k: f.get_default(call_default_factory=True) for k, f in Tune.model_fields.items()}, **params["tune"]}
    train = section(params, DATASETS[s["dataset"]])
    if s["max_epochs"] is None:
        s["max_epochs"] = train.get("epochs", 1)
    if s["grace_period"] > s["max_epochs"]:
        raise FerError(f"tune.grace_period={s['grace_period']} exceeds max_epochs={s['max_epochs']}")
    bad = sorted(set(s["fixed"]) - set(tunable_keys()))
    if bad:
        raise FerError(f"tune.fixed: {bad} cannot be set here; allowed: {', '.join(tunable_keys())}")
    validate_space(s["space"])
    if s["dataset"] == "sfew":
        arch = sorted(k for k in list(s["space"]) + list(s["fixed"]) if k in ARCH_KEYS)
        if arch:
            raise FerError(f"tune.dataset sfew fine-tunes models/rafdb/model.pt: its architecture "
                           f"({', '.join(arch)}) cannot change in the sweep")
    return s


def _resolve(root: Path, p: str) -> str:
    return p if "://" in p else str((root / p).resolve())


def base_options(params: dict[str, Any], settings: dict[str, Any], root: Path) -> dict[str, Any]:
    """The TrainConfig options every trial starts from: model + ray + the dataset's training
    section (as the DVC stage reads them) + ``tune.fixed``."""
    from pipeline.train.config import TrainConfig

    opts = {**section(params, "model"), **section(params, "ray"),
            **section(params, DATASETS[settings["dataset"]]), **settings["fixed"]}
    opts.pop("storage_path", None)
    known = set(TrainConfig.field_names())
    unknown = sorted(set(opts) - known)
    if unknown:
        raise FerError(f"unknown training key(s) {unknown} in params.yaml")
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
