"""Expressions in videos and on a camera: ``fer predict clip.mp4 [--every N] [--annotate out.mp4]``.

Frames are read with OpenCV's ``VideoCapture`` (the formats its bundled FFmpeg reads: MP4,
AVI, MOV, MKV, WebM, ...), converted to RGB, and every N-th one goes through the same face
finding, alignment and Predictor as a photo. Output: JSON lines on stdout, one per face per
analysed frame::

    {"frame": 12, "time": 0.4, "face": 0, "box": [x, y, w, h], "landmarks": [[x, y], ...],
     "aligned": "eyes", "label": "happiness", "probabilities": {"surprise": 0.01, ...}}

and one line with ``"face": null`` (box, label and probabilities null) for an analysed frame
with no face, so every analysed frame is accounted for. A progress bar goes to stderr. With
``--smooth A`` each face's probabilities are averaged exponentially with those of the nearest
face of the previous analysed frame (``p = A * previous + (1 - A) * current``, matched by box
centre); ``--annotate out.mp4`` writes every frame with the latest boxes drawn.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from pipeline.errors import FerError


def _open(source):
    import cv2

    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        what = f"camera {source}" if isinstance(source, int) else str(source)
        raise FerError(f"{what}: cannot open it as a video (OpenCV VideoCapture)")
    return cap


def _smooth(records: list[dict], previous: list[dict], alpha: float) -> None:
    """Blend each face's probabilities with the nearest previous face (box centre within half
    the box size); relabel from the blend."""
    for r in records:
        x, y, w, h = r["box"]
        c = np.array([x + w / 2, y + h / 2])
        best, dist = None, 0.5 * max(w, h)
        for q in previous:
            qx, qy, qw, qh = q["box"]
            d = float(np.linalg.norm(c - [qx + qw / 2, qy + qh / 2]))
            if d < dist:
                best, dist = q, d
        if best is not None:
            r["probabilities"] = {k: alpha * best["probabilities"][k] + (1 - alpha) * v
                                  for k, v in r["probabilities"].items()}
            r["label"] = max(r["probabilities"], key=r["probabilities"].get)


def predict_video(source, predictor, *, every: int = 1, align: str = "eyes", margin: float = 0.2,
                  annotate=None, smooth: float = 0.0, out=None, progress: bool = True) -> dict:
    """Run the predictor on a video file or camera index; write JSON lines to ``out``
    (stdout by default). Returns ``{"frames", "analysed", "faces", "seconds", "fps"}``."""
    import cv2

    from pipeline.data._util import Progress
    from pipeline.infer.cli import predict_image

    if not 0.0 <= smooth < 1.0:
        raise FerError(f"--smooth {smooth}: must be in [0, 1)")
    out = sys.stdout if out is None else out
    cap = _open(source)
    name = f"camera {source}" if isinstance(source, int) else str(source)
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    if not np.isfinite(fps) or fps <= 0:
        fps = 30.0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if not isinstance(source, int) else 0
    bar = Progress(max(total, 0), f"fer predict {name}", enabled=progress, unit="frames")
    writer = None
    drawn: list[dict] = []
    previous: list[dict] = []
    frames = analysed = n_faces = 0
    t0 = time.perf_counter()
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            i = frames
            frames += 1
            if i % every == 0:
                analysed += 1
                _, records = predict_image(rgb, predictor, margin=margin, align=align)
                records = [r for r in records if r["detected"]]
                if smooth > 0:
                    _smooth(records, previous, smooth)
                previous = records
                t = round(i / fps, 4)
                for k, r in enumerate(records):
                    out.write(json.dumps({"frame": i, "time": t, "face": k, **{
                        key: r[key] for key in ("box", "landmarks", "aligned", "label", "probabilities")}}) + "\n")
                if not records:
                    out.write(json.dumps({"frame": i, "time": t, "face": None, "box": None,
                                          "landmarks": None, "aligned": None, "label": None,
                                          "probabilities": None}) + "\n")
                n_faces += len(records)
                drawn = records
            if annotate is not None:
                from pipeline.infer.annotate import draw

                if writer is None:
                    writer = _writer(annotate, fps, rgb.shape)
                writer.write(cv2.cvtColor(draw(rgb, drawn), cv2.COLOR_RGB2BGR))
            if total:
                bar.update()
    except KeyboardInterrupt:
        if not isinstance(source, int):
            raise
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    if total:
        bar.total = frames
        bar.close()
    if frames == 0:
        raise FerError(f"{name}: no frame could be read (not a video, or a codec OpenCV lacks)")
    secs = time.perf_counter() - t0
    summary = {"frames": frames, "analysed": analysed, "faces": n_faces, "seconds": round(secs, 3),
               "fps": round(frames / secs, 2) if secs > 0 else None}
    if progress:
        print(f"fer predict {name}: {frames} frames, {analysed} analysed, {n_faces} faces, "
              f"{summary['fps']} frames/s" + (f"; annotated video: {annotate}" if annotate else ""),
              file=sys.stderr)
    out.flush()
    return summary


def _writer(path, fps: float, shape):
    import cv2

    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    h, w = shape[:2]
    wr = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not wr.isOpened():
        raise FerError(f"cannot write the annotated video {path} (OpenCV's mp4v encoder)")
    return wr
