"""Table cells that carry their sources, and the number formats of the report.

Owns: `Cell` (text + the (input, key path) of every number in it), `FORMATS` (params in M, MACs in
G or M, latency in ms, ...) and the helpers that build a cell from `Inputs` candidates. Every
number shown comes from `Inputs.first` / `Inputs.number`; nothing here computes a metric.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .inputs import Inputs, input_name


@dataclasses.dataclass
class Cell:
    """Text of one table cell; `sources` are the (input, key path) of each number in it, in order."""

    text: str
    sources: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def source_text(self, files: dict[str, Path]) -> str:
        return "; ".join(f"{input_name(i, files)} › {p}" for i, p in self.sources)


EMPTY = Cell("—")


def fmt_params(v: float) -> str:
    return f"{v / 1e6:.3f}M"


def macs_unit(v: float) -> tuple[float, str]:
    return (1e9, "G") if abs(v) >= 1e9 else (1e6, "M")


def fmt_macs(v: float, unit: tuple[float, str]) -> str:
    return f"{v / unit[0]:.3f}{unit[1]}"


FORMATS = {
    "params": fmt_params,
    "ms": lambda v: f"{v:.2f} ms",
    "x": lambda v: f"×{v:.2f}",
    "ratio": lambda v: f"{v:.3f}",
    "fid": lambda v: f"{v:.3f}",
    "kid": lambda v: f"{v:.5f}",
    "ssim": lambda v: f"{v:.4f}",
    "clip": lambda v: f"{v:.3f}",
    "db": lambda v: f"{v:.2f}",
    "ips": lambda v: f"{v:.2f} img/s",
    "int": lambda v: f"{int(v)}",
    "s": lambda v: f"{v:.1f} s",
}


def cell(inputs: Inputs, kind, *candidates: tuple[str, str]) -> Cell:
    """One number, from the first candidate that has it, formatted by `kind` (a FORMATS key or callable)."""
    hit = inputs.first(*candidates)
    if hit is None:
        return EMPTY
    v, name, path = hit
    fmt = FORMATS[kind] if isinstance(kind, str) else kind
    return Cell(fmt(v), [(name, path)])


def pm(inputs: Inputs, kind: str, name: str, mean: str, std: str, unit: str = "") -> Cell:
    """'mean ± std' (+ unit once at the end)."""
    m, s = inputs.number(name, mean), inputs.number(name, std)
    if m is None:
        return EMPTY
    fmt = FORMATS[kind]
    if s is None:
        return Cell(fmt(m) + unit, [(name, mean)])
    return Cell(f"{fmt(m)} ± {fmt(s)}{unit}", [(name, mean), (name, std)])


def join(*cells: Cell, sep: str = "; ") -> Cell:
    cells = [c for c in cells if c is not EMPTY]
    if not cells:
        return EMPTY
    return Cell(sep.join(c.text for c in cells), [s for c in cells for s in c.sources])


def suffix(c: Cell, text: str) -> Cell:
    return c if c is EMPTY else Cell(c.text + text, c.sources)
