"""Face alignment: a similarity transform (rotation, uniform scale, shift) that puts a face's
landmarks on the canonical aligned geometry the model was trained on, at its input size.

Canonical geometry
------------------
RAF-DB's "aligned" images are 100x100 crops warped by a similarity transform on five landmarks
(eye centres, nose tip, mouth corners); the dataset does not publish the target points. The
embedded synthetic set (:mod:`pipeline.data.synthetic`, layout ``rafdb``), on which the
project's default models are trained, draws its faces in that aligned framing: the head fills
the frame, eyes level a little above the middle. :data:`TEMPLATE_100` is the mean of its five
points over 700 rendered faces (seed 0, every class; measured by
:func:`pipeline.infer.facebench.synthetic_landmarks`), made left-right symmetric about the
image centre (pixel centres at integer coordinates, so the centre is 49.5):

==============  ================  ========================  ============================
point           TEMPLATE_100      synthetic mean (sd)       ArcFace 112 template x 100/112
==============  ================  ========================  ============================
left eye        (34.3, 42.3)      (34.5, 42.4) (3.1, 2.7)   (34.2, 46.2)
right eye       (64.7, 42.3)      (64.9, 42.2) (3.1, 2.6)   (65.7, 46.0)
nose tip        (49.5, 59.3)      (49.8, 59.3) (2.9, 2.1)   (50.0, 64.1)
mouth left      (38.7, 71.0)      (39.0, 71.0) (4.2, 3.3)   (37.1, 82.5)
mouth right     (60.3, 71.0)      (60.6, 70.9) (4.6, 3.3)   (63.2, 82.3)
==============  ================  ========================  ============================

Eye distance 30.4 px and eye-to-mouth 28.7 px: the face is framed looser than the face
recognition template (which cuts the forehead and sits lower), as RAF-DB's aligned crops show
forehead, hair line and chin. Only the eyes are used by ``--align eyes``; a five-point detector
fits all five points (least squares).

"Left" and "right" are as seen in the image (left eye = smaller x).
"""
from __future__ import annotations

import numpy as np

#: Canonical five points (left eye, right eye, nose tip, mouth left, mouth right) at 100x100.
TEMPLATE_100 = np.array([[34.3, 42.3], [64.7, 42.3], [49.5, 59.3], [38.7, 71.0], [60.3, 71.0]],
                        dtype=np.float64)
#: Indices of the template points that a two-point (eyes) landmark set maps to.
EYES = (0, 1)


def template(size: int, points=None) -> np.ndarray:
    """The canonical points for a ``size x size`` output (scaled about pixel centres)."""
    t = TEMPLATE_100 if points is None else TEMPLATE_100[list(points)]
    return (t + 0.5) * (size / 100.0) - 0.5


def similarity(src, dst) -> np.ndarray:
    """The 2x3 similarity transform (Umeyama, least squares) taking points ``src`` to ``dst``
    (both ``[N, 2]``, N >= 2). With two points it is exact."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two matching [N>=2, 2] point sets, got {src.shape} and {dst.shape}")
    ms, md = src.mean(0), dst.mean(0)
    s, d = src - ms, dst - md
    var = (s ** 2).sum() / len(src)
    if var <= 1e-12:
        raise ValueError("landmarks coincide: no transform")
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1
    r = u @ e @ vt
    scale = (sig * np.diag(e)).sum() / var
    m = np.zeros((2, 3))
    m[:, :2] = scale * r
    m[:, 2] = md - m[:, :2] @ ms
    return m


def transform_points(m: np.ndarray, pts) -> np.ndarray:
    pts = np.asarray(pts, np.float64).reshape(-1, 2)
    return pts @ m[:, :2].T + m[:, 2]


def invert(m: np.ndarray) -> np.ndarray:
    a = np.linalg.inv(m[:, :2])
    return np.concatenate([a, (-a @ m[:, 2])[:, None]], 1)


def alignment_matrix(landmarks, size: int) -> np.ndarray:
    """The 2x3 matrix from photo coordinates to the aligned ``size x size`` face: five points
    (``[5, 2]``) fit all of :data:`TEMPLATE_100`, two points (``[2, 2]``) fit the eyes."""
    pts = np.asarray(landmarks, np.float64).reshape(-1, 2)
    if len(pts) == 5:
        return similarity(pts, template(size))
    if len(pts) == 2:
        return similarity(pts, template(size, EYES))
    raise ValueError(f"expected 2 (eyes) or 5 landmarks, got {len(pts)}")


def warp(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """``image`` (uint8 HxWx3) warped by ``m`` into a ``size x size`` crop: bilinear, borders
    replicated (a face at the photo's edge gets its edge pixels, not black)."""
    import cv2

    out = cv2.warpAffine(np.ascontiguousarray(image), m.astype(np.float64), (size, size),
                         flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return np.ascontiguousarray(out)


def align(image: np.ndarray, landmarks, size: int) -> np.ndarray:
    """The face with these landmarks (2 eyes or 5 points, photo pixels), aligned at ``size``."""
    return warp(image, alignment_matrix(landmarks, size), size)


def box_of(m: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """The axis-aligned box ``(x, y, w, h)`` in the photo around the aligned crop's square."""
    c = transform_points(invert(m), [[-0.5, -0.5], [size - 0.5, -0.5], [size - 0.5, size - 0.5],
                                     [-0.5, size - 0.5]])
    x0, y0 = np.floor(c.min(0)).astype(int)
    x1, y1 = np.ceil(c.max(0)).astype(int)
    return int(x0), int(y0), int(x1 - x0), int(y1 - y0)
