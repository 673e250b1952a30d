"""Map torchvision's ImageNet `vgg16_bn` weights (read from a local file) into any LIP-VGG16 variant.

Kept apart from the architecture (timm-style): the network never knows where its weights came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.errors import FerError
from pipeline.model.vgg import LIPVGG16


@dataclass
class MappingReport:
    copied: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"copied {len(self.copied)} tensors, {len(self.new)} new "
                f"(e.g. {', '.join(self.new[:3]) or '-'}), {len(self.ignored)} source tensors unused")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FerError(f"weights file {path} does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with code, truncated file, not a torch file
        raise FerError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FerError(f"weights file {path} does not hold a state dict of tensors")
    return sd


def map_vgg16_bn(model: LIPVGG16, source: dict[str, torch.Tensor], *,
                 copy_classifier: bool = False) -> MappingReport:
    """Copy every conv+BN tensor (and VGG's first two FC layers for head "fc") into `model`.

    Names line up because the model keeps torchvision's indices; a shape mismatch (other width,
    not a vgg16_bn file) is an error, never a partial load.
    """
    target = model.state_dict()
    report = MappingReport()
    wanted = [k for k in target if k.startswith("features.") and ".logit." not in k]
    if model.config["head"] == "fc":
        wanted += [k for k in target if k.startswith("classifier.")
                   and (copy_classifier or not k.startswith(model.classifier_prefix))]
    missing = [k for k in wanted if k not in source]
    if missing:
        raise FerError(f"weights do not look like torchvision vgg16_bn: missing {missing[:3]} "
                       f"({len(missing)} tensors)")
    bad = [f"{k}: file {tuple(source[k].shape)} vs model {tuple(target[k].shape)}"
           for k in wanted if source[k].shape != target[k].shape]
    if bad:
        raise FerError("weights do not fit this network (width must be 1.0 for ImageNet weights): "
                       + "; ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""))
    with torch.no_grad():
        for k in wanted:
            target[k].copy_(source[k])
    report.copied = wanted
    report.new = [k for k in target if k not in set(wanted)]
    report.ignored = [k for k in source if k not in set(wanted)]
    return report


def load_vgg16_bn_file(model: LIPVGG16, path: str | Path) -> MappingReport:
    return map_vgg16_bn(model, load_state_dict_file(path))


def torchvision_weights_path() -> Path:
    """Where torchvision keeps vgg16_bn's ImageNet weights (the torch hub cache)."""
    from torchvision.models import VGG16_BN_Weights

    url = VGG16_BN_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _torchvision_state_dict() -> dict[str, torch.Tensor]:
    path = torchvision_weights_path()
    if path.is_file():
        return load_state_dict_file(path)
    from torchvision.models import VGG16_BN_Weights

    try:  # online machines fetch it once into the cache; offline ones get told where to put it
        return VGG16_BN_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    except Exception as e:
        raise FerError(f"torchvision vgg16_bn ImageNet weights are not in the cache ({path}) and "
                       f"could not be downloaded ({type(e).__name__}). Copy "
                       f"{VGG16_BN_Weights.IMAGENET1K_V1.url.rsplit('/', 1)[-1]} to {path}, or set "
                       "imagenet_init.source to a local .pth path, or to 'none'") from None


def initialise(model: LIPVGG16, source: str) -> dict:
    """Apply `source` ('none' | 'torchvision' | a .pth path) to `model`; return what was used."""
    if source == "none":
        return {"source": "none", "copied": 0, "new": len(model.state_dict())}
    if source == "torchvision":
        report = map_vgg16_bn(model, _torchvision_state_dict())
        where = str(torchvision_weights_path())
    else:
        report = load_vgg16_bn_file(model, source)
        where = str(Path(source).resolve())
    print(f"imagenet_init: {report.summary()}")
    return {"source": source, "weights_file": where, "copied": len(report.copied), "new": len(report.new)}
