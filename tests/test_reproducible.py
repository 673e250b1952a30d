"""The data stages' outputs are a function of their inputs and params only: the same bytes in any
folder, with any thread or worker count, time zone, locale, and with numpy's and libjpeg-turbo's
CPU-specific kernels switched off (what a machine with other CPU features would run). Also the
pinned stack: requirements.lock pins every package exactly."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.data.synthetic import _png, render

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("rafdb", "sfew")
# big enough for the process pools (synth from 300 images, ingest validation from 192)
SMALL = {"synth": {"rafdb": {"n": 320, "seed": 0}, "sfew": {"n": 200, "seed": 1}}}


def _numpy_dispatch_off() -> str:
    """Every CPU feature numpy dispatches to at run time (baseline kernels only)."""
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_dispatch__
    return " ".join(__cpu_dispatch__)


#: The second run's "other machine": baseline numpy kernels, no libjpeg-turbo SIMD.
OTHER_CPU = {"NPY_DISABLE_CPU_FEATURES": _numpy_dispatch_off(), "JSIMD_FORCENONE": "1"}


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _data_stage_commands(params: dict) -> list[list[str]]:
    """synth@<ds> and ingest@<ds>, both datasets, as dvc.yaml declares their commands."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    cmds = []
    for ds in DATASETS:
        for name in ("synth", "ingest"):
            do = stages[name]["do"]
            cmd = do["cmd"].replace("${key}", ds)
            cmd = cmd.replace("${item}", ds if name == "synth" else str(params["datasets"][ds]))
            argv = shlex.split(cmd)
            cmds.append([sys.executable if argv[0] == "python" else argv[0], *argv[1:]])
    return cmds


def _run_data_stages(project: Path, *, workers: int, cpus: set[int] | None, env: dict) -> None:
    """synth and ingest for both datasets, as DVC runs them (cwd = the project, code from the
    repo), in ``project`` holding a reduced params.yaml."""
    project.mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["synth"] = SMALL["synth"]
    params["ingest"]["workers"] = workers
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("OMP_", "MKL_", "OPENBLAS_", "NPY_", "JSIMD_", "LC_"))}
    full_env.update(PYTHONPATH=str(REPO), **env)
    preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    for cmd in _data_stage_commands(params):
        r = subprocess.run(cmd, cwd=project, env=full_env, preexec_fn=preexec,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}{r.stderr[-2000:]}"


@pytest.mark.slow
def test_data_stages_same_bytes_across_folders_threads_locale_and_cpu_kernels(tmp_path):
    cores = sorted(os.sched_getaffinity(0))
    a = tmp_path / "a"
    b = tmp_path / "deeper folder" / "b é"  # another depth, a space and a non-ASCII name
    _run_data_stages(a, workers=1, cpus={cores[0]},  # one core: the synth pool is not used
                     env={"OMP_NUM_THREADS": "1", "TZ": "UTC", "LC_ALL": "C", "LANG": "C"})
    _run_data_stages(b, workers=2, cpus=None,
                     env={"OMP_NUM_THREADS": "2", "TZ": "Pacific/Chatham", "LC_ALL": "C.UTF-8",
                          "LANG": "C.UTF-8", **OTHER_CPU})
    for out in ("data", "reports"):
        ta, tb = _tree(a / out), _tree(b / out)
        assert ta.keys() == tb.keys(), out
        differ = sorted(k for k in ta if ta[k] != tb[k])
        assert not differ, f"{len(differ)} files differ, e.g. {differ[:5]}"
    names = set(_tree(a / "data")) | {f"reports/{k}" for k in _tree(a / "reports")}
    for ds in DATASETS:
        assert f"parquet/{ds}/.fer-output.json" in names and f"synthetic/{ds}/.synthetic.json" in names
        assert f"reports/ingest_{ds}.json" in names
        assert f"parquet/{ds}/train.parquet" in names and f"parquet/{ds}/test.parquet" in names
    # the report holds nothing of the run: no timings, worker count or absolute path
    for ds in DATASETS:
        text = (a / f"reports/ingest_{ds}.json").read_text()
        rep = json.loads(text)
        assert not {"seconds", "images_per_s", "workers", "report_path", "run"} & set(rep)
        assert rep["src"] == f"data/synthetic/{ds}" and rep["out"] == f"data/parquet/{ds}"
        assert str(tmp_path) not in text


def test_render_bytes_do_not_depend_on_cpu_kernels_or_threads():
    """The same faces from a process running numpy's baseline kernels and libjpeg-turbo without
    SIMD, on one thread, in another time zone and locale."""
    code = ("import hashlib; from pipeline.data.synthetic import render; "
            "print(hashlib.sha256(b''.join(render(i % 7, l, 5, i) for l in ('rafdb', 'sfew') "
            "for i in range(12))).hexdigest())")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TZ": "Asia/Kathmandu",
           "LC_ALL": "C", **OTHER_CPU}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    here = hashlib.sha256(b"".join(render(i % 7, l, 5, i) for l in ("rafdb", "sfew")
                                   for i in range(12))).hexdigest()
    assert r.stdout.strip() == here


