"""Face detection for `fer predict`, and the face crops the model sees.

Two detectors (``detector``): ``blazeface`` (the default: MediaPipe's BlazeFace full-range model
run by onnxruntime, :mod:`pipeline.infer.blazeface`; a box and both eye centres per face, tilted
faces included) and ``haar`` (OpenCV's cascades, below). README, Prediction, has the comparison
behind the default (``python -m pipeline.infer.facebench``).

Three ways to turn a detected face into the model's input (``align``):

``none``       the detector's box grown by a margin, made square and cropped (the predictor then
               resizes it).
``eyes``       the two eye centres define a similarity transform onto the canonical aligned
               geometry (:mod:`pipeline.infer.align`) at the model's input size. BlazeFace gives
               the eyes directly. With ``haar``: the frontal-face cascade, run on the photo and
               on copies rotated by
               :data:`ANGLES` (so tilted faces are found), then OpenCV's bundled eye cascades
               inside each face; the two eye centres define a similarity transform onto the
               canonical aligned geometry (:mod:`pipeline.infer.align`) at the model's input
               size. A face whose eyes are not both found is aligned from its box instead (eye
               positions expected in a Haar box, rotation of the copy it was found in):
               ``landmarks`` is then None and ``aligned`` is ``"box"``.
``landmarks``  a five-point detector (eye centres, nose tip, mouth corners): see
               :mod:`pipeline.infer.landmarks`; the five points are fitted to the canonical
               template by least squares.

When no face is found the whole image is used, and the result says so (``detected=False``).
Every model file used here ships inside an installed package: nothing is downloaded.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import FerError

CASCADE = "haarcascade_frontalface_default.xml"
#: Eye cascades tried in order inside a face (the second one also finds eyes behind glasses).
EYE_CASCADES = ("haarcascade_eye.xml", "haarcascade_eye_tree_eyeglasses.xml")
#: Rotations (degrees) of the photo searched by ``--align eyes``: frontal Haar cascades find
#: faces tilted up to about 15 degrees, so these cover about +-40.
ANGLES = (0.0, -25.0, 25.0)
#: Where a Haar face box has the eyes (fractions of the box, image left eye first), measured on
#: synthetic faces (pipeline.infer.facebench): used when the eye cascades miss.
BOX_EYES = ((0.335, 0.425), (0.665, 0.425))
ALIGN_MODES = ("none", "eyes", "landmarks")
DETECTORS = ("blazeface", "haar")
#: recall 0.93 vs 0.32 and ~20x faster than the Haar search on pipeline.infer.facebench photos
DEFAULT_DETECTOR = "blazeface"
#: A face found only in a rotated copy must pass this cascade confidence (``levelWeights``):
#: the rotated copies add searches, so their weakest finds are mostly clutter (measured on
#: pipeline.infer.facebench photos: true finds >= 1.9, false ones <= 1.5).
MIN_ROTATED_WEIGHT = 1.7


@dataclass
class Face:
    image: np.ndarray               # uint8 HxWx3 RGB crop (aligned: size x size)
    box: tuple[int, int, int, int]  # x, y, w, h of the face in the photo
    detected: bool                  # False: no face found, this is the whole image
    landmarks: list | None = None   # [[x, y], ...] in the photo: 2 eyes or 5 points
    aligned: str = "none"           # none | eyes | landmarks | box
    angle: float = 0.0              # in-plane rotation of the face (degrees, image y down)
    extra: dict = field(default_factory=dict)


@functools.lru_cache(maxsize=4)
def _cascade(name: str = CASCADE):
    import cv2

    path = cv2.data.haarcascades + name
    det = cv2.CascadeClassifier(path)
    if det.empty():
        raise FerError(f"cannot load OpenCV's detector {path} (install opencv-python-headless<5)")
    return det


def _gray(image: np.ndarray) -> np.ndarray:
    import cv2

    if image.ndim == 2:
        return cv2.equalizeHist(image)
    return cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))


def detect(image: np.ndarray, *, min_size: int = 24) -> list[tuple[int, int, int, int]]:
    """Face boxes ``(x, y, w, h)`` in an RGB uint8 (or equalised gray) image, largest first."""
    gray = _gray(image) if image.ndim == 3 else image
    boxes = _cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                        minSize=(min_size, min_size))
    boxes = [tuple(int(v) for v in b) for b in (boxes if len(boxes) else [])]
    return sorted(boxes, key=lambda b: -b[2] * b[3])


def square_with_margin(box, height: int, width: int, margin: float = 0.2) -> tuple[int, int, int, int]:
    """Grow a box by ``margin`` of its size on every side, make it square, clip to the image."""
    x, y, w, h = box
    side = int(round(max(w, h) * (1 + 2 * margin)))
    side = min(side, height, width)
    cx, cy = x + w / 2, y + h / 2
    x0 = int(round(min(max(cx - side / 2, 0), width - side)))
    y0 = int(round(min(max(cy - side / 2, 0), height - side)))
    return x0, y0, side, side


# --------------------------------------------------------------------------- rotated search


def _rotation(shape, angle: float) -> tuple[np.ndarray, tuple[int, int]]:
    """2x3 matrix rotating an image of ``shape`` by ``angle`` degrees (counter-clockwise as
    seen) about its centre into a canvas that holds all of it, and that canvas's (w, h)."""
    import cv2

    h, w = shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
    c, s = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(np.ceil(w * c + h * s)), int(np.ceil(w * s + h * c))
    m[0, 2] += (nw - w) / 2
    m[1, 2] += (nh - h) / 2
    return m, (nw, nh)


