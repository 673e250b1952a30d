"""Every Ray workaround lives in pipeline/ray_workarounds.py and was checked against one Ray
release: moving Ray in requirements.lock fails here until each is rechecked and the pin moved."""
from __future__ import annotations

import re
from pathlib import Path

import ray

from pipeline import ray_workarounds

ROOT = Path(__file__).resolve().parent.parent


def test_the_workarounds_were_checked_against_the_locked_ray():
    locked = re.search(r"^ray==(\S+)", (ROOT / "requirements.lock").read_text(), re.M).group(1)
    assert locked == ray_workarounds.CHECKED_WITH_RAY, (
        f"requirements.lock moves Ray to {locked}: recheck each workaround in "
        f"pipeline/ray_workarounds.py (still needed? still works?), then set CHECKED_WITH_RAY")
    assert ray.__version__ == locked


def test_no_other_module_works_around_ray():
    """What the workarounds patch (Ray's placement-group cleaner, its log records, its print)
    is touched nowhere else in the package."""
    patterns = [r"PlacementGroupCleanerCallback", r"\(logging\.Filter\)", r"def _?say\(",
                r"train/v2/_internal/execution/context|\"context\.py\"", r"PREEMPTION_WATCHER",
                r"getLogger\(\"ray\.train\"\)"]
    for f in (ROOT / "pipeline").rglob("*.py"):
        if f.name != "ray_workarounds.py":
            text = f.read_text()
            assert not [p for p in patterns if re.search(p, text)], f
