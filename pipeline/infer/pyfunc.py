"""The MLflow pyfunc model: face images in, expression probabilities out.

Input: a pandas DataFrame with an ``image`` column (encoded bytes, base64 strings as sent to
``mlflow models serve`` in JSON, or uint8 HxWx3 arrays), or a list / array of uint8 HxWx3 images
or encoded bytes. The logged model's signature (:func:`pipeline.infer.registry.signature`)
declares the served form, an ``image`` string column (base64), so MLflow refuses other frames
(a missing ``image`` column, numbers) before :meth:`FerPyfunc.predict` runs; arrays reach it
only through the unwrapped model (``model.unwrap_python_model()``). Output: a DataFrame with
``label`` and one probability column per class. The
preprocessing (decode, resize, ten-crop, softmax average) is
:class:`pipeline.infer.predictor.Predictor`'s, which is evaluation's: encoded bytes go through the
loader's decoder (:func:`pipeline.data.decode.decode`), pixel cap and EXIF orientation included.
An undecodable image is a ``ValueError`` with a one-line message.

Request caps (the served model answers HTTP 400 with one line beyond them, before decoding
anything): at most ``FER_SERVE_MAX_IMAGES`` images (default 64) and ``FER_SERVE_MAX_BYTES``
encoded bytes (default 32 MiB) per request; each image is also capped at 40 megapixels. A server
otherwise keeps the memory of its largest request (868 MB -> 1.5 GB after 8 images of 36 MP).
"""
from __future__ import annotations

import base64
import binascii

import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
import numpy as np
import pandas as pd

from pipeline.errors import FerError

import os


def request_caps() -> tuple[int, int]:
    """(images, encoded bytes) one request may carry: ``FER_SERVE_MAX_IMAGES``, ``FER_SERVE_MAX_BYTES``."""
    return (int(os.environ.get("FER_SERVE_MAX_IMAGES", "64")),
            int(os.environ.get("FER_SERVE_MAX_BYTES", str(32 * 1024 * 1024))))


def check_request(images: list) -> None:
    """Refuse a request over the caps in one line (a ValueError, HTTP 400 when served)."""
    max_images, max_bytes = request_caps()
    if len(images) > max_images:
        raise ValueError(f"{len(images)} images in one request: at most {max_images} "
                         "(FER_SERVE_MAX_IMAGES); send them in several requests")
    total = sum(len(v) if isinstance(v, (bytes, bytearray)) else getattr(v, "nbytes", 0) for v in images)
    if total > max_bytes:
        raise ValueError(f"{total / 2**20:.1f} MiB of images in one request: at most "
                         f"{max_bytes / 2**20:.1f} MiB (FER_SERVE_MAX_BYTES); send fewer or smaller images")


def _as_image(v):
    if isinstance(v, str):
        try:
            return base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError("an `image` string must be base64-encoded image bytes") from e
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, list):
        v = np.asarray(v, dtype=np.uint8)
    return v


def to_images(model_input) -> list:
    """Normalise the accepted input types to a list of encoded bytes / uint8 HxWx3 arrays."""
    if isinstance(model_input, pd.DataFrame):
        col = "image" if "image" in model_input.columns else model_input.columns[0]
        items = list(model_input[col])
    elif isinstance(model_input, pd.Series):
        items = list(model_input)
    elif isinstance(model_input, dict) and "image" in model_input:
        items = list(model_input["image"]) if not isinstance(model_input["image"], (bytes, str)) \
            else [model_input["image"]]
    elif isinstance(model_input, np.ndarray) and model_input.dtype != object:
        single = model_input.ndim == 2 or (model_input.ndim == 3 and model_input.shape[-1] in (1, 3, 4))
        items = [model_input] if single else list(model_input)
    elif isinstance(model_input, (bytes, bytearray, str)):
        items = [model_input]
    else:
        items = list(model_input)
    return [_as_image(v) for v in items]


class BadInput(MlflowException, ValueError):
    """A request the model cannot read (not base64, not an image, over the pixel cap): the served
    model answers HTTP 400 with this one line, and stays up; a ValueError for Python callers."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class FerPyfunc(mlflow.pyfunc.PythonModel):
    """Loads ``context.artifacts["checkpoint"]`` (the training ``model.pt``) into a Predictor."""

    def load_context(self, context):
        from pipeline.infer.predictor import Predictor

        self.predictor = Predictor(context.artifacts["checkpoint"])

    # The hint is the serving input (`mlflow models serve`); lists and arrays of images work too.
    # pd.DataFrame is a hint MLflow neither validates nor converts against.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        classes = self.predictor.classes
        try:
            images = to_images(model_input)
            check_request(images)
            if not images:
                return pd.DataFrame(columns=["label", *classes])
            preds = self.predictor.predict_faces(images)
        except (FerError, ValueError) as e:
            raise BadInput(str(e)) from e
        rows = [{"label": p["label"], **p["probabilities"]} for p in preds]
        return pd.DataFrame(rows, columns=["label", *classes])
