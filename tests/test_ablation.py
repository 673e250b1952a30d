"""The ablation study: row planning (with and without ImageNet weights), the report format, and
(slow) every row trained + evaluated on synthetic faces, with the report's figures checked
against the MLflow runs they name."""
from __future__ import annotations

import argparse
import json
import os
import re
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import ablation as A
from pipeline import ablation_report as AR
from pipeline.errors import FerError
from tiny_project import NETWORK_AND_RAY, make_project

PARAMS = textwrap.dedent("""\
    datasets:
      rafdb: raw/rafdb
      sfew: raw/sfew
    """) + NETWORK_AND_RAY + textwrap.dedent("""\
    train_rafdb:
      image_size: 56
      crop: 48
      epochs: 3
      batch_size: 32
      lr: 0.05
      warmup_epochs: 0
      seed: 0
    finetune_sfew:
      image_size: 56
      crop: 48
      epochs: 3
      batch_size: 32
      lr: 0.01
      warmup_epochs: 0
      seed: 0
    evaluate:
      batch_size: 64
      num_workers: 1
    mlflow:
      experiment: ablation-test
    """)
ALL_ROWS = ["vgg16", "lip", "ten_crop", "imagenet", "attention_off", "attention_on",
            "sfew_imagenet", "sfew_scratch", "sfew_rafdb"]


def _fake_vgg16_bn(path: Path) -> Path:
    """A vgg16_bn-shaped state dict at the test width (real ImageNet weights need width 1.0)."""
    from pipeline.model import lip_vgg16

    torch.manual_seed(1)
    torch.save(lip_vgg16(7, pool="max", head="fc", attention="none", width=0.0625).state_dict(), path)
    return path


# --------------------------------------------------------------------------- fast
def test_plan_without_imagenet_weights(tmp_path):
    rows, specs, source = A.plan(yaml.safe_load(PARAMS), tmp_path, tmp_path / "work")
    assert source is None
    assert [r.key for r in rows] == ALL_ROWS
    by = {r.key: r for r in rows}
    for key in ("imagenet", "sfew_imagenet"):
        assert by[key].spec is None and by[key].reason == A.NO_WEIGHTS
    # ten-crop reads the +LIP model; rows 1-2 are centre crop, the rest ten-crop
    assert by["ten_crop"].spec == by["lip"].spec and by["lip"].metric == "accuracy_center"
    assert by["vgg16"].metric == "accuracy_center" and by["ten_crop"].metric == "accuracy"
    assert specs[by["vgg16"].spec].model == {"pool": "max", "head": "fc", "attention": "none"}
    assert specs[by["lip"].spec].model == {"pool": "lip", "head": "fc", "attention": "none"}
    assert specs[by["attention_off"].spec].model["attention"] == "none"
    assert specs[by["attention_on"].spec].model == {"pool": "lip", "head": "conv", "attention": "eca"}
    # SFEW from the RAF-DB model fine-tunes the full RAF-DB model (the attention_on run here)
    sfew = specs[by["sfew_rafdb"].spec]
    assert sfew.dataset == "sfew" and sfew.init == f"spec:{by['attention_on'].spec}"
    assert specs[by["sfew_scratch"].spec].init == "none"
    assert len(specs) == 6  # vgg16, lip, attention off/on, sfew scratch, sfew from rafdb
    assert [r.paper for r in rows] == [81.68, 83.15, 84.97, 86.31, None, None, 50.00, None, 57.34]


def test_plan_with_imagenet_weights(tmp_path):
    params = yaml.safe_load(PARAMS)
    params["imagenet_init"]["source"] = str(_fake_vgg16_bn(tmp_path / "vgg16_bn.pth"))
    rows, specs, source = A.plan(params, tmp_path, tmp_path / "work")
    assert source == str((tmp_path / "vgg16_bn.pth").resolve())
    assert "sfew_scratch" not in [r.key for r in rows]
    by = {r.key: r for r in rows}
    assert specs[by["imagenet"].spec].init == "imagenet" and specs[by["sfew_imagenet"].spec].init == "imagenet"
    assert specs[by["attention_on"].spec].init == "imagenet"  # attention rows follow the full setting
    # lip/fc/none, lip/conv/none, lip/conv/eca (= the model section): one init file each
    assert len(list((tmp_path / "work" / "init").glob("imagenet_*.pt"))) == 3
    # weights that do not fit the network: the rows say why they were not run
    params["model"]["width"] = 0.125
    rows, specs, source = A.plan(params, tmp_path, tmp_path / "work2")
    assert source is None
    assert {r.key: r for r in rows}["imagenet"].reason.startswith("not run: ImageNet weights unusable")


