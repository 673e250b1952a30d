"""What the two training stages share: params -> TrainConfig, one MLflow run, history for dvc plots."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline import code_deps
from pipeline.config import load_params, section
from pipeline.outputs import output_lock, write_file_atomic
from pipeline.model.speed import stage_banner
from pipeline.train.launch import check_output
from stages import stage_args


def train_stage(*, stage: str, dataset: str) -> dict:
    """The training stage ``stage`` (its params section has the same name), with its paths from
    dvc.yaml: DATA (parquet) INIT (checkpoint) OUT (model folder) HISTORY (json for dvc plots)."""
    from pipeline import tracking
    from pipeline.evaluate import plot_history
    from pipeline.train.config import TrainConfig
    from pipeline.train.launch import run_training

    data, init, out, history_path = stage_args("DATA", "INIT", "OUT", "HISTORY")
    params = load_params()
    output = Path(out)
    options = TrainConfig.options(params, stage)
    stage_banner(stage, options.get("amp", "auto"), options.get("use_gpu", "auto"))
    # The run name hashes the config, the init weights and the code the stage runs (its import
    # closure, which its dvc.yaml deps also are): an interrupted run resumes from its last Ray
    # checkpoint; changed params, weights or code start a fresh run.
    init_bytes = Path(init).read_bytes() if Path(init).is_file() else b""
    digest = code_deps.digest(f"stages.{stage}", json.dumps({**options, "init": init}, sort_keys=True).encode(),
                              init_bytes)[:10]
    cfg = TrainConfig.from_dict({**options, "data": data, "init": init,
                                 "output": str(output), "run_name": f"{stage}-{digest}"})
    check_output(output)  # refuse a foreign folder before an MLflow run is opened
    experiment = section(params, "mlflow")["experiment"]
    with tracking.tracked_run(experiment, f"{stage}-{digest}", stage=stage, dataset=dataset,
                              params=cfg.to_dict()) as run_id, output_lock(output):
        cfg = cfg.model_copy(update={"mlflow_run_id": run_id})
        # The previous model stays until the new one is complete (run_training swaps it in).
        summary = run_training(cfg)
        history = json.loads((output / "history.json").read_text())
        history_path = Path(history_path)
        write_file_atomic(history_path, json.dumps(history, indent=1) + "\n")
        curves = plot_history(history, history_path.with_name(f"curves_{dataset}.png"))
        tracking.log_artifacts(run_id, [curves, output / "history.json"])
    print(f"{stage}: best val accuracy {summary.get('best_val_accuracy')} -> {output}/model.pt "
          f"(MLflow run {run_id})")
    return summary
