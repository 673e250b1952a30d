"""The pages a user looks at, opened the way a user opens them: `dvc plots show`'s HTML in a real
Chromium with the network cut off (its default page loads Vega from a CDN and is blank offline),
and the template that makes it work, which must be what the pinned package writes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import plots_page

from test_dvc_pipeline import _copy_repo

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"

#: The plots dvc.yaml declares: the training curves (line marks, one per field) and the
#: confusion matrices (7 x 7 rect cells), as dvc_render names their divs.
CURVES = ("reports_history_rafdb_json", "reports_history_sfew_json")
CONFUSION = ("plots_confusion_rafdb_csv", "plots_confusion_sfew_csv")


def test_committed_plots_template_is_what_the_pinned_package_writes():
    """The template inlines a 900 KB bundle that nobody reads: comparing it with a fresh build is
    the only way to know it is the pinned vl-convert's, unedited, and still has the placeholders
    DVC fills (and none that would bring back the CDN scripts)."""
    import hashlib

    committed = (REPO / plots_page.TEMPLATE).read_bytes()
    fresh = plots_page.page_template().encode("utf-8")
    assert hashlib.sha256(committed).hexdigest() == hashlib.sha256(fresh).hexdigest(), \
        "differs from the pinned package's: run python -m pipeline.plots_page, then commit .dvc/plots_page.html"
    text = committed.decode("utf-8")
    assert "{plot_divs}" in text and "{refresh_tag}" in text and "{scripts}" not in text
    assert "window.vegaEmbed" in text and "cdn.jsdelivr" not in text


def _page_problems(page) -> list[str]:
    """What is missing from each plot of the page: an empty list when every plot is drawn."""
    got = page.evaluate("""(ids) => ids.map(id => {
        const d = document.getElementById(id);
        if (!d) return [id, 'no div', 0, 0, 0];
        const lines = [...d.querySelectorAll('.mark-line path')].filter(p => (p.getAttribute('d') || '').length > 20);
        const cells = d.querySelectorAll('.mark-rect path');
        let inked = 0;  // a canvas renderer draws no elements: count its painted pixels instead
        for (const c of d.querySelectorAll('canvas')) {
            const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            for (let i = 3; i < px.length; i += 4) if (px[i]) inked++;
        }
        return [id, 'ok', lines.length, cells.length, inked];
    })""", [*CURVES, *CONFUSION])
    problems = []
    for pid, state, lines, cells, inked in got:
        canvas = inked > 1000
        if state != "ok":
            problems.append(f"{pid}: {state}")
        elif pid in CURVES and lines < 2 and not canvas:
            problems.append(f"{pid}: {lines} drawn line(s), expected train and val")
        elif pid in CONFUSION and cells < 49 and not canvas:
            problems.append(f"{pid}: {cells} cells, expected 7 x 7")
    return problems


def test_dvc_plots_show_draws_every_plot_offline(browser, tmp_path):
    """`dvc plots show` in a copy of the repo, with the project's settings as committed (no
    --html-template: `.dvc/config` names the template), opened from file:// with every other URL
    refused: the training curves and confusion matrices are drawn and no script fails. The
    screenshot is the README's picture of the page."""
    work = tmp_path / "repo"
    work.mkdir()
    _copy_repo(work)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site")}
    r = subprocess.run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], cwd=work, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    html = tmp_path / "plots" / "index.html"
    assert html.is_file(), r.stdout

    ctx = browser.new_context(viewport={"width": 1000, "height": 900})
    refused: list[str] = []

    def offline(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    ctx.route("**/*", offline)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(html.as_uri(), timeout=60_000)
    try:  # vegaEmbed renders asynchronously after load
        page.wait_for_function("document.querySelectorAll('.vega-embed svg, .vega-embed canvas').length >= 4",
                               timeout=30_000)
    except Exception:  # noqa: BLE001 - the assertions below say what is missing
        pass
    problems = _page_problems(page)
    assert not errors, errors  # e.g. "vegaEmbed is not defined" with DVC's CDN page
    assert not problems, f"{problems}; refused URLs: {refused[:5]}"
    assert not refused, refused  # the page asked for nothing outside file://
    page.screenshot(path=str(DOCS / "dvc_plots.png"), full_page=True)
    ctx.close()