def test_report_format():
    assert AR.fmt_value([0.5]) == "50.00"
    assert AR.fmt_value([0.5, 0.6]) == "55.00 ± 7.07"
    rows = [A.Row("vgg16", 1, "VGG16", "accuracy_center", "s1", paper=81.68, values=[0.25], run_ids=["r1"]),
            A.Row("imagenet", 1, "+ ImageNet", "accuracy", None, A.NO_WEIGHTS, 86.31),
            A.Row("sfew_rafdb", 3, "SFEW", "accuracy", "s2", paper=57.34, values=[0.5, 0.6], run_ids=["a", "b"])]
    text = AR.render(rows, {"ablation_id": "x", "commit": "c", "wall_s": 1.0, "parent_run_id": "p",
                           "seeds": [0, 1], "epochs": 2, "n_test": {"rafdb": 10, "sfew": 5},
                           "model": {"pool": "lip"}, "source": None})
    assert "| `vgg16` | VGG16 | accuracy_center | 25.00 | — | 81.68 | `r1` |" in text
    assert f"| `imagenet` | + ImageNet | accuracy | {A.NO_WEIGHTS} | — | 86.31 | — |" in text
    assert "| `sfew_rafdb` | SFEW | accuracy | 55.00 ± 7.07 | — | 57.34 | `a`, `b` |" in text
    assert text.index("Table 1") < text.index("`imagenet`") < text.index("Table 3") < text.index("`sfew_rafdb`")


def test_rows_are_tested_against_their_reference_row():
    rows = [A.Row("vgg16", 1, "VGG16", "accuracy_center", "s1", values=[0.70, 0.72, 0.71]),
            A.Row("lip", 1, "+ LIP", "accuracy_center", "s2", values=[0.80, 0.82, 0.81]),
            A.Row("ten_crop", 1, "+ ten-crop", "accuracy", "s2", values=[0.81, 0.80, 0.83]),
            A.Row("sfew_scratch", 3, "scratch", "accuracy", "s3", values=[0.3]),
            A.Row("sfew_rafdb", 3, "SFEW", "accuracy", "s4", values=[0.5])]
    cmp = AR.comparisons(rows)
    assert cmp["lip"]["ref"] == "vgg16" and cmp["lip"]["verdict"] == "higher"
    assert cmp["ten_crop"]["verdict"] == "tie"
    assert cmp["sfew_rafdb"]["ref"] == "sfew_scratch" and cmp["sfew_rafdb"]["verdict"] == "n/a"
    assert "vgg16" not in cmp
    text = AR.render(rows, {"ablation_id": "x", "commit": "c", "wall_s": 1.0, "parent_run_id": "p",
                           "seeds": [0, 1, 2], "epochs": 2, "n_test": {"rafdb": 10, "sfew": 5},
                           "model": {"pool": "lip"}, "source": None})
    assert "`vgg16`: +10.0 pts, beyond noise (p=" in text
    assert "`lip`: +0.3 pts, within noise (p=" in text


def test_cli_arguments_and_errors(tmp_path, monkeypatch):
    p = argparse.ArgumentParser()
    A.add_ablation_arguments(p)
    a = p.parse_args(["--seeds", "3", "--epochs", "2"])
    assert (a.seeds, a.epochs, a.output, a.params) == (3, 2, "reports/ablation.md", "params.yaml")
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(PARAMS)
    with pytest.raises(FerError, match="data/parquet/rafdb"):
        A.run_ablation("params.yaml")
    with pytest.raises(FerError, match="--seeds"):
        A.run_ablation("params.yaml", seeds=0)


# --------------------------------------------------------------------------- slow: every row
@pytest.fixture
def ablation_repo(tmp_path, monkeypatch):
    yield make_project(tmp_path, monkeypatch, PARAMS, {"rafdb": (300, 0), "sfew": (200, 1)})