@dataclass
class _Hit:
    box: tuple[int, int, int, int]  # in the rotated copy
    angle: float
    m: np.ndarray                   # photo -> rotated copy
    weight: float
    centre: np.ndarray              # in the photo
    size: float


def _search(gray: np.ndarray, angles, min_size: int) -> list[_Hit]:
    import cv2

    from pipeline.infer.align import invert, transform_points

    hits = []
    for a in angles:
        if a == 0:
            m = np.array([[1.0, 0, 0], [0, 1.0, 0]])
            g = gray
        else:
            m, (nw, nh) = _rotation(gray.shape, a)
            g = cv2.warpAffine(gray, m, (nw, nh), flags=cv2.INTER_LINEAR, borderValue=128)
        boxes, _, weights = _cascade().detectMultiScale3(
            g, scaleFactor=1.1, minNeighbors=5, minSize=(min_size, min_size), outputRejectLevels=True)
        inv = invert(m)
        for b, wt in zip(boxes if len(boxes) else [], np.ravel(weights) if len(boxes) else []):
            if a != 0 and wt < MIN_ROTATED_WEIGHT:
                continue
            x, y, w, h = (int(v) for v in b)
            c = transform_points(inv, [[x + (w - 1) / 2, y + (h - 1) / 2]])[0]
            hits.append(_Hit((x, y, w, h), float(a), m, float(wt) - 0.5 * abs(a) / 25.0, c, float(w)))
    # one detection per face: the same face found at several angles keeps its best (an upright
    # find wins ties: the weight is docked for rotation)
    hits.sort(key=lambda h: -h.weight)
    kept: list[_Hit] = []
    for h in hits:
        if all(np.linalg.norm(h.centre - k.centre) > 0.4 * min(h.size, k.size) for k in kept):
            kept.append(h)
    return sorted(kept, key=lambda h: -h.size)


