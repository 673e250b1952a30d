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


def camera_source(value) -> int | str:
    """What ``--camera`` names: an OpenCV device index (``"0"`` -> 0), else a device path, stream
    URL or video file, read the same way (a live source: no frame count, Ctrl-C stops)."""
    if isinstance(value, int) and not isinstance(value, bool):
        source = value
    else:
        text = str(value).strip()
        source = int(text) if text.lstrip("+-").isdigit() else text
    if isinstance(source, int) and source < 0 or source == "":
        raise FerError(f"--camera {value!r}: a device index >= 0, a device path or a video")
    return source


def open_capture(source, *, live: bool = False):
    """An opened ``cv2.VideoCapture`` on a file, a device index or a URL; FerError (one line)
    otherwise. A camera index with no device (``/dev/videoN`` absent on Linux) is refused before
    OpenCV is asked, and OpenCV's own warnings are kept off the console while it tries."""
    import os
    import sys as _sys

    import cv2

    if isinstance(source, int):
        what = f"camera {source}"
        dev = f"/dev/video{source}"
        if _sys.platform.startswith("linux") and not os.path.exists(dev):
            raise FerError(f"{what}: no such camera ({dev} does not exist); "
                           "pass a video file instead, or --camera with another index")
    else:
        what = f"camera {source}" if live else str(source)
        if "://" not in str(source) and not os.path.exists(source):
            raise FerError(f"{what}: no such file or device")
    log = cv2.utils.logging
    level = log.getLogLevel()
    try:
        log.setLogLevel(log.LOG_LEVEL_SILENT)  # the one-line error below says it
        cap = cv2.VideoCapture(source)
    finally:
        log.setLogLevel(level)
    if not cap.isOpened():
        cap.release()
        why = "busy, or no permission" if isinstance(source, int) else "OpenCV VideoCapture"
        raise FerError(f"{what}: cannot open it as a video ({why})")
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
                  detector: str | None = None,
                  annotate=None, smooth: float = 0.0, out=None, progress: bool = True,
                  live: bool | None = None, name: str | None = None) -> dict:
    """Run the predictor on a video file, a camera index or an opened ``cv2.VideoCapture``;
    write JSON lines to ``out`` (stdout by default). ``live`` (default: a camera index) reads
    until the source ends or Ctrl-C, with no frame count. Returns ``{"frames", "analysed",
    "faces", "seconds", "fps"}``."""
    import cv2

    from pipeline.workers import Progress

    if not 0.0 <= smooth < 1.0:
        raise FerError(f"--smooth {smooth}: must be in [0, 1)")
    out = sys.stdout if out is None else out
    if live is None:
        live = isinstance(source, int)
    if hasattr(source, "read") and hasattr(source, "isOpened"):
        cap, name = source, name or "video"
    else:
        cap = open_capture(source, live=live)
        name = name or (f"camera {source}" if isinstance(source, int) else str(source))
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    if not np.isfinite(fps) or fps <= 0:
        fps = 30.0
    total = 0 if live else int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    bar = Progress(max(total, 0), f"fer predict {name}", enabled=progress, unit="frames")
    writer = None
    latest: list[dict] = []  # the last analysed frame's faces: drawn until the next, smoothed against
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
                latest = _analyse_frame(rgb, i, round(i / fps, 4), predictor, latest, out, margin=margin,
                                        align=align, detector=detector, smooth=smooth)
                n_faces += len(latest)
            if annotate is not None:
                from pipeline.infer.annotate import draw

                if writer is None:
                    writer = _writer(annotate, fps, rgb.shape)
                writer.write(cv2.cvtColor(draw(rgb, latest), cv2.COLOR_RGB2BGR))
            if total:
                bar.update()
    except KeyboardInterrupt:
        if not live:
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


def _analyse_frame(rgb: np.ndarray, i: int, t: float, predictor, previous: list[dict], out, *,
                   margin: float, align: str, detector: str | None, smooth: float) -> list[dict]:
    """The faces found in frame ``i`` (at ``t`` s), smoothed against ``previous`` (the last
    analysed frame's), each written as a JSON line; one line with ``"face": null`` when there is
    none, so that every analysed frame is in the output."""
    from pipeline.infer.photo import predict_image

    _, records = predict_image(rgb, predictor, margin=margin, align=align, detector=detector)
    records = [r for r in records if r["detected"]]
    if smooth > 0:
        _smooth(records, previous, smooth)
    for k, r in enumerate(records):
        out.write(json.dumps({"frame": i, "time": t, "face": k, **{
            key: r[key] for key in ("box", "landmarks", "aligned", "label", "probabilities")}}) + "\n")
    if not records:
        out.write(json.dumps({"frame": i, "time": t, "face": None, "box": None, "landmarks": None,
                              "aligned": None, "label": None, "probabilities": None}) + "\n")
    return records


def _writer(path, fps: float, shape):
    import cv2

    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    h, w = shape[:2]
    wr = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    if not wr.isOpened():
        raise FerError(f"cannot write the annotated video {path} (OpenCV's mp4v encoder)")
    return wr
