"""Decode-and-validate one file (runs in ingest's worker processes; imports only numpy and PIL).

Validation *is* decoding: :func:`check_bytes` runs :func:`pipeline.data.decode.decode`, the
function the loader and the predictor use, so "ok" means "the loader can decode it" and the
reported size is the EXIF-oriented one the loader will produce.
"""
from __future__ import annotations

import contextlib
import hashlib

from PIL import Image, ImageFile

from pipeline.data.decode import MAX_PIXELS, DecodeError, decode

__all__ = ["MAX_PIXELS", "check_bytes", "check_file", "check_files", "configure", "configured"]


def configure(max_pixels: int = MAX_PIXELS) -> None:
    """Pool initializer: truncated images are errors, and PIL's own bomb guard sits at the same
    limit as a backstop (it errors only above twice the limit; :func:`decode` refuses from the
    header at the limit itself)."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False


@contextlib.contextmanager
def configured(max_pixels: int = MAX_PIXELS):
    """:func:`configure` for the duration of a block, then PIL's previous settings."""
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    configure(max_pixels)
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def check_bytes(data: bytes, max_pixels: int = MAX_PIXELS) -> dict:
    """Validate encoded image bytes by decoding them the way the loader does.

    Returns ``{"ok", "reason", "sha256", "height", "width", "mode", "format"}``; ``reason`` is
    None when ok, else :func:`~pipeline.data.decode.decode`'s one-line error. ``mode`` is the
    stored mode and the bytes are never modified: a non-RGB image is only reported (the loader
    converts it at decode time). ``height``/``width`` are EXIF-oriented.
    """
    res = {"ok": False, "reason": None, "sha256": hashlib.sha256(data).hexdigest(),
           "height": 0, "width": 0, "mode": None, "format": None}
    info: dict = {}
    try:
        decode(data, max_pixels=max_pixels, info=info)
    except DecodeError as e:
        res["reason"] = str(e)
    else:
        res["ok"] = True
    res.update(info)
    return res


def check_file(path: str, max_pixels: int = MAX_PIXELS) -> dict:
    """:func:`check_bytes` on a file; unreadable files are rejected with the OS error."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        return {"ok": False, "reason": f"unreadable: {e.strerror or e}", "sha256": None,
                "height": 0, "width": 0, "mode": None, "format": None}
    return check_bytes(data, max_pixels)


def check_files(paths: list[str], max_pixels: int = MAX_PIXELS) -> list[dict]:
    return [check_file(p, max_pixels) for p in paths]
