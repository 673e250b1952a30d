"""DVC stage ingest@<dataset>: a dataset folder (real or synthetic) -> validated parquet + report."""
from __future__ import annotations

from pathlib import Path

from pipeline.config import load_params, section
from pipeline.data.ingest import ingest
from pipeline.errors import FerError
from stages import run_stage, stage_args

DOWNLOAD_HINTS = {
    "rafdb": "RAF-DB (basic) from http://www.whdeng.cn/raf/model1.html (licence agreement required); "
             "unpack so that the folder holds EmoLabel/list_patition_label.txt and Image/aligned/",
    "sfew": "SFEW 2.0 from https://users.cecs.anu.edu.au/~few_group/AFEW.html (licence agreement "
            "required); unpack so that the folder holds Train/ and Val/ with the emotion folders",
}


def source_path(src: str, dataset: str) -> Path:
    path = Path(src).expanduser()
    if not path.exists():
        raise FerError(f"datasets.{dataset} = {src} does not exist. Download "
                       f"{DOWNLOAD_HINTS[dataset]}, then set datasets.{dataset} in params.yaml to "
                       f"that folder (or back to data/synthetic/{dataset})")
    return path


def main() -> None:
    dataset, src, out, report = stage_args("DATASET", "SRC", "OUT", "REPORT", datasets=DOWNLOAD_HINTS)
    opts = section(load_params(), "ingest")
    ingest(source_path(src, dataset), Path(out), report_path=Path(report), dataset=dataset,
           val_fraction=opts["val_fraction"], seed=opts["seed"],
           max_bad_fraction=opts["max_bad_fraction"], workers=opts.get("workers"))


if __name__ == "__main__":
    run_stage(main)
