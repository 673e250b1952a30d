"""DVC stage synth@<dataset>: the built-in synthetic faces, in the dataset's real layout.

The previous set is replaced only once the new one is complete (written beside it, then swapped).
"""
from __future__ import annotations

from pipeline.config import load_params, section
from pipeline.data.synthetic import write_synthetic
from stages import run_stage, stage_args


def main() -> None:
    synth = section(load_params(), "synth")
    dataset, out = stage_args("DATASET", "OUT", datasets=synth)
    opts = synth[dataset]
    write_synthetic(out, layout=dataset, n=opts.get("n"), seed=opts.get("seed", 0))
    print(f"synth: wrote {dataset} synthetic faces to {out}")


if __name__ == "__main__":
    run_stage(main)