@pytest.mark.slow
def test_ablation_report_matches_mlflow_runs(ablation_repo):
    import ray
    from mlflow import MlflowClient

    from pipeline.tune.sweep import ensure_ray

    ensure_ray()
    try:
        rows = A.run_ablation("params.yaml", seeds=1, epochs=2, output="reports/ablation.md")
    finally:
        ray.shutdown()
    text = (ablation_repo / "reports" / "ablation.md").read_text()
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    lines = {m.group(1): line for line in text.splitlines() if (m := re.match(r"\| `(\w+)` \|", line))}
    assert list(lines) == ALL_ROWS == [r["key"] for r in rows]
    runs_seen = set()
    for row in rows:
        cells = [c.strip() for c in lines[row["key"]].strip("|").split("|")]
        key, _label, metric, ours, vs_ref, paper, run_cell = cells
        assert metric == row["metric"]
        # one seed: a difference to the reference row is stated, its noise is not known
        ref = {"lip": "vgg16", "ten_crop": "lip", "attention_off": "ten_crop", "attention_on": "attention_off",
               "sfew_rafdb": "sfew_scratch"}.get(row["key"])
        if ref and row["status"] == "ok":
            assert vs_ref.startswith(f"`{ref}`: ") and "noise unknown (one seed)" in vs_ref, vs_ref
        else:
            assert vs_ref == "—", vs_ref
        assert paper == ({"vgg16": "81.68", "lip": "83.15", "ten_crop": "84.97", "imagenet": "86.31", "sfew_imagenet": "50.00",
                          "sfew_rafdb": "57.34"}.get(row["key"], "—"))
        if row["key"] in ("imagenet", "sfew_imagenet"):
            assert ours == A.NO_WEIGHTS and run_cell == "—" and row["status"] == A.NO_WEIGHTS
            continue
        assert row["status"] == "ok"
        run_ids = re.findall(r"`([0-9a-f]{32})`", run_cell)
        assert run_ids == row["run_ids"] and len(run_ids) == 1
        run = client.get_run(run_ids[0])
        # the figure in the report is the run's logged test metric
        logged = run.data.metrics[f"test_{row['metric']}"]
        assert ours == f"{logged * 100:.2f}"
        assert run.info.status == "FINISHED"
        assert row["key"] in run.data.tags["ablation_row"].split(",")
        assert run.data.tags["stage"] == "ablation" and run.data.tags.get("mlflow.parentRunId")
        assert run.data.params["epochs"] == "2" and run.data.params["seed"] == "0"
        runs_seen.add(run_ids[0])
    by = {r["key"]: r for r in rows}
    assert by["ten_crop"]["run_ids"] == by["lip"]["run_ids"]  # same model, other crop protocol
    assert len(runs_seen) == 6
    # the SFEW-from-RAF-DB run started from the attention_on RAF-DB model
    sfew = client.get_run(by["sfew_rafdb"]["run_ids"][0])
    assert sfew.data.params["init"].endswith("model.pt") and "rafdb-lip-conv-eca" in sfew.data.params["init"]
    assert client.get_run(by["vgg16"]["run_ids"][0]).data.params["pool"] == "max"

    # a rerun (the same code, data and settings) takes every finished (row, seed) as it is
    ensure_ray()
    try:
        again = A.run_ablation("params.yaml", seeds=1, epochs=2, output="reports/ablation.md")
    finally:
        ray.shutdown()
    assert [r["run_ids"] for r in again] == [r["run_ids"] for r in rows]
    assert [r["values"] for r in again] == [r["values"] for r in rows]
    runs = client.search_runs([client.get_experiment_by_name("ablation-test").experiment_id],
                              "tags.stage = 'ablation' and tags.ablation_spec != ''")
    assert len(runs) == 6, [r.data.tags.get("ablation_spec") for r in runs]  # nothing retrained


def test_a_report_is_rewritten_from_its_json_in_the_current_format(tmp_path):
    rows = [A.Row("vgg16", 1, "VGG16", "accuracy_center", "s1", values=[0.70, 0.72, 0.71], run_ids=["a", "b", "c"]),
            A.Row("imagenet", 1, "+ ImageNet", "accuracy", None, A.NO_WEIGHTS)]
    meta = {"ablation_id": "x", "commit": "c", "wall_s": 5000.0, "parent_run_id": "p", "seeds": [0, 1, 2],
            "epochs": None, "n_test": {"rafdb": 10, "sfew": 5}, "model": {"pool": "lip"}, "source": None}
    j = tmp_path / "ablation.json"
    # as an older format wrote it: no paper figure on the row
    j.write_text(json.dumps({"meta": meta, "rows": [{**r.as_dict(), "paper": None} for r in rows]}))
    md = AR.rerender(j, tmp_path / "ablation.md")
    text = md.read_text()
    assert "| `vgg16` | VGG16 | accuracy_center | 71.00 ± 1.00 | — | 81.68 | `a`, `b`, `c` |" in text
    assert f"| `imagenet` | + ImageNet | accuracy | {A.NO_WEIGHTS} | — | 86.31 | — |" in text
    assert "5000 s" in text  # the meta of the run that made the figures is kept
    again = json.loads(j.read_text())
    assert again["rows"][0]["values"] == [0.70, 0.72, 0.71] and again["rows"][0]["paper"] == 81.68
    j.write_text("{not json")
    with pytest.raises(FerError, match="not an ablation report"):
        AR.rerender(j, tmp_path / "ablation.md")
