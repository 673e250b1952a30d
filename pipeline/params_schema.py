"""The one typed schema of params.yaml and of a training run's config, so that a wrong value fails
in one line naming its key instead of as a traceback deep inside a stage.

Every rule is written once, here, as a pydantic field (its description is the message) or as a
cross-field rule in `cross_problems`: `pipeline.config.load_params` checks the file with it, and
`pipeline.train.config.TrainConfig` checks a run (model + ray + a training section + what the
stage adds) with the same fields.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# The allowed values of the network's, optimiser's and sampler's switches (pipeline.model.vgg,
# pipeline.train.steps, pipeline.train.imbalance read them from here).
POOLS, HEADS, ATTENTIONS = ("lip", "max", "avg"), ("conv", "fc"), ("eca", "none")
#: How LIP's logits start: "avg" (constant: average pooling, the paper's module) or "max" (a soft max pooling).
LIP_STARTS = ("avg", "max")


def recorded_lip_switches(pool: str, lip_norm: bool = True, lip_start: str = "avg") -> dict[str, Any]:
    """The LIP switches a network's config records: only those that change the paper's module, so
    that a checkpoint of the paper's module keeps the config (and a training run the fingerprint)
    it had before the switch existed. The one rule for the model, the training stages and the
    ablation."""
    out: dict[str, Any] = {}
    if not lip_norm:
        out["lip_norm"] = False
    if pool == "lip" and lip_start != "avg":
        out["lip_start"] = lip_start
    return out
OPTIMIZERS, SCHEDULES, SAMPLERS = ("sgd", "adamw"), ("cosine", "step", "onecycle"), ("shuffle", "balanced")
MIN_SIZE, MAX_SIZE = 48, 224  # the input sizes LIP-VGG16 accepts (five 2x2 pools)

AUTO = Literal["auto"]
TRAIN_SECTIONS = ("train_rafdb", "finetune_sfew")
#: sections whose type errors also say which type was expected ("(a number, not a string)")
_TYPED = ("model", "ray", "tune", *TRAIN_SECTIONS)


class _Section(BaseModel):
    # strict: "64" is not an int and true is not 1; an int is still a valid float
    model_config = ConfigDict(extra="forbid", strict=True)


def _key(description: str, **constraints: Any) -> Any:
    """A required key; `description` is what the error message says it must be."""
    return Field(description=description, **constraints)


def _opt(description: str | None = None, **constraints: Any) -> Any:
    """An optional key (the consumer has a default)."""
    return Field(None, description=description, **constraints)


AUTO_BOOL = 'must be true, false or "auto"'


class Datasets(_Section):
    rafdb: str = _opt("must be the dataset's folder (a path)", min_length=1)
    sfew: str = _opt("must be the dataset's folder (a path)", min_length=1)


class SynthSet(_Section):
    n: Optional[int] = _opt("must be an integer >= 1 (or null: the layout's default size)", ge=1)
    seed: int = _opt("must be an integer")


class Synth(_Section):
    rafdb: SynthSet = _opt()
    sfew: SynthSet = _opt()


class Ingest(_Section):
    val_fraction: float = _key("must be a number in [0, 1)", ge=0, lt=1)
    seed: int = _key("must be an integer")
    max_bad_fraction: float = _key("must be a number in [0, 1]", ge=0, le=1)
    workers: Optional[int] = _opt("must be null (all cores) or an integer >= 1", ge=1)


# ---- a training run: model + ray + a training section (params.yaml) + Run (set by the stages).
# The defaults here are a run's defaults for keys params.yaml leaves out (TrainConfig holds them).
def _d(default: Any, description: str, **constraints: Any) -> Any:
    return Field(default, description=description, **constraints)


class Model(_Section):
    """pipeline.model.lip_vgg16's switches, shared by every training section."""
    pool: Literal[POOLS] = _d("lip", f"must be one of {list(POOLS)}")
    head: Literal[HEADS] = _d("conv", f"must be one of {list(HEADS)}")
    attention: Literal[ATTENTIONS] = _d("eca", f"must be one of {list(ATTENTIONS)}")
    width: float = _d(1.0, "must be in (0, 4]", gt=0, le=4)
    lip_bottleneck: float = _d(0.25, "must be in (0, 1]", gt=0, le=1)
    lip_norm: bool = _d(True, "must be true or false (false: the LIP logit module without InstanceNorms)")
    lip_start: Literal[LIP_STARTS] = _d("avg", f"must be one of {list(LIP_STARTS)} (how LIP's logits start: "
                                        "avg = average pooling, the paper's module; max = a soft max pooling)")
    dropout: float = _d(0.5, "must be in [0, 1)", ge=0, lt=1)
    compile: bool = _d(False, "must be true or false")


