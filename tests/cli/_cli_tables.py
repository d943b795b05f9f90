"""Read the tables ``mtx`` prints back into cells, so tests can check cells by column."""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator
from typing import Any

from rich.console import Console

RULE = re.compile(r"^\s*─+\s*$")


def render_text(renderable: Any, width: int) -> str:
    """What ``renderable`` prints on a plain (no colour, not a terminal) console ``width`` wide."""
    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    console.print(renderable)
    return console.file.getvalue()


def _spans(lines: list[str]) -> list[tuple[int, int]]:
    """Character ranges that are not blank on every one of ``lines``."""
    width = max((len(line) for line in lines), default=0)
    filled = [any(c < len(line) and line[c] != " " for line in lines) for c in range(width)]
    spans, start = [], None
    for c, on in enumerate([*filled, False]):
        if on and start is None:
            start = c
        elif not on and start is not None:
            spans.append((start, c))
            start = None
    return spans


def table_rows(
    text: str, title: str, headers: list[str], occurrence: int = 0
) -> list[dict[str, str]]:
    """The rows of the table printed under the line that reads ``title``: {header: cell}.

    ``headers`` are the column headers in order, each on one line. A stretch of the body
    that is not blank on some line belongs to the header it overlaps most (or the
    nearest); a line with an empty first cell continues the row above.
    """
    lines = text.splitlines()
    titles = [i for i, line in enumerate(lines) if line.strip() == title]
    assert len(titles) > occurrence, f"no table titled {title!r} in:\n{text}"
    start = titles[occurrence] + 1
    rule = next(i for i in range(start, len(lines)) if RULE.match(lines[i]))
    head = lines[rule - 1]
    places, at = [], 0
    for h in headers:
        at = head.find(h, at)
        assert at >= 0, f"no header {h!r} in {head!r}"
        places.append((at, at + len(h)))
        at += len(h)
    body = []
    for line in lines[rule + 1 :]:
        if not line.strip():
            break
        body.append(line)

    def owner(span: tuple[int, int]) -> int:
        a, b = span
        overlap = [min(b, hb) - max(a, ha) for ha, hb in places]
        if max(overlap) > 0:
            return overlap.index(max(overlap))
        distance = [max(ha - b, a - hb) for ha, hb in places]
        return distance.index(min(distance))

    owners = [(span, owner(span)) for span in _spans(body)]
    rows: list[list[str]] = []
    for line in body:
        row = [""] * len(headers)
        for (a, b), j in owners:
            piece = line[a:b].strip()
            if piece:
                row[j] = f"{row[j]} {piece}".strip()
        if rows and not row[0]:
            rows[-1] = [" ".join(x for x in (old, new) if x) for old, new in zip(rows[-1], row)]
        else:
            rows.append(row)
    return [dict(zip(headers, row)) for row in rows]


def is_subsequence(words: Iterable[str], tokens: Iterable[str]) -> bool:
    """Every word of ``words``, in order, among ``tokens`` (other columns may interleave;
    a token may end in punctuation the renderer added, as in ``title:``)."""
    it = iter(tokens)
    return all(any(t == w or t.rstrip(":;,") == w for t in it) for w in words)


def walk(value: Any) -> Iterator[tuple[str | None, Any]]:
    """Every (key, value) pair in a JSON document, depth first (key None in lists)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k, v
            yield from walk(v)
    elif isinstance(value, list):
        for v in value:
            yield None, v
            yield from walk(v)


def names_to_find(doc: dict[str, Any]) -> set[str]:
    """The names a table must show whole: parameters, ``semantic/…`` terms, finding codes."""
    names: set[str] = set()
    for key, value in walk(doc):
        if isinstance(key, str) and key.startswith("semantic/"):
            names.add(key)
        if key == "parameters" and isinstance(value, list):
            names |= {p["name"] for p in value if isinstance(p, dict) and "name" in p}
        if key in ("findings", "not_checked") and isinstance(value, list):
            names |= {f["code"] for f in value if isinstance(f, dict) and "code" in f}
    return names
