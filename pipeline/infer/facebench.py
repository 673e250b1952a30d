"""Face detectors compared on faces with known landmarks: ``python -m pipeline.infer.facebench``.

Test photos are synthetic faces (:func:`pipeline.data.synthetic.render`, layout ``rafdb``)
pasted into larger cluttered photos, rotated, scaled and shifted; their five landmarks are
known exactly because the drawing is recorded (:func:`synthetic_landmarks`). Each detector
is scored on:

* recall: faces found (a detection whose eye midpoint is within half an eye distance of the
  true one), and false detections on photos with no face;
* landmark error: eye-centre error / true eye distance (normalised mean error, NME), over the
  faces whose eyes the detector located (not those aligned from the box alone);
* aligned error: the true eyes of the aligned crop against the template, in pixels of a
  100x100 crop (what the model sees), over all faces found;
* speed: milliseconds per photo on this machine.

The detectors: ``blazeface`` (``--detector blazeface``: :mod:`pipeline.infer.blazeface` with
the eyes refined by OpenCV's eye cascades, :func:`pipeline.infer.faces.locate_blazeface`),
``blazeface-raw`` (BlazeFace's own eye points),
``haar-eyes`` (``--detector haar``), ``haar-eyes@0`` (the same without the rotated search), and
any other that :mod:`pipeline.infer.landmarks` can load here.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np


def synthetic_landmarks(label: int, seed: int = 0, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic RAF-DB-layout face (decoded RGB 100x100) and its five points ``[5, 2]``
    (left eye, right eye, nose tip, mouth left, mouth right; pixel centres at integers).

    The drawing is recorded by a painter that keeps every polygon and line it draws; the image
    is the same as ``render``'s. The pupils are the two 10-point black polygons, the nostrils the
    last two other 10-point polygons, the mouth corners the ends of the first 17-point line (the
    upper lip)."""
    from pipeline.data.face_drawing import FacePainter
    from pipeline.data.synthetic import render
    from pipeline.infer.predictor import decode_image

    painters: list = []

    class _Rec(FacePainter):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.polys, self.lines = [], []
            painters.append(self)

        def poly(self, pts, fill):
            self.polys.append((np.asarray(self.px(pts)), fill))
            super().poly(pts, fill)

        def line(self, pts, fill, width):
            self.lines.append((np.asarray(self.px(pts)), fill))
            super().line(pts, fill, width)

    data = render(label, "rafdb", seed, index, painter=_Rec)
    f = painters[0]

    def mid(p):
        return (p.min(0) + p.max(0)) / 2

    eyes = sorted((mid(p) for p, c in f.polys if c == (10, 10, 10) and len(p) == 10), key=lambda e: e[0])[:2]
    nostrils = [p for p, c in f.polys if len(p) == 10 and c != (10, 10, 10)][-2:]
    lip = next(p for p, _ in f.lines if len(p) == 17)
    corners = sorted([lip[0], lip[-1]], key=lambda e: e[0])
    pts = np.array([eyes[0], eyes[1], np.mean([mid(p) for p in nostrils], 0), corners[0], corners[1]])
    return decode_image(data), pts / 2.0 - 0.25  # drawn at 2x, pixel centres


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    import cv2

    c0, c1 = rng.uniform(30, 230, 3), rng.uniform(30, 230, 3)
    t = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    img = (c0 + (c1 - c0) * t) * np.ones((h, 1, 1), np.float32)
    for _ in range(int(rng.integers(3, 9))):  # clutter: boxes and discs
        col = tuple(float(v) for v in rng.uniform(0, 255, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x, y), (x + int(rng.integers(20, w // 3)), y + int(rng.integers(20, h // 3))), col, -1)
        else:
            cv2.circle(img, (x, y), int(rng.integers(8, h // 5)), col, -1)
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def paste(canvas: np.ndarray, face: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``face`` (100x100) warped by ``m`` onto ``canvas`` through a feathered head-shaped mask."""
    import cv2

    fh, fw = face.shape[:2]
    mask = np.zeros((fh, fw), np.float32)
    cv2.ellipse(mask, (fw // 2, fh // 2), (int(fw * 0.46), int(fh * 0.52)), 0, 0, 360, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), 2.0)
    h, w = canvas.shape[:2]
    wf = cv2.warpAffine(face, m, (w, h), flags=cv2.INTER_LINEAR)
    wm = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_LINEAR)[..., None]
    return (canvas * (1 - wm) + wf * wm + 0.5).astype(np.uint8)


def face_transform(scale: float, angle_deg: float, centre) -> np.ndarray:
    """2x3: a 100x100 face's coordinates -> the photo, scaled, rotated by ``angle_deg``
    (positive = clockwise as seen, image y down) about its centre, centre at ``centre``."""
    a = math.radians(angle_deg)
    r = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return np.concatenate([r, (np.asarray(centre, float) - r @ np.array([49.5, 49.5]))[:, None]], 1)


def scene(index: int, *, seed: int = 0, size=(480, 360), max_angle: float = 30.0,
          face: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """A photo with one synthetic face (or none) and that face's five points in the photo."""
    from pipeline.infer.align import transform_points

    rng = np.random.default_rng([seed, 99, index])
    w, h = size
    img = _background(rng, w, h)
    if not face:
        return img, None
    label = int(rng.integers(7))
    fimg, pts = synthetic_landmarks(label, seed=seed + 1000, index=index)
    s = rng.uniform(0.9, 1.7)
    ang = rng.uniform(-max_angle, max_angle)
    half = 55 * s
    c = (rng.uniform(half, w - half), rng.uniform(half, h - half))
    m = face_transform(s, ang, c)
    return paste(img, fimg, m), transform_points(m, pts)


def evaluate(detector, photos, truths) -> dict:
    """Scores of ``detector(image) -> [{"landmarks": [k, 2] (eyes first), "source"}]``."""
    from pipeline.infer.align import alignment_matrix, template, transform_points

    found = fp = located = 0
    nme, aligned_err = [], []
    t0 = time.perf_counter()
    outs = [detector(img) for img in photos]
    ms = (time.perf_counter() - t0) / max(len(photos), 1) * 1000
    n_faces = sum(t is not None for t in truths)
    for out, gt in zip(outs, truths):
        if gt is None:
            fp += len(out)
            continue
        iod = np.linalg.norm(gt[1] - gt[0])
        mid = (gt[0] + gt[1]) / 2
        match = [d for d in out if np.linalg.norm(np.mean(np.asarray(d["landmarks"])[:2], 0) - mid) < 0.5 * iod]
        fp += len(out) - min(len(match), 1)
        if not match:
            continue
        d = match[0]
        lm = np.asarray(d["landmarks"], float)
        found += 1
        if d.get("source") != "box":
            located += 1
            nme.append(np.mean(np.linalg.norm(lm[:2] - gt[:2], axis=1)) / iod)
        m = alignment_matrix(lm[:5] if len(lm) >= 5 else lm[:2], 100)
        aligned_err.append(np.mean(np.linalg.norm(transform_points(m, gt[:2]) - template(100, (0, 1)), axis=1)))
    return {"recall": found / max(n_faces, 1), "eyes_located": located / max(n_faces, 1),
            "false_per_photo": fp / len(photos),
            "eye_nme": float(np.mean(nme)) if nme else None,
            "aligned_eye_err_px": float(np.mean(aligned_err)) if aligned_err else None,
            "ms_per_photo": ms}


def detectors() -> dict:
    from pipeline.infer import blazeface as B
    from pipeline.infer import faces as F
    from pipeline.infer import landmarks as L

    d = {"blazeface": lambda img: F.locate_blazeface(img),
         "blazeface-raw": lambda img: B.detect(img),
         "haar-eyes": lambda img: F.locate(img),
         "haar-eyes@0": lambda img: F.locate(img, angles=(0.0,))}
    for name in L.available():
        d[name] = functools_partial(L.detect_landmarks, backend=name)
    return d


def functools_partial(f, **kw):
    return lambda img: f(img, **kw)


def example_photo(out, *, size=(560, 300)):
    """Write a JPEG with three synthetic faces (happiness, surprise tilted 20 degrees, sadness)
    on a cluttered background: the README's annotated example is ``fer predict`` on it."""
    from pathlib import Path

    w, h = size
    img = _background(np.random.default_rng(11), w, h)
    for k, (label, angle, cx) in enumerate(((3, 0, 0.2), (0, 20, 0.5), (4, -8, 0.8))):
        face, _ = synthetic_landmarks(label, seed=0, index=30 + k)
        img = paste(img, face, face_transform(1.35, angle, (cx * w, 0.55 * h)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray(img).save(out, quality=90)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.infer.facebench", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=60, help="photos with a face (and n/3 without)")
    p.add_argument("--max-angle", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--example", default=None, metavar="OUT.jpg",
                   help="only write the README's example photo (three synthetic faces) and stop")
    a = p.parse_args(argv)
    if a.example:
        print(example_photo(a.example))
        return
    photos, truths = [], []
    for i in range(a.n):
        img, gt = scene(i, seed=a.seed, max_angle=a.max_angle)
        photos.append(img)
        truths.append(gt)
    for i in range(a.n // 3):
        img, _ = scene(10_000 + i, seed=a.seed, face=False)
        photos.append(img)
        truths.append(None)
    for name, det in detectors().items():
        if a.only and name not in a.only:
            continue
        det(photos[0])  # load models outside the timing
        r = evaluate(det, photos, truths)
        print(json.dumps({"detector": name, **{k: (round(v, 4) if isinstance(v, float) else v)
                                                  for k, v in r.items()}}))


if __name__ == "__main__":
    main()
