"""`--detector blazeface` (the default): MediaPipe's BlazeFace model shipped in the package and run
by onnxruntime, on synthetic faces with known landmarks (pipeline.infer.facebench): the face and
its eyes are found, tilted and small faces in large photos too, nothing in clutter or grey."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.infer import align as A
from pipeline.infer import blazeface as B
from pipeline.infer import faces as F
from pipeline.infer.facebench import _background, face_transform, paste, scene, synthetic_landmarks


def _photo(size, scale, angle, centre, label=3, index=4):
    face, pts = synthetic_landmarks(label, seed=0, index=index)
    m = face_transform(scale, angle, centre)
    return paste(_background(np.random.default_rng(5), *size), face, m), A.transform_points(m, pts)


def test_model_ships_with_the_package_and_its_licence():
    assert B.MODEL.is_file() and B.MODEL.stat().st_size < 1_500_000
    assert "Apache License" in (B.MODEL.parent / "LICENSE-blazeface.txt").read_text()
    assert B.anchors().shape == (2304, 2) and B.anchors().min() > 0 and B.anchors().max() < 1
    sess = B._session()
    assert sess.get_inputs()[0].shape == [1, 3, B.INPUT, B.INPUT]


@pytest.mark.parametrize("angle", [0, -25])
def test_finds_the_face_and_its_eyes(angle):
    img, gt = _photo((480, 360), 1.3, angle, (260, 190), index=2)
    raw = B.detect(img)
    assert len(raw) == 1 and raw[0]["keypoints"].shape == (6, 2) and raw[0]["score"] > B.MIN_SCORE
    iod = np.linalg.norm(gt[1] - gt[0])
    x, y, w, h = raw[0]["box"]
    assert x < gt[:, 0].min() and gt[:, 0].max() < x + w and y < gt[:, 1].min() and gt[:, 1].max() < y + h
    assert np.linalg.norm(raw[0]["landmarks"] - gt[:2], axis=1).max() < 0.25 * iod  # eye region
    refined = F.locate_blazeface(img)
    assert np.linalg.norm(refined[0]["landmarks"] - gt[:2], axis=1).max() < 0.08 * iod  # pupils
    faces = F.find_faces(img, align="eyes", size=56)
    assert faces[0].detected and faces[0].aligned == "eyes" and faces[0].angle == pytest.approx(angle, abs=4)


def test_small_face_in_a_large_photo_is_found_in_tiles():
    img, gt = _photo((1600, 1200), 0.9, 10, (1100, 300))
    assert B.detect(img, tiles=False) == []  # ~15 px in the 192-pixel view of the whole
    found = B.detect(img)
    assert len(found) == 1
    assert np.linalg.norm(found[0]["landmarks"] - gt[:2], axis=1).max() < 0.25 * np.linalg.norm(gt[1] - gt[0])


def test_nothing_in_grey_or_clutter():
    assert B.detect(np.full((240, 320, 3), 128, np.uint8)) == []
    assert B.detect(np.full((50, 40), 30, np.uint8)) == []  # grayscale, smaller than the input
    for i in range(3):
        img, _ = scene(10_000 + i, face=False)
        assert B.detect(img) == []
    found = F.find_faces(np.full((120, 90, 3), 128, np.uint8), align="none")
    assert len(found) == 1 and not found[0].detected


def test_weighted_nms_merges_overlaps():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], float)
    kps = np.zeros((3, 6, 2))
    kps[1] += 2.0
    out = B.weighted_nms(boxes, kps, np.array([0.9, 0.6, 0.8]))
    assert len(out) == 2 and out[0][2] == pytest.approx(0.9) and out[1][2] == pytest.approx(0.8)
    assert out[0][0] == pytest.approx([0.4, 0.4, 10.4, 10.4])  # score-weighted mean
    assert out[0][1][0, 0] == pytest.approx(0.8)
