"""Decode encoded images into a uint8 ``[N, H, W, 3]`` array (the loader's pool workers import
only this module: numpy and PIL, not torch)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode_chunk(args) -> np.ndarray:
    blobs, size = args
    out = []
    for b in blobs:
        with Image.open(io.BytesIO(b)) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            out.append(np.asarray(im))
    return np.stack(out) if out else np.zeros((0, size or 0, size or 0, 3), np.uint8)
