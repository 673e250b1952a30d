"""Pictures of the predictions: each face's box, landmarks and top expression with its
probability, drawn on the photo or video frame (``fer predict --annotate OUT``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import FerError

#: Box colour per expression (RGB), in the class order of pipeline.data.classes.
COLOURS = {"surprise": (255, 200, 0), "fear": (160, 90, 255), "disgust": (0, 170, 80),
           "happiness": (255, 230, 40), "sadness": (60, 130, 255), "anger": (240, 40, 40),
           "neutral": (200, 200, 200)}


def draw(image: np.ndarray, records: list[dict]) -> np.ndarray:
    """A copy of the RGB ``image`` with each record's box (``detected`` faces), landmarks and
    ``label p`` caption; an image with no face found gets a caption for the whole image."""
    import cv2

    out = np.ascontiguousarray(image.copy())
    h, w = out.shape[:2]
    thick = max(1, int(round(max(h, w) / 400)))
    scale = max(0.4, max(h, w) / 900)
    for r in records:
        if not r.get("label"):
            continue
        col = COLOURS.get(r["label"], (255, 255, 255))
        p = r["probabilities"][r["label"]]
        text = f"{r['label']} {p:.2f}"
        x, y, bw, bh = (int(v) for v in r["box"])
        if r.get("detected", True):
            cv2.rectangle(out, (x, y), (x + bw - 1, y + bh - 1), col, thick, cv2.LINE_AA)
        else:
            text = "whole image: " + text
            x, y = 0, 0
        for lx, ly in r.get("landmarks") or []:
            cv2.circle(out, (int(round(lx)), int(round(ly))), thick + 1, col, -1, cv2.LINE_AA)
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        ty = y - 4 if y - th - base - 4 >= 0 else min(y + bh + th + 4, h - base)
        tx = min(max(x, 0), max(w - tw - 2, 0))
        cv2.rectangle(out, (tx, ty - th - 3), (tx + tw + 2, ty + base), col, -1)
        cv2.putText(out, text, (tx + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick,
                    cv2.LINE_AA)
    return out


def save_image(image: np.ndarray, path) -> Path:
    """Write an RGB array; the format follows the name (JPEG quality 92, else PNG, ...)."""
    from PIL import Image

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(image)
        if path.suffix.lower() in (".jpg", ".jpeg"):
            im.save(path, quality=92)
        else:
            im.save(path)
    except (OSError, ValueError, KeyError) as e:
        raise FerError(f"cannot write {path}: {e}") from e
    return path
