"""`fer export --onnx`: the exported ten-crop graph run by onnxruntime matches PyTorch (1e-4)
on every model variant, with a dynamic batch axis; `fer predict --model model.onnx`."""
from __future__ import annotations

import argparse
import os
import stat
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from pipeline.cli import main  # noqa: E402
from pipeline.data.classes import CLASSES  # noqa: E402
from pipeline.data.synthetic import render  # noqa: E402
from pipeline.errors import FerError  # noqa: E402
from pipeline.infer.cli import add_predict_arguments, predict_command  # noqa: E402
from pipeline.infer.export import OnnxPredictor, export_onnx  # noqa: E402
from pipeline.infer.predictor import Predictor, decode_image  # noqa: E402

from test_evaluate import make_assets  # noqa: E402

VARIANTS = [(p, h, a) for p in ("lip", "max") for h in ("conv", "fc") for a in ("eca", "none")]


def _faces(n=5):
    rng = np.random.default_rng(0)
    out = [decode_image(render(k % 7, "rafdb", seed=7, index=k)) for k in range(2)]
    return out + list(rng.integers(0, 256, (n - 2, 56, 56, 3), dtype=np.uint8))


def _check(pool, head, attention, tmp_path):
    from pipeline.model import lip_vgg16

    torch.manual_seed(0)
    model = lip_vgg16(pool=pool, head=head, attention=attention, width=0.0625)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    meta = {"classes": list(CLASSES), "crop": 48, "image_size": 56, "model_config": model.config}
    pt = Predictor((model, meta), device="cpu")
    path = export_onnx(pt, tmp_path / f"{pool}-{head}-{attention}.onnx")
    ox = OnnxPredictor(path)
    assert ox.classes == list(CLASSES) and ox.image_size == 56 and ox.crop == 48
    faces = _faces(5)
    ref = pt.probabilities(faces).numpy()
    got = ox.probabilities(faces)
    assert np.abs(ref - got).max() < 1e-4
    assert np.abs(ox.probabilities(faces[:1]) - ref[:1]).max() < 1e-4  # batch 1: dynamic axis
    # the export left evaluation's eager path intact (normalize's cached constants)
    assert np.abs(pt.probabilities(faces).numpy() - ref).max() == 0


@pytest.mark.slow  # ~10-35 s per variant on 2 cores (torch.export)
@pytest.mark.parametrize("pool,head,attention", VARIANTS)
def test_onnx_matches_torch_every_variant(pool, head, attention, tmp_path):
    _check(pool, head, attention, tmp_path)


def test_fer_export_and_predict_with_onnx(tmp_path_factory, tmp_path, capsys):
    assets = make_assets(tmp_path_factory.getbasetemp() / "tiny_assets")
    out = tmp_path / "m.onnx"
    assert main(["export", "--onnx", str(out), "--model", str(assets["checkpoint"])]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # the user's normal mode, not mkstemp's 0600
    face = tmp_path / "face.jpg"
    face.write_bytes(render(3, "rafdb", seed=7, index=1))
    args = add_predict_arguments(argparse.ArgumentParser()).parse_args(
        [str(face), "--model", str(out), "--json", "--align", "none"])
    predict_command(args)
    onnx_res = json.loads(capsys.readouterr().out)
    args = add_predict_arguments(argparse.ArgumentParser()).parse_args(
        [str(face), "--model", str(assets["checkpoint"]), "--json", "--align", "none", "--device", "cpu"])
    predict_command(args)
    torch_res = json.loads(capsys.readouterr().out)
    a, b = onnx_res[0]["faces"][0]["probabilities"], torch_res[0]["faces"][0]["probabilities"]
    assert max(abs(a[k] - b[k]) for k in CLASSES) < 1e-4
    not_onnx = tmp_path / "x.onnx"
    not_onnx.write_bytes(b"garbage")
    with pytest.raises(FerError, match="not a loadable ONNX model"):
        OnnxPredictor(not_onnx)
