from pathlib import Path

import pytest
import yaml

from pipeline import params_schema
from pipeline.config import load_params
from pipeline.errors import FerError
from pipeline.model import lip_vgg16
from pipeline.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["params.yaml", "params.paper.yaml"])
def test_committed_params_load_as_written(name):
    # validated, never rewritten: no defaults filled in, so DVC and the stages see the file itself
    assert load_params(REPO / name) == yaml.safe_load((REPO / name).read_text())


@pytest.mark.parametrize("name", ["params.yaml", "params.paper.yaml"])
def test_committed_params_are_valid(name):
    p = load_params(REPO / name)
    for section in ("train_rafdb", "finetune_sfew"):
        cfg = TrainConfig.from_dict({**p["model"], **p["ray"], **p[section], "data": "x"})
        assert cfg.crop <= (cfg.image_size or 100)
        lip_vgg16(**cfg.network())  # model.compile is how to run the network, not part of it


def test_paper_params_are_the_paper_setup():
    p = load_params(REPO / "params.paper.yaml")
    assert (p["model"]["pool"], p["model"]["head"], p["model"]["attention"], p["model"]["width"]) == \
        ("lip", "conv", "eca", 1.0)
    assert p["model"]["lip_start"] == "avg"  # the paper's module, not the CPU default's faster start
    assert p["imagenet_init"]["source"] == "torchvision"
    assert p["train_rafdb"]["crop"] == 90 and p["finetune_sfew"]["image_size"] == 112


