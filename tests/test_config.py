from pathlib import Path

import pytest

from pipeline.config import load_params
from pipeline.errors import FerError
from pipeline.model import lip_vgg16
from pipeline.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["params.yaml", "params.paper.yaml"])
def test_committed_params_are_valid(name):
    p = load_params(REPO / name)
    for section in ("train_rafdb", "finetune_sfew"):
        cfg = TrainConfig.from_dict({**p["model"], **p["ray"], **p[section], "data": "x"})
        assert cfg.crop <= (cfg.image_size or 100)
    lip_vgg16(7, **p["model"])


def test_paper_params_are_the_paper_setup():
    p = load_params(REPO / "params.paper.yaml")
    assert (p["model"]["pool"], p["model"]["head"], p["model"]["attention"], p["model"]["width"]) == \
        ("lip", "conv", "eca", 1.0)
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

    params = {"datasets": {"rafdb": str(tmp_path / "nope"), "sfew": str(tmp_path)}}
    with pytest.raises(FerError, match="EmoLabel/list_patition_label.txt"):
        source_path(params, "rafdb")
    assert source_path(params, "sfew") == tmp_path
