"""The one typed schema of params.yaml, so that a wrong value fails in one line naming its key
instead of as a traceback deep inside a stage. Training values keep a single rule: their types are
declared here, their ranges are TrainConfig's own checks."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.train.config import ATTENTIONS, HEADS, OPTIMIZERS, POOLS, SAMPLERS, SCHEDULES, TrainConfig

AUTO = Literal["auto"]
#: TrainConfig fields that params.yaml never sets: the stages set them (paths, run names) or the
#: pipeline fixes them (the seven classes).
NOT_PARAMS = frozenset({"data", "init", "output", "run_name", "mlflow_run_id", "num_classes"})
TRAIN_SECTIONS = ("train_rafdb", "finetune_sfew")


class _Section(BaseModel):
    # strict: "64" is not an int; an int is still a valid float
    model_config = ConfigDict(extra="forbid", strict=True)


def _key(description: str, **constraints: Any) -> Any:
    """A required key."""
    return Field(description=description, **constraints)


def _opt(description: str | None = None, **constraints: Any) -> Any:
    """An optional key (the consumer has a default)."""
    return Field(None, description=description, **constraints)


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


# model, ray and the training sections are TrainConfig's fields: the values and ranges allowed
# (and their messages) come from TrainConfig itself, see train_problems().
class Model(_Section):
    pool: Literal[POOLS] = _opt()
    head: Literal[HEADS] = _opt()
    attention: Literal[ATTENTIONS] = _opt()
    width: float = _opt()
    lip_bottleneck: float = _opt()
    dropout: float = _opt()
    compile: bool = _opt("must be true or false")


class Ray(_Section):
    num_workers: int = _opt()
    use_gpu: bool | AUTO = _opt()
    cpus_per_worker: Optional[float] = _opt()
    storage_path: str = _opt()
    max_failures: int = _opt()


class Training(_Section):
    image_size: Optional[int] = _opt()
    crop: int = _opt()
    epochs: int = _opt()
    batch_size: int = _opt()
    optimizer: Literal[OPTIMIZERS] = _opt()
    lr: float = _opt()
    momentum: float = _opt()
    weight_decay: float = _opt()
    schedule: Literal[SCHEDULES] = _opt()
    warmup_epochs: float = _opt()
    step_size: int = _opt()
    gamma: float = _opt()
    label_smoothing: float = _opt()
    class_weighted: bool = _opt()
    sampler: Literal[SAMPLERS] = _opt()
    logit_adjust: float = _opt()
    max_rotate_deg: float = _opt()
    patience: int = _opt()
    seed: int = _opt()
    amp: bool | AUTO = _opt()
    channels_last: bool | AUTO = _opt()


class ImagenetInit(_Section):
    source: str = _key('must be "none", "torchvision" or the path of a vgg16_bn .pth', min_length=1)
    # the training modes (pipeline.train.imagenet; its DEFAULTS fill in what is left out)
    mode: Literal["map", "adapt", "pretrain"] = _opt()
    data: Optional[str] = _opt("must be null or the parquet folder `fer ingest-imagenet` wrote",
                               min_length=1)
    epochs: int = _opt("must be an integer >= 1", ge=1)
    finetune_epochs: int = _opt("must be an integer >= 0 (0: no full-network phase)", ge=0)
    lr: float = _opt("must be a number > 0", gt=0)
    finetune_lr: float = _opt("must be a number > 0", gt=0)
    batch_size: int = _opt("must be an integer >= 2", ge=2)
    crop: int = _opt("must be an integer in 48..224", ge=48, le=224)
    min_scale: float = _opt("must be a number in (0, 1]", gt=0, le=1)
    optimizer: Literal[OPTIMIZERS] = _opt()
    momentum: float = _opt("must be a number in [0, 1)", ge=0, lt=1)
    weight_decay: float = _opt("must be a number >= 0", ge=0)
    warmup_epochs: float = _opt("must be a number >= 0", ge=0)
    label_smoothing: float = _opt("must be a number in [0, 1)", ge=0, lt=1)
    shuffle_buffer: int = _opt("must be an integer >= 0 (rows each worker shuffles locally)", ge=0)
    seed: Optional[int] = _opt("must be null (train_rafdb.seed) or an integer")


class Evaluate(_Section):
    batch_size: int = _key("must be an integer >= 1", ge=1)
    num_workers: int = _key("must be an integer >= 1", ge=1)
    amp: bool | AUTO = _opt("must be true, false or \"auto\"")
    channels_last: bool | AUTO = _opt("must be true, false or \"auto\"")


class Mlflow(_Section):
    experiment: str = _key("must be an MLflow experiment name", min_length=1)


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
    # free-form here: `fer tune` validates it (pipeline.train.tune.tune_settings)
    tune: dict[str, Any] = _opt("must be a mapping (see `fer tune --help` for its keys)")


SECTIONS = tuple(Params.model_fields)
HOME = {**{k: "model" for k in Model.model_fields}, **{k: "ray" for k in Ray.model_fields}}


# --------------------------------------------------------------------------- checking
def problems(raw: Any) -> list[str]:
    """One line per problem with the parsed params.yaml (empty: valid)."""
    if not isinstance(raw, dict):
        return [f"the file must be a mapping of sections ({', '.join(SECTIONS)}), got {_show(raw)}"]
    try:
        Params.model_validate(raw)
    except ValidationError as e:
        return _explain(e.errors(include_url=False), raw)
    return train_problems(raw)


def train_problems(raw: dict[str, Any]) -> list[str]:
    """TrainConfig's checks on model + ray + each training section, as the stages merge them."""
    model, ray = raw.get("model") or {}, raw.get("ray") or {}
    runs = [(name, raw[name]) for name in TRAIN_SECTIONS if name in raw] or [(None, {})]
    out: list[str] = []
    for name, sec in runs:
        given = {**model, **ray, **sec}
        origin = {**{k: "model" for k in model}, **{k: "ray" for k in ray}, **{k: name for k in sec}}
        probe = _Unchecked(data="params.yaml", **given)
        for p in probe._problems():
            field = p.split("=", 1)[0]
            where = origin.get(field) or (name if field in Training.model_fields else None)
            if where is None:
                continue  # a default of a section that is not in the file
            value = getattr(probe, field)
            rest = _strip(p, field, value)
            line = (f"{where}.{field} = {_show(value)}{'' if field in given else ' (default)'}: {rest}"
                    if rest is not None else f"{where}.{p}")
            if line not in out:
                out.append(line)
    return out