def test_unknown_keys_and_sections_are_errors(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("model:\n  widht: 0.5\n")
    with pytest.raises(FerError, match="widht"):
        load_params(f)
    f.write_text("modle:\n  width: 0.5\n")
    with pytest.raises(FerError, match="modle"):
        load_params(f)
    f.write_text("model: [1, 2\n")
    with pytest.raises(FerError, match="not valid YAML"):
        load_params(f)
    with pytest.raises(FerError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_missing_dataset_path_says_what_to_download(tmp_path):
    from stages.ingest import source_path

    with pytest.raises(FerError, match="EmoLabel/list_patition_label.txt"):
        source_path(str(tmp_path / "nope"), "rafdb")
    assert source_path(str(tmp_path), "sfew") == tmp_path


def test_schema_covers_train_config():
    """Every TrainConfig field has one home: model, ray, a training section, or the stages."""
    homes = [set(params_schema.Model.model_fields), set(params_schema.Ray.model_fields),
             set(params_schema.Training.model_fields), set(params_schema.NOT_PARAMS)]
    assert set().union(*homes) == set(TrainConfig.model_fields)
    assert sum(map(len, homes)) == len(TrainConfig.model_fields)  # disjoint


def _set(*path, value=None, delete=False):
    def edit(p):
        node = p
        for key in path[:-1]:
            node = node[key]
        if delete:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return edit


# (case, edit of the real params.yaml or the whole file's text, what the one-line message says)
BAD = [
    ("val_fraction text", _set("ingest", "val_fraction", value="ten"),
     "ingest.val_fraction = 'ten': must be a number in [0, 1)"),
    ("val_fraction 1", _set("ingest", "val_fraction", value=1), "ingest.val_fraction = 1: must be a number in [0, 1)"),
    ("max_bad_fraction percent", _set("ingest", "max_bad_fraction", value="5%"),
     "ingest.max_bad_fraction = '5%': must be a number in [0, 1]"),
    ("ingest seed text", _set("ingest", "seed", value="abc"), "ingest.seed = 'abc': must be an integer"),
    ("ingest workers text", _set("ingest", "workers", value="two"),
     "ingest.workers = 'two': must be null (all cores) or an integer >= 1"),
    ("ingest seed missing", _set("ingest", "seed", delete=True), "ingest.seed is required: must be an integer"),
    ("ingest empty", _set("ingest", value=None),
     "ingest = null: must be a mapping of val_fraction, seed, max_bad_fraction (required) and workers (optional)"),
    ("imagenet_init empty", _set("imagenet_init", value=None),
     "imagenet_init = null: must be a mapping of source (required)"),
    ("width text", _set("model", "width", value="big"),
     "model.width = 'big': must be in (0, 4] (a number, not a string)"),
    ("width range", _set("model", "width", value=5), "model.width = 5: must be in (0, 4]"),
    ("dropout text", _set("model", "dropout", value="high"),
     "model.dropout = 'high': must be in [0, 1) (a number, not a string)"),
    ("pool typo", _set("model", "pool", value="lipp"), "model.pool = 'lipp': must be one of ['lip', 'max', 'avg']"),
    ("use_gpu text", _set("ray", "use_gpu", value="yes"), "ray.use_gpu = 'yes': must be true, false or \"auto\""),
    ("evaluate batch_size quoted", _set("evaluate", "batch_size", value="64"),
     "evaluate.batch_size = '64': must be an integer >= 1"),
    ("mlflow experiment missing", _set("mlflow", value={}),
     "mlflow.experiment is required: must be an MLflow experiment name"),
    ("top-level scalar", "hello\n", "the file must be a mapping of sections (datasets, synth, ingest,"),
    ("top-level list", "- model\n- ray\n", "the file must be a mapping of sections"),
    ("synth n text", _set("synth", "rafdb", "n", value="ten"),
     "synth.rafdb.n = 'ten': must be an integer >= 1 (or null: the layout's default size)"),
    ("synth entry empty", _set("synth", "sfew", value=None), "synth.sfew = null: must be a mapping of n, seed"),
    ("unknown key", _set("ingest", "val_fraktion", value=0.1),
     "unknown key(s) ['val_fraktion'] in 'ingest'; known: ['max_bad_fraction', 'seed', 'val_fraction', 'workers']"),
    ("unknown synth key", _set("synth", "rafdb", "size", value=3), "unknown key(s) ['size'] in 'synth.rafdb'"),
    ("unknown section", _set("evalute", value={"batch_size": 64}), "unknown section(s) ['evalute']; known: ["),
    ("model key in a training section", _set("train_rafdb", "dropout", value=0.2),
     "unknown key(s) ['dropout'] in 'train_rafdb'; known: ['amp', 'batch_size',"),
    ("lr quoted", _set("train_rafdb", "lr", value="0.01"),
     "train_rafdb.lr = '0.01': must be > 0 (a number, not a string)"),
    ("crop range", _set("train_rafdb", "crop", value=300), "train_rafdb.crop = 300: must be an integer in 48..224"),
    ("crop over image_size", _set("finetune_sfew", "crop", value=120),
     "finetune_sfew.crop = 120: is larger than image_size="),  # params.yaml's size (56)
    ("image_size float", _set("train_rafdb", "image_size", value=100.0),
     "train_rafdb.image_size = 100.0: must be null (native) or an integer >= 48 (an integer, not a float)"),
    ("optimizer typo", _set("finetune_sfew", "optimizer", value="adam"),
     "finetune_sfew.optimizer = 'adam': must be one of ['sgd', 'adamw']"),
    ("too many workers", _set("ray", "num_workers", value=32),
     "train_rafdb.batch_size = 32: leaves fewer than 2 images per worker for num_workers=32"),
    ("tune not a mapping", _set("tune", value=5), "tune = 5: must be a mapping"),
    ("tune samples quoted", _set("tune", "num_samples", value="8"),
     "tune.num_samples = '8': must be an integer >= 1 (an integer, not a string)"),
    ("tune key typo", _set("tune", "samples", value=8), "unknown key(s) ['samples'] in 'tune'"),
    ("tune without space", _set("tune", "space", delete=True), "tune.space is required: must be a non-empty mapping"),
    ("tune name with a slash", _set("tune", "name", value="a/b"),
     "tune.name = 'a/b': must be null or a name of letters, digits"),
    ("tune space key not tunable", _set("tune", "space", value={"data": {"choice": ["a"]}}),
     "tune.space: 'data' cannot be tuned; tunable keys: "),
    ("tune loguniform from 0", _set("tune", "space", value={"lr": {"loguniform": [0, 1]}}),
     "tune.space.lr.loguniform = [0, 1]: needs low > 0"),
    ("tune grace over budget", _set("tune", "grace_period", value=99), "tune.grace_period = 99: exceeds max_epochs="),
    ("imagenet pretrain without data", _set("imagenet_init", "mode", value="pretrain"),
     "imagenet_init.mode = pretrain: set imagenet_init.data to the parquet folder"),
    ("broken YAML", "model: [1, 2\n", "is not valid YAML: line 2, column 1: "),
]


@pytest.mark.parametrize("edit,expected", [pytest.param(e, m, id=c) for c, e, m in BAD])
def test_bad_params_give_one_line(tmp_path, edit, expected):
    f = tmp_path / "params.yaml"
    if isinstance(edit, str):
        f.write_text(edit)
    else:
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        edit(params)
        f.write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(FerError) as e:
        load_params(f)
    message = str(e.value)
    assert expected in message, message
    assert message.startswith(str(f)) and "\n" not in message


def test_all_problems_in_one_line(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"]["seed"] = "abc"
    params["evaluate"]["num_workers"] = 0
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(params))
    with pytest.raises(FerError, match=r"ingest.seed = 'abc': .*; evaluate.num_workers = 0: must be an integer >= 1"):
        load_params(f)


def test_partial_files_and_ints_for_floats_are_fine(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("ingest: {val_fraction: 0, seed: 1, max_bad_fraction: 1}\nmodel: {width: 1}\n")
    assert load_params(f) == {"ingest": {"val_fraction": 0, "seed": 1, "max_bad_fraction": 1},
                              "model": {"width": 1}}
    f.write_text("")
    assert load_params(f) == {}
