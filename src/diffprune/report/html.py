"""The self-contained HTML page: inline CSS, images as base64 PNG data URIs, no scripts, no links.

Owns `render_html`. Metric cells carry `data-src="input:key.path ..."` so every number on the page
can be traced to the file and key it came from.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from .cells import Cell
from .document import Image, Section, Table

_CSS = """
body{font:14px/1.45 -apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}th,td{border:1px solid #ddd;padding:3px 8px;
vertical-align:top}th{background:#f4f4f4;text-align:left}td.num{text-align:right;font-variant-numeric:
tabular-nums;white-space:nowrap}td.src{color:#666;font-size:12px}table.kv td:first-child{color:#555}
.note{background:#fff7e0;border-left:4px solid #f0b400;padding:4px 10px;margin:.4em 0}
figure{margin:.8em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
img.px{image-rendering:pixelated}figcaption{color:#555;font-size:12.5px;margin-top:.3em}
code{background:#f4f4f4;padding:0 3px}details{margin:.5em 0}summary{cursor:pointer;color:#345}
""".strip()


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def render_html(title: str, sections: list[Section], folder: Path, files: dict[str, Path]) -> str:
    """The page; `folder` holds the PNGs the Image blocks name (they are embedded, not linked)."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{_h(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{_h(title)}</h1>"]
    for sec in sections:
        out.append(f"<h2>{_h(sec.title)}</h2>")
        out += [_html_block(block, folder, files) for block in sec.blocks]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _html_block(block, folder: Path, files: dict[str, Path]) -> str:
    if isinstance(block, str):
        return f"<p>{_h(block)}</p>"
    if isinstance(block, tuple) and block[0] == "note":
        return f'<p class="note">{_h(block[1])}</p>'
    if isinstance(block, Table):
        return _html_table(block, files)
    if isinstance(block, Image):
        data = base64.b64encode((folder / block.file).read_bytes()).decode("ascii")
        cls = ' class="px"' if block.pixelated else ""
        return (f'<figure><img{cls} src="data:image/png;base64,{data}" alt="{_h(block.alt)}">'
                f"<figcaption>{_h(block.caption)}</figcaption></figure>")
    raise TypeError(f"not a report block: {type(block).__name__}")


def _html_cell(c) -> str:
    if isinstance(c, Cell):
        src = " ".join(f"{i}:{p}" for i, p in c.sources)
        attr = f' data-src="{_h(src)}"' if src else ""
        return f'<td class="num"{attr}>{_h(c.text)}</td>'
    if isinstance(c, tuple) and c[0] == "src":
        return f'<td class="src">{_h(c[1])}</td>'
    return f"<td>{_h(c)}</td>"


def _html_table(t: Table, files: dict[str, Path]) -> str:
    cls = f' class="{t.css}"' if t.css else ""
    lines = [f"<table{cls}><thead><tr>" + "".join(f"<th>{_h(h)}</th>" for h in t.header) + "</tr></thead><tbody>"]
    lines += ["<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in t.rows]
    lines.append("</tbody></table>")
    body = "\n".join(lines)
    if t.collapsed:
        return f"<details><summary>{_h(t.collapsed)}</summary>\n{body}\n</details>"
    return body