class _Unchecked(TrainConfig):
    """TrainConfig that lists its problems instead of raising them."""

    def __post_init__(self) -> None:
        pass


def _train_rule(field: str, value: Any) -> str | None:
    """What TrainConfig says about `field` set to `value` ("must be in (0, 4]"), if anything."""
    for p in _Unchecked(data="params.yaml", **{field: value})._problems():
        rest = _strip(p, field, value)
        if rest is not None:
            return rest
    return None


def _strip(problem: str, field: str, value: Any) -> str | None:
    for prefix in (f"{field}={value!r} ", f"{field}={value} "):
        if problem.startswith(prefix):
            return problem[len(prefix):]
    return None


def _explain(errors: list[dict[str, Any]], raw: dict[str, Any]) -> list[str]:
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
        allowed = _allowed(path, err)
        if err["type"] == "missing":
            lines.append(f"{dotted} is required: {allowed}")
        else:
            lines.append(f"{dotted} = {_show(err['input'])}: {allowed}")
    for parent, keys in reversed(unknown.items()):
        if not parent:
            lines.insert(0, f"unknown section(s) {sorted(map(str, keys))}; known: {sorted(SECTIONS)}")
        else:
            known = sorted(_model_at(parent).model_fields)
            lines.insert(0, f"unknown key(s) {sorted(map(str, keys))} in '{'.'.join(map(str, parent))}'; "
                            f"known: {known}")
    return lines


def _path(err: dict[str, Any], raw: dict[str, Any]) -> tuple:
    """The params.yaml key path of an error (pydantic's loc also names union members)."""
    loc, node, path = err["loc"], raw, []
    for part in loc:
        if not (isinstance(node, dict) and part in node):
            break
        path.append(part)
        node = node[part]
    if err["type"] == "missing" and len(path) < len(loc):
        path.append(loc[len(path)])
    return tuple(path)


def _model_at(path: tuple) -> type[BaseModel]:
    model: type[BaseModel] = Params
    for part in path:
        model = model.model_fields[part].annotation
    return model


def _allowed(path: tuple, err: dict[str, Any]) -> str:
    if len(path) == 2 and (path[0] in TRAIN_SECTIONS or path[0] in ("model", "ray")):
        rule = _train_rule(path[1], err.get("input"))
        if rule is not None:
            expected = TYPE_WORDS.get(err["type"]) if len(err["loc"]) == len(path) else None
            return rule + (f" ({expected}, not {_kind(err.get('input'))})" if expected else "")
    info = _model_at(path[:-1]).model_fields[path[-1]]
    if info.description:
        return info.description
    if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
        return "must be a mapping of " + _keys(info.annotation)
    return err["msg"].replace("Input should", "must")


TYPE_WORDS = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
              "string_type": "a string"}


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
