"""pipeline.noise: mean ± std over seeds and Welch's test, against scipy's own."""
import math

import pytest
from scipy import stats

from pipeline.noise import compare, fmt_compare, fmt_pct, mean_std


def test_mean_std_and_format():
    assert mean_std([]) == (None, None)
    assert mean_std([0.5]) == (0.5, None)
    m, s = mean_std([0.8, 0.82, 0.84])
    assert m == pytest.approx(0.82) and s == pytest.approx(0.02)
    assert fmt_pct([0.8, 0.82, 0.84]) == "82.0 ± 2.0 (n=3)"
    assert fmt_pct([0.5]) == "50.0"


def test_welch_matches_scipy():
    a, b = [0.80, 0.83, 0.85], [0.70, 0.74, 0.71]
    c = compare(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert c["t"] == pytest.approx(ref.statistic) and c["p"] == pytest.approx(ref.pvalue)
    assert c["verdict"] == "higher" and "beyond noise" in fmt_compare(c)
    c2 = compare([0.80, 0.70, 0.75], [0.76, 0.72, 0.78])
    assert c2["verdict"] == "tie" and "within noise" in fmt_compare(c2)
    assert compare(b, a)["verdict"] == "lower"


def test_one_seed_has_no_noise_estimate():
    c = compare([0.8], [0.7, 0.72])
    assert c["verdict"] == "n/a" and math.isclose(c["delta"], 0.09)
    assert "one seed" in fmt_compare(c)
    assert fmt_compare(compare([], [0.1])) == "—"


def test_tune_noise_note_compares_the_margin_with_the_seed_spread():
    from pipeline.tune.results import noise_note

    rows = [{"trial_id": "a", "best_val_accuracy": 0.80, "status": "completed"},
            {"trial_id": "b", "best_val_accuracy": 0.78, "status": "completed"},
            {"trial_id": "c", "best_val_accuracy": 0.90, "status": "stopped"}]
    n = noise_note(rows, rows[0], seed_std=0.02)
    assert n["margin_over_runner_up"] == pytest.approx(0.02) and n["verdict"] == "within noise"
    assert noise_note(rows, rows[0], seed_std=0.005)["verdict"] == "beyond noise"
    unknown = noise_note(rows, rows[0])
    assert unknown["verdict"] == "n/a" and "seed spread is unknown" in unknown["note"]
    assert noise_note(rows[:1], rows[0])["margin_over_runner_up"] is None
