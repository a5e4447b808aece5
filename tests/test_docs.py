"""README.md and docs/: every relative link resolves (the file, and a `#anchor` to a heading of it), the README
stays a front door, and no page cites a tracker's issue numbers. Reads text only: a few milliseconds."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 260

LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target) and ![alt](target)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")
SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*:|//)")
ISSUE_NUMBER = re.compile(r"\bissues?\s*(?:#|no\.?|number)?\s*\d+", re.IGNORECASE)


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def prose(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks, with inline code spans removed."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, re.sub(r"(`+)(?:(?!\1).)+?\1", "", line)))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (links as their text, no code or emphasis marks), lower case,
    without characters other than letters, digits, spaces, hyphens and underscores; spaces become hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("**", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """Every heading anchor of a Markdown file; a repeated heading's anchors get -1, -2, ... as on GitHub."""
    found, seen, fenced = set(), {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def broken_links(page: Path) -> list[str]:
    broken = []
    for number, line in prose(page):
        for target in LINK.findall(line):
            if SCHEME.match(target):
                continue
            path, _, anchor = unquote(target).partition("#")
            where = f"{page.relative_to(REPO)}:{number}: {target}"
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and file.suffix != ".md":
                broken.append(f"{where} (an anchor into a file that is not Markdown)")
            elif anchor and anchor not in anchors(file):
                broken.append(f"{where} (no heading with that anchor in {file.relative_to(REPO)})")
    return broken


def test_the_pages_exist():
    names = {page.name for page in pages()[1:]}
    assert {"train.md", "generate.md", "settings.md", "formats.md", "evaluate.md", "runs.md", "estimate.md",
            "differences.md", "development.md"} <= names


def test_every_relative_link_resolves():
    broken = [problem for page in pages() for problem in broken_links(page)]
    assert not broken, "\n".join(broken)


def test_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_no_page_cites_issue_numbers():
    found = [f"{page.relative_to(REPO)}:{number}: {match.group(0)}"
             for page in pages()
             for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
             for match in ISSUE_NUMBER.finditer(line)]
    assert not found, "\n".join(found)


def test_slugs_are_githubs():
    assert slug("Will it fit? `python -m tlora.estimate`") == "will-it-fit-python--m-tloraestimate"
    assert slug("The paper's protocol") == "the-papers-protocol"
    assert slug("SimpleTuner / LyCORIS files") == "simpletuner--lycoris-files"
    assert slug("diffusers' own tools after loading") == "diffusers-own-tools-after-loading"
    assert slug("inference.py") == "inferencepy"
