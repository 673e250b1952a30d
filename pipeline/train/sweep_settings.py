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
import re
from pathlib import Path
from typing import Any

from pipeline.config import load_params, section
from pipeline.errors import FerError

DATASETS = {"rafdb": "train_rafdb", "sfew": "finetune_sfew"}
MODEL_KEYS = ("pool", "head", "attention", "width", "lip_bottleneck", "dropout")
ARCH_KEYS = ("pool", "head", "attention", "width", "lip_bottleneck")
#: TrainConfig fields a sweep owns itself (paths, Ray sizing, the epoch budget): not tunable.
NOT_TUNABLE = {"data", "output", "storage_path", "run_name", "mlflow_run_id", "num_workers", "use_gpu",
               "cpus_per_worker", "max_failures", "init", "epochs", "num_classes", "amp", "channels_last"}
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
TUNE_DEFAULTS: dict[str, Any] = {
    "dataset": "rafdb", "num_samples": 8, "max_epochs": None, "grace_period": 1, "reduction_factor": 2,
    "workers_per_trial": 1, "max_concurrent": None, "seed": 0, "name": None, "fixed": {}, "space": None,
}

# --------------------------------------------------------------------------- settings
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def tunable_keys() -> list[str]:
    from pipeline.train.config import TrainConfig

    return [k for k in TrainConfig.field_names() if k not in NOT_TUNABLE]


def validate_space(space: Any) -> dict[str, Any]:
    """Check the ``space`` mapping (see the module doc); returns it unchanged."""
    if not isinstance(space, dict) or not space:
        raise FerError("tune.space must be a non-empty mapping of training keys to distributions, "
                       "e.g. {lr: {loguniform: [0.001, 0.1]}}")
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
    """The validated ``tune:`` section with defaults filled in (unknown keys are errors)."""
    if "tune" not in params or not isinstance(params.get("tune"), dict):
        raise FerError("params.yaml has no 'tune' section (see `fer tune --help` for its keys)")
    raw = params["tune"]
    unknown = sorted(set(raw) - set(TUNE_DEFAULTS))
    if unknown:
        raise FerError(f"unknown key(s) {unknown} in 'tune'; known: {sorted(TUNE_DEFAULTS)}")
    s = {**TUNE_DEFAULTS, **raw}
    if s["dataset"] not in DATASETS:
        raise FerError(f"tune.dataset={s['dataset']!r} must be one of {list(DATASETS)}")
    train = section(params, DATASETS[s["dataset"]])
    if s["max_epochs"] is None:
        s["max_epochs"] = train.get("epochs", 1)
    for key, low in (("num_samples", 1), ("max_epochs", 1), ("grace_period", 1), ("workers_per_trial", 1)):
        if not _is_int(s[key]) or s[key] < low:
            raise FerError(f"tune.{key}={s[key]!r} must be an integer >= {low}")
    if not _is_num(s["reduction_factor"]) or s["reduction_factor"] < 2:
        raise FerError(f"tune.reduction_factor={s['reduction_factor']!r} must be >= 2")
    if s["grace_period"] > s["max_epochs"]:
        raise FerError(f"tune.grace_period={s['grace_period']} exceeds max_epochs={s['max_epochs']}")
    if s["max_concurrent"] is not None and (not _is_int(s["max_concurrent"]) or s["max_concurrent"] < 1):
        raise FerError(f"tune.max_concurrent={s['max_concurrent']!r} must be null or an integer >= 1")
    if not _is_int(s["seed"]):
        raise FerError(f"tune.seed={s['seed']!r} must be an integer")
    if s["name"] is not None and (not isinstance(s["name"], str)
                                  or not re.fullmatch(r"[A-Za-z0-9._-]+", s["name"])):
        raise FerError(f"tune.name={s['name']!r} must be null or a name of letters, digits, '.', '_', '-'")
    if not isinstance(s["fixed"], dict):
        raise FerError("tune.fixed must be a mapping of training keys")
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
