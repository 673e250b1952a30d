"""The logged model and the registry: the pyfunc model (:mod:`pipeline.infer.pyfunc`, with the
training checkpoint as its artifact) logged under a run, registered per dataset, and the
``champion`` alias kept on the version with the best test accuracy.

Every logged model carries its contract: a signature (input: an ``image`` column of base64
strings, the documented serving request; output: ``label`` and one probability per class), an
input example (one real encoded face, base64), and each registered version a description (the
dataset and its data version, the test figures, the training and evaluation runs) and the tags
``params_hash``, ``data_version``, ``training_run_id``, ``test_accuracy`` and ``git_commit``.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import os
from pathlib import Path

import pipeline
from pipeline.errors import FerError
from pipeline.infer.pyfunc import FerPyfunc
from pipeline.infer.resolve import SHA_KEY
from pipeline.outputs import sha256_file
from pipeline.tracking import client, git_commit, using_store

CHAMPION = "champion"
#: Model-version tag that holds the test accuracy the champion comparison uses.
ACCURACY_TAG = "test_accuracy"
#: Training-config keys left out of the params hash: where things are and which run, not what
#: was trained.
RUN_KEYS = ("data", "output", "init", "storage_path", "run_name", "mlflow_run_id", "num_workers",
            "cpus_per_worker", "use_gpu", "max_failures")
UNKNOWN = "unknown"


def signature(classes):
    """The logged models' signature: input one ``image`` column of base64-encoded image bytes
    (what ``mlflow models serve`` receives as JSON), output ``label`` and one probability
    (double) per class."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "image")]),
                          outputs=Schema([ColSpec("string", "label"),
                                          *(ColSpec("double", c) for c in classes)]))


def input_example(image: bytes):
    """The input example: a one-row frame with the face's bytes, base64-encoded."""
    import pandas as pd

    return pd.DataFrame({"image": [base64.b64encode(image).decode("ascii")]})


def example_image(data: str | os.PathLike | None = None) -> bytes:
    """A small real encoded face: the first test image of the parquet dataset ``data`` when it
    has one, else a synthetic face (:func:`pipeline.data.synthetic.render`)."""
    if data is not None:
        f = Path(data) / "test.parquet"
        if f.is_file():
            import pyarrow.parquet as pq

            col = pq.read_table(f, columns=["image"]).column("image")
            if len(col):
                return bytes(col[0].as_py())
    from pipeline.data.synthetic import render

    return render(3, "rafdb", seed=0, index=0)


def params_hash(train_config: dict | None) -> str:
    """sha256 (first 12 hex digits) of the training config a checkpoint records, without the
    keys that say where and in which run (:data:`RUN_KEYS`); ``unknown`` without one."""
    if not train_config:
        return UNKNOWN
    cfg = {k: v for k, v in sorted(train_config.items()) if k not in RUN_KEYS}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


