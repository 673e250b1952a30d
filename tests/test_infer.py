"""Inference: predictor (same preprocessing as evaluation), face detection and its fallback,
the pyfunc input forms, and `fer predict` (predict_command) on good and bad inputs."""
from __future__ import annotations

import argparse
import base64
import io
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline import evaluate as E
from pipeline.data.classes import CLASSES
from pipeline.data.loader import load_split
from pipeline.data.synthetic import render
from pipeline.errors import FerError
from pipeline.infer import faces as F
from pipeline.infer.cli import add_predict_arguments, predict_command
from pipeline.infer.predictor import Predictor, decode_image

from test_evaluate import IMAGE_SIZE, make_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.getbasetemp() / "tiny_assets")


@pytest.fixture(scope="module")
def predictor(assets):
    return Predictor(assets["checkpoint"], device="cpu")


def _args(*argv):
    return add_predict_arguments(argparse.ArgumentParser(prog="fer predict")).parse_args(list(argv))


def test_predictor_matches_evaluation_on_parquet_bytes(assets, predictor):
    """Raw encoded test images through the predictor == evaluation's tensors through ten-crop."""
    blobs = pq.read_table(assets["parquet"] / "test.parquet", columns=["image"]).column("image").to_pylist()[:5]
    x, _ = load_split(assets["parquet"], "test", size=IMAGE_SIZE)
    ref, _ = E.ten_crop_probabilities(predictor.model, x[:5], predictor.crop)
    got = predictor.probabilities(blobs)
    assert torch.allclose(got, ref, atol=1e-6)


def test_predictor_on_a_synthetic_face(predictor):
    jpeg = render(3, "rafdb", seed=7, index=1)
    arr = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    res = predictor.predict_faces([jpeg, arr, arr[:, :, 0]])  # bytes, RGB, grayscale
    assert len(res) == 3
    for r in res:
        assert r["label"] in CLASSES and list(r["probabilities"]) == list(CLASSES)
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
    assert res[0]["probabilities"] == pytest.approx(res[1]["probabilities"], abs=1e-6)
    # a face of another size is resized to the checkpoint's image size first
    big = np.asarray(Image.fromarray(arr).resize((160, 160)))
    assert predictor.predict_faces([big])[0]["label"] in CLASSES
    with pytest.raises(FerError, match="not an image"):
        predictor.predict_faces([b"definitely not an image"])
    same = Predictor((predictor.model, predictor.meta), device="cpu").predict_faces([jpeg])
    assert same[0]["probabilities"] == pytest.approx(res[0]["probabilities"], abs=1e-6)


def test_pyfunc_input_forms(predictor):
    from pipeline.infer.pyfunc import FerPyfunc, to_images

    jpeg = render(0, "rafdb", seed=7, index=2)
    arr = decode_image(jpeg)
    m = FerPyfunc()
    m.predictor = predictor
    ref = m.predict(None, pd.DataFrame({"image": [jpeg]}))
    assert list(ref.columns) == ["label", *CLASSES]
    for inp in ([arr], arr, np.stack([arr, arr]), pd.DataFrame({"image": [base64.b64encode(jpeg).decode()]})):
        out = m.predict(None, inp)
        np.testing.assert_allclose(out[list(CLASSES)].to_numpy()[:1], ref[list(CLASSES)].to_numpy(), atol=1e-6)
    assert len(to_images(np.stack([arr, arr, arr]))) == 3
    assert m.predict(None, pd.DataFrame({"image": []})).empty


def test_face_detector_loads():
    assert not F._cascade().empty()


def test_no_face_falls_back_to_whole_image():
    gray = np.full((120, 90, 3), 128, np.uint8)
    found = F.find_faces(gray)
    assert len(found) == 1 and found[0].detected is False
    assert found[0].box == (0, 0, 90, 120) and found[0].image.shape == (120, 90, 3)


def test_detected_face_is_cropped_square_with_margin(monkeypatch):
    img = np.zeros((200, 300, 3), np.uint8)
    monkeypatch.setattr(F, "detect", lambda image, **kw: [(100, 50, 60, 60), (0, 0, 40, 40)])
    found = F.find_faces(img, margin=0.25)
    assert [f.detected for f in found] == [True, True]
    assert found[0].box == (85, 35, 90, 90) and found[0].image.shape == (90, 90, 3)
    assert found[1].box == (0, 0, 60, 60)  # clipped at the image border, still square
    assert F.square_with_margin((250, 150, 80, 80), 200, 300, 0.5) == (140, 40, 160, 160)


def test_predict_command_text_and_json(assets, tmp_path, capsys):
    photo = tmp_path / "blank.png"
    Image.fromarray(np.full((100, 100, 3), 200, np.uint8)).save(photo)
    face = tmp_path / "face.jpg"
    face.write_bytes(render(3, "rafdb", seed=7, index=1))
    predict_command(_args(str(photo), str(face), "--model", str(assets["checkpoint"]), "--device", "cpu"))
    out = capsys.readouterr().out
    assert f"{photo}: no face found, using the whole image" in out
    assert str(face) in out and any(c in out for c in CLASSES)
    predict_command(_args(str(photo), "--model", str(assets["checkpoint"]), "--json", "--device", "cpu"))
    data = json.loads(capsys.readouterr().out)
    assert data[0]["photo"] == str(photo)
    assert data[0]["faces"][0]["detected"] is False and data[0]["faces"][0]["label"] in CLASSES


def test_predict_command_bad_inputs(assets, tmp_path):
    with pytest.raises(FerError, match="no such file") as e:
        predict_command(_args(str(tmp_path / "missing.jpg"), "--model", str(assets["checkpoint"])))
    assert "\n" not in str(e.value)
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    with pytest.raises(FerError, match="not an image"):
        predict_command(_args(str(text), "--model", str(assets["checkpoint"])))
    good = tmp_path / "g.png"
    Image.fromarray(np.zeros((60, 60, 3), np.uint8)).save(good)
    with pytest.raises(FerError, match="not found"):
        predict_command(_args(str(good), "--model", str(tmp_path / "nope.pt")))


def test_predict_command_registry_default_without_store(tmp_path, monkeypatch):
    """No --model, no models/rafdb/model.pt, no MLflow store: a one-line error, no store created."""
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "store" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    good = tmp_path / "g.png"
    Image.fromarray(np.zeros((60, 60, 3), np.uint8)).save(good)
    with pytest.raises(FerError, match="models:/lip-vgg16-rafdb@champion") as e:
        predict_command(_args(str(good)))
    assert "\n" not in str(e.value) and not db.exists()
