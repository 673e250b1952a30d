"""End to end: `dvc repro` in a temporary copy of the repo, on a reduced synthetic config."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"accuracy", "accuracy_center", "mean_class_accuracy", "per_class", "n_test"}

REDUCED = {
    "synth": {"rafdb": {"n": 360, "seed": 0}, "sfew": {"n": 200, "seed": 1}},
    "model": {"width": 0.0625},
    "ray": {"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 0},
    "train_rafdb": {"image_size": 56, "crop": 48, "epochs": 4, "batch_size": 32},
    "finetune_sfew": {"image_size": 56, "crop": 48, "epochs": 2, "batch_size": 32},
}


def _copy_repo(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for f in files:
        src = REPO / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


@pytest.mark.slow
def test_dvc_repro_end_to_end(tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    _copy_repo(work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    (work / "params.yaml").write_text(yaml.safe_dump(_merge(params, REDUCED), sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"), "RAY_AUTH_MODE": "disabled",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the contract's default: sqlite at the repo root
    env.pop("RAY_ADDRESS", None)

    def run(*cmd):
        return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1200)

    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"]):
        assert run(*cmd).returncode == 0

    first = run("dvc", "repro")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]

    for out in ("data/synthetic/rafdb/EmoLabel/list_patition_label.txt", "data/synthetic/sfew/Train",
                "data/parquet/rafdb/train.parquet", "data/parquet/sfew/test.parquet",
                "reports/ingest_rafdb.json", "reports/ingest_sfew.json", "models/imagenet_init.pt",
                "models/rafdb/model.pt", "models/sfew/model.pt", "reports/history_rafdb.json",
                "plots/confusion_rafdb.csv", "plots/confusion_sfew.png", "dvc.lock"):
        assert (work / out).exists(), out
    for ds in ("rafdb", "sfew"):
        m = json.loads((work / f"metrics/eval_{ds}.json").read_text())
        assert set(m) == METRIC_KEYS
        n_test = json.loads((work / f"reports/ingest_{ds}.json").read_text())["counts"]["test"]
        assert m["n_test"] == n_test
        assert 0 <= m["accuracy"] <= 1 and set(m["per_class"]) == {
            "surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"}
    # registry: one version per dataset, with the champion alias, in the repo-root sqlite store
    db = sqlite3.connect(work / "mlflow.db")
    names = {r[0] for r in db.execute("select name from registered_models")}
    assert {"lip-vgg16-rafdb", "lip-vgg16-sfew"} <= names
    aliases = {r[0] for r in db.execute("select name from registered_model_aliases where alias='champion'")}
    assert {"lip-vgg16-rafdb", "lip-vgg16-sfew"} <= aliases

    second = run("dvc", "repro")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "up to date" in second.stdout, second.stdout
    assert "Running stage" not in second.stdout

    shown = run("dvc", "metrics", "show", "--json")
    assert shown.returncode == 0 and "eval_rafdb.json" in shown.stdout
