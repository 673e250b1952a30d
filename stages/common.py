"""What the two training stages share: params -> TrainConfig, one MLflow run, history for dvc plots."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pipeline
from pipeline.config import load_params, section
from pipeline.data._util import output_lock
from pipeline.train.launch import check_output

CODE = Path(pipeline.__file__).parent


def train_stage(*, stage: str, dataset: str, section_name: str, init: str) -> dict:
    from pipeline import tracking
    from pipeline.evaluate import plot_history
    from pipeline.train.config import TrainConfig
    from pipeline.train.launch import run_training

    params = load_params()
    output = Path("models") / dataset
    options = {**section(params, "model"), **section(params, "ray"), **section(params, section_name)}
    # The run name hashes the config, the init weights and the training code: an interrupted run
    # resumes from its last Ray checkpoint; changed params, weights or code start a fresh run.
    h = hashlib.sha256(json.dumps({**options, "init": init}, sort_keys=True).encode())
    for f in sorted([Path(init), *CODE.glob("train/*.py"), *CODE.glob("model/*.py"), CODE / "data/loader.py"]):
        if f.is_file():
            h.update(f.read_bytes())
    digest = h.hexdigest()[:10]
    cfg = TrainConfig.from_dict({**options, "data": f"data/parquet/{dataset}", "init": init,
                                 "output": str(output), "run_name": f"{stage}-{digest}"})
    check_output(output)  # refuse a foreign folder before an MLflow run is opened
    experiment = section(params, "mlflow")["experiment"]
    run_id = tracking.start_run(experiment, f"{stage}-{digest}", stage=stage, dataset=dataset,
                                params=cfg.to_dict())
    cfg.mlflow_run_id = run_id
    try:
        # The previous model stays until the new one is complete (run_training swaps it in).
        with output_lock(output):
            summary = run_training(cfg, extra_loop_config={"mlflow_tracking_uri": tracking.tracking_uri()})
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    history = json.loads((output / "history.json").read_text())
    reports = Path("reports")
    reports.mkdir(exist_ok=True)
    (reports / f"history_{dataset}.json").write_text(json.dumps(history, indent=1) + "\n")
    curves = plot_history(history, reports / f"curves_{dataset}.png")
    tracking.log_artifacts(run_id, [curves, output / "history.json"])
    tracking.end_run(run_id)
    print(f"{stage}: best val accuracy {summary.get('best_val_accuracy')} -> {output}/model.pt "
          f"(MLflow run {run_id})")
    return summary