class Ray(_Section):
    """Ray sizing and fault tolerance: how a run is placed, not what it learns."""
    num_workers: int = _d(2, "must be an integer >= 1", ge=1)
    use_gpu: bool | AUTO = _d("auto", AUTO_BOOL)
    cpus_per_worker: Optional[float] = _d(None, "must be null (auto) or > 0", gt=0)
    storage_path: str = _d("runs/ray", "must be a path or URI", min_length=1)
    max_failures: int = _d(2, "must be >= 0 (or -1 = unlimited)", ge=-1)


class Training(_Section):
    """The hyperparameters of one training stage."""
    image_size: Optional[int] = _d(None, f"must be null (native) or an integer >= {MIN_SIZE}",
                                   ge=MIN_SIZE, le=1024)
    crop: int = _d(90, f"must be an integer in {MIN_SIZE}..{MAX_SIZE}", ge=MIN_SIZE, le=MAX_SIZE)
    epochs: int = _d(30, "must be an integer >= 1", ge=1)
    batch_size: int = _d(64, "must be an integer >= 2 (global: split across the workers)", ge=2)
    optimizer: Literal[OPTIMIZERS] = _d("sgd", f"must be one of {list(OPTIMIZERS)}")
    lr: float = _d(0.01, "must be > 0", gt=0)
    momentum: float = _d(0.9, "must be in [0, 1)", ge=0, lt=1)
    weight_decay: float = _d(5e-4, "must be >= 0", ge=0)
    decay_norms: bool = _d(True, "must be true or false (false: no weight decay on norm gains and biases)")
    lip_lr_scale: float = _d(1.0, "must be > 0 (the LIP logit modules' learning rate over lr)", gt=0)
    schedule: Literal[SCHEDULES] = _d("cosine", f"must be one of {list(SCHEDULES)}")
    warmup_epochs: float = _d(1.0, "must be >= 0", ge=0)
    step_size: int = _d(10, "must be an integer >= 1 (schedule step: decay every step_size epochs)", ge=1)
    gamma: float = _d(0.1, "must be in (0, 1] (schedule step: the decay factor)", gt=0, le=1)
    label_smoothing: float = _d(0.0, "must be in [0, 1)", ge=0, lt=1)
    class_weighted: bool = _d(False, "must be true or false")
    sampler: Literal[SAMPLERS] = _d("shuffle", f"must be one of {list(SAMPLERS)}")
    logit_adjust: float = _d(0.0, "must be >= 0 (0 = off)", ge=0)
    max_rotate_deg: float = _d(10.0, "must be in [0, 180]", ge=0, le=180)
    patience: int = _d(0, "must be an integer >= 0 (0 = off)", ge=0)
    seed: int = _d(0, "must be an integer")
    amp: bool | AUTO = _d("auto", AUTO_BOOL)
    channels_last: bool | AUTO = _d("auto", AUTO_BOOL)


class Run(_Section):
    """A run's bookkeeping, which params.yaml never sets: the stages pass paths and run ids, and
    the pipeline fixes the seven classes."""
    data: str = _key("must be a directory path (the parquet dataset)", min_length=1)
    init: str = _d("none", 'must be "none" or a checkpoint path', min_length=1)
    output: str = _d("models/train", "must be a directory path", min_length=1)
    run_name: Optional[str] = _d(None, "must be null or a name without '/'", pattern=r"^[^/]*[^/\s][^/]*$")
    mlflow_run_id: Optional[str] = _d(None, "must be null or a run id")
    num_classes: int = _d(7, "must be an integer >= 2", ge=2)


class TrainRun(Model, Ray, Training, Run):
    """One training run's whole config, flat: `pipeline.train.config.TrainConfig` is this."""


NOT_PARAMS = frozenset(Run.model_fields)


def cross_problems(c: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, rule) for the rules that tie two keys of a run together; `c` has passed the fields."""
    out = []
    if c.get("image_size") is not None and c["crop"] > c["image_size"]:
        out.append(("crop", f"is larger than image_size={c['image_size']}"))
    if c["batch_size"] // c["num_workers"] < 2:
        out.append(("batch_size", f"leaves fewer than 2 images per worker for num_workers={c['num_workers']}"))
    if c["logit_adjust"] and c["class_weighted"]:
        out.append(("logit_adjust", "cannot be combined with class_weighted: both correct for the class "
                                    "prior; choose one"))
    return out


def run_problems(values: dict[str, Any], error: ValidationError | None = None) -> list[str]:
    """One line per problem ("crop = 300: must be an integer in 48..224") of a whole run's config:
    of pydantic's ``error`` for ``values`` if given, else the cross-field rules (``values`` valid)."""
    if error is not None:
        return _explain(error.errors(include_url=False), values, TrainRun, typed=True)
    return [f"{k} = {_show(values[k])}: {rule}" for k, rule in cross_problems(values)]


