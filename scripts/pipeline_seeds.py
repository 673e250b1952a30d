"""Run the whole default pipeline at other training seeds: the spread of `make repro`'s figures.

    python scripts/pipeline_seeds.py --seeds 1 2     # about 12 min per seed on 2 cores
    python scripts/pipeline_seeds.py --seeds 0 1 2 --set train_rafdb.epochs=45 --out reports/seeds_lipmax_e45

`make repro` is seed 0. Each seed here runs `dvc repro` in a throwaway clone of the committed HEAD
with ``train_rafdb.seed`` and ``finetune_sfew.seed`` set to it (the synthetic data, its split and
everything else stay as committed, but for the ``--set`` keys), and copies that run's ten-crop metrics and training histories
to ``reports/seeds/seed<N>/`` with the commit they came from. `scripts/results.py` reads them
beside seed 0's files (``metrics/``, ``reports/history_*.json``) for the README's mean ± std rows.
Run two seeds at once as two processes if you like; each clone has its own Ray instance and store.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("metrics/eval_rafdb.json", "metrics/eval_sfew.json",
          "reports/history_rafdb.json", "reports/history_sfew.json")


def _apply(params: dict, sets: dict) -> None:
    for key, value in sets.items():
        *path, last = key.split(".")
        node = params
        for k in path:
            node = node[k]
        if last not in node:
            sys.exit(f"--set {key}: params.yaml has no such key")
        node[last] = value


def run_seed(seed: int, out_root: Path, sets: dict | None = None) -> Path:
    sets = sets or {}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                          text=True, timeout=60).stdout.strip()
    with tempfile.TemporaryDirectory(prefix=f"fer-seed{seed}-") as tmp:
        work = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True, timeout=300)
        params = yaml.safe_load((work / "params.yaml").read_text())
        for stage in ("train_rafdb", "finetune_sfew"):
            params[stage]["seed"] = seed
        _apply(params, sets)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "RAY_ADDRESS"))}
        env.update(PYTHONPATH=str(work), PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
                   RAY_AUTH_MODE="disabled", MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1")
        print(f"seed {seed}: dvc repro in {work} (commit {head[:10]})", flush=True)
        t0 = time.monotonic()
        r = subprocess.run(["dvc", "repro"], cwd=work, env=env, timeout=4 * 3600)
        if r.returncode != 0:
            sys.exit(f"seed {seed}: dvc repro failed (exit {r.returncode}); see the output above")
        dst = out_root / f"seed{seed}"
        dst.mkdir(parents=True, exist_ok=True)
        for rel in COPIED:
            shutil.copyfile(work / rel, dst / Path(rel).name)
        extra = "".join(f" --set {k}={v}" for k, v in sets.items())
        minutes = (time.monotonic() - t0) / 60
        (dst / "run.json").write_text(json.dumps(
            {"commit": head, "seed": seed,
             "command": f"python scripts/pipeline_seeds.py --seeds {seed}{extra} --out {out_root.name}",
             "params_changed": {"train_rafdb.seed": seed, "finetune_sfew.seed": seed, **sets},
             "dvc_repro_minutes": round(minutes, 1)}, indent=1) + "\n")
        print(f"seed {seed}: done in {(time.monotonic() - t0) / 60:.1f} min -> {dst}", flush=True)
        return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", required=True, help="training seeds (0 is make repro's)")
    ap.add_argument("--out", default=str(ROOT / "reports" / "seeds"))
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="other params.yaml values for these runs, e.g. train_rafdb.epochs=45")
    a = ap.parse_args()
    sets = {}
    for kv in a.set:
        key, eq, value = kv.partition("=")
        if not eq:
            sys.exit(f"--set {kv}: expected KEY=VALUE")
        sets[key] = yaml.safe_load(value)
    for s in a.seeds:
        run_seed(s, Path(a.out), sets)


if __name__ == "__main__":
    main()
