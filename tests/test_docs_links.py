"""Every relative link and image of README.md and docs/*.md resolves: the file exists, and so does the #anchor.

    pytest tests/test_docs_links.py -q
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def without_code(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than - and _ dropped, spaces to -."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def relative_links(page: Path) -> list[str]:
    """The targets of a page's links and images that point into the repository."""
    return [t for t in LINK.findall(without_code(page.read_text(encoding="utf-8"))) if not re.match(r"^[a-z]+:", t)]


def test_the_slug_rule_matches_githubs():
    assert slug("Tokenizer training (`benchmarks/tokenizer_bench.py`)") == "tokenizer-training-benchmarkstokenizer_benchpy"
    assert slug("What happens when...") == "what-happens-when"
    assert slug("Reaching a target loss sooner: Muon, WSD, data mixtures") == "reaching-a-target-loss-sooner-muon-wsd-data-mixtures"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no heading with the anchor #{anchor} in {file.relative_to(ROOT)})")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_docs_link_every_topic_page_from_the_readme():
    linked = {Path(t.partition("#")[0]).name for t in relative_links(ROOT / "README.md")}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"README.md does not link {sorted(pages - linked)}"


def test_no_page_repeats_a_section():
    """A second-level heading appears once across the README and the topic pages (a merge can duplicate one)."""
    where: dict[str, list[str]] = {}
    for page in PAGES[:-1]:
        for heading in re.findall(r"^## (.+)$", re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S), re.M):
            where.setdefault(heading.strip().lower(), []).append(page.name)
    repeated = {h: pages for h, pages in where.items() if len(pages) > 1}
    assert not repeated, f"sections that appear more than once: {repeated}"
