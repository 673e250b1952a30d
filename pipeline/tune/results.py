"""A sweep's results: one row per trial, the best trial, the table `fer tune` prints, what one
seed per trial can say against the seed noise, and where `--apply` writes the best values."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.errors import FerError
from pipeline.tune.runs import find_runs
from pipeline.params_schema import is_number
from pipeline.tune.settings import DATASETS, MODEL_KEYS

METRIC, MODE = "val_accuracy", "max"
SIG_DIGITS = 4                 # best values are rounded to this many significant digits


def round_sig(v: Any) -> Any:
    if isinstance(v, float) and math.isfinite(v) and v != 0:
        return float(f"{v:.{SIG_DIGITS}g}")
    if hasattr(v, "item"):  # numpy scalars from tune.choice
        return round_sig(v.item())
    return v


def trial_rows(grid, max_epochs: int, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    from pipeline import tracking

    exp_id = tracking.get_or_create_experiment(ctx["experiment"])
    run_ids = {r.data.tags.get("trial_id"): r.info.run_id
               for r in find_runs(exp_id, sweep=ctx["sweep"], stage="tune_trial")}
    rows = []
    for res in grid:
        if res.config is None:  # never started
            continue
        m = res.metrics or {}
        trial_id = m.get("trial_id") or Path(res.path).name
        df = res.metrics_dataframe
        seen = [float(df[METRIC].max())] if df is not None and METRIC in df else []
        seen += [float(m[k]) for k in (METRIC, "best_val_accuracy") if is_number(m.get(k))]
        best = max(seen) if seen else float("nan")
        epoch = int(m.get("epoch") or 0)
        rows.append({
            "trial_id": trial_id, "config": dict(res.config), "checkpoint_path": m.get("checkpoint_path"),
            "params": {k: round_sig(res.config[k]) for k in sorted(res.config)},
            "epochs": epoch, "val_accuracy": m.get(METRIC), "best_val_accuracy": best,
            "status": "error" if res.error else ("stopped" if epoch < max_epochs else "completed"),
            "mlflow_run_id": run_ids.get(trial_id),
        })
    return rows


def pick_best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Among the trials that ran the full budget (ASHA's survivors), the highest best val
    accuracy (ties: the lowest trial id); if none completed, the highest among all that reported."""
    ok = [r for r in rows if r["status"] != "error" and r["best_val_accuracy"] == r["best_val_accuracy"]]
    if not ok:
        raise FerError("no trial reported a val accuracy; see the Ray logs above")
    full = [r for r in ok if r["status"] == "completed"] or ok
    # ties: more epochs, then the first trial (max keeps the first of equal keys)
    return max(sorted(full, key=lambda r: r["trial_id"]), key=lambda r: (r["best_val_accuracy"], r["epochs"]))


def format_table(rows: list[dict[str, Any]], best_id: str | None = None) -> str:
    keys = sorted({k for r in rows for k in r["params"]})
    head = ["", "trial", *keys, "epochs", "val_acc", "best_val_acc", "status"]
    body = []
    def order(r):  # the chosen trial first, then by best val accuracy
        acc = r["best_val_accuracy"]
        return (r["trial_id"] != best_id, -(acc if acc == acc else -1.0))

    for r in sorted(rows, key=order):
        body.append(["*" if r["trial_id"] == best_id else "", r["trial_id"],
                     *[f"{r['params'].get(k)}" for k in keys], str(r["epochs"]),
                     "-" if r["val_accuracy"] is None else f"{r['val_accuracy']:.4f}",
                     f"{r['best_val_accuracy']:.4f}", r["status"]])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def noise_note(rows: list[dict[str, Any]], best: dict[str, Any], seed_std: float | None = None
               ) -> dict[str, Any]:
    """What the single-seed trials can say: the best trial's margin over the runner-up (completed
    trials) beside the seed spread, when one is known (``seed_std``: the sample std over seeds of
    one configuration, e.g. a ``fer ablation --seeds 3`` row). A margin under 2 x seed_std (the
    spread of a difference of two single runs is sqrt(2) x seed_std) is within the noise."""
    others = sorted((r["best_val_accuracy"] for r in rows
                     if r is not best and r["status"] == "completed" and r["best_val_accuracy"] == r["best_val_accuracy"]),
                    reverse=True)
    margin = best["best_val_accuracy"] - others[0] if others else None
    out: dict[str, Any] = {"seeds_per_trial": 1, "margin_over_runner_up": None if margin is None else round(margin, 6),
                           "seed_std": seed_std, "verdict": "n/a"}
    if margin is not None and seed_std:
        out["verdict"] = "beyond noise" if margin > 2 * seed_std else "within noise"
    out["note"] = ("each trial is one training run (one seed): " + (
        f"the best leads the runner-up by {margin * 100:.1f} pts" if margin is not None else "no runner-up")
        + (f", {out['verdict']} (seed std {seed_std * 100:.1f} pts)" if seed_std and margin is not None
           else "; the seed spread is unknown here (`fer ablation --seeds 3` measures it), so the "
                "ranking is not a measured difference"))
    return out


def ablation_seed_std(root: Path) -> float | None:
    """The largest per-row seed std in reports/ablation.json (written by `fer ablation`), if any."""
    try:
        rows = json.loads((root / "reports" / "ablation.json").read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    stds = [r["std"] for r in rows if isinstance(r, dict) and isinstance(r.get("std"), (int, float))]
    return max(stds) if stds else None


def targets(best_params: dict[str, Any], dataset: str) -> dict[str, dict[str, Any]]:
    """Where `--apply` writes each value: model keys -> `model`, the rest -> the training section."""
    out: dict[str, dict[str, Any]] = {}
    for k, v in best_params.items():
        out.setdefault("model" if k in MODEL_KEYS else DATASETS[dataset], {})[k] = v
    return out
