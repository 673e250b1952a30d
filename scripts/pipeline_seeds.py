"""Run the whole default pipeline at other training seeds: the spread of `make repro`'s figures.

    python scripts/pipeline_seeds.py --seeds 1 2     # about 12 min per seed on 2 cores

`make repro` is seed 0. Each seed here runs `dvc repro` in a throwaway clone of the committed HEAD
with ``train_rafdb.seed`` and ``finetune_sfew.seed`` set to it (the synthetic data, its split and
everything else stay as committed), and copies that run's ten-crop metrics and training histories
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


def run_seed(seed: int, out_root: Path) -> Path:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                          text=True, timeout=60).stdout.strip()
    with tempfile.TemporaryDirectory(prefix=f"fer-seed{seed}-") as tmp:
        work = Path(tmp) / "repo"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True, timeout=300)
        params = yaml.safe_load((work / "params.yaml").read_text())
        for stage in ("train_rafdb", "finetune_sfew"):
            params[stage]["seed"] = seed
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
        (dst / "run.json").write_text(json.dumps(
            {"commit": head, "seed": seed, "command": f"python scripts/pipeline_seeds.py --seeds {seed}",
             "params_changed": {"train_rafdb.seed": seed, "finetune_sfew.seed": seed}}, indent=1) + "\n")
        print(f"seed {seed}: done in {(time.monotonic() - t0) / 60:.1f} min -> {dst}", flush=True)
        return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", required=True, help="training seeds (0 is make repro's)")
    ap.add_argument("--out", default=str(ROOT / "reports" / "seeds"))
    a = ap.parse_args()
    for s in a.seeds:
        run_seed(s, Path(a.out))


if __name__ == "__main__":
    main()
