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
        (tmp_path / "metrics" / f"eval_{ds}.json").write_text(json.dumps(_eval(0.90, {"a": 1.0, "b": 0.6})))
    assert R.seed_block(R.pipeline_seeds(tmp_path)) == [
        "Only 1 seed of the whole pipeline has been run with the current default: "
        "`python scripts/pipeline_seeds.py --seeds 1 2` runs two more."]
    for seed, (acc, b) in {1: (0.94, 0.0), 2: (0.92, 0.3)}.items():
        d = tmp_path / "reports" / "seeds" / f"seed{seed}"
        d.mkdir(parents=True)
        for ds in ("rafdb", "sfew"):
            (d / f"eval_{ds}.json").write_text(json.dumps(_eval(acc, {"a": 1.0, "b": b})))
    (tmp_path / "reports" / "seeds" / "seed3").mkdir()  # a seed without its files is left out
    seeds = R.pipeline_seeds(tmp_path)
    assert sorted(seeds) == [0, 1, 2]
    lines = R.seed_block(seeds)
    raf = next(line for line in lines if line.startswith("| RAF-DB layout"))
    assert "92.0 ± 2.0 (n=3)" in raf and "b 30 ± 30" in raf and raf.endswith("| b |")
    # per seed against the targets (ten-crop >= 90%, mean class >= 80%, no class at 0%)
    assert lines[-1].endswith("seed 0 meets them, seed 1 misses them (mean class 50.0%; b at 0%), "
                              "seed 2 misses them (mean class 65.0%).")


def test_alternatives_are_set_against_the_defaults_seeds_and_the_targets(tmp_path, monkeypatch):
    assert R.alternatives_lines(tmp_path, default={}) == []
    monkeypatch.setattr(R, "ALTERNATIVES", [("seeds_e45", "the default at 45 epochs", "train_rafdb.epochs=45")])
    default = {}
    for seed, acc in enumerate((0.88, 0.89, 0.90)):
        default[seed] = {ds: _eval(acc, {"a": 1.0, "b": 0.5}) for ds in ("rafdb", "sfew")}
    for seed, (acc, b) in {0: (0.95, 0.9), 1: (0.86, 0.4)}.items():
        d = tmp_path / "reports" / "seeds_e45" / f"seed{seed}"
        d.mkdir(parents=True)
        for ds in ("rafdb", "sfew"):
            (d / f"eval_{ds}.json").write_text(json.dumps(_eval(acc, {"a": 1.0, "b": b})))
        (d / "run.json").write_text(json.dumps({"dvc_repro_minutes": 7.5 + seed}))  # the --set keys: ALTERNATIVES
    line = R.alternatives_lines(tmp_path, default=default)[0]
    assert "--seeds 0 1 --set train_rafdb.epochs=45 --out reports/seeds_e45" in line
    assert "seed 0: RAF-DB ten-crop 95.0%, mean class 95.0%, SFEW 95.0%, meets them" in line
    assert "seed 1: RAF-DB ten-crop 86.0%" in line and "misses them (ten-crop 86.0%; mean class 70.0%)" in line
    assert "Not every seed meets the targets." in line
    # against the default's three seeds, by the noise rule, and the recorded minutes
    assert f"RAF-DB ten-crop {R.fmt_compare(R.compare([0.95, 0.86], [0.88, 0.89, 0.90]))}" in line
    assert line.endswith("`dvc repro` took 7.5, 8.5 min.")


def test_main_writes_the_compact_readme_block_and_the_full_docs_page(tmp_path):
    """main() rewrites only the README's block, with the compact part and a link to the docs page,
    and writes the docs page whole with the full study; the reports go where --reports says."""
    readme, docs = tmp_path / "README.md", tmp_path / "docs" / "results.md"
    reports, runs = tmp_path / "rep", tmp_path / "runs"
    runs.mkdir()
    for s in range(2):
        _run(runs, "e45_base", s, 0.8 + s / 100, [1.0] * 6 + [0.5])
    readme.write_text(f"# Title\n\nbefore\n\n{R.BEGIN}\nstale block\n{R.END}\n\nafter\n")
    R.main(["--readme", str(readme), "--docs", str(docs), "--runs", str(runs), "--reports", str(reports)])
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n\n" + R.BEGIN) and text.endswith(R.END + "\n\nafter\n")
    block = text.split(R.BEGIN, 1)[1].split(R.END, 1)[0]
    assert "stale block" not in block
    for heading in ("### The embedded default (synthetic faces, CPU)", "### The embedded default over training seeds",
                    "### LIP vs VGG16-BN at the default size"):
        assert heading in block
    assert "Recipe comparison" not in block.split("The full study")[0] and "recipe_runs.py --data" not in block
    assert "[docs/results.md](docs/results.md)" in block  # the link is relative to the README
    page = docs.read_text()
    assert page.startswith(R.DOCS_TITLE + "\n\n" + R.DOCS_NOTE + "\n") and "do not edit" in R.DOCS_NOTE
    assert R.BEGIN not in page and R.END not in page
    for heading in ("## The embedded default (synthetic faces, CPU)", "## Recipe comparison (`reports/recipe.md`)",
                    "## Rare classes (`reports/imbalance.md`)", "## Why LIP learned slowly (`reports/recipe.md`)",
                    "## fp32 vs bf16 autocast on the CPU (`reports/bf16_recipe.md`)",
                    "## LIP vs VGG16-BN at the default size"):
        assert heading in page
    # the figures come from the run files: e45_base's two seeds in the rare-class table, its command listed
    assert "| 0, 1 (3 epochs) | 80.5 ± 0.7 (n=2) |" in page
    assert "--name e45_base --seeds 0 1" in page
    for name in ("recipe", "imbalance", "bf16_recipe"):
        assert (reports / f"{name}.json").is_file() and (reports / f"{name}.md").is_file()


