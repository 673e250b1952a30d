"""Seed noise: mean ± sample std over seeds, and whether two rows differ beyond it.

`compare(a, b)` is Welch's two-sample t-test on per-seed figures (unequal variances; two-sided,
alpha 0.05). With fewer than two values on either side there is no estimate of the noise, and
the verdict says so instead of guessing. Used by `fer ablation`, `fer tune`'s report and
`scripts/results.py`.
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

ALPHA = 0.05


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample std); std is None for fewer than two values, both None for none."""
    v = [float(x) for x in values]
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else None)


def fmt_pct(values: Sequence[float], digits: int = 1) -> str:
    """Fractions as percent: "84.1" for one value, "84.1 ± 0.5 (n=3)" for several (sample std)."""
    m, s = mean_std(values)
    if m is None:
        return "—"
    if s is None:
        return f"{m * 100:.{digits}f}"
    return f"{m * 100:.{digits}f} ± {s * 100:.{digits}f} (n={len(values)})"


def compare(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA) -> dict:
    """Welch's t-test of mean(a) - mean(b). Returns delta, t, df, p and a verdict: "higher" /
    "lower" (p < alpha), "tie" (within the seed noise), or "n/a" (a side has < 2 values)."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    out = {"delta": None, "t": None, "df": None, "p": None, "verdict": "n/a", "n": [len(a), len(b)]}
    if not a or not b:
        return out
    out["delta"] = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return out
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se2 = va + vb
    if se2 == 0:
        out.update(p=0.0 if out["delta"] != 0 else 1.0, t=math.inf if out["delta"] else 0.0)
    else:
        df = se2 ** 2 / ((va ** 2 / (len(a) - 1) if va else 0.0) + (vb ** 2 / (len(b) - 1) if vb else 0.0))
        t = out["delta"] / math.sqrt(se2)
        from scipy import stats

        out.update(t=t, df=df, p=float(2 * stats.t.sf(abs(t), df)))
    if out["p"] < alpha:
        out["verdict"] = "higher" if out["delta"] > 0 else "lower"
    else:
        out["verdict"] = "tie"
    return out


def fmt_compare(c: dict) -> str:
    """One cell: "+2.3 pts, beyond noise (p=0.01)" / "-0.4 pts, within noise (p=0.62)"."""
    if c["delta"] is None:
        return "—"
    d = f"{c['delta'] * 100:+.1f} pts"
    if c["verdict"] == "n/a":
        return f"{d}, noise unknown (one seed)"
    word = "within noise" if c["verdict"] == "tie" else "beyond noise"
    return f"{d}, {word} (p={c['p']:.2g})"
