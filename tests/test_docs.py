"""The front door and the docs: every relative link resolves, to a file and, with ``#``, to a
heading of that file (GitHub's anchor rule), and the README stays a front door (≤ 12 kB)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```.*?```", re.S)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    text = FENCE.sub("", md.read_text(encoding="utf-8"))
    return {anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def broken_links(md: Path) -> list[str]:
    """The relative links of ``md`` (outside code blocks) that lead nowhere."""
    bad = []
    for target in LINK.findall(FENCE.sub("", md.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            bad.append(f"{target} (no such heading)")
    return bad


def test_anchor_follows_githubs_rule():
    assert anchor("Training cost, in plain epochs of the same network") == \
        "training-cost-in-plain-epochs-of-the-same-network"
    assert anchor("Bit for bit on one machine; the committed seeds 0 and 1") == \
        "bit-for-bit-on-one-machine-the-committed-seeds-0-and-1"


def test_a_missing_file_or_heading_is_reported(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n[ok](#title) [gone](b.md) [nohead](a.md#nope)\n")
    assert broken_links(tmp_path / "a.md") == ["b.md (no such file)",
                                              "a.md#nope (no such heading)"]


def test_every_relative_link_of_readme_and_docs_resolves():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    bad = {str(md.relative_to(REPO)): broken_links(md) for md in pages}
    assert not {page: links for page, links in bad.items() if links}


def test_readme_is_at_most_12_kb():
    assert (REPO / "README.md").stat().st_size <= 12_000
