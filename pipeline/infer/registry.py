"""The logged model and the registry: the pyfunc model (:mod:`pipeline.infer.pyfunc`, with the
training checkpoint as its artifact) logged under a run, registered per dataset, and the
``champion`` alias kept on the version with the best test accuracy."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pipeline
from pipeline.errors import FerError
from pipeline.infer.pyfunc import FerPyfunc
from pipeline.infer.resolve import SHA_KEY, sha256_file
from pipeline.tracking import client, git_commit, using_store

CHAMPION = "champion"
#: Model-version tag that holds the test accuracy the champion comparison uses.
ACCURACY_TAG = "test_accuracy"




def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("mlflow", "torch", "torchvision", "numpy", "pandas", "pillow",
                 "opencv-python-headless"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


def log_model(run_id: str, checkpoint_path: str | os.PathLike, *, registered_name: str | None = None,
              name: str = "model"):
    """Log the pyfunc model (``pipeline.infer.pyfunc.FerPyfunc`` with the checkpoint as its
    ``checkpoint`` artifact and the ``pipeline`` package as code) under ``run_id``; register it
    as a new version of ``registered_name`` when given. Returns MLflow's ``ModelInfo``."""
    import mlflow.pyfunc
    from mlflow.models import Model

    ckpt = Path(checkpoint_path)
    if not ckpt.is_file():
        raise FerError(f"checkpoint {ckpt} not found")
    c = client()
    run = c.get_run(run_id)
    # Created here so that the model lands in the run's experiment (MLflow 3 otherwise files a
    # model logged with no *active* run under the default experiment).
    logged = c.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                   params=dict(run.data.params),
                                   tags={"stage": run.data.tags.get("stage", ""),
                                         "dataset": run.data.tags.get("dataset", "")})
    with using_store():
        return Model.log(
            artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id,
            model_id=logged.model_id,
            python_model=FerPyfunc(), artifacts={"checkpoint": str(ckpt)},
            code_paths=[str(Path(pipeline.__file__).parent)],
            pip_requirements=_pip_requirements(), registered_model_name=registered_name,
            # `fer predict` checks the checkpoint against this before loading it
            metadata={SHA_KEY: sha256_file(ckpt)},
        )


def champion(name: str) -> tuple[int, float] | None:
    """``(version, test accuracy)`` of ``name``'s ``champion`` alias, or None if it has none."""
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        mv = c.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    acc = mv.tags.get(ACCURACY_TAG)
    return int(mv.version), float(acc) if acc is not None else float("nan")


def log_and_register_model(run_id: str, checkpoint_path: str | os.PathLike, *, registered_name: str,
                           test_accuracy: float) -> int:
    """Log the model, register it as a new version of ``registered_name``, tag the version with
    ``test_accuracy``, and move the ``champion`` alias to it only if it beats the current
    champion (ties keep the old one; a champion with no recorded accuracy is always beaten).
    Returns the new version number."""
    info = log_model(run_id, checkpoint_path, registered_name=registered_name)
    version = int(info.registered_model_version)
    c = client()
    acc = float(test_accuracy)
    c.set_model_version_tag(registered_name, str(version), ACCURACY_TAG, repr(acc))
    c.set_model_version_tag(registered_name, str(version), "git_commit", git_commit())
    current = champion(registered_name)
    if current is None or math.isnan(current[1]) or acc > current[1]:
        c.set_registered_model_alias(registered_name, CHAMPION, str(version))
    return version
