"""`fer predict clip.mp4`: a real MP4 written here from synthetic faces (with frames that have
no face), read by OpenCV, JSON lines per face per analysed frame, --every, --annotate."""
from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest

from pipeline.data.classes import CLASSES
from pipeline.errors import FerError
from pipeline.infer.cli import add_predict_arguments, predict_command
from pipeline.infer.facebench import _background, face_transform, paste, synthetic_landmarks
from pipeline.infer.predictor import Predictor
from pipeline.infer.video import predict_video

from test_evaluate import make_assets

FRAMES, FACE_FRAMES = 12, range(0, 8)  # faces in frames 0..7, none in 8..11


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.getbasetemp() / "tiny_assets")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 320x240 MP4 at 10 frames/s: a synthetic face drifting and turning, then frames with no
    face (flat grey: the cluttered background alone can give the cascade a false find)."""
    import cv2

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    face, _ = synthetic_landmarks(2, seed=0, index=2)
    bg = _background(np.random.default_rng(3), 320, 240)
    wr = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (320, 240))
    assert wr.isOpened()
    for i in range(FRAMES):
        img = (paste(bg.copy(), face, face_transform(1.2, 2 * i, (150 + 3 * i, 120))) if i in FACE_FRAMES
               else np.full_like(bg, 128))
        wr.write(cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    wr.release()
    return path


def _args(*argv):
    return add_predict_arguments(argparse.ArgumentParser(prog="fer predict")).parse_args(list(argv))


def test_video_json_lines(clip, assets, capsys):
    predict_command(_args(str(clip), "--model", str(assets["checkpoint"]), "--device", "cpu"))
    cap = capsys.readouterr()
    rows = [json.loads(line) for line in cap.out.splitlines()]
    frames = sorted({r["frame"] for r in rows})
    assert frames == list(range(FRAMES))  # every frame accounted for
    with_face = {r["frame"] for r in rows if r["face"] is not None}
    assert with_face <= set(FACE_FRAMES) and len(with_face) >= len(FACE_FRAMES) - 2
    for r in rows:
        assert r["time"] == pytest.approx(r["frame"] / 10.0, abs=1e-3)
        if r["face"] is None:
            assert r["box"] is None and r["label"] is None and r["probabilities"] is None
        else:
            assert len(r["box"]) == 4 and r["label"] in CLASSES
            assert list(r["probabilities"]) == list(CLASSES)
            assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert all(r["face"] is None for r in rows if r["frame"] not in FACE_FRAMES)
    assert "frames/s" in cap.err and f"{FRAMES} frames" in cap.err


def test_video_every_and_annotate(clip, assets, tmp_path):
    import cv2

    out, ann = io.StringIO(), tmp_path / "annotated.mp4"
    p = Predictor(assets["checkpoint"], device="cpu")
    summary = predict_video(str(clip), p, every=3, annotate=ann, out=out, progress=False, smooth=0.5)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert sorted({r["frame"] for r in rows}) == [0, 3, 6, 9]
    assert summary["frames"] == FRAMES and summary["analysed"] == 4 and summary["fps"] > 0
    cap = cv2.VideoCapture(str(ann))
    n, first = 0, None
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        first = frame if first is None else first
        n += 1
    assert n == FRAMES and first.shape == (240, 320, 3)


def test_video_errors(tmp_path, assets):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    p = Predictor(assets["checkpoint"], device="cpu")
    with pytest.raises(FerError, match="broken.mp4"):
        predict_video(str(bad), p, out=io.StringIO(), progress=False)
    with pytest.raises(FerError, match="--every"):
        predict_command(_args(str(bad), "--every", "0"))
    with pytest.raises(FerError, match="--camera"):
        predict_command(_args(str(bad), "--camera", "0"))


def test_camera_path_on_a_video_file(clip, assets, capsys):
    """`--camera SOURCE` runs the live-camera code (no frame count, Ctrl-C stops) on any capture
    source: here the real MP4, so the camera path is exercised without a camera."""
    predict_command(_args("--camera", str(clip), "--model", str(assets["checkpoint"]),
                          "--device", "cpu", "--every", "4", "--align", "none"))
    cap = capsys.readouterr()
    rows = [json.loads(line) for line in cap.out.splitlines()]
    assert sorted({r["frame"] for r in rows}) == [0, 4, 8]
    assert all(r["label"] in CLASSES for r in rows if r["face"] is not None)
    assert f"camera {clip}: {FRAMES} frames, 3 analysed" in cap.err


def test_no_camera_is_one_line(tmp_path, assets):
    """A camera index with no device: one line naming it, before the model is loaded."""
    import sys

    from pipeline.infer.video import camera_source, open_capture

    if sys.platform.startswith("linux"):
        import os

        index = next(i for i in range(10, 64) if not os.path.exists(f"/dev/video{i}"))
        with pytest.raises(FerError, match=f"camera {index}: no such camera") as e:
            predict_command(_args("--camera", str(index), "--model", str(tmp_path / "never-loaded.pt")))
        assert "\n" not in str(e.value)
    with pytest.raises(FerError, match="no such file or device"):
        open_capture(str(tmp_path / "absent.mp4"), live=True)
    with pytest.raises(FerError, match="--camera"):
        camera_source("-1")
    assert camera_source("2") == 2 and camera_source(str(tmp_path)) == str(tmp_path)
