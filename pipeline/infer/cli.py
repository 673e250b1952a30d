"""`fer predict PHOTO... [--model PATH|models:/NAME@ALIAS] [--json]`: expressions per face.

Imports only the standard library at module level, so ``fer --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pipeline.errors import FerError

#: Tried in order when --model is not given.
DEFAULT_MODELS = ("models/rafdb/model.pt", "models:/lip-vgg16-rafdb@champion")


def add_predict_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("photos", nargs="+", metavar="PHOTO", help="image files (JPEG, PNG, ...)")
    p.add_argument("--model", default=None,
                   help="a model.pt checkpoint or a registry URI such as models:/lip-vgg16-rafdb@champion "
                        f"(default: {DEFAULT_MODELS[0]} if it exists, else {DEFAULT_MODELS[1]})")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--margin", type=float, default=0.2, help="margin around each detected face (fraction)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    return p


def load_predictor(model: str | None, device: str | None = None):
    """A Predictor from a checkpoint path, a logged-model folder or a ``models:/`` / ``runs:/`` /
    ``file://`` / ``s3://`` URI. Never unpickles: see :mod:`pipeline.infer.resolve`."""
    from pipeline.infer.predictor import Predictor
    from pipeline.infer.resolve import checkpoint_path

    if model is None:
        model = DEFAULT_MODELS[0] if Path(DEFAULT_MODELS[0]).is_file() else DEFAULT_MODELS[1]
    if model.startswith(("models:/", "runs:/")):
        from pipeline.tracking import sqlite_root, tracking_uri

        uri = tracking_uri()
        if sqlite_root(uri) and not Path(uri[len("sqlite:///"):]).is_file():
            raise FerError(f"no model at {model}: the MLflow store {uri} does not exist yet "
                           "(run the pipeline, or pass --model path/to/model.pt)")
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


def predict_photos(paths: list[str], predictor, *, margin: float = 0.2) -> list[dict]:
    """One entry per photo: ``{"photo", "faces": [{"box", "detected", "label", "probabilities"}]}``,
    or ``{"photo", "error"}`` for a photo that cannot be read: one bad file does not stop the rest."""
    from pipeline.infer.faces import find_faces

    out = []
    for path in paths:
        try:
            img = read_photo(path)
        except FerError as e:
            out.append({"photo": path, "error": str(e)})
            continue
        faces = find_faces(img, margin=margin)
        preds = predictor.predict_faces([f.image for f in faces])
        out.append({"photo": path, "faces": [
            {"box": list(f.box), "detected": f.detected, **p} for f, p in zip(faces, preds)]})
    return out


def format_text(results: list[dict]) -> str:
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['photo']}: error: {r['error'].removeprefix(r['photo'] + ': ')}")
            continue
        faces = r["faces"]
        if len(faces) == 1 and not faces[0]["detected"]:
            head = [f"{r['photo']}: no face found, using the whole image"]
        else:
            head = [f"{r['photo']}: {len(faces)} face{'s' if len(faces) != 1 else ''}"]
        lines += head
        for i, f in enumerate(faces, 1):
            probs = sorted(f["probabilities"].items(), key=lambda kv: -kv[1])
            rest = ", ".join(f"{k} {v:.2f}" for k, v in probs[1:4])
            x, y, w, h = f["box"]
            where = f"face {i} at x={x} y={y} {w}x{h}" if f["detected"] else "whole image"
            lines.append(f"  {where}: {f['label']} {probs[0][1]:.2f}  ({rest})")
    return "\n".join(lines)


def predict_command(args: argparse.Namespace) -> None:
    """The `fer predict` action: prints expressions per face. A photo that cannot be read is
    reported on its own line (or in the JSON) and the rest go on; FerError at the end if any
    failed, and at once if none of the files exists or the model cannot be loaded."""
    if not any(os.path.exists(p) for p in args.photos):  # fail fast, before loading the model
        raise FerError(f"{args.photos[0]}: no such file" if len(args.photos) == 1
                       else "none of the photos exists")
    predictor = load_predictor(getattr(args, "model", None), getattr(args, "device", None))
    results = predict_photos(list(args.photos), predictor, margin=getattr(args, "margin", 0.2))
    if getattr(args, "json", False):
        print(json.dumps(results, indent=2))
    else:
        print(format_text(results))
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise FerError(f"{len(failed)} of {len(results)} photos could not be read: "
                       + "; ".join(failed))
