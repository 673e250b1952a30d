"""The HTML template `dvc plots show` fills, with Vega, Vega-Lite and vega-embed inlined.

DVC's own page loads those three libraries from a CDN, so on a machine without internet (many
cluster nodes, this project's test machine) it is a blank page. dvc_render fills a template's
``{plot_divs}`` and ``{refresh_tag}``, and adds its CDN ``<script>`` tags only where the template
has ``{scripts}``: this one has none and carries the libraries itself, taken from the
``vl-convert-python`` package (a dev dependency, pinned in requirements.lock), never downloaded.
The written file is committed (``.dvc/plots_page.html``) and named by ``.dvc/config``'s
``plots.html_template``, so users need neither the package nor a network; the test suite checks
the committed file is byte-for-byte what this module writes from the pinned package.

    python -m pipeline.plots_page            # rewrite .dvc/plots_page.html
    python -m pipeline.plots_page --check    # exit 1 if the committed file differs
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import FerError

#: The oldest Vega-Lite 5 that vl-convert bundles: DVC's plot specs use the v5 schema.
VEGA_LITE = "5.8"
#: Where the template lives, relative to the repo root (``plots.html_template`` in
#: ``.dvc/config`` names it relative to ``.dvc/``).
TEMPLATE = Path(".dvc") / "plots_page.html"


def _vl_convert():
    try:
        import vl_convert
    except ImportError:
        raise FerError("the plots template is built from the vl-convert-python package: "
                       "pip install vl-convert-python (a dev dependency, see requirements.lock)") from None
    return vl_convert


def page_template() -> str:
    """The template's text. Deterministic for one package version (the bundle is embedded in
    the wheel), so the committed file can be compared with it."""
    from importlib.metadata import version

    vl = _vl_convert()
    bundle = vl.javascript_bundle(vl_version=VEGA_LITE)
    # dvc_render replaces these by plain string substitution, over the whole page: a bundle that
    # happened to contain one would be corrupted; and "</script" would end the inline script.
    for bad in ("{plot_divs}", "{refresh_tag}", "{scripts}", "</script"):
        if bad in bundle.lower():
            raise FerError(f"the vl-convert bundle contains {bad!r}: it cannot be inlined as it is")
    origin = (f"vl-convert-python {version('vl-convert-python')}: Vega {vl.get_vega_version()}, "
              f"Vega-Lite {VEGA_LITE}, vega-embed {vl.get_vega_embed_version()}")
    return (
        "<!DOCTYPE html>\n"
        "<html>\n<head>\n"
        '<meta charset="utf-8">\n'
        "{refresh_tag}\n"
        "<title>DVC Plot</title>\n"
        f"<!-- Written by `python -m pipeline.plots_page` from {origin}; not to be edited by hand.\n"
        "     It has no scripts placeholder, so DVC adds no CDN script tags: the page works offline. -->\n"
        # in a function of its own: the bundle's top-level names (n, t, ...) stay out of the page's
        # global scope, where DVC's per-plot scripts declare theirs; it sets window.vegaEmbed itself
        f"<script>\n(function () {{\n{bundle}\n}})();\n</script>\n"
        "<style>\n  table { border-spacing: 15px; }\n</style>\n"
        "</head>\n<body>\n{plot_divs}\n</body>\n</html>\n"
    )


def write(path: str | Path = TEMPLATE) -> Path:
    """Write the template to ``path`` (whole, or the previous file is kept)."""
    from pipeline.outputs import write_file_atomic

    return write_file_atomic(Path(path), page_template().encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.plots_page", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help=f"default: <repo root>/{TEMPLATE}")
    p.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    a = p.parse_args(argv)
    from pipeline.tracking import repo_root

    out = a.out or repo_root() / TEMPLATE
    try:
        if a.check:
            same = out.is_file() and out.read_bytes() == page_template().encode("utf-8")
            print(f"{out}: {'up to date' if same else 'differs: run python -m pipeline.plots_page'}")
            return 0 if same else 1
        write(out)
    except FerError as e:
        print(f"plots_page: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