def _eye_pair(gray_rot: np.ndarray, box) -> np.ndarray | None:
    """Both eye centres (rotated-copy coordinates, image-left first) inside a face box, or None."""
    x, y, w, h = box
    H, W = gray_rot.shape[:2]
    y0, y1 = max(y + int(0.15 * h), 0), min(y + int(0.62 * h), H)
    x0, x1 = max(x, 0), min(x + w, W)
    roi = gray_rot[y0:y1, x0:x1]
    if roi.size == 0:
        return None
    lo, hi = max(int(w * 0.12), 6), max(int(w * 0.45), 8)
    best, best_cost = None, np.inf
    for name in EYE_CASCADES:
        eyes = _cascade(name).detectMultiScale(roi, scaleFactor=1.05, minNeighbors=3,
                                               minSize=(lo, lo), maxSize=(hi, hi))
        cands = [(ex + x0 + (ew - 1) / 2, ey + y0 + (eh - 1) / 2, ew) for ex, ey, ew, eh in
                 (eyes if len(eyes) else [])]
        left = [c for c in cands if c[0] < x + w / 2]
        right = [c for c in cands if c[0] >= x + w / 2]
        for lc in left:
            for rc in right:
                dx, dy = rc[0] - lc[0], rc[1] - lc[1]
                if not (0.25 * w <= dx <= 0.7 * w) or abs(dy) > 0.25 * dx:
                    continue
                # expected: eyes symmetric about the box centre, 0.33 w apart, alike in size
                cost = (abs((lc[0] + rc[0]) / 2 - (x + w / 2)) / w + abs(dx - 0.33 * w) / w
                        + abs(dy) / w + abs(lc[2] - rc[2]) / w)
                if cost < best_cost:
                    best, best_cost = np.array([lc[:2], rc[:2]]), cost
        if best is not None:
            return best
    return None


def _dark_spot(gray: np.ndarray, x0: int, x1: int, y0: int, y1: int, sigma: float,
               min_contrast: float, disc: float) -> list[float] | None:
    """The darkest blob (pupil, iris) in ``gray[y0:y1, x0:x1]``, in photo coordinates, or None
    without a clear one. A difference of Gaussians favours blobs over dark lines (brows, lids);
    the sub-pixel centre is the centroid of darkness in a disc of ``disc * sigma`` around the
    minimum."""
    import cv2

    win = gray[y0:y1, x0:x1].astype(np.float32)
    if win.shape[0] < 3 or win.shape[1] < 3:
        return None
    sm = cv2.GaussianBlur(win, (0, 0), sigma) - cv2.GaussianBlur(win, (0, 0), 3 * sigma)
    if float(np.median(sm) - sm.min()) < min_contrast:
        return None
    iy, ix = np.unravel_index(int(np.argmin(sm)), sm.shape)
    r = max(int(round(disc * sigma)), 1)
    ys, xs = np.mgrid[max(iy - r, 0):min(iy + r + 1, sm.shape[0]), max(ix - r, 0):min(ix + r + 1, sm.shape[1])]
    wgt = np.clip(np.median(sm) - sm[ys, xs], 0, None)
    if wgt.sum() <= 0:
        return None
    return [x0 + (xs * wgt).sum() / wgt.sum(), y0 + (ys * wgt).sum() / wgt.sum()]


def _dark_eyes(gray_rot: np.ndarray, box) -> np.ndarray | None:
    """Eye centres as the darkest spots (pupil, iris) near where a Haar box expects them, or
    None when neither side has a clear dark spot. Used when the eye cascades miss."""
    x, y, w, h = box
    H, W = gray_rot.shape[:2]
    sigma = max(w * 0.025, 0.8)
    out = []
    for fx, fy in BOX_EYES:
        px, py = x + fx * w, y + fy * h
        x0, x1 = int(max(px - 0.11 * w, 0)), int(min(px + 0.11 * w + 1, W))
        y0, y1 = int(max(py - 0.07 * h, 0)), int(min(py + 0.08 * h + 1, H))
        spot = _dark_spot(gray_rot, x0, x1, y0, y1, sigma, min_contrast=12, disc=2)
        if spot is None:
            return None
        out.append(spot)
    pair = np.array(out)
    dx, dy = pair[1] - pair[0]
    if not (0.2 * w <= dx <= 0.5 * w) or abs(dy) > 0.2 * dx:
        return None
    return pair


