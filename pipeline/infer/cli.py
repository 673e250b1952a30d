"""`fer predict PHOTO|VIDEO... [--model PATH|model.onnx|models:/NAME@ALIAS] [--align eyes]
[--json] [--annotate OUT]`: expressions per face, in photos and videos.

Imports only the standard library at module level, so ``fer --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pipeline.errors import FerError
from pipeline.infer.photo import (  # noqa: F401 - read_photo: re-exported
    DEFAULT_MODELS, load_predictor, predict_image, read_photo)


#: File name endings read as videos (through OpenCV's VideoCapture); anything else is a photo.
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".gif")


def is_video(path: str) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def add_predict_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("photos", nargs="*", metavar="PHOTO",
                   help="image files (JPEG, PNG, ...) or videos (" + ", ".join(VIDEO_SUFFIXES[:6]) + ", ...)")
    p.add_argument("--camera", default=None, metavar="N|SOURCE",
                   help="read camera N (OpenCV device index, /dev/videoN on Linux) instead of files, "
                        "as a live video; Ctrl-C stops. A device path, stream URL or video file "
                        "is read the same way")
    p.add_argument("--model", default=None,
                   help="a model.pt checkpoint, an exported model.onnx (run by onnxruntime) or a "
                        "registry URI such as models:/lip-vgg16-rafdb@champion "
                        f"(default: {DEFAULT_MODELS[0]} if it exists, else {DEFAULT_MODELS[1]})")
    p.add_argument("--json", action="store_true",
                   help="photos: print one JSON document instead of text (boxes, landmarks, all "
                        "probabilities); videos always print JSON lines")
    p.add_argument("--align", choices=("none", "eyes", "landmarks"), default="eyes",
                   help="eyes (default): warp each face onto the training faces' aligned geometry "
                        "from its eye centres (from --detector; rotated faces too); landmarks: "
                        "the same from five points (needs the optional MTCNN package faceie); "
                        "none: the square crop with --margin")
    p.add_argument("--detector", choices=("blazeface", "haar"), default="blazeface",
                   help="blazeface (default): MediaPipe's BlazeFace model run by onnxruntime (box "
                        "and eye centres; shipped with this package); haar: OpenCV's cascades, "
                        "searched at +-25 degrees for tilted faces (slower, finds fewer faces)")
    p.add_argument("--margin", type=float, default=0.2,
                   help="--align none: margin around each detected face (fraction)")
    p.add_argument("--annotate", default=None, metavar="OUT",
                   help="also write the picture (or video) with each face's box and top expression: "
                        "a file for one input, a folder for several")
    p.add_argument("--every", type=int, default=1, metavar="N",
                   help="videos: analyse every N-th frame (default 1)")
    p.add_argument("--smooth", type=float, default=0.0, metavar="A",
                   help="videos: exponential smoothing of each tracked face's probabilities "
                        "across analysed frames (0 = off, 0.6 = strong)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    return p


def predict_photos(paths: list[str], predictor, *, margin: float = 0.2, align: str = "eyes",
                   detector: str | None = None,
                   annotate: dict | None = None) -> list[dict]:
    """One entry per photo: ``{"photo", "faces": [{"box", "detected", "aligned", "landmarks",
    "label", "probabilities"}]}``, or ``{"photo", "error"}`` for a photo that cannot be read: one
    bad file does not stop the rest. ``annotate`` maps a photo path to the picture to write."""
    out = []
    for path in paths:
        try:
            img = read_photo(path)
        except FerError as e:
            out.append({"photo": path, "error": str(e)})
            continue
        _, records = predict_image(img, predictor, margin=margin, align=align, detector=detector)
        entry = {"photo": path, "faces": records}
        if annotate and path in annotate:
            from pipeline.infer.annotate import draw, save_image

            try:
                save_image(draw(img, records), annotate[path])
                entry["annotated"] = str(annotate[path])
            except FerError as e:
                entry["annotate_error"] = str(e)
        out.append(entry)
    return out


def annotate_targets(paths: list[str], out: str | None, *, suffix: str | None = None) -> dict:
    """Where ``--annotate OUT`` writes each input: OUT itself for one input, else
    ``OUT/<name>_annotated<suffix>`` (the folder is created)."""
    if not out:
        return {}
    if len(paths) == 1:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        return {paths[0]: Path(out)}
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise FerError(f"--annotate {out}: with several inputs this must be a folder")
    folder.mkdir(parents=True, exist_ok=True)
    targets, seen = {}, set()
    for p in paths:
        stem, ext = Path(p).stem, (suffix or Path(p).suffix or ".png")
        if is_video(p):
            ext = ".mp4"
        elif ext.lower() not in (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"):
            ext = ".png"
        name, k = f"{stem}_annotated{ext}", 1
        while name in seen:
            k += 1
            name = f"{stem}_annotated_{k}{ext}"
        seen.add(name)
        targets[p] = folder / name
    return targets


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
            how = {"eyes": ", aligned on the eyes", "landmarks": ", aligned on 5 landmarks",
                   "box": ", aligned on the box (eyes not found)"}.get(f.get("aligned"), "")
            lines.append(f"  {where}{how}: {f['label']} {probs[0][1]:.2f}  ({rest})")
        if r.get("annotated"):
            lines.append(f"  annotated picture: {r['annotated']}")
        if r.get("annotate_error"):
            lines.append(f"  annotated picture not written: {r['annotate_error']}")
    return "\n".join(lines)


def predict_command(args: argparse.Namespace) -> None:
    """The `fer predict` action: prints expressions per face. A photo that cannot be read is
    reported on its own line (or in the JSON) and the rest go on; FerError at the end if any
    failed, and at once if none of the files exists or the model cannot be loaded. Videos (and
    ``--camera N``) print JSON lines, one per face per analysed frame
    (:mod:`pipeline.infer.video`)."""
    paths = list(args.photos)
    camera = getattr(args, "camera", None)
    every = getattr(args, "every", 1)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise FerError(f"--every {every!r}: must be an integer >= 1")
    if camera is not None:
        from pipeline.infer.video import camera_source

        camera = camera_source(camera)
    if camera is None and not paths:
        raise FerError("name at least one photo or video (or --camera N)")
    if camera is not None and paths:
        raise FerError("--camera reads the camera: name no files with it")
    if paths and not any(os.path.exists(p) for p in paths):  # fail fast, before loading the model
        raise FerError(f"{paths[0]}: no such file" if len(paths) == 1
                       else "none of the photos exists")
    align = getattr(args, "align", "eyes")
    detector = getattr(args, "detector", None)
    margin = getattr(args, "margin", 0.2)
    targets = annotate_targets(paths or ["camera.mp4"], getattr(args, "annotate", None))
    if camera is not None:
        from pipeline.infer.video import open_capture, predict_video

        cap = open_capture(camera, live=True)  # before loading the model: no camera, one line
        predictor = load_predictor(getattr(args, "model", None), getattr(args, "device", None))
        predict_video(cap, predictor, every=every, align=align, margin=margin, detector=detector,
                      annotate=next(iter(targets.values()), None),
                      smooth=getattr(args, "smooth", 0.0), name=f"camera {camera}", live=True)
        return
    predictor = load_predictor(getattr(args, "model", None), getattr(args, "device", None))
    from pipeline.infer.video import predict_video

    photos = [p for p in paths if not is_video(p)]
    videos = [p for p in paths if is_video(p)]
    failed = []
    if photos:
        results = predict_photos(photos, predictor, margin=margin, align=align, detector=detector,
                                 annotate=targets)
        if getattr(args, "json", False):
            print(json.dumps(results, indent=2))
        else:
            print(format_text(results))
        failed += [r["error"] for r in results if "error" in r]
    for v in videos:
        try:
            predict_video(v, predictor, every=every, align=align, margin=margin, detector=detector,
                          annotate=targets.get(v), smooth=getattr(args, "smooth", 0.0))
        except FerError as e:
            failed.append(str(e))
    if failed:
        raise FerError(f"{len(failed)} of {len(paths)} "
                       f"{'photos' if not videos else 'inputs'} could not be read: " + "; ".join(failed))


def export_command(args) -> None:
    """`fer export --onnx OUT [--model CKPT|URI] [--log]`."""
    from pipeline.infer.export import export_onnx

    if not args.onnx:
        raise FerError("say what to export: --onnx model.onnx")
    if args.model and str(args.model).lower().endswith(".onnx"):
        raise FerError(f"--model {args.model} is already an ONNX file")
    predictor = load_predictor(args.model, "cpu")
    log = getattr(args, "log", False)
    if log and not str(args.model or "").startswith("models:/"):
        raise FerError("--log logs the file beside a registered version: name it with "
                       "--model models:/NAME/VERSION or models:/NAME@ALIAS")
    path = export_onnx(predictor, args.onnx, opset=args.opset)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, input uint8 [N, 3, "
          f"{predictor.image_size}, {predictor.image_size}], ten-crop probabilities of "
          f"{len(predictor.classes)} classes)")
    if log:
        from pipeline.infer.registry import log_onnx

        print(f"logged beside {args.model}: {log_onnx(args.model, path)}")
