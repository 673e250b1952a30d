"""The one place checkpoints are written and read.

Three kinds, all plain dicts of tensors and JSON-like values, read with
``torch.load(weights_only=True)`` only (a checkpoint can come from a shared registry; unpickling
arbitrary objects would run its code):

* a **model** (``models/<dataset>/model.pt``, contract): ``state_dict``, ``model_config`` (the
  kwargs of :func:`pipeline.model.lip_vgg16`), ``classes``, ``image_size`` (the square size the
  images were resized to in training: what inference must resize to), ``crop``, ``epoch``,
  ``val_accuracy``, ``train_config``;
* an **init** (``models/imagenet_init.pt``): ``state_dict``, ``model_config``, ``classes``,
  ``init`` (what the ImageNet mapping copied);
* the **training state** inside each Ray Train checkpoint folder (``state.pt``): model,
  optimiser, scheduler, epoch, best state, history; written by the worker, read to resume and to
  write the model. Each ``.pt`` file there has a ``<name>.sha256`` beside it, written after it:
  a folder torn by a kill, a full disk or a half-finished upload is told from an intact one
  (:func:`damage`), so a resume can fall back to the newest intact epoch.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.outputs import sha256_file, write_file_atomic
from pipeline.errors import FerError

STATE_FILE = "state.pt"
CHECKSUM_SUFFIX = ".sha256"
#: Keys a model checkpoint must have to be rebuilt.
MODEL_KEYS = ("state_dict", "model_config", "classes", "image_size", "crop")


def to_bytes(obj: dict) -> bytes:
    """``torch.save`` into memory: the zip's inner folder is then always ``archive/`` (saved to
    a file it is named after the file), so equal contents give equal bytes wherever written."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _atomic_save(obj: dict, path: Path) -> Path:
    """Written beside ``path``, then renamed: a killed writer never leaves half a file."""
    path = Path(path)
    write_file_atomic(path, to_bytes(obj))
    return path


