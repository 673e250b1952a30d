"""The ablation report: each row beside its reference row and the paper, as markdown.

Kept apart from the runs (:mod:`pipeline.ablation`) so that the report's format can be read and
tested without Ray or MLflow.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from pipeline.errors import FerError

#: Each row's reference: the row it adds one change to (``attention_off`` swaps ``ten_crop``'s FC head
#: for the conv head). The report tests every difference against the seed noise
#: (pipeline.noise.compare, Welch's t over per-seed figures).
REFS = {"lip": "vgg16", "ten_crop": "lip", "imagenet": "ten_crop", "attention_off": "ten_crop",
        "attention_on": "attention_off", "sfew_rafdb": "sfew_imagenet"}

def comparisons(rows: list) -> dict[str, dict[str, Any]]:
    """Row key -> ``pipeline.noise.compare`` of the row against its reference (REFS; the SFEW row
    against ``sfew_scratch`` when ``sfew_imagenet`` did not run), plus ``ref``."""
    from pipeline.noise import compare

    by_key = {r.key: r for r in rows}
    out = {}
    for r in rows:
        ref = REFS.get(r.key)
        if ref == "sfew_imagenet" and not (by_key.get(ref) and by_key[ref].values):
            ref = "sfew_scratch"
        if not ref or ref not in by_key or not r.values or not by_key[ref].values:
            continue
        out[r.key] = dict(compare(r.values, by_key[ref].values), ref=ref)
    return out


def fmt_value(values: list[float]) -> str:
    """Test accuracy in %: one run -> "84.12", several -> "84.12 ± 0.53" (sample std)."""
    if not values:
        return ""
    mean = statistics.fmean(values) * 100
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(values) * 100:.2f}"


def render(rows: list, meta: dict[str, Any]) -> str:
    from pipeline.noise import fmt_compare

    cmp = comparisons(rows)

    def table(n: int, title: str) -> list[str]:
        out = [f"## {title}", "",
               "| Row | Setting | Metric | Ours (test %) | vs reference row | Paper (%) | MLflow run id(s) |",
               "|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r.table == n):
            ours = fmt_value(r.values) if r.values else (r.reason or "not run")
            vs = f"`{cmp[r.key]['ref']}`: {fmt_compare(cmp[r.key])}" if r.key in cmp else "—"
            paper = f"{r.paper:.2f}" if r.paper is not None else "—"
            runs = ", ".join(f"`{i}`" for i in r.run_ids) if r.run_ids else "—"
            out.append(f"| `{r.key}` | {r.label} | {r.metric} | {ours} | {vs} | {paper} | {runs} |")
        return out + [""]

    seeds = meta["seeds"]
    n_test = meta["n_test"]
    lines = [
        "# Ablation study: LIP-VGG16", "",
        f"Written by `fer ablation` (id `{meta['ablation_id']}`, git `{meta['commit']}`, "
        f"{meta['wall_s']:.0f} s; parent MLflow run `{meta['parent_run_id']}`). "
        f"Each row: {len(seeds)} training run(s) per seed budget (seeds {', '.join(map(str, seeds))}"
        + (f", {meta['epochs']} epochs each" if meta["epochs"] else ", epochs from params")
        + f"), then the test split (RAF-DB n={n_test.get('rafdb')}, SFEW n={n_test.get('sfew')}). "
        + ("Figures are the mean ± sample standard deviation over seeds." if len(seeds) > 1 else
           "One seed: single-run figures, no spread."),
        f"Network: `{json.dumps(meta['model'], sort_keys=True)}` (rows override pool/head/attention); "
        f"training settings from `train_rafdb` / `finetune_sfew`; ImageNet init: "
        f"{meta['source'] or 'none (rows that need it are marked not run)'}.",
        "",
    ]
    lines += table(1, "Table 1: RAF-DB")
    lines += table(3, "Table 3: SFEW 2.0 (fine-tuning)")
    lines += [
        "Notes:", "",
        "- Metric `accuracy_center` is single centre-crop top-1 accuracy; `accuracy` is ten-crop "
        "(the paper's test protocol). Both are logged on every run as `test_accuracy_center` / "
        "`test_accuracy`.",
        "- Paper figures carried here, and only these: its Table 1 progression on RAF-DB, VGG16 "
        "81.68 (row `vgg16`), + LIP 83.15 (`lip`), + ten-crop 84.97 (`ten_crop`) and + ImageNet "
        "pre-training 86.31 (`imagenet`, the full LIP-VGG16); SFEW from ImageNet init 50.00 and from "
        "the RAF-DB model 57.34. '—' means the paper gives no figure for that row here (the "
        "attention rows are not in the paper at all).",
        "- `vs reference row`: the difference to the row this one adds a change to, tested against the "
        "seed noise (Welch's t-test on the per-seed figures, two-sided, 5%): *beyond noise* or "
        "*within noise* (a tie at this number of seeds); with one seed the noise is unknown. "
        "`reports/ablation.json` holds the same figures with t, df and p.",
        "- Rows that share a model share runs: `ten_crop` reads the ten-crop accuracy of the `lip` "
        "runs; `sfew_rafdb` fine-tunes the RAF-DB model named in its label.",
        "- On the built-in synthetic data at CPU size these numbers test the pipeline, not the "
        "paper: only real RAF-DB / SFEW 2.0 at width 1.0 with ImageNet weights are comparable.",
        "",
    ]
    return "\n".join(lines)


def rerender(json_path: str | Path, md_path: str | Path) -> Path:
    """Write the report again from ``reports/ablation.json`` in this module's current format (the
    reference rows, the paper's figures), without retraining: the per-seed figures, run ids and the
    meta of the run that made them are kept as they are; only the comparisons and the text follow
    the current code."""
    from pipeline.ablation import Row

    json_path, md_path = Path(json_path), Path(md_path)
    try:
        data = json.loads(json_path.read_text())
        rows = [Row.from_dict(r) for r in data["rows"]]
        meta = data["meta"]
        text = render(rows, meta)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FerError(f"{json_path}: not an ablation report `fer ablation` wrote ({type(e).__name__}: {e})")
    md_path.write_text(text)
    json_path.write_text(json.dumps({"meta": meta, "rows": [r.as_dict() for r in rows],
                                     "comparisons": comparisons(rows)}, indent=1, default=str))
    return md_path


if __name__ == "__main__":  # python -m pipeline.ablation_report [reports/ablation.json [reports/ablation.md]]
    import sys

    args = sys.argv[1:] or ["reports/ablation.json"]
    try:
        out = rerender(args[0], args[1] if len(args) > 1 else Path(args[0]).with_suffix(".md"))
    except FerError as e:
        sys.exit(f"error: {e}")
    print(f"ablation report -> {out}")
