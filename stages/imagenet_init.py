"""DVC stage imagenet_init: LIP-VGG16 with ImageNet vgg16_bn weights mapped in (or random: 'none')."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.config import load_params, section
from pipeline.data.classes import CLASSES
from pipeline.model import lip_vgg16
from pipeline.model.pretrained import initialise
from stages import run_stage

OUT = Path("models/imagenet_init.pt")
REPORT = Path("reports/imagenet_init.json")


def main() -> None:
    params = load_params()
    model_cfg = section(params, "model")
    source = str(section(params, "imagenet_init")["source"])
    torch.manual_seed(section(params, "train_rafdb").get("seed", 0))
    model = lip_vgg16(len(CLASSES), **model_cfg)
    info = initialise(model, source)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "model_config": model.config,
                "classes": list(CLASSES), "init": info}, tmp)
    tmp.replace(OUT)
    REPORT.write_text(json.dumps({**info, "pretrained": int(source != "none")}, indent=2) + "\n")
    print(f"imagenet_init: wrote {OUT} (source={source})")


if __name__ == "__main__":
    run_stage(main)
