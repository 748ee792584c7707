"""The README and docs/ link to each other by relative paths and section anchors: every one resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """The section anchors GitHub makes of a page's headings: lower case, punctuation dropped, spaces to '-'."""
    heads = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_reaches_a_file_and_its_section(page):
    links = [target for target in LINK.findall(page.read_text()) if "://" not in target]
    assert links or page.name != "README.md", "the README links to no docs page"
    for target in links:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page.name} links to {target}: no such section in {file.name}"


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, f"docs/{page.name} is not in the README's documentation table"


def _table_value(text: str):
    """A default as docs/training.md writes it: `code`, true/false, none, a number or a (tuple)."""
    text = text.strip().strip("`")
    if text in ("true", "false"):
        return text == "true"
    if text == "none":
        return None
    if text.startswith("("):
        return [float(v) for v in text.strip("()").split(",")]
    try:
        return float(text)
    except ValueError:
        return text


def test_the_train_table_states_the_defaults_zoo_train_reads():
    """docs/training.md's `train` keys table is what a recipe that leaves a key out gets: a changed default
    (ema_decay, batch_size, log_every, tf32, eval_n, betas: mutation testing changed each unseen) or a
    table left behind would now fail here."""
    from zoo.training.sections import TRAIN, TRAIN_DEFAULTS, UNSET_MEANS

    read = {**TRAIN_DEFAULTS, **UNSET_MEANS}
    rows = {}
    for line in (ROOT / "docs" / "training.md").read_text().splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        keys = [k.strip().strip("`") for k in cells[0].split(",")]
        if not all(k in TRAIN for k in keys):  # another table of the page (the run directory)
            continue
        values = [cells[1]] if len(keys) == 1 else _split_defaults(cells[1], len(keys))
        rows.update(zip(keys, values))
    assert set(rows) == set(TRAIN), set(rows) ^ set(TRAIN)  # every key documented, no key that is not one
    for key, text in rows.items():
        expected = read[key]
        got = _table_value(text)
        if isinstance(expected, (list, tuple)):
            expected = [float(v) for v in expected]
        elif isinstance(expected, (int, float)) and not isinstance(expected, bool):
            expected = float(expected)
        assert got == expected, (key, text, read[key])


def _split_defaults(text: str, n: int) -> list[str]:
    """'0, (0.9, 0.999)' -> ['0', '(0.9, 0.999)']: commas inside parentheses stay."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    assert len(parts) == n, text
    return parts