class ImagenetInit(_Section):
    """The init weights: ``map`` copies vgg16_bn's ImageNet weights (``source``); ``adapt`` and
    ``pretrain`` train on the streamed ImageNet parquet (pipeline.train.imagenet). The defaults
    are those modes' (params.yaml lists only what it sets, so DVC sees exactly that)."""
    source: str = _key('must be "none", "torchvision" or the path of a vgg16_bn .pth', min_length=1)
    mode: Literal["map", "adapt", "pretrain"] = Field("map")
    data: Optional[str] = _d(None, "must be null or the parquet folder `fer ingest-imagenet` wrote",
                             min_length=1)
    epochs: int = _d(5, "must be an integer >= 1", ge=1)
    finetune_epochs: int = _d(0, "must be an integer >= 0 (0: no full-network phase)", ge=0)
    lr: float = _d(0.01, "must be a number > 0", gt=0)
    finetune_lr: float = _d(0.001, "must be a number > 0", gt=0)
    batch_size: int = _d(256, "must be an integer >= 2", ge=2)
    crop: int = _d(224, f"must be an integer in {MIN_SIZE}..{MAX_SIZE}", ge=MIN_SIZE, le=MAX_SIZE)
    min_scale: float = _d(0.08, "must be a number in (0, 1]", gt=0, le=1)
    optimizer: Literal[OPTIMIZERS] = Field("sgd")
    momentum: float = _d(0.9, "must be a number in [0, 1)", ge=0, lt=1)
    weight_decay: float = _d(1e-4, "must be a number >= 0", ge=0)
    warmup_epochs: float = _d(1, "must be a number >= 0", ge=0)
    label_smoothing: float = _d(0.1, "must be a number in [0, 1)", ge=0, lt=1)
    shuffle_buffer: int = _d(1024, "must be an integer >= 0 (rows each worker shuffles locally)", ge=0)
    seed: Optional[int] = _d(None, "must be null (train_rafdb.seed) or an integer")


def imagenet_problems(raw: dict[str, Any]) -> list[str]:
    """What a (field-valid) ``imagenet_init`` section cannot run."""
    s = raw.get("imagenet_init")
    if not isinstance(s, dict) or s.get("mode", "map") == "map":
        return []
    if not s.get("data"):
        return [f"imagenet_init.mode = {s['mode']}: set imagenet_init.data to the parquet folder "
                "`fer ingest-imagenet` wrote"]
    if s["mode"] == "adapt" and s["source"] == "none":
        return ["imagenet_init.mode = adapt trains the parts vgg16_bn lacks around its weights: set "
                "imagenet_init.source to torchvision or a vgg16_bn .pth (or use pretrain)"]
    return []


class Evaluate(_Section):
    batch_size: int = _key("must be an integer >= 1", ge=1)
    num_workers: int = _key("must be an integer >= 1", ge=1)
    amp: bool | AUTO = _opt(AUTO_BOOL)
    channels_last: bool | AUTO = _opt(AUTO_BOOL)


class Mlflow(_Section):
    experiment: str = _key("must be an MLflow experiment name", min_length=1)


class Tune(_Section):
    """`fer tune`'s settings (the defaults are the sweep's); the search space's language and the
    rules between keys are `tune_problems`."""
    dataset: Literal["rafdb", "sfew"] = _d("rafdb", "must be rafdb (train_rafdb's settings) or sfew "
                                            "(finetune_sfew's, from models/rafdb)")
    num_samples: int = _d(8, "must be an integer >= 1", ge=1)
    max_epochs: Optional[int] = _d(None, "must be null (the dataset's epochs) or an integer >= 1", ge=1)
    grace_period: int = _d(1, "must be an integer >= 1", ge=1)
    reduction_factor: float = _d(2, "must be a number >= 2", ge=2)
    workers_per_trial: int = _d(1, "must be an integer >= 1", ge=1)
    max_concurrent: Optional[int] = _d(None, "must be null (from the cluster) or an integer >= 1", ge=1)
    seed: int = _d(0, "must be an integer")
    name: Optional[str] = _d(None, "must be null or a name of letters, digits, '.', '_', '-'",
                             pattern=r"^[A-Za-z0-9._-]+$")
    fixed: dict[str, Any] = _d({}, "must be a mapping of training keys")
    space: dict[str, Any] = _key("must be a non-empty mapping of training keys to distributions, "
                                 "e.g. {lr: {loguniform: [0.001, 0.1]}}", min_length=1)


