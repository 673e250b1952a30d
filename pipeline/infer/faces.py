"""Face detection for `fer predict`: OpenCV's frontal-face Haar cascade, crops with a margin.

When no face is found the whole image is used, and the result says so (``detected=False``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from pipeline.errors import FerError

CASCADE = "haarcascade_frontalface_default.xml"


@dataclass
class Face:
    image: np.ndarray               # uint8 HxWx3 RGB crop
    box: tuple[int, int, int, int]  # x, y, w, h of the crop in the photo
    detected: bool                  # False: no face found, this is the whole image


@functools.lru_cache(maxsize=1)
def _cascade():
    import cv2

    path = cv2.data.haarcascades + CASCADE
    det = cv2.CascadeClassifier(path)
    if det.empty():
        raise FerError(f"cannot load OpenCV's face detector {path} (install opencv-python-headless<5)")
    return det


def detect(image: np.ndarray, *, min_size: int = 24) -> list[tuple[int, int, int, int]]:
    """Face boxes ``(x, y, w, h)`` in an RGB uint8 image, largest first."""
    import cv2

    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    gray = cv2.equalizeHist(gray)
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


def find_faces(image: np.ndarray, *, margin: float = 0.2, max_faces: int = 20) -> list[Face]:
    """Face crops of an RGB uint8 image (largest first); the whole image when none is found."""
    h, w = image.shape[:2]
    boxes = detect(image)[:max_faces]
    if not boxes:
        return [Face(image, (0, 0, w, h), False)]
    faces = []
    for b in boxes:
        x, y, s, _ = square_with_margin(b, h, w, margin)
        faces.append(Face(np.ascontiguousarray(image[y:y + s, x:x + s]), (x, y, s, s), True))
    return faces
