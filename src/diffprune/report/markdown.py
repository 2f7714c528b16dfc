"""The Markdown twin of the HTML page: same sections and tables, PNGs referenced beside it.

Every text is plain text, as in the HTML page (which escapes it): `&`, `<` and `>` become entities, so
a title or a JSON string holding `<script>` or `<img onerror=...>` is shown, never run by a Markdown
viewer that renders inline HTML, and `](` is escaped so that no text becomes a link or a remote image.
"""

from __future__ import annotations

import html
from typing import Any

from .cells import Cell
from .document import Image, Section, Table


def _text(text: Any) -> str:
    """Plain text for a Markdown line: no inline HTML, no link, no line break."""
    return html.escape(str(text), quote=False).replace("](", "]\\(").replace("\r", " ").replace("\n", " ")


def _md(text: Any) -> str:
    """Plain text for a table cell (| escaped too)."""
    return _text(text).replace("|", "\\|")


def _md_table(t: Table) -> list[str]:
    out = [f"*{_text(t.collapsed)}*", ""] if t.collapsed else []
    out.append("| " + " | ".join(_md(h) for h in t.header) + " |")
    out.append("|" + "|".join("---" for _ in t.header) + "|")
    for row in t.rows:
        cells = [c.text if isinstance(c, Cell) else (c[1] if isinstance(c, tuple) else c) for c in row]
        out.append("| " + " | ".join(_md(c) for c in cells) + " |")
    return [*out, ""]


def render_markdown(title: str, sections: list[Section]) -> str:
    """report.md: the PNGs are referenced by file name (they are written next to it)."""
    out = [f"# {_text(title)}", ""]
    for sec in sections:
        out += [f"## {_text(sec.title)}", ""]
        for block in sec.blocks:
            if isinstance(block, str):
                out += [_text(block), ""]
            elif isinstance(block, tuple) and block[0] == "note":
                out += [f"> **Note:** {_text(block[1])}", ""]
            elif isinstance(block, Table):
                out += _md_table(block)
            elif isinstance(block, Image):
                out += [f"![{_md(block.alt)}]({block.file})", "", f"*{_text(block.caption)}*", ""]
    return "\n".join(out).rstrip() + "\n"
