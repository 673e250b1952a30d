"""Five-point face landmarks (``--align landmarks``): eye centres, nose tip, mouth corners.

Backend: MTCNN (Zhang et al. 2016) as implemented in pure numpy by the ``faceie`` package,
whose wheel ships the MTCNN weights (converted from facenet-pytorch's, MIT licence); nothing is
downloaded. ``faceie``'s own code is GPL-3.0, so it is *not* a dependency of this MIT project:
``pip install faceie`` to use this mode (the default, ``--align eyes``, needs only OpenCV's
bundled cascades). See README, Prediction, for the detector comparison behind this choice.
"""
from __future__ import annotations

import numpy as np

from pipeline.errors import FerError

BACKENDS = ("mtcnn",)


def available() -> list[str]:
    """The backends importable here."""
    try:
        import faceie.mtcnn  # noqa: F401
    except ImportError:
        return []
    return ["mtcnn"]


def detect_landmarks(image: np.ndarray, *, max_faces: int = 20, backend: str = "mtcnn",
                     min_probability: float = 0.9) -> list[dict]:
    """Faces in an RGB uint8 image: ``[{"box", "landmarks" [5, 2], "source", "score"}]``,
    largest first."""
    if backend != "mtcnn":
        raise FerError(f"unknown landmark backend {backend!r}; use one of {', '.join(BACKENDS)}")
    try:
        from faceie.mtcnn import detect_faces
    except ImportError as e:
        raise FerError("--align landmarks needs the MTCNN detector: pip install faceie "
                       "(GPL-3.0; or use --align eyes, OpenCV only)") from e
    from PIL import Image

    res = detect_faces(Image.fromarray(np.ascontiguousarray(image)), extract_images=None)
    out = []
    for p, b, lm in zip(res.probabilities, res.bounding_boxes, res.landmarks):
        if p < min_probability:
            continue
        x0, y0, x1, y1 = (float(v) for v in b)
        pts = np.asarray(lm, np.float64).reshape(5, 2)
        out.append({"box": (int(round(x0)), int(round(y0)), int(round(x1 - x0 + 1)), int(round(y1 - y0 + 1))),
                    "landmarks": pts, "source": "landmarks", "score": float(p)})
    out.sort(key=lambda f: -f["box"][2] * f["box"][3])
    return out[:max_faces]
