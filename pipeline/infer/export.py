"""ONNX export (``fer export --onnx model.onnx``) and the onnxruntime predictor behind
``fer predict --model model.onnx``.

The exported graph is the whole of evaluation's ten-crop step, traced from
:func:`pipeline.evaluate.ten_crop_probabilities` itself (no second copy): input ``images``,
uint8 ``[N, 3, S, S]`` at the checkpoint's image size (N dynamic), ten crops, ImageNet
normalisation, the network, softmax, mean over the crops; output ``probabilities`` ``[N, C]``.
Resizing a face to ``S x S`` stays in :func:`pipeline.infer.predictor.to_model_input`, which
:class:`OnnxPredictor` shares with the PyTorch :class:`~pipeline.infer.predictor.Predictor`.
The checkpoint's classes, crop, image size and model config are stored in the ONNX file's
metadata (``fer.*`` keys), so the file alone is enough to predict; torch is not run.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.errors import FerError

OPSET = 18
META_PREFIX = "fer."


def _tencrop_module(predictor):
    import torch

    from pipeline.evaluate import ten_crop_probabilities

    class TenCrop(torch.nn.Module):
        def __init__(self, model, crop):
            super().__init__()
            self.model, self.crop = model, crop

        def forward(self, x):
            return ten_crop_probabilities(self.model, x, self.crop, "cpu")[0]

    return TenCrop(predictor.model, predictor.crop).eval()


def export_onnx(predictor, out, *, opset: int = OPSET) -> Path:
    """Write ``predictor``'s model (a :class:`~pipeline.infer.predictor.Predictor`) as an ONNX
    file at ``out`` (written beside it, then renamed). Returns the path."""
    import warnings

    import torch

    try:
        import onnx
    except ImportError as e:
        raise FerError("ONNX export needs the onnx package (pip install onnx onnxruntime)") from e
    out = Path(out)
    predictor.to("cpu")
    module = _tencrop_module(predictor)
    s = predictor.image_size
    dummy = torch.zeros(2, 3, s, s, dtype=torch.uint8)
    from pipeline.outputs import replacing_file

    # written beside `out`, renamed in with the user's normal file mode (mkstemp's is 0600)
    with replacing_file(out) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            batch = torch.export.Dim("batch", min=1, max=4096)
            prog = torch.onnx.export(module, (dummy,), dynamo=True, opset_version=opset,
                                     input_names=["images"], output_names=["probabilities"],
                                     dynamic_shapes=({0: batch},), optimize=True,
                                     verbose=False, external_data=False)
            prog.save(str(tmp), external_data=False)
        m = onnx.load(str(tmp))
        meta = {"classes": json.dumps(list(predictor.classes)), "crop": str(predictor.crop),
                "image_size": str(predictor.image_size),
                "model_config": json.dumps(predictor.meta.get("model_config", {}), sort_keys=True)}
        for k, v in meta.items():
            p = m.metadata_props.add()
            p.key, p.value = META_PREFIX + k, v
        m.producer_name = "fer-lipvgg"
        onnx.checker.check_model(m)
        onnx.save(m, str(tmp))
    return out


class OnnxPredictor:
    """The :class:`~pipeline.infer.predictor.Predictor` interface (``classes``, ``image_size``,
    ``probabilities``, ``predict_faces``) on an exported ONNX file, run by onnxruntime."""

    def __init__(self, path, *, batch_size: int = 32, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise FerError("running an ONNX model needs onnxruntime (pip install onnxruntime)") from e
        path = Path(path)
        if not path.is_file():
            raise FerError(f"{path}: no such ONNX file")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime's own errors: one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise FerError(f"{path}: not a loadable ONNX model ({first})") from e
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.classes = list(json.loads(meta[META_PREFIX + "classes"]))
            self.crop = int(meta[META_PREFIX + "crop"])
            self.image_size = int(meta[META_PREFIX + "image_size"])
        except (KeyError, ValueError) as e:
            raise FerError(f"{path}: not exported by `fer export --onnx` (no fer.* metadata)") from e
        self.meta = {"model_config": json.loads(meta.get(META_PREFIX + "model_config", "{}"))}
        self.batch_size = batch_size
        self.device = "cpu"
        self.input = self.session.get_inputs()[0].name

    def to(self, device: str) -> "OnnxPredictor":
        return self

    def run(self, batch_uint8_nchw: np.ndarray) -> np.ndarray:
        """Ten-crop probabilities ``[N, C]`` of uint8 images ``[N, 3, S, S]``."""
        return self.session.run(None, {self.input: np.ascontiguousarray(batch_uint8_nchw)})[0]

    def probabilities(self, faces: list) -> np.ndarray:
        from pipeline.infer.predictor import to_model_input

        out = []
        for i in range(0, len(faces), self.batch_size):
            batch = np.stack([to_model_input(f, self.image_size) for f in faces[i:i + self.batch_size]])
            out.append(self.run(batch.transpose(0, 3, 1, 2)))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict_faces(self, faces: list) -> list[dict]:
        from pipeline.infer.predictor import Predictor

        return Predictor.predict_faces(self, faces)
