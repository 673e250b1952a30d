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
    found = F.find_faces(img, margin=0.25, detector="haar")
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


@pytest.mark.parametrize("pool", ["lip", "max"])
@pytest.mark.parametrize("head", ["conv", "fc"])
@pytest.mark.parametrize("attention", ["eca", "none"])
def test_batch_size_independence(pool, head, attention):
    """A face predicted alone and inside a batch of 32 gives the same probabilities (eval mode:
    BatchNorm running statistics, LIP's InstanceNorm and ECA are per-sample)."""
    from pipeline.model import lip_vgg16

    torch.manual_seed(0)
    model = lip_vgg16(pool=pool, head=head, attention=attention, width=0.0625)
    for m in model.modules():  # non-trivial running statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    meta = {"classes": list(CLASSES), "crop": 48, "image_size": 56, "model_config": model.config}
    p = Predictor((model, meta), device="cpu", batch_size=32)
    faces = list(np.random.default_rng(1).integers(0, 256, (32, 56, 56, 3), dtype=np.uint8))
    faces[5] = decode_image(render(3, "rafdb", seed=7, index=1))  # a face among noise
    batch = p.probabilities(faces)
    for i in (0, 5, 31):
        alone = p.probabilities([faces[i]])
        assert torch.allclose(alone[0], batch[i], atol=1e-5, rtol=0), (i, (alone[0] - batch[i]).abs().max())
    assert not model.training


def test_predict_command_annotate_and_json_landmarks(assets, tmp_path, capsys):
    """--annotate writes the picture with boxes and labels; --json keeps boxes, landmarks, all
    seven probabilities and how each face was aligned."""
    from pipeline.infer.facebench import _background, face_transform, paste, synthetic_landmarks

    face, _ = synthetic_landmarks(2, seed=0, index=2)
    img = paste(_background(np.random.default_rng(3), 480, 360), face, face_transform(1.3, 20, (270, 200)))
    photo = tmp_path / "photo.jpg"
    Image.fromarray(img).save(photo, quality=95)
    out = tmp_path / "out" / "annotated.jpg"
    predict_command(_args(str(photo), "--model", str(assets["checkpoint"]), "--device", "cpu",
                          "--json", "--annotate", str(out)))
    data = json.loads(capsys.readouterr().out)
    f = data[0]["faces"][0]
    assert f["detected"] and f["aligned"] == "eyes" and len(f["landmarks"]) == 2
    assert list(f["probabilities"]) == list(CLASSES) and len(f["box"]) == 4
    assert data[0]["annotated"] == str(out)
    drawn = np.asarray(Image.open(out).convert("RGB"))
    assert drawn.shape == img.shape
    x, y, w, h = f["box"]
    ring = np.abs(drawn.astype(int) - img.astype(int)).sum(-1)
    assert ring[y:y + h, x].mean() > 30  # the box's left edge is drawn
    assert ring[max(y - 20, 0):y, x:x + w].mean() > 10  # the caption above it
    # several photos: --annotate names a folder (same names in two folders: numbered)
    (tmp_path / "b").mkdir()
    other = tmp_path / "b" / "photo.jpg"
    other.write_bytes(photo.read_bytes())
    predict_command(_args(str(photo), str(other), "--model", str(assets["checkpoint"]), "--device", "cpu",
                          "--annotate", str(tmp_path / "many"), "--align", "none"))
    text = capsys.readouterr().out
    assert "annotated picture:" in text
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["photo_annotated.jpg", "photo_annotated_2.jpg"]
