"""A stage's DVC code deps and its run-name hash are the files it can import: an edit to code a
stage runs reruns it, an edit to code it never imports does not."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline import code_deps

ROOT = Path(__file__).resolve().parent.parent


def _stages():
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, st in doc["stages"].items():
        body = st.get("do", st)
        entry = re.search(r"python -m (stages\.\w+)", body["cmd"]).group(1)
        yield name, entry, [d for d in body["deps"] if str(d).startswith(("pipeline", "stages"))]


@pytest.mark.parametrize("name,entry,declared", list(_stages()), ids=[s[0] for s in _stages()])
def test_dvc_code_deps_are_the_stages_import_closure(name, entry, declared):
    want = list(code_deps.closure(entry))
    listed = "\n".join(f"        - {f}" for f in want)
    assert all((ROOT / d).is_file() for d in declared), f"{name}: declare files, not folders"
    assert sorted(declared) == want, (
        f"stage {name}: dvc.yaml code deps differ from what {entry} imports "
        f"(missing {sorted(set(want) - set(declared))}, never imported {sorted(set(declared) - set(want))}); "
        f"its deps should be:\n{listed}")


def test_the_closure_follows_lazy_and_package_imports_only():
    train = code_deps.closure("stages.train_rafdb")
    assert "pipeline/evaluate.py" in train  # imported inside train_stage(), not at the top
    assert {"pipeline/__init__.py", "pipeline/train/__init__.py", "stages/__init__.py"} <= set(train)
    assert "pipeline/train/tune.py" not in train and "pipeline/infer/registry.py" not in train
    assert "pipeline/infer/registry.py" in code_deps.closure("stages.evaluate")


def test_the_run_name_hash_moves_with_imported_code_only(tmp_path, monkeypatch):
    for pkg in ("pipeline", "stages"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(code_deps, "ROOT", tmp_path)
    code_deps.closure.cache_clear()
    try:
        before = code_deps.digest("stages.train_rafdb", b"cfg")
        assert code_deps.digest("stages.train_rafdb", b"other cfg") != before
        (tmp_path / "pipeline/train/tune.py").write_text("# the sweep: train_rafdb never imports it\n")
        assert code_deps.digest("stages.train_rafdb", b"cfg") == before
        with (tmp_path / "pipeline/train/worker.py").open("a") as f:
            f.write("\n# an edit to the worker loop\n")
        assert code_deps.digest("stages.train_rafdb", b"cfg") != before
    finally:
        code_deps.closure.cache_clear()