def locate(image: np.ndarray, *, angles=ANGLES, min_size: int = 24, max_faces: int = 20,
           eyes: bool = True) -> list[dict]:
    """Faces with eye landmarks: ``[{"box", "landmarks" ([2, 2] or None), "angle",
    "source" ("eyes" | "box"), "m_box" (photo -> the box's rotated frame)}]``, largest first."""
    import cv2

    from pipeline.infer.align import invert, transform_points

    gray = _gray(image)
    out = []
    for hit in _search(gray, angles, min_size)[:max_faces]:
        x, y, w, h = hit.box
        inv = invert(hit.m)
        corners = transform_points(inv, [[x, y], [x + w, y], [x + w, y + h], [x, y + h]])
        x0, y0 = np.floor(corners.min(0)).astype(int)
        x1, y1 = np.ceil(corners.max(0)).astype(int)
        pair = None
        if eyes:
            if hit.angle == 0:
                g = gray
            else:
                nw, nh = _rotation(gray.shape, hit.angle)[1]
                g = cv2.warpAffine(gray, hit.m, (nw, nh), flags=cv2.INTER_LINEAR, borderValue=128)
            pair = _eye_pair(g, hit.box)
            if pair is None:
                pair = _dark_eyes(g, hit.box)
        if pair is not None:
            lm, source = transform_points(inv, pair), "eyes"
        else:
            prior = [[x + fx * w, y + fy * h] for fx, fy in BOX_EYES]
            lm, source = transform_points(inv, prior), "box"
        out.append({"box": (int(x0), int(y0), int(x1 - x0), int(y1 - y0)), "landmarks": lm,
                    "angle": hit.angle, "source": source})
    return out


def _dark_near(gray: np.ndarray, eyes: np.ndarray, iod: float) -> np.ndarray | None:
    """Each eye as the darkest blob (pupil, iris: a difference of Gaussians) within a fifth of
    the eye distance of a level rough eye position; None when one side has no clear dark spot."""
    sigma = max(iod * 0.05, 0.8)
    H, W = gray.shape[:2]
    out = []
    for px, py in eyes:
        x0, x1 = int(max(px - 0.22 * iod, 0)), int(min(px + 0.22 * iod + 1, W))
        y0, y1 = int(max(py - 0.18 * iod, 0)), int(min(py + 0.18 * iod + 1, H))
        spot = _dark_spot(gray, x0, x1, y0, y1, sigma, min_contrast=8, disc=1.5)
        if spot is None:
            return None
        out.append(spot)
    return np.array(out)


def refine_eyes(gray: np.ndarray, eyes: np.ndarray) -> np.ndarray | None:
    """Eye centres as the dark pupils near rough ones (``[2, 2]``, image-left first, e.g.
    BlazeFace's): the photo is rotated so that the rough eyes are level, and each eye is the
    darkest blob within about a fifth of the eye distance (:func:`_dark_near`). None when a side
    has no clear dark spot, the pair is not about as far apart and level as the rough one, or it
    moves more than a quarter of the eye distance."""
    import cv2

    from pipeline.infer.align import invert, transform_points

    eyes = np.asarray(eyes, np.float64)
    d = eyes[1] - eyes[0]
    iod = float(np.hypot(*d))
    if iod < 6:
        return None
    w = iod / (BOX_EYES[1][0] - BOX_EYES[0][0])
    side = int(np.ceil(2 * w))
    mid = eyes.mean(0)
    m = cv2.getRotationMatrix2D((float(mid[0]), float(mid[1])), float(np.degrees(np.arctan2(d[1], d[0]))), 1.0)
    m[:, 2] += [side / 2 - mid[0], side / 2 - mid[1]]
    g = cv2.warpAffine(gray, m, (side, side), flags=cv2.INTER_LINEAR, borderValue=128)
    level = np.array([[side / 2 - iod / 2, side / 2], [side / 2 + iod / 2, side / 2]])
    pair = _dark_near(g, level, iod)
    if pair is None:
        return None
    # in the level frame: the pair must stay about as far apart and about as level as the
    # rough one (a brow or a lash line taken for one pupil breaks one or the other)
    dx, dy = pair[1] - pair[0]
    if abs(np.hypot(dx, dy) / iod - 1) > 0.25 or abs(np.degrees(np.arctan2(dy, dx))) > 12:
        return None
    found = transform_points(invert(m), pair)
    if np.linalg.norm(found - eyes, axis=1).max() > 0.25 * iod:
        return None
    return found


