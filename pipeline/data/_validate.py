"""Decode-and-validate one file (runs in ingest's worker processes; imports only PIL)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import warnings

from PIL import Image, ImageFile, UnidentifiedImageError

#: Images above this many pixels are rejected as decompression bombs (never decoded).
MAX_PIXELS = 40_000_000


def configure(max_pixels: int = MAX_PIXELS) -> None:
    """Pool initializer: PIL's own bomb guard at the same limit, truncated images are errors."""
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
    """Validate encoded image bytes.

    Returns ``{"ok", "reason", "sha256", "height", "width", "mode", "format"}``; ``reason`` is
    None when ok. The bytes are never modified: a non-RGB mode is only reported (the loader
    converts to RGB at decode time).
    """
    res = {"ok": False, "reason": None, "sha256": hashlib.sha256(data).hexdigest(),
           "height": 0, "width": 0, "mode": None, "format": None}
    if not data:
        res["reason"] = "zero-byte file"
        return res
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                res.update(width=int(w), height=int(h), mode=im.mode, format=im.format)
                if w <= 0 or h <= 0:
                    res["reason"] = f"invalid size {w}x{h}"
                    return res
                if w * h > max_pixels:
                    res["reason"] = (f"decompression bomb: {w}x{h} = {w * h / 1e6:.0f} megapixels "
                                     f"exceeds the {max_pixels / 1e6:.0f} megapixel limit")
                    return res
                im.load()
                if im.mode != "RGB":
                    im.convert("RGB")  # proves the loader can convert it
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        res["reason"] = f"decompression bomb: {e}"
        return res
    except UnidentifiedImageError:
        res["reason"] = "not an image (unrecognised format)"
        return res
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as e:
        msg = str(e).strip() or type(e).__name__
        res["reason"] = f"truncated or corrupt image: {msg}"
        return res
    res["ok"] = True
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