#: Where a sweep's trials take their training section from.
TUNE_DATASETS = {"rafdb": "train_rafdb", "sfew": "finetune_sfew"}
#: TrainRun fields a sweep owns itself (paths, Ray sizing, the epoch budget): not tunable.
NOT_TUNABLE = frozenset({"data", "output", "storage_path", "run_name", "mlflow_run_id", "num_workers",
                         "use_gpu", "cpus_per_worker", "max_failures", "init", "epochs", "num_classes",
                         "amp", "channels_last"})
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
#: The network's shape: fixed when a sweep fine-tunes models/rafdb on SFEW.
ARCH_KEYS = ("pool", "head", "attention", "width", "lip_bottleneck", "lip_norm", "lip_start")


def tunable_keys() -> list[str]:
    return [k for k in TrainRun.model_fields if k not in NOT_TUNABLE]


def is_number(v: Any, integer: bool = False) -> bool:
    return isinstance(v, int if integer else (int, float)) and not isinstance(v, bool)


def _space_problem(key: str, spec: Any, allowed: list[str]) -> str | None:
    """``tune.space.<key>``: a tunable key mapped to a plain value or ``{distribution: [args]}``."""
    if key not in allowed:
        return f"tune.space: {key!r} cannot be tuned; tunable keys: {', '.join(allowed)}"
    if not isinstance(spec, dict):
        return None  # a constant
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        return (f"tune.space.{key} = {_show(spec)}: must be one of "
                + ", ".join(f"{{{d}: [...]}}" for d in DISTRIBUTIONS) + " or a plain value")
    (kind, args), = spec.items()
    where = f"tune.space.{key}.{kind} = {_show(args)}: needs"
    if not isinstance(args, list) or not args:
        return f"{where} a non-empty list"
    if kind in ("loguniform", "uniform", "randint"):
        if len(args) != 2 or not all(map(is_number, args)) or not args[0] < args[1]:
            return f"{where} [low, high] numbers with low < high"
        if kind == "loguniform" and args[0] <= 0:
            return f"{where} low > 0"
        if kind == "randint" and not all(is_number(a, integer=True) for a in args):
            return f"{where} integers"
    return None


def tune_max_epochs(raw: dict[str, Any]) -> int:
    """A sweep's epoch budget: ``tune.max_epochs``, else its training section's ``epochs`` (else 1)."""
    t = raw["tune"]
    return t.get("max_epochs") or (raw.get(TUNE_DATASETS[t.get("dataset", "rafdb")]) or {}).get("epochs", 1)


def tune_problems(raw: dict[str, Any]) -> list[str]:
    """The rules of a (field-valid) ``tune:`` section that tie its keys to each other and to the
    training sections."""
    t = raw.get("tune")
    if not isinstance(t, dict):
        return []
    allowed = tunable_keys()
    space, fixed = t.get("space") or {}, t.get("fixed") or {}
    out = [p for k, s in space.items() if (p := _space_problem(k, s, allowed))]
    bad = sorted(set(fixed) - set(allowed))
    if bad:
        out.append(f"tune.fixed: {bad} cannot be set here; allowed: {', '.join(allowed)}")
    dataset = t.get("dataset", "rafdb")
    max_epochs = tune_max_epochs(raw)
    if t.get("grace_period", 1) > max_epochs:
        out.append(f"tune.grace_period = {t['grace_period']}: exceeds max_epochs={max_epochs}")
    arch = sorted(k for k in [*space, *fixed] if k in ARCH_KEYS)
    if dataset == "sfew" and arch:
        out.append(f"tune.dataset = sfew fine-tunes models/rafdb/model.pt: its architecture "
                   f"({', '.join(arch)}) cannot change in the sweep")
    return out


class Params(_Section):
    """Every section is optional (a stage needs only its own); a section that is there is whole."""
    datasets: Datasets = _opt()
    synth: Synth = _opt()
    ingest: Ingest = _opt()
    model: Model = _opt()
    imagenet_init: ImagenetInit = _opt()
    ray: Ray = _opt()
    train_rafdb: Training = _opt()
    finetune_sfew: Training = _opt()
    evaluate: Evaluate = _opt()
    mlflow: Mlflow = _opt()
    tune: Tune = _opt()


SECTIONS = tuple(Params.model_fields)


