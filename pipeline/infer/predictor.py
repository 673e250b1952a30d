"""Expression probabilities of face images, with evaluation's exact preprocessing.

A face (encoded bytes or a uint8 HxWx3 RGB array) is decoded and resized the way the loader
builds the evaluation tensors (PIL, RGB, bilinear to ``image_size``), then goes through
:func:`pipeline.evaluate.ten_crop_probabilities`: ten crops at the checkpoint's ``crop`` in one
forward pass, softmax averaged. No second copy of that code lives here.
"""
from __future__ import annotations


import numpy as np
import torch

from pipeline.data.decode import DecodeError, decode
from pipeline.errors import FerError


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 HxWx3, by the pipeline's one decoder
    (:func:`pipeline.data.decode.decode`: pixel cap from the header, EXIF orientation, 16-bit
    and float modes scaled to 8 bits), so a photo gives the pixels training saw."""
    return _decode(data)


def _decode(data, size: int | None = None) -> np.ndarray:
    try:
        return decode(bytes(data), size)
    except DecodeError as e:
        raise FerError(str(e)) from e


def _rgb_array(a) -> np.ndarray:
    """An image array -> uint8 HxWx3. Values are 0..255 whatever the integer dtype (JSON gives
    int64), so they are clipped, not rescaled; floats follow decode's F rule (0..1 if max <= 1)."""
    a = np.asarray(a)
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise FerError(f"expected an HxWx3 RGB image, got an array of shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def to_model_input(face, size: int) -> np.ndarray:
    """One face (bytes or HxWx3 array) -> RGB uint8 ``size x size x 3``, as the loader does it
    (encoded bytes go through the loader's own decode, resize included)."""
    from PIL import Image

    if isinstance(face, (bytes, bytearray, memoryview)):
        return _decode(face, size)
    a = _rgb_array(face)
    if a.shape[:2] == (size, size):
        return a
    return np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BILINEAR))


class Predictor:
    """``Predictor("models/rafdb/model.pt")`` or ``Predictor((model, meta))``."""

    def __init__(self, source, *, device: str | None = None, batch_size: int = 32,
                 amp: bool | str = "auto", channels_last: bool | str = "auto"):
        from pipeline.evaluate import default_device
        from pipeline.model.checkpoint import load_model

        if isinstance(source, tuple):
            model, meta = source
        else:
            model, meta = load_model(source)
        self.model, self.meta = model.eval(), meta
        self.classes: list[str] = list(meta["classes"])
        self.crop = int(meta["crop"])
        self.image_size = int(meta["image_size"])  # what training resized to (recorded)
        self.batch_size = batch_size
        self.amp, self.channels_last = amp, channels_last  # as in evaluation: true/false/"auto"
        self.to(default_device(device))

    def to(self, device: str) -> "Predictor":
        self.device = device
        self.model.to(device)
        return self

    def probabilities(self, faces: list) -> torch.Tensor:
        """``[N, C]`` ten-crop-averaged softmax probabilities of the faces."""
        from pipeline.evaluate import ten_crop_probabilities

        out = []
        for i in range(0, len(faces), self.batch_size):
            batch = np.stack([to_model_input(f, self.image_size) for f in faces[i:i + self.batch_size]])
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
            p10, _ = ten_crop_probabilities(self.model, x, self.crop, self.device, amp=self.amp,
                                            channels_last=self.channels_last)
            out.append(p10.cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.classes))

    def predict_faces(self, faces: list) -> list[dict]:
        """``[{"label": name, "probabilities": {name: p}}]``, one per face."""
        if isinstance(faces, (bytes, bytearray, np.ndarray)) and not (
                isinstance(faces, np.ndarray) and faces.ndim == 4):
            faces = [faces]
        probs = self.probabilities(list(faces))
        res = []
        for row in probs.tolist():
            k = int(np.argmax(row))
            res.append({"label": self.classes[k],
                        "probabilities": {c: float(p) for c, p in zip(self.classes, row)}})
        return res
