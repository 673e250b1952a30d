"""scripts/results.py: figures come from the run files, and the rare-class decision rule."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("results_script", ROOT / "scripts" / "results.py")
R = importlib.util.module_from_spec(spec)
spec.loader.exec_module(R)
CLASSES = ["a", "b"]


def _run(d: Path, name: str, seed: int, val: float, per: list, done: bool = True):
    rec = {"name": name, "seed": seed, "epochs": 3, "epochs_done": 3 if done else 1,
           "status": "done" if done else "running", "history": [{"epoch": 1}], "best_val_accuracy": val,
           "val_per_class": per, "val_mean_class_accuracy": sum(per) / len(per),
           "final_train_accuracy": 0.9, "test_accuracy_center": 0.5}
    (d / f"{name}__s{seed}.json").write_text(json.dumps(rec))


def test_tables_and_decision(tmp_path, monkeypatch):
    for s, (v, m) in enumerate([(0.80, 0.2), (0.81, 0.25), (0.79, 0.22)]):
        _run(tmp_path, "ref", s, v, [1.0, m])
    for s, (v, m) in enumerate([(0.80, 0.6), (0.805, 0.65), (0.79, 0.62)]):
        _run(tmp_path, "good", s, v, [1.0, m])
    for s, (v, m) in enumerate([(0.70, 0.9), (0.71, 0.9), (0.69, 0.9)]):
        _run(tmp_path, "costly", s, v, [0.8, m])
    _run(tmp_path, "partial", 0, 0.5, [0.0, 0.0], done=False)
    runs = R.load_runs(tmp_path)
    monkeypatch.setattr(R, "IMBALANCE", [("ref", "ref"), ("good", "good"), ("costly", "costly")])
    lines, summ = R.table(R.IMBALANCE, runs, CLASSES)
    assert summ["ref"]["best_val_accuracy"] == [0.80, 0.81, 0.79]
    assert any("80.0 ± 1.0 (n=3)" in line for line in lines)
    v = R.imbalance_verdict(summ)
    assert v["winner"] == "good" and "costly" in " ".join(v["excluded"])
    plines, psumm = R.table([("ref", "ref"), ("p", "partial"), ("missing", "nope")], runs, CLASSES)
    assert psumm["partial"]["classes_at_zero"] == ["a", "b"]
    assert any("stopped after 1 of 3 epochs" in line for line in plines)
    assert any("| missing | not run |" in line for line in plines)


def _eval(acc: float, per: dict) -> dict:
    return {"accuracy": acc, "accuracy_center": acc - 0.01, "n_test": 10, "per_class": per,
            "mean_class_accuracy": sum(per.values()) / len(per)}


def test_pipeline_seed_rows_read_metrics_and_seed_copies(tmp_path):
    (tmp_path / "metrics").mkdir()
    for ds in ("rafdb", "sfew"):
        (tmp_path / "metrics" / f"eval_{ds}.json").write_text(json.dumps(_eval(0.80, {"a": 1.0, "b": 0.6})))
    assert R.seed_block(R.pipeline_seeds(tmp_path))[0].startswith("Only 1 seed")
    for seed, (acc, b) in {1: (0.84, 0.0), 2: (0.82, 0.3)}.items():
        d = tmp_path / "reports" / "seeds" / f"seed{seed}"
        d.mkdir(parents=True)
        for ds in ("rafdb", "sfew"):
            (d / f"eval_{ds}.json").write_text(json.dumps(_eval(acc, {"a": 1.0, "b": b})))
    (tmp_path / "reports" / "seeds" / "seed3").mkdir()  # a seed without its files is left out
    seeds = R.pipeline_seeds(tmp_path)
    assert sorted(seeds) == [0, 1, 2]
    lines = R.seed_block(seeds)
    raf = next(line for line in lines if line.startswith("| RAF-DB layout"))
    assert "82.0 ± 2.0 (n=3)" in raf and "b 30 ± 30" in raf and raf.endswith("| b |")
    # per seed against the targets (ten-crop >= 80%, mean class >= 65%, no class at 0%)
    assert lines[-1].endswith("seed 0 meets them, seed 1 misses them (mean class 50.0%; b at 0%), seed 2 meets them.")
