"""Every relative link in README.md and docs/*.md points to a file that exists, and every
``#anchor`` to a heading of its target: the README links the docs pages and they link back."""
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _outside_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # fenced blocks
    return re.sub(r"`[^`\n]*`", "", text)  # inline code


def _anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#{1,6} +(.+?) *$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M),
                       flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def _links(page: Path) -> list[str]:
    return [t for t in LINK.findall(_outside_code(page.read_text())) if not re.match(r"^[a-z][a-z+.-]*:", t)]


def test_the_readme_links_the_docs_pages():
    linked = {(ROOT / unquote(t.split("#")[0])).resolve() for t in _links(ROOT / "README.md") if t.split("#")[0]}
    pages = {p.resolve() for p in PAGES[1:]}
    assert pages <= linked, f"docs pages the README does not link: {sorted(p.name for p in pages - linked)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path)).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)
