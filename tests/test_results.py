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