# --------------------------------------------------------------------------- checking
def problems(raw: Any) -> list[str]:
    """One line per problem with the parsed params.yaml (empty: valid)."""
    if not isinstance(raw, dict):
        return [f"the file must be a mapping of sections ({', '.join(SECTIONS)}), got {_show(raw)}"]
    try:
        Params.model_validate(raw)
    except ValidationError as e:
        return _explain(e.errors(include_url=False), raw, Params)
    return _section_cross_problems(raw) + tune_problems(raw) + imagenet_problems(raw)


def _section_cross_problems(raw: dict[str, Any]) -> list[str]:
    """The cross-field rules on model + ray + each training section, as the stages merge them
    (keys the file leaves out take a run's defaults)."""
    defaults = {k: f.default for k, f in TrainRun.model_fields.items() if not f.is_required()}
    model, ray = raw.get("model") or {}, raw.get("ray") or {}
    out: list[str] = []
    for name in [s for s in TRAIN_SECTIONS if s in raw] or [None]:
        sec = raw.get(name) or {}
        given = {**model, **ray, **sec}
        origin = {**{k: "model" for k in model}, **{k: "ray" for k in ray}, **{k: name for k in sec}}
        for key, rule in cross_problems({**defaults, **given}):
            where = origin.get(key) or name
            if where is None:
                continue  # a default of a section that is not in the file
            value = given.get(key, defaults.get(key))
            line = f"{where}.{key} = {_show(value)}{'' if key in given else ' (default)'}: {rule}"
            if line not in out:
                out.append(line)
    return out


def _explain(errors: list[dict[str, Any]], raw: dict[str, Any], root: type[BaseModel],
             typed: bool = False) -> list[str]:
    unknown: dict[tuple, list] = {}
    lines: list[str] = []
    seen: set[tuple] = set()
    for err in errors:
        path = _path(err, raw)
        if err["type"] == "extra_forbidden":
            unknown.setdefault(path[:-1], []).append(path[-1])
            continue
        if path in seen:  # a union reports once per member
            continue
        seen.add(path)
        dotted = ".".join(map(str, path))
        allowed = _allowed(root, path, err, typed or (len(path) == 2 and path[0] in _TYPED))
        if err["type"] == "missing":
            lines.append(f"{dotted} is required: {allowed}")
        else:
            lines.append(f"{dotted} = {_show(err['input'])}: {allowed}")
    for parent, keys in reversed(unknown.items()):
        known = sorted(_model_at(root, parent).model_fields)
        if root is Params and not parent:
            lines.insert(0, f"unknown section(s) {sorted(map(str, keys))}; known: {sorted(SECTIONS)}")
        else:
            where = f" in '{'.'.join(map(str, parent))}'" if parent else ""
            lines.insert(0, f"unknown key(s) {sorted(map(str, keys))}{where}; known: {known}")
    return lines


def _path(err: dict[str, Any], raw: dict[str, Any]) -> tuple:
    """The key path of an error (pydantic's loc also names union members)."""
    loc, node, path = err["loc"], raw, []
    for part in loc:
        if not (isinstance(node, dict) and part in node):
            break
        path.append(part)
        node = node[part]
    if err["type"] == "missing" and len(path) < len(loc):
        path.append(loc[len(path)])
    return tuple(path)


def _model_at(root: type[BaseModel], path: tuple) -> type[BaseModel]:
    model = root
    for part in path:
        model = model.model_fields[part].annotation
    return model


TYPE_WORDS = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
              "string_type": "a string"}


def _allowed(root: type[BaseModel], path: tuple, err: dict[str, Any], typed: bool) -> str:
    info = _model_at(root, path[:-1]).model_fields[path[-1]]
    if info.description:
        # a plain type error (not inside a union) also says which type was expected
        expected = TYPE_WORDS.get(err["type"]) if typed and len(err["loc"]) == len(path) else None
        return info.description + (f" ({expected}, not {_kind(err.get('input'))})" if expected else "")
    if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
        return "must be a mapping of " + _keys(info.annotation)
    return err["msg"].replace("Input should", "must")


def _kind(value: Any) -> str:
    for t, word in ((bool, "a boolean"), (str, "a string"), (int, "an integer"), (float, "a float"),
                    (list, "a list"), (dict, "a mapping")):
        if isinstance(value, t):
            return word
    return "null" if value is None else type(value).__name__


def _keys(model: type[BaseModel]) -> str:
    req = [k for k, f in model.model_fields.items() if f.is_required()]
    opt = [k for k, f in model.model_fields.items() if not f.is_required()]
    parts = ([", ".join(req) + " (required)"] if req else []) + ([", ".join(opt) + " (optional)"] if opt else [])
    return " and ".join(parts)


def _show(value: Any) -> str:
    """A value as the message shows it: YAML's null/true/false, else Python's repr, cut short."""
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