def data_version(data: str | os.PathLike | None, lock: str | os.PathLike = "dvc.lock") -> str:
    """The md5 dvc.lock records for the stage output at path ``data`` (the ingest stage's
    parquet folder, e.g. ``data/parquet/rafdb``), or ``unknown`` (no dvc.lock, no such out)."""
    import yaml

    lock = Path(lock)
    if data is None or not lock.is_file():
        return UNKNOWN
    try:
        doc = yaml.safe_load(lock.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return UNKNOWN
    want = Path(os.path.normpath(str(data))).as_posix()
    for stage in (doc.get("stages") or {}).values():
        for out in (stage or {}).get("outs") or []:
            if isinstance(out, dict) and Path(os.path.normpath(str(out.get("path", "")))).as_posix() == want:
                return str(out.get("md5") or UNKNOWN)
    return UNKNOWN


def _checkpoint_meta(path: Path) -> dict:
    from pipeline.model.checkpoint import read

    ckpt = read(path)  # torch.load(weights_only=True)
    return {k: v for k, v in ckpt.items() if k != "state_dict"}


def describe(*, dataset: str, data: str | None, data_ver: str, metrics: dict, train_config: dict,
             eval_run_id: str, params: str, model_config: dict | None = None,
             experiment_id: str | None = None) -> str:
    """The version's description: dataset, test figures, training and evaluation runs. The UI
    renders it as Markdown and links the version only to the run that logged it (evaluation), so
    the training run's id is a link to that run's page (a route relative to the UI, which works
    under any host or prefix), given the experiment both runs are in."""
    tc = train_config or {}
    mc = {**tc, **(model_config or {})}
    acc = metrics.get("accuracy")
    lines = [f"LIP-VGG16 ({mc.get('pool', '?')} pooling, {mc.get('head', '?')} head, "
             f"{mc.get('attention', '?')} attention, width {mc.get('width', '?')}) "
             f"for facial expressions on {dataset}."]
    lines.append(f"Dataset: {dataset}, {data or 'path unknown'}, data version (dvc.lock md5) {data_ver}.")
    if acc is not None:
        figs = [f"ten-crop accuracy {acc:.4f}"]
        for key, label in (("accuracy_center", "centre crop"), ("mean_class_accuracy", "mean class accuracy")):
            if metrics.get(key) is not None:
                figs.append(f"{label} {metrics[key]:.4f}")
        if metrics.get("n_test") is not None:
            figs.append(f"n={metrics['n_test']}")
        lines.append("Test: " + ", ".join(figs) + ".")
    train = tc.get("mlflow_run_id")
    shown = f"[{train}](#/experiments/{experiment_id}/runs/{train})" if train and experiment_id else train
    lines.append(f"Training run: {shown or UNKNOWN} ({tc.get('run_name') or 'name unknown'}), "
                 f"params hash {params}; evaluation run: {eval_run_id}.")
    lines.append("Input: an `image` column of base64-encoded JPEG/PNG faces; output: `label` and "
                 "one probability per class.")
    return "\n".join(lines)


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
              name: str = "model", example: bytes | None = None, classes=None):
    """Log the pyfunc model (``pipeline.infer.pyfunc.FerPyfunc`` with the checkpoint as its
    ``checkpoint`` artifact and the ``pipeline`` package as code) under ``run_id``, with its
    signature and input example (``example``: encoded image bytes; default a synthetic face);
    register it as a new version of ``registered_name`` when given. Returns MLflow's
    ``ModelInfo``."""
    import mlflow.pyfunc
    from mlflow.models import Model

    ckpt = Path(checkpoint_path)
    if not ckpt.is_file():
        raise FerError(f"checkpoint {ckpt} not found")
    if classes is None:
        classes = _checkpoint_meta(ckpt)["classes"]
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
            signature=signature(classes), input_example=input_example(example or example_image()),
            # MLflow checks the example by predicting it with the folder it has just written
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


