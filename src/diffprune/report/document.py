"""The report as data: sections of paragraphs, notes, tables and images, rendered twice.

Owns the document model (`Section`, `Table`, `Image`) that `html.py` and `markdown.py` render, and
the small text helpers for settings tables. A new report section builds one `Section` of these.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .cells import FORMATS, Cell
from .inputs import is_number


@dataclasses.dataclass
class Table:
    header: list[str]
    rows: list[list[Cell | str]]
    css: str = ""
    collapsed: str | None = None  # summary line of a <details> block


@dataclasses.dataclass
class Image:
    file: str
    alt: str
    caption: str
    pixelated: bool = False


@dataclasses.dataclass
class Section:
    title: str
    blocks: list = dataclasses.field(default_factory=list)  # str (paragraph) | ("note", str) | Table | Image


def settings_table(items: list[tuple[str, Any]]) -> Table:
    """A two-column (setting, value) table; None values are left out, lists/dicts shown as JSON."""
    rows = []
    for k, v in items:
        if v is None:
            continue
        if isinstance(v, list | dict):
            v = json.dumps(v, separators=(", ", ": "))
        rows.append([k, str(v)])
    return Table(["setting", "value"], rows, css="kv")


def seconds_text(times) -> str | None:
    """{'importance': 42.59, 'prune': 20.49} -> 'importance 42.6 s, prune 20.5 s'."""
    if not isinstance(times, dict):
        return None if times is None else str(times)
    return ", ".join(f"{k} {FORMATS['s'](v)}" if is_number(v) else f"{k} {v}" for k, v in times.items())


def ranges_text(ranges) -> str:
    """[[0, 5], [7, 9]] -> '[0, 5), [7, 9)'; 'none' when empty."""
    try:
        return ", ".join(f"[{int(a)}, {int(b)})" for a, b in ranges) or "none"
    except (TypeError, ValueError):
        return str(ranges)
