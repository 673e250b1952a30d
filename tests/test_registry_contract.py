"""Every registered model version carries its contract (a temporary SQLite MLflow store): the
signature (an `image` base64 column in; `label` and one probability per class out), a real
encoded face as input example, a description naming the dataset, the test figures and the
training run, and the tags params_hash and data_version (dvc.lock's md5 of the dataset)."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline import tracking as T
from pipeline.data.classes import CLASSES
from pipeline.infer import registry as R

from test_evaluate import make_assets

NAME = "lip-vgg16-contract"
DATA_MD5 = "5eb63bbbe01eeed093cb22bb8f5acdc3.dir"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    d = tmp_path_factory.mktemp("contract")
    assets = make_assets(tmp_path_factory.getbasetemp() / "tiny_assets")
    # the training stage's checkpoint records its config and run name, not its MLflow run id (that
    # would change the model's bytes on every run): the registry finds the run by its name
    ckpt = torch.load(assets["checkpoint"], map_location="cpu", weights_only=True)
    ckpt["train_config"] = {"pool": "lip", "head": "conv", "attention": "eca", "width": 0.0625,
                            "lr": 0.003, "epochs": 12, "data": str(assets["parquet"]),
                            "run_name": "train_rafdb-0123456789", "mlflow_run_id": None}
    model = d / "model.pt"
    torch.save(ckpt, model)
    lock = d / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {"ingest@t": {
        "cmd": "python -m stages.ingest ...",
        "outs": [{"path": str(assets["parquet"]), "hash": "md5", "md5": DATA_MD5, "nfiles": 4}]}}}))
    metrics = {"accuracy": 0.5123, "accuracy_center": 0.5, "mean_class_accuracy": 0.41, "n_test": 21}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{d}/mlflow.db")
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        failed = T.start_run("contract-tests", "train_rafdb-0123456789", stage="train_rafdb", dataset="t")
        T.end_run(failed, "FAILED")  # an earlier attempt of the same run name did not finish
        train = T.start_run("contract-tests", "train_rafdb-0123456789", stage="train_rafdb", dataset="t")
        T.end_run(train)
        T.end_run(T.start_run("contract-tests", "train_rafdb-9999999999", stage="train_rafdb", dataset="t"))
        run = T.start_run("contract-tests", "evaluate-t", stage="evaluate", dataset="t", params={})
        v = R.log_and_register_model(run, model, registered_name=NAME, test_accuracy=metrics["accuracy"],
                                     metrics=metrics, dataset="t", data=assets["parquet"], lock=lock)
        T.end_run(run)
        yield {"version": v, "run": run, "train": train, "assets": assets, "ckpt": ckpt, "client": T.client()}


def test_version_has_signature_and_input_example(registered):
    from mlflow.models import get_model_info

    info = get_model_info(f"models:/{NAME}/{registered['version']}")  # reads MLmodel only
    sig = info.signature
    assert [(c.name, c.type.name) for c in sig.inputs.inputs] == [("image", "string")]
    assert [c.name for c in sig.outputs.inputs] == ["label", *CLASSES]
    assert all(c.type.name == "double" for c in sig.outputs.inputs[1:])
    # the input example is the dataset's first test image, base64-encoded
    import mlflow.artifacts

    with T.using_store():
        folder = mlflow.artifacts.download_artifacts(f"models:/{NAME}/{registered['version']}")
    example = json.loads((Path(folder) / "input_example.json").read_text())
    assert example["columns"] == ["image"] and len(example["data"]) == 1
    first = pq.read_table(registered["assets"]["parquet"] / "test.parquet", columns=["image"]).column("image")[0]
    assert base64.b64decode(example["data"][0][0]) == first.as_py()


def test_version_has_description_and_tags(registered):
    mv = registered["client"].get_model_version(NAME, str(registered["version"]))
    text = mv.description
    assert "t," in text and str(registered["assets"]["parquet"]) in text and DATA_MD5 in text
    assert "0.5123" in text and "n=21" in text and "mean class accuracy 0.4100" in text
    train = registered["train"]  # the id of the run that trained it, found by its name
    exp = registered["client"].get_run(train).info.experiment_id  # a link to its page in the UI
    assert f"Training run: [{train}](#/experiments/{exp}/runs/{train}) (train_rafdb-0123456789)" in text
    assert registered["run"] in text
    assert mv.tags["data_version"] == DATA_MD5
    assert mv.tags["params_hash"] == R.params_hash(registered["ckpt"]["train_config"])
    assert len(mv.tags["params_hash"]) == 12 and mv.tags["training_run_id"] == train
    assert float(mv.tags[R.ACCURACY_TAG]) == pytest.approx(0.5123)


def test_params_hash_and_data_version_rules(tmp_path):
    cfg = {"lr": 0.003, "epochs": 12, "mlflow_run_id": "a", "output": "models/x", "data": "d"}
    # where and in which run do not change the hash; a hyperparameter does
    assert R.params_hash(cfg) == R.params_hash({**cfg, "mlflow_run_id": "b", "output": "elsewhere"})
    assert R.params_hash(cfg) != R.params_hash({**cfg, "lr": 0.001})
    assert R.params_hash(None) == "unknown"
    assert R.data_version("data/parquet/rafdb", tmp_path / "absent.lock") == "unknown"
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"stages": {"ingest@rafdb": {"outs": [
        {"path": "data/parquet/rafdb", "md5": "abc.dir"}, {"path": "reports/x.json", "md5": "def"}]}}}))
    assert R.data_version("data/parquet/rafdb", lock) == "abc.dir"
    assert R.data_version("./data/parquet/rafdb/", lock) == "abc.dir"
    assert R.data_version("data/parquet/sfew", lock) == "unknown"
    lock.write_text("stages: [unclosed")
    assert R.data_version("data/parquet/rafdb", lock) == "unknown"


@pytest.mark.slow  # one ONNX export of the tiny model (~10-30 s on 2 cores)
def test_fer_export_log_puts_the_onnx_beside_the_version(registered, tmp_path, capsys):
    """`fer export --onnx m.onnx --model models:/NAME@champion --log`: the file becomes an artifact
    of the version's run and the version is tagged with its URI and sha256."""
    pytest.importorskip("onnxscript")
    import mlflow.artifacts

    from pipeline.cli import main
    from pipeline.outputs import sha256_file

    out = tmp_path / "m.onnx"
    assert main(["export", "--onnx", str(out), "--model", f"models:/{NAME}@champion", "--log"]) == 0
    assert "logged beside" in capsys.readouterr().out
    mv = registered["client"].get_model_version(NAME, str(registered["version"]))
    assert mv.tags[R.ONNX_TAG] == f"runs:/{registered['run']}/onnx/m.onnx"
    assert mv.tags[R.ONNX_SHA_TAG] == sha256_file(out)
    with T.using_store():
        got = mlflow.artifacts.download_artifacts(mv.tags[R.ONNX_TAG], dst_path=str(tmp_path / "dl"))
    assert sha256_file(Path(got)) == sha256_file(out)
    # --log needs a registered version to put the file beside
    assert main(["export", "--onnx", str(tmp_path / "x.onnx"), "--model", str(registered["assets"]["checkpoint"]),
                 "--log"]) == 2
    assert "--log" in capsys.readouterr().err
