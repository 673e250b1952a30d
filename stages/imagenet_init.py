"""DVC stage imagenet_init: the init weights of LIP-VGG16, per ``imagenet_init.mode``:

* ``map`` (default): torchvision's ImageNet vgg16_bn weights mapped in (or random: source none);
* ``adapt`` / ``pretrain``: trained on the ImageNet parquet (``imagenet_init.data``) streamed with
  Ray Data (pipeline.train.imagenet).
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

from pipeline.config import load_params, section
from pipeline.outputs import write_file_atomic
from pipeline.data.classes import CLASSES
from pipeline.model import LIPVGG16
from pipeline.model.checkpoint import write_imagenet_init
from stages import run_stage, stage_args


def main() -> None:
    out, report = map(Path, stage_args("OUT", "REPORT"))
    params = load_params()
    opts = section(params, "imagenet_init")
    if opts.get("mode", "map") != "map":
        from pipeline.model.speed import stage_banner
        from pipeline.train.imagenet import run_imagenet_init

        stage_banner(f"imagenet_init ({opts['mode']})", opts.get("amp", "auto"),
                     section(params, "ray").get("use_gpu", "auto"))
        run_imagenet_init(out, report, params)
        return
    source = str(opts["source"])
    # the network's own arguments only: the model section also holds how it is run (compile)
    arch = inspect.signature(LIPVGG16).parameters
    model_config = {"num_classes": len(CLASSES),
                    **{k: v for k, v in section(params, "model").items() if k in arch}}
    # the parts ImageNet does not cover start from train_rafdb's seed (declared in dvc.yaml)
    info = write_imagenet_init(out, model_config, source, seed=section(params, "train_rafdb").get("seed", 0))
    write_file_atomic(report, json.dumps({**info, "pretrained": int(source != "none")}, indent=2) + "\n")
    print(f"imagenet_init: wrote {out} (source={source})")


if __name__ == "__main__":
    run_stage(main)
