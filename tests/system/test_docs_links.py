"""Links in README.md and docs/: every relative link reaches a file that exists, every #anchor a
heading of its page (as GitHub names headings), and docs/index.md reaches every page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.paths import ROOT

DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]

FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def prose(page: Path) -> str:
    """The page without code: a link inside a code block or span is not a link."""
    return CODE_SPAN.sub("", FENCE.sub("", page.read_text()))


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page))


def anchors(page: Path) -> set[str]:
    """The ids GitHub gives the page's headings: lower case, punctuation dropped, spaces to
    hyphens, a repeated heading numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    ids = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        ids.add(slug if count == 0 else f"{slug}-{count}")
    return ids


def local(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:, ...


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_reaches_its_file_and_heading(page: Path) -> None:
    broken = []
    for target in filter(local, links(page)):
        path, _, anchor = target.partition("#")
        found = (page.parent / path).resolve() if path else page
        if not found.exists():
            broken.append(f"{target}: no file {found.relative_to(ROOT)}")
        elif anchor and found.suffix == ".md" and anchor not in anchors(found):
            broken.append(f"{target}: no heading #{anchor} in {found.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_docs_index_reaches_every_page() -> None:
    """Every page under docs/ is linked from docs/index.md, or from a page it links to."""
    reached = {DOCS / "index.md"}
    todo = [DOCS / "index.md"]
    while todo:
        page = todo.pop()
        for target in filter(local, links(page)):
            found = (page.parent / target.partition("#")[0]).resolve()
            if found.suffix == ".md" and found.is_relative_to(DOCS) and found not in reached:
                reached.add(found)
                todo.append(found)
    missing = sorted(str(p.relative_to(ROOT)) for p in set(DOCS.rglob("*.md")) - reached)
    assert not missing, f"not reachable from docs/index.md: {missing}"


def test_the_checker_sees_a_broken_link(tmp_path: Path) -> None:
    """The checks above can fail: a missing file and a missing heading are both found."""
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## Some `code` here\n\nSee [gone](gone.md), [here](#some-code-here), "
        "[there](#nowhere) and `[not a link](nope.md)`.\n"
    )
    assert links(page) == ["gone.md", "#some-code-here", "#nowhere"]
    assert anchors(page) == {"title", "some-code-here"}
