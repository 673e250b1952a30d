"""Face alignment: the canonical template matches the synthetic faces' geometry, the similarity
fit, and a face rotated by 20 degrees and shifted gives (nearly) the same aligned crop and
prediction as the upright one (real JPEGs, the real detector), unlike the square crop."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.infer import align as A
from pipeline.infer import faces as F
from pipeline.infer.cli import read_photo
from pipeline.infer.facebench import _background, face_transform, paste, synthetic_landmarks
from pipeline.infer.predictor import Predictor

from test_evaluate import make_assets


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    assets = make_assets(tmp_path_factory.getbasetemp() / "tiny_assets")
    return Predictor(assets["checkpoint"], device="cpu")


def _photo(tmp_path, name, face, scale, angle, centre):
    """A real JPEG on disk: the face pasted into a cluttered 480x360 photo; read back by the
    project's decoder. Returns (rgb, true five points in the photo)."""
    img = paste(_background(np.random.default_rng(3), 480, 360), face[0], face_transform(scale, angle, centre))
    path = tmp_path / name
    Image.fromarray(img).save(path, quality=95)
    return read_photo(str(path)), A.transform_points(face_transform(scale, angle, centre), face[1])


def test_template_is_the_synthetic_faces_geometry():
    pts = np.array([synthetic_landmarks(i % 7, seed=0, index=i)[1] for i in range(70)])
    mean = pts.mean(0)
    assert np.abs(mean - A.TEMPLATE_100).max() < 1.0, mean
    # symmetric about the image centre, eyes level
    t = A.TEMPLATE_100
    assert t[0, 1] == t[1, 1] and t[0, 0] + t[1, 0] == pytest.approx(99.0)
    assert A.template(100)[0] == pytest.approx(t[0])
    assert A.template(56)[0] == pytest.approx((t[0] + 0.5) * 0.56 - 0.5)


def test_similarity_fit():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    m_true = face_transform(1.7, 23.0, (300, 200))
    got = A.similarity(src, A.transform_points(m_true, src))
    assert got == pytest.approx(m_true, abs=1e-9)
    two = A.similarity(src[:2], A.template(100, A.EYES))  # exact with two points
    assert A.transform_points(two, src[:2]) == pytest.approx(A.template(100, A.EYES), abs=1e-9)
    assert A.transform_points(A.invert(got), A.transform_points(got, src)) == pytest.approx(src)
    with pytest.raises(ValueError):
        A.similarity(np.zeros((2, 2)), np.ones((2, 2)))


def test_true_landmarks_undo_rotation_and_shift(tmp_path):
    """With the exact landmarks, upright and rotated+shifted photos align to the same crop."""
    face = synthetic_landmarks(3, seed=0, index=2)
    a, la = _photo(tmp_path, "up.jpg", face, 1.3, 0, (200, 170))
    b, lb = _photo(tmp_path, "rot.jpg", face, 1.3, 20, (270, 200))
    ca, cb = A.align(a, la, 100), A.align(b, lb, 100)
    assert _diff(ca, cb) < 4.0
    # the five points land on the template (least squares: within this face's own variation)
    m = A.alignment_matrix(lb, 100)
    assert np.abs(A.transform_points(m, lb) - A.TEMPLATE_100).max() < 4.0


def _diff(x, y):
    """Mean |pixel difference| over the face (the crops' centre: the photo around the pasted
    face differs between the two photos, the face should not)."""
    n = x.shape[0]
    c = (slice(int(0.2 * n), int(0.85 * n)), slice(int(0.2 * n), int(0.8 * n)))
    return float(np.abs(x[c].astype(int) - y[c].astype(int)).mean())


@pytest.mark.parametrize("detector", F.DETECTORS)
@pytest.mark.parametrize("index,label,scale", [(2, 2, 1.3), (20, 6, 1.6)])
def test_rotated_face_same_aligned_crop_and_prediction(tmp_path, predictor, index, label, scale, detector):
    face = synthetic_landmarks(label, seed=0, index=index)
    a, la = _photo(tmp_path, "up.jpg", face, scale, 0, (200, 170))
    b, lb = _photo(tmp_path, "rot.jpg", face, scale, 20, (270, 200))
    size = predictor.image_size
    fa = F.find_faces(a, align="eyes", size=size, detector=detector)
    fb = F.find_faces(b, align="eyes", size=size, detector=detector)
    assert len(fa) == len(fb) == 1 and fa[0].aligned == fb[0].aligned == "eyes"
    assert fb[0].angle == pytest.approx(20, abs=6)  # the eye line's tilt, measured
    # the found eyes are near the true ones (an eighth of the eye distance)
    iod = np.linalg.norm(lb[1] - lb[0])
    err = np.linalg.norm(np.array(fb[0].landmarks) - lb[:2], axis=1).max() / iod
    assert err < 0.12, err
    aligned = _diff(fa[0].image, fb[0].image)
    na = F.find_faces(a, align="none", detector=detector)
    nb = F.find_faces(b, align="none", detector=detector)
    from pipeline.infer.predictor import to_model_input

    sq = _diff(to_model_input(na[0].image, size), to_model_input(nb[0].image, size))
    pa, pb = predictor.probabilities([fa[0].image, fb[0].image]).numpy()
    qa, qb = predictor.probabilities([na[0].image, nb[0].image]).numpy()
    print(f"\n{detector} face {index}: eye error {err:.3f} eye distances; mean |pixel diff| "
          f"upright vs rotated 20 deg + shifted: aligned {aligned:.1f}, "
          f"square crop {sq:.1f}; max |prob diff| aligned {np.abs(pa - pb).max():.4f}, "
          f"square crop {np.abs(qa - qb).max():.4f}")
    assert aligned < 8.0 and aligned < 0.5 * sq
    # the tiny test model's probabilities are close to uniform, so compare them, not only labels
    assert np.abs(pa - pb).max() < 0.005 and np.abs(pa - pb).max() < 0.5 * np.abs(qa - qb).max()
    top2 = np.sort(pa)[-2:]
    if top2[1] - top2[0] > 2 * np.abs(pa - pb).max():
        assert pa.argmax() == pb.argmax()


def test_eyes_mode_finds_no_face_in_clutter_and_falls_back():
    img = _background(np.random.default_rng(7), 320, 240)
    found = F.find_faces(img, align="eyes", size=56)
    assert len(found) == 1 and not found[0].detected and found[0].image.shape == img.shape
    with pytest.raises(Exception, match="--align"):
        F.find_faces(img, align="sideways", size=56)


def test_landmarks_mode_without_its_package_is_one_line(monkeypatch):
    from pipeline.errors import FerError
    from pipeline.infer import landmarks as L

    if L.available():
        pytest.skip("the MTCNN package is installed here")
    with pytest.raises(FerError, match="pip install faceie"):
        F.find_faces(np.zeros((60, 60, 3), np.uint8), align="landmarks", size=56)


def test_jpeg_roundtrip_keeps_alignment(tmp_path):
    """The aligned crop of a decoded JPEG is what the model gets: uint8, size x size x 3."""
    face = synthetic_landmarks(0, seed=0, index=2)
    a, _ = _photo(tmp_path, "p.jpg", face, 1.3, 0, (200, 170))
    f = F.find_faces(a, align="eyes", size=56)[0]
    assert f.image.dtype == np.uint8 and f.image.shape == (56, 56, 3)
    buf = io.BytesIO()
    Image.fromarray(f.image).save(buf, format="PNG")
    assert buf.tell() > 0