def test_main_refuses_a_readme_without_markers_and_writes_nothing(tmp_path):
    readme, docs, reports = tmp_path / "README.md", tmp_path / "results.md", tmp_path / "rep"
    readme.write_text("# no markers\n")
    try:
        R.main(["--readme", str(readme), "--docs", str(docs), "--runs", str(tmp_path), "--reports", str(reports)])
    except SystemExit as e:
        assert "markers not found" in str(e)
    else:
        raise AssertionError("main() accepted a README without markers")
    assert readme.read_text() == "# no markers\n" and not docs.exists() and not reports.exists()


def test_ablation_block_sets_our_rows_beside_the_papers():
    def row(key, table, metric, values, status="ok"):
        return {"key": key, "table": table, "label": key.upper(), "metric": metric, "status": status,
                "values": values, "run_ids": [], "paper": None}

    a = {"meta": {"ablation_id": "x", "commit": "abcdef0123", "seeds": [0, 1, 2], "wall_s": 7200.0},
         "rows": [row("vgg16", 1, "accuracy_center", [0.80, 0.82, 0.81]),
                  row("lip", 1, "accuracy_center", [0.70, 0.71, 0.69]),
                  row("ten_crop", 1, "accuracy", [0.70, 0.72, 0.71]),
                  row("imagenet", 1, "accuracy", [], "not run: no ImageNet weights"),
                  row("sfew_scratch", 3, "accuracy", [0.5, 0.52, 0.51]),
                  row("sfew_rafdb", 3, "accuracy", [0.6, 0.62, 0.61])]}
    lines = R.ablation_lines(a)
    text = "\n".join(lines)
    vgg = next(x for x in lines if "`vgg16`" in x)
    assert "81.0 ± 1.0 (n=3)" in vgg and "| 81.68 | — |" in vgg
    lip = next(x for x in lines if "`lip`" in x)
    assert "`vgg16`: -11.0 pts, beyond noise" in lip and "| 83.15 | +1.47 pts vs `vgg16` |" in lip
    assert "| 84.97 | +1.82 pts vs `lip` |" in next(x for x in lines if "`ten_crop`" in x)
    assert "not run: no ImageNet weights" in next(x for x in lines if "`imagenet`" in x)
    # the SFEW row is compared with the stand-in row when the ImageNet one did not run
    assert "`sfew_scratch`: +10.0 pts, beyond noise" in next(x for x in lines if "`sfew_rafdb`" in x)
    assert "LIP against VGG16-BN's max pooling at this size hurts: -11.0 pts" in text
    assert "git `abcdef0`" in text and "2.0 h" in text
    assert R.ablation_lines({})[0].startswith("`fer ablation` has not been run")


def test_ablation_block_says_when_its_network_is_not_todays_default():
    """An ablation run before a network switch changed (here lip_start) says so, naming the switch,
    since its LIP rows then no longer measure the default network; a switch it did not record ran
    at the schema's default."""
    ran = {"pool": "lip", "head": "conv", "attention": "eca", "width": 0.25, "lip_bottleneck": 0.25,
           "dropout": 0.1}
    now = {"model": {**ran, "lip_start": "max"}}
    assert R.ablation_network_changes(ran, now) == ["`model.lip_start: avg`, where params.yaml now has `max`"]
    assert R.ablation_network_changes({**ran, "lip_start": "max"}, now) == []
    assert R.ablation_network_changes({**ran, "width": 1.0, "lip_start": "max"}, now) == [
        "`model.width: 1.0`, where params.yaml now has `0.25`"]
    a = {"meta": {"ablation_id": "x", "commit": "abc", "seeds": [0, 1], "model": {**ran, "width": 0.5}},
         "rows": [{"key": "vgg16", "table": 1, "label": "V", "metric": "accuracy_center", "status": "ok",
                   "values": [0.8, 0.81], "run_ids": [], "paper": None}]}
    text = "\n".join(R.ablation_lines(a))
    assert "Its network is not today's default: it ran with `model.width: 0.5`" in text
    assert "`fer ablation --seeds 2` reruns them." in text


def test_recipe_commands_name_the_switches_a_run_predates(tmp_path, monkeypatch):
    """A run recorded before a switch existed trained at the switch's schema default; its command
    names it where params.yaml has since changed the switch, so that it reruns what was run."""
    from pipeline.params_schema import TrainRun

    (tmp_path / "params.yaml").write_text("model:\n  pool: lip\n  lip_start: max\ntrain_rafdb:\n  epochs: 60\n")
    monkeypatch.setattr(R, "ROOT", tmp_path)
    old = {"seed": 0, "overrides": {"pool": "lip", "epochs": 30, "seed": 0}}  # before lip_start existed
    new = {"seed": 1, "overrides": {"pool": "lip", "epochs": 30, "seed": 1, "lip_start": "max"}}
    lines = R.commands(["old", "new"], {"old": [old], "new": [new]})
    assert TrainRun.model_fields["lip_start"].default == "avg"
    assert lines[0].endswith('--name old --seeds 0 --set lip_start="avg" epochs=30')
    assert lines[1].endswith("--name new --seeds 1 --set epochs=30")
