"""The Markdown twin of the HTML page: same sections and tables, PNGs referenced beside it."""

from __future__ import annotations

from typing import Any

from .cells import Cell
from .document import Image, Section, Table


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> list[str]:
    out = [f"*{t.collapsed}*", ""] if t.collapsed else []
    out.append("| " + " | ".join(_md(h) for h in t.header) + " |")
    out.append("|" + "|".join("---" for _ in t.header) + "|")
    for row in t.rows:
        cells = [c.text if isinstance(c, Cell) else (c[1] if isinstance(c, tuple) else c) for c in row]
        out.append("| " + " | ".join(_md(c) for c in cells) + " |")
    return [*out, ""]


def render_markdown(title: str, sections: list[Section]) -> str:
    """report.md: the PNGs are referenced by file name (they are written next to it)."""
    out = [f"# {title}", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for block in sec.blocks:
            if isinstance(block, str):
                out += [block, ""]
            elif isinstance(block, tuple) and block[0] == "note":
                out += [f"> **Note:** {block[1]}", ""]
            elif isinstance(block, Table):
                out += _md_table(block)
            elif isinstance(block, Image):
                out += [f"![{block.alt}]({block.file})", "", f"*{block.caption}*", ""]
    return "\n".join(out).rstrip() + "\n"