def test_png_is_written_without_a_compressor():
    rng = np.random.default_rng(0)
    for h, w in ((112, 112), (300, 257), (1, 1)):  # 300x257: raw data spans several blocks
        px = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        data = _png(Image.fromarray(px, "RGB"))
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert np.array_equal(np.asarray(im), px)
        raw = h * (1 + 3 * w)
        assert len(data) == 8 + 25 + 12 + 2 + raw + 5 * -(-raw // 0xFFFF) + 4 + 12
    face = render(3, "sfew", 0, 0)
    assert face == render(3, "sfew", 0, 0) and face[:8] == b"\x89PNG\r\n\x1a\n"


def test_lock_pins_every_package_exactly():
    lock = (REPO / "requirements.lock").read_text()
    pins = {}
    for line in lock.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line.strip())
            assert m, f"not an exact pin: {line!r}"
            pins[re.sub(r"[-_.]+", "-", m[1]).lower()] = m[2]
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    # every direct dependency of the project (and of its dev extra) is in the lock
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    direct = project["dependencies"] + project["optional-dependencies"]["dev"]
    for req in direct:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", req)[0]).lower()
        assert name in pins, f"{name} is not in requirements.lock: run `make lock`"
    makefile = (REPO / "Makefile").read_text()
    assert "--no-deps -r requirements.lock" in makefile and "pip-compile" in makefile


DATA_STAGES = ("synth@rafdb", "synth@sfew", "ingest@rafdb", "ingest@sfew")


def _lock_is_current(lock: dict, params: dict) -> str | None:
    """None when dvc.lock's data-stage entries were written by this code and these params, else
    why not (then nothing can be compared)."""
    for name in DATA_STAGES:
        st = lock.get(name)
        if st is None:
            return f"dvc.lock has no {name}"
        for dep in st.get("deps", []):
            p = REPO / dep["path"]
            if p.is_file() and hashlib.md5(p.read_bytes()).hexdigest() != dep["md5"]:
                return f"{dep['path']} changed since dvc.lock was written"
        for key, val in st.get("params", {}).get("params.yaml", {}).items():
            cur = params
            for part in key.split("."):
                cur = cur.get(part) if isinstance(cur, dict) else None
            if cur != val:
                return f"params {key} changed since dvc.lock was written"
    return None


@pytest.mark.slow
def test_committed_lock_matches_a_fresh_copys_data_stages(tmp_path):
    """The data stages of a fresh copy, run by DVC with the committed params, write exactly the
    outputs that the committed dvc.lock records."""
    from test_dvc_pipeline import _copy_repo

    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    stale = _lock_is_current(lock, yaml.safe_load((REPO / "params.yaml").read_text()))
    if stale:
        pytest.skip(f"dvc.lock is older than the code ({stale}): run `make repro` and commit it")
    work = tmp_path / "fresh"
    work.mkdir()
    _copy_repo(work)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"), "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"],
                ["dvc", "repro", "ingest@rafdb", "ingest@sfew"]):
        r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    fresh = yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    for name in DATA_STAGES:
        assert fresh[name]["outs"] == lock[name]["outs"], name


#: The smallest training that still runs 2 DDP workers through every part of the stage.
TINY_TRAIN = {"synth": {"rafdb": {"n": 140, "seed": 0}}, "model": {"width": 0.0625},
              "ray": {"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 0},
              "train_rafdb": {"image_size": 56, "crop": 48, "epochs": 1, "batch_size": 32}}


def _stage_argv(name: str) -> list[str]:
    argv = shlex.split(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][name]["cmd"])
    return [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]


@pytest.mark.slow
def test_training_stage_same_bytes_in_two_folders(tmp_path):
    """On one machine, train_rafdb run twice (other folder, time zone, locale, MLflow store) writes
    the same model.pt, history and curves: nothing of the session (MLflow run id, speed, paths)
    enters a DVC-tracked output. Across CPUs the float kernels differ: see the README."""
    from test_dvc_pipeline import _merge

    outs = []
    for name, tz, lc in (("a", "UTC", "C"), ("deeper/b é", "Pacific/Chatham", "C.UTF-8")):
        work = tmp_path / name
        work.mkdir(parents=True)
        params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY_TRAIN)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env = {**os.environ, "PYTHONPATH": str(REPO), "TZ": tz, "LC_ALL": lc, "LANG": lc,
               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / (name[-1] + '.db')}"}
        env.pop("RAY_ADDRESS", None)
        for cmd in ([sys.executable, "-m", "stages.synth", "rafdb", "data/synthetic/rafdb"],
                    [sys.executable, "-m", "stages.ingest", "rafdb", "data/synthetic/rafdb",
                     "data/parquet/rafdb", "reports/ingest_rafdb.json"],
                    _stage_argv("imagenet_init"), _stage_argv("train_rafdb")):
            r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}{r.stderr[-2000:]}"
        outs.append({**{f"models/{k}": v for k, v in _tree(work / "models").items()},
                     **{f"reports/{k}": v for k, v in _tree(work / "reports").items()}})
    assert {"models/rafdb/model.pt", "models/rafdb/history.json", "models/imagenet_init.pt",
            "reports/history_rafdb.json", "reports/curves_rafdb.png"} <= set(outs[0])
    differ = sorted(k for k in outs[0] if outs[0][k] != outs[1].get(k))
    assert not differ and outs[0].keys() == outs[1].keys(), differ
