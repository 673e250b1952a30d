"""DVC stage synth@<dataset>: the built-in synthetic faces, in the dataset's real layout."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from pipeline.config import load_params, section
from pipeline.data.synthetic import write_synthetic
from stages import run_stage


def main() -> None:
    dataset = sys.argv[1]
    opts = section(load_params(), "synth")[dataset]
    out = Path("data/synthetic") / dataset
    shutil.rmtree(out, ignore_errors=True)
    write_synthetic(out, layout=dataset, n=opts.get("n"), seed=opts.get("seed", 0))
    print(f"synth: wrote {dataset} synthetic faces to {out}")


if __name__ == "__main__":
    run_stage(main)