def read(source) -> dict:
    """A checkpoint dict from a path or from its bytes (shipped through Ray's object store)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return torch.load(io.BytesIO(bytes(source)), map_location="cpu", weights_only=True)
    path = Path(source)
    if not path.is_file():
        raise FerError(f"checkpoint {path} not found (train the model first, or pass its model.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a one-line message for any unreadable file
        first = (str(e).strip().splitlines() or [""])[0]
        raise FerError(f"{path} is not a readable model checkpoint: {type(e).__name__}: {first}") from e
    if not isinstance(ckpt, dict):
        raise FerError(f"{path} is not a checkpoint dict")
    return ckpt


# --------------------------------------------------------------------------- models


def save_model(path, state_dict: dict, *, model_config: dict, classes, image_size: int, crop: int,
               **meta: Any) -> Path:
    return _atomic_save({"state_dict": state_dict, "model_config": dict(model_config),
                         "classes": list(classes), "image_size": int(image_size), "crop": int(crop),
                         **meta}, path)


def model_from_dict(ckpt: dict) -> tuple[nn.Module, dict]:
    """``(network in eval mode on CPU, meta)``: meta is the checkpoint without ``state_dict``."""
    from pipeline.model import lip_vgg16

    missing = [k for k in MODEL_KEYS if ckpt.get(k) is None]
    if missing:
        raise FerError(f"checkpoint lacks {', '.join(missing)}: not a model.pt written by training "
                       "(or by a version that did not record the training image size: retrain it)")
    model = lip_vgg16(**ckpt["model_config"])
    state = ckpt["state_dict"]
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers prefix the names
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    model.load_state_dict(state)
    model.eval()
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    meta.update(classes=list(meta["classes"]), crop=int(meta["crop"]), image_size=int(meta["image_size"]))
    if len(meta["classes"]) != model.config["num_classes"]:
        raise FerError(f"checkpoint has {len(meta['classes'])} class names for a "
                       f"{model.config['num_classes']}-class network")
    return model, meta


def load_model(source) -> tuple[nn.Module, dict]:
    """The network of a model checkpoint (path or bytes), in eval mode on CPU, and its meta."""
    return model_from_dict(read(source))


# --------------------------------------------------------------------------- init weights


def load_init(model: nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    """Copy every tensor of a checkpoint (``{"state_dict", "model_config"}``) that fits ``model``.

    The classifier (``model.classifier_prefix``) is kept freshly initialised only when the number
    of classes differs; any other shape mismatch means a different architecture and is an error.
    Returns the lists of copied, re-initialised (classifier) and missing (not in the file) keys.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [""])[0]
        raise FerError(f"cannot read init checkpoint {path}: {type(e).__name__}: {first}") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict)):
        raise FerError(f"init checkpoint {path} is not a dict with a 'state_dict'")
    src: dict[str, torch.Tensor] = ckpt["state_dict"]
    src_classes = (ckpt.get("model_config") or {}).get("num_classes")
    target = model.state_dict()
    prefix = model.classifier_prefix
    n_classes = model.config["num_classes"]
    if src_classes is None:  # infer from the classifier's bias
        bias = src.get(prefix + "bias")
        src_classes = int(bias.shape[0]) if bias is not None else n_classes
    report: dict[str, list[str]] = {"copied": [], "reinit": [], "missing": []}
    bad = []
    for k, t in target.items():
        if k.startswith(prefix) and src_classes != n_classes:
            report["reinit"].append(k)
        elif k not in src:
            report["missing"].append(k)
        elif src[k].shape != t.shape:
            bad.append(f"{k}: file {tuple(src[k].shape)} vs model {tuple(t.shape)}")
        else:
            report["copied"].append(k)
    if bad:
        raise FerError(f"init checkpoint {path} does not fit this network (other width/head?): "
                       + "; ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""))
    if not report["copied"]:
        raise FerError(f"init checkpoint {path} shares no tensor with this network")
    with torch.no_grad():
        for k in report["copied"]:
            target[k].copy_(src[k])
    return report


def write_imagenet_init(out, model_config: dict, source: str, *, seed: int = 0) -> dict:
    """LIP-VGG16 with ImageNet ``vgg16_bn`` weights mapped in (``source``: "none" = random init,
    "torchvision", or a .pth path), saved at ``out``; returns what the mapping copied. The seed
    fixes the parts the mapping does not cover (LIP logits, head, ECA)."""
    from pipeline.data.classes import CLASSES
    from pipeline.model import lip_vgg16
    from pipeline.model.pretrained import initialise

    torch.manual_seed(seed)
    model = lip_vgg16(**model_config)
    info = initialise(model, source)
    save_init(out, model.state_dict(), model.config, CLASSES, info)
    return info


def save_init(out, state_dict: dict, model_config: dict, classes, init: dict) -> Path:
    """An init checkpoint (what :func:`load_init` reads): the ``map`` mapping's, or the network
    the ImageNet training (``adapt``/``pretrain``) left, with its own classes."""
    return _atomic_save({"state_dict": state_dict, "model_config": dict(model_config),
                         "classes": list(classes), "init": init}, Path(out))


# --------------------------------------------------------------------------- training state


def save_checked(obj: dict, path) -> Path:
    """``path`` and then its checksum: a file without its checksum, or not matching it, was torn."""
    data = to_bytes(obj)
    path = write_file_atomic(Path(path), data)
    write_file_atomic(path.with_name(path.name + CHECKSUM_SUFFIX), hashlib.sha256(data).hexdigest() + "\n")
    return path


def save_state(folder, state: dict) -> None:
    save_checked(state, Path(folder) / STATE_FILE)


def damage(folder) -> str | None:
    """Why the training-state folder cannot be resumed from (None: intact). Every ``.pt`` file
    must match its checksum; one without a checksum (written before checksums were) must load."""
    folder = Path(folder)
    if not folder.is_dir():
        return "its folder is missing"
    if not (folder / STATE_FILE).is_file():
        return f"{STATE_FILE} is missing"
    for f in sorted(folder.glob("*.pt")):
        sums = f.with_name(f.name + CHECKSUM_SUFFIX)
        if sums.is_file():
            if sha256_file(f) != sums.read_text().strip():
                return f"{f.name} does not match its checksum (a torn write)"
        else:
            try:
                torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable file is damage
                first = (str(e).strip().splitlines() or [""])[0]
                return f"{f.name} is unreadable ({type(e).__name__}: {first})"
    return None


def read_state(folder) -> dict:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FerError(f"no training state at {folder}")
    return torch.load(path, map_location="cpu", weights_only=True)


def has_state(folder) -> bool:
    return (Path(folder) / STATE_FILE).is_file()