def locate_blazeface(image: np.ndarray, *, max_faces: int = 20, refine: bool = True) -> list[dict]:
    """BlazeFace's faces (:func:`pipeline.infer.blazeface.detect`), each face's eye centres
    refined by :func:`refine_eyes` when ``refine`` and the cascades agree (BlazeFace's own are
    the eye region's centre, about a tenth of the eye distance off the pupils)."""
    from pipeline.infer import blazeface

    found = blazeface.detect(image, max_faces=max_faces)
    if refine and found:
        gray = _gray(image)
        for f in found:
            better = refine_eyes(gray, f["landmarks"])
            if better is not None:
                f["landmarks"] = better
    return found


# --------------------------------------------------------------------------- crops


def _angle_of(lm: np.ndarray) -> float:
    d = lm[1] - lm[0]
    return float(np.degrees(np.arctan2(d[1], d[0])))


def find_faces(image: np.ndarray, *, margin: float = 0.2, max_faces: int = 20,
               align: str = "none", size: int | None = None,
               detector: str = DEFAULT_DETECTOR) -> list[Face]:
    """Face crops of an RGB uint8 image (largest first); the whole image when none is found.

    ``align="none"``: square crops with ``margin``. ``"eyes"`` / ``"landmarks"``: crops warped
    onto the canonical aligned geometry at ``size x size`` (the model's input size).
    ``detector``: ``blazeface`` or ``haar`` (``landmarks`` always uses its own, MTCNN)."""
    if align not in ALIGN_MODES:
        raise FerError(f"--align {align!r}: use one of {', '.join(ALIGN_MODES)}")
    if detector not in DETECTORS:
        raise FerError(f"--detector {detector!r}: use one of {', '.join(DETECTORS)}")
    h, w = image.shape[:2]
    if align == "none":
        if detector == "blazeface":
            from pipeline.infer import blazeface

            boxes = [f["box"] for f in blazeface.detect(image, max_faces=max_faces)]
        else:
            boxes = detect(image)[:max_faces]
        faces = []
        for b in boxes:
            x, y, s, _ = square_with_margin(b, h, w, margin)
            faces.append(Face(np.ascontiguousarray(image[y:y + s, x:x + s]), (x, y, s, s), True))
    else:
        if size is None:
            raise ValueError("aligned crops need the model's input size")
        from pipeline.infer.align import align as warp_face

        if align == "eyes" and detector == "blazeface":
            found = locate_blazeface(image, max_faces=max_faces)
        elif align == "eyes":
            found = locate(image, max_faces=max_faces)
        else:
            from pipeline.infer.landmarks import detect_landmarks

            found = detect_landmarks(image, max_faces=max_faces)
        faces = []
        for f in found:
            lm = np.asarray(f["landmarks"], np.float64)
            src = f["source"]
            faces.append(Face(warp_face(image, lm, size), tuple(int(v) for v in f["box"]), True,
                              None if src == "box" else np.round(lm, 2).tolist(),
                              src, round(_angle_of(lm[:2]), 2),
                              {k: v for k, v in f.items() if k == "score"}))
    if not faces:
        return [Face(image, (0, 0, w, h), False)]
    return faces
