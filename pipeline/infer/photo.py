"""Shared by `fer predict` (:mod:`pipeline.infer.cli`), videos (:mod:`pipeline.infer.video`)
and `fer export` (:mod:`pipeline.infer.export`): loading a predictor from what ``--model`` names,
reading a photo, and one image through face finding and the predictor.

Imports only the standard library at module level (``fer --help`` stays fast).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.errors import FerError

#: Tried in order when --model is not given.
DEFAULT_MODELS = ("models/rafdb/model.pt", "models:/lip-vgg16-rafdb@champion")


def load_predictor(model: str | None, device: str | None = None):
    """A Predictor from a checkpoint path, a logged-model folder or a ``models:/`` / ``runs:/`` /
    ``file://`` / ``s3://`` URI. Never unpickles: see :mod:`pipeline.infer.resolve`. A ``.onnx``
    file gives an :class:`pipeline.infer.export.OnnxPredictor` (same preprocessing)."""
    from pipeline.infer.predictor import Predictor
    from pipeline.infer.resolve import checkpoint_path

    if model is not None and model.lower().endswith(".onnx"):
        from pipeline.infer.export import OnnxPredictor

        return OnnxPredictor(model)
    if model is None:
        model = DEFAULT_MODELS[0] if Path(DEFAULT_MODELS[0]).is_file() else DEFAULT_MODELS[1]
    if model.startswith(("models:/", "runs:/")):
        from pipeline.tracking import check_sqlite_store, sqlite_file, tracking_uri

        uri = tracking_uri()
        db = sqlite_file(uri)
        if db is not None and not db.is_file():
            raise FerError(f"no model at {model}: the MLflow store {uri} does not exist yet "
                           "(run the pipeline, or pass --model path/to/model.pt)")
        if db is not None:
            check_sqlite_store(db)  # read-only: a damaged or empty store is refused, never re-created
    with checkpoint_path(model) as ckpt:
        return Predictor(str(ckpt), device=device)


def read_photo(path: str):
    """RGB uint8 HxWx3 array of an image file; FerError with a one-line reason otherwise."""
    from pipeline.infer.predictor import decode_image

    p = Path(path)
    if not p.exists():
        raise FerError(f"{path}: no such file")
    if not p.is_file():
        raise FerError(f"{path}: not a file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise FerError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        return decode_image(data)
    except FerError as e:
        raise FerError(f"{path}: {e}") from e


def face_records(faces, preds) -> list[dict]:
    """JSON-ready records of found faces and their predictions."""
    return [{"box": list(f.box), "detected": f.detected, "aligned": f.aligned,
             "landmarks": f.landmarks, **p} for f, p in zip(faces, preds)]


def predict_image(img, predictor, *, margin: float = 0.2, align: str = "eyes",
                  detector: str | None = None) -> tuple[list, list[dict]]:
    """Faces of one RGB image and their records (``box``, ``detected``, ``aligned``,
    ``landmarks``, ``label``, ``probabilities``); ``detector`` None is the default one."""
    from pipeline.infer.faces import DEFAULT_DETECTOR, find_faces

    faces = find_faces(img, margin=margin, align=align, size=predictor.image_size,
                       detector=detector or DEFAULT_DETECTOR)
    preds = predictor.predict_faces([f.image for f in faces])
    return faces, face_records(faces, preds)
