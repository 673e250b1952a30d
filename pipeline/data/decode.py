"""The pipeline's one image decoder: encoded bytes -> uint8 ``H x W x 3`` RGB.

Ingest's validation (:mod:`pipeline.data.validate`), the loader's pool workers
(:func:`decode_chunk`), ``fer predict`` and the MLflow model
(:mod:`pipeline.infer.predictor`) all call :func:`decode`, so "ingest accepted it" means "the
loader can decode it", and one file gives the same pixels in training, evaluation and serving.
It imports only numpy and PIL: the loader's pool workers import this module, never torch.

The rules, in order:

1. **Pixel cap, from the header.** ``Image.open`` reads only the header; an image over
   ``max_pixels`` (:data:`MAX_PIXELS`, 40 MP) is refused before a pixel is decoded. PIL's own
   bomb guard (``Image.MAX_IMAGE_PIXELS``) is left as a backstop; its warning is silenced (the
   cap here is stricter) and its error becomes the same one-line refusal.
2. **EXIF orientation** is applied (``ImageOps.exif_transpose``): the array is the photo as
   viewers show it, and its size is the oriented one.
3. **8-bit RGB.** PIL's ``convert("RGB")`` clips wide modes, so a 16-bit PNG would come out all
   white. Instead: ``I;16*`` and ``I`` (16-bit grayscale; older Pillow opens such PNGs as
   ``I``) keep the high byte (``value >> 8`` after clipping to 0..65535), which is what PIL
   itself does to 48/64-bit RGB(A) PNGs, so 16-bit gray and colour agree; ``F`` is taken as
   0..1 and scaled by 255 when its maximum is <= 1, else as 0..255, then rounded and clipped
   (NaN -> 0). Palette images with transparency go through RGBA; every other mode (1, L, LA,
   P, PA, RGBA, CMYK, YCbCr) is ``convert("RGB")``, alpha dropped. Ordinary 8-bit RGB comes
   out exactly as plain PIL decodes it.
4. Optional bilinear resize to ``size x size`` (the loader's and predictor's model input).

Every failure is a :class:`DecodeError` (a ``ValueError``) with a one-line message that starts
with its kind: ``zero-byte file``, ``not an image``, ``invalid size``, ``decompression bomb``,
``truncated or corrupt image``.
"""
from __future__ import annotations

import io
import re
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Images above this many pixels are refused as decompression bombs (never decoded).
MAX_PIXELS = 40_000_000

# What PIL raises for a corrupt or truncated file (beyond its own OSError/SyntaxError).
_CORRUPT = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError,
            struct.error, MemoryError)


class DecodeError(ValueError):
    """An image that cannot be decoded; the message is one line, fit for a report or the CLI."""


def _bomb(pixels: int, max_pixels: int, dims: str = "") -> DecodeError:
    return DecodeError(f"decompression bomb: {dims}{pixels / 1e6:.0f} megapixels exceeds the "
                       f"{max_pixels / 1e6:.0f} megapixel limit")


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0].strip() if lines else type(e).__name__


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB by rule 3 of the module docstring."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "I" or mode.startswith("I;16"):
        a = np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
        return Image.fromarray((a >> 8).astype(np.uint8)).convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0)
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # PIL warns on P -> RGB with transparency; same RGB values
    return im.convert("RGB")


def decode(data: bytes, size: int | None = None, *, max_pixels: int = MAX_PIXELS,
           info: dict | None = None) -> np.ndarray:
    """Encoded image bytes -> uint8 ``H x W x 3`` RGB (``size x size`` when ``size`` is given).

    ``info``, when given, is filled with ``format``, ``mode`` (as stored), ``width`` and
    ``height`` (the header's, then the EXIF-oriented size once decoded), so a caller that only
    validates still learns them for a refused file. Raises :class:`DecodeError`.
    """
    if not data:
        raise DecodeError("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if info is not None:
                    info.update(format=im.format, mode=im.mode, width=int(w), height=int(h))
                if w <= 0 or h <= 0:
                    raise DecodeError(f"invalid size {w}x{h}")
                if w * h > max_pixels:
                    raise _bomb(w * h, max_pixels, f"{w}x{h} = ")
                im.load()
                ImageOps.exif_transpose(im, in_place=True)  # no copy when there is no tag
                if info is not None:
                    info.update(width=int(im.width), height=int(im.height))
                out = _to_rgb(im)
                if size is not None and out.size != (size, size):
                    out = out.resize((size, size), Image.Resampling.BILINEAR)
                return np.asarray(out)
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:  # PIL's backstop fired first (its limit is lower)
        m = re.search(r"\((\d+) pixels\)", str(e))
        if m and int(m.group(1)) > max_pixels:
            raise _bomb(int(m.group(1)), max_pixels) from None
        raise DecodeError(f"decompression bomb: {_one_line(e)}") from None  # PIL's own limit
    except UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised format)") from None
    except _CORRUPT as e:
        raise DecodeError(f"truncated or corrupt image: {_one_line(e)}") from e


def decode_chunk(args) -> np.ndarray:
    """``(blobs, size)`` -> uint8 ``[N, H, W, 3]``: the loader's pool task (one argument, picklable)."""
    blobs, size = args
    out = [decode(b, size) for b in blobs]
    return np.stack(out) if out else np.zeros((0, size or 0, size or 0, 3), np.uint8)