def training_run_id(train_config: dict, eval_run_id: str) -> str | None:
    """The MLflow run that trained the checkpoint. ``model.pt`` no longer carries its id (it would
    change the model's bytes on every run), so it is found by name: the training stage names its
    run ``run_name`` (``<stage>-<hash of config, init and code>``), in the experiment the
    evaluation logs to; the newest FINISHED run of that name, else None."""
    if train_config.get("mlflow_run_id"):  # checkpoints written before it was dropped
        return train_config["mlflow_run_id"]
    name = train_config.get("run_name")
    if not name:
        return None
    c = client()
    exp = c.get_run(eval_run_id).info.experiment_id
    runs = c.search_runs([exp], filter_string=f"attributes.run_name = '{name}' and attributes.status = 'FINISHED'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def log_and_register_model(run_id: str, checkpoint_path: str | os.PathLike, *, registered_name: str,
                           test_accuracy: float, metrics: dict | None = None, dataset: str | None = None,
                           data: str | os.PathLike | None = None, lock: str | os.PathLike = "dvc.lock") -> int:
    """Log the model (signature, input example: the first test image of ``data``), register it
    as a new version of ``registered_name``, describe it (dataset, data version, ``metrics``,
    training and evaluation runs), tag it (``test_accuracy``, ``params_hash``, ``data_version``
    from ``lock``, ``training_run_id``, ``git_commit``), and move the ``champion`` alias to it
    only if it beats the current champion (ties keep the old one; a champion with no recorded
    accuracy is always beaten). Returns the new version number."""
    ckpt = Path(checkpoint_path)
    if not ckpt.is_file():
        raise FerError(f"checkpoint {ckpt} not found")
    meta = _checkpoint_meta(ckpt)
    tc = dict(meta.get("train_config") or {})
    tc["mlflow_run_id"] = training_run_id(tc, run_id)
    info = log_model(run_id, ckpt, registered_name=registered_name, example=example_image(data),
                     classes=meta["classes"])
    version = int(info.registered_model_version)
    c = client()
    acc = float(test_accuracy)
    dataset = dataset or c.get_run(run_id).data.tags.get("dataset") or registered_name
    data_ver = data_version(data, lock)
    params = params_hash(tc)
    tags = {ACCURACY_TAG: repr(acc), "git_commit": git_commit(), "params_hash": params,
            "data_version": data_ver, "dataset": dataset,
            "training_run_id": tc.get("mlflow_run_id") or UNKNOWN}
    for k, v in tags.items():
        c.set_model_version_tag(registered_name, str(version), k, v)
    c.update_model_version(registered_name, str(version), description=describe(
        dataset=dataset, data=None if data is None else str(data), data_ver=data_ver,
        metrics={"accuracy": acc, **(metrics or {})}, train_config=tc, eval_run_id=run_id,
        params=params, model_config=meta.get("model_config"),
        experiment_id=c.get_run(run_id).info.experiment_id))
    current = champion(registered_name)
    if current is None or math.isnan(current[1]) or acc > current[1]:
        c.set_registered_model_alias(registered_name, CHAMPION, str(version))
    return version


#: Model-version tags written by :func:`log_onnx`.
ONNX_TAG, ONNX_SHA_TAG = "onnx_artifact", "onnx_sha256"


def log_onnx(model_uri: str, onnx_path: str | os.PathLike) -> str:
    """Log an exported ONNX file (``fer export --onnx``) beside a registered version: an artifact
    ``onnx/<file>`` of the version's run, and the version tagged ``onnx_artifact`` (its
    ``runs:/`` URI) and ``onnx_sha256``. ``model_uri`` is ``models:/NAME/VERSION`` or
    ``models:/NAME@ALIAS``. Returns the artifact's URI."""
    from mlflow.exceptions import MlflowException

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FerError(f"{onnx_path}: no such ONNX file")
    ref = model_uri[len("models:/"):] if model_uri.startswith("models:/") else None
    if not ref or ("@" not in ref and "/" not in ref):
        raise FerError(f"--log needs --model models:/NAME/VERSION or models:/NAME@ALIAS, not {model_uri!r}")
    c = client()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = c.get_model_version_by_alias(name, alias)
        else:
            name, version = ref.rsplit("/", 1)
            mv = c.get_model_version(name, version)
    except MlflowException as e:
        raise FerError(f"{model_uri}: no such registered version ({e.message.splitlines()[0]})") from e
    if not mv.run_id:
        raise FerError(f"{model_uri}: the version has no run to log the ONNX file under")
    with using_store():
        c.log_artifact(mv.run_id, str(onnx_path), "onnx")
    uri = f"runs:/{mv.run_id}/onnx/{onnx_path.name}"
    c.set_model_version_tag(mv.name, mv.version, ONNX_TAG, uri)
    c.set_model_version_tag(mv.name, mv.version, ONNX_SHA_TAG, sha256_file(onnx_path))
    return uri
