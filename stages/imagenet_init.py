"""DVC stage imagenet_init: LIP-VGG16 with ImageNet vgg16_bn weights mapped in (or random: 'none')."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import load_params, section
from pipeline.data.classes import CLASSES
from pipeline.model.checkpoint import write_imagenet_init
from stages import run_stage

OUT = Path("models/imagenet_init.pt")
REPORT = Path("reports/imagenet_init.json")


def main() -> None:
    params = load_params()
    source = str(section(params, "imagenet_init")["source"])
    model_config = {"num_classes": len(CLASSES), **section(params, "model")}
    info = write_imagenet_init(OUT, model_config, source, seed=section(params, "train_rafdb").get("seed", 0))
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps({**info, "pretrained": int(source != "none")}, indent=2) + "\n")
    print(f"imagenet_init: wrote {OUT} (source={source})")


if __name__ == "__main__":
    run_stage(main)
