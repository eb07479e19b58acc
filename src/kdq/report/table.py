"""Plain-text tables for the terminal and Markdown files."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _layout(rows: Sequence[dict[str, Any]],
            columns: Sequence[tuple[str, str]]) -> tuple[list[str], list[list[str]], list[int]]:
    """(headers, cells, column widths) of a table: `columns` are (key, header) pairs."""
    headers = [h for _, h in columns]
    cells = [[str(row.get(k, "")) for k, _ in columns] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    return headers, cells, widths


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """`columns` are (key, header) pairs; cells are str()-ed, so format numbers before."""
    headers, cells, widths = _layout(rows, columns)
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(c) for c in cells)])


def plain_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """The same table for a terminal: columns two spaces apart, the header underlined."""
    headers, cells, widths = _layout(rows, columns)
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
