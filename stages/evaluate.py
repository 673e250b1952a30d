"""DVC stage evaluate@<dataset>: ten-crop test metrics, confusion plots, MLflow model + registry."""
from __future__ import annotations

from pathlib import Path

from pipeline import tracking
from pipeline.infer import registry
from pipeline.config import load_params, section
from pipeline.data.classes import CLASSES
from pipeline.evaluate import evaluate_checkpoint, write_outputs
from pipeline.model.speed import stage_banner
from stages import run_stage, stage_args


def main() -> None:
    dataset, model_path, data, metrics_dir, plots_dir = stage_args(
        "DATASET", "MODEL", "DATA", "METRICS_DIR", "PLOTS_DIR", datasets=("rafdb", "sfew"))
    params = load_params()
    opts = section(params, "evaluate")
    stage_banner(f"evaluate {dataset}", opts.get("amp", "auto"))
    metrics, confusion = evaluate_checkpoint(
        model_path, data, split="test", num_workers=opts["num_workers"], batch_size=opts["batch_size"],
        amp=opts.get("amp", "auto"), channels_last=opts.get("channels_last", "auto"),
        compile=bool(section(params, "model").get("compile", False)))
    paths = write_outputs(metrics, confusion, CLASSES, metrics_path=Path(metrics_dir),
                          plots_dir=Path(plots_dir), dataset=dataset)
    run_id = tracking.start_run(section(params, "mlflow")["experiment"], f"evaluate-{dataset}",
                                stage="evaluate", dataset=dataset, params=opts)
    tracking.log_metrics(run_id, metrics)  # nested per_class -> per_class.<name>
    tracking.log_artifacts(run_id, [paths["metrics"], paths["confusion_csv"], paths["confusion_png"]])
    name = f"lip-vgg16-{dataset}"
    version = registry.log_and_register_model(run_id, model_path, registered_name=name,
                                              test_accuracy=metrics["accuracy"], metrics=metrics,
                                              dataset=dataset, data=data)
    tracking.end_run(run_id)
    champ = registry.champion(name)
    print(f"evaluate {dataset}: ten-crop accuracy {metrics['accuracy']:.4f} "
          f"(centre {metrics['accuracy_center']:.4f}, n={metrics['n_test']}); registered {name} "
          f"v{version}; champion is v{champ[0] if champ else '?'}")


if __name__ == "__main__":
    run_stage(main)
