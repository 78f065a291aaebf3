"""Pareto plots (matplotlib, the ``report`` extra): quality against size on disk and against
peak memory, one pair per validation setting, the frontier marked.

Quality is PSNR against the reference when every variant of the setting has a finite one;
otherwise (identical images, or not measured) the relative error of one transformer forward,
which every validation measures. The PNGs are deterministic: no timestamp or software
metadata, fixed size and DPI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .collect import VariantData
from .table import Group

EXTRA = "report"


def available() -> bool:
    from ..deps import installed

    return installed("matplotlib")


@dataclass(frozen=True)
class Point:
    name: str
    x: float
    quality: float
    passed: bool


def quality_of(variants: list[VariantData]) -> tuple[str, str, bool]:
    """(quality key, axis label, higher is better) for one setting's variants."""
    psnrs = [(v.validation.get("quality") or {}).get("psnr") for v in variants]
    if all(isinstance(p, (int, float)) for p in psnrs):
        return "psnr", "PSNR vs reference (dB, higher is better)", True
    return "forward_rel_error", "transformer forward error vs reference (lower is better)", False


def points(variants: list[VariantData], x_of: Any, key: str) -> list[Point]:
    out = []
    for v in variants:
        x, q = x_of(v), (v.validation.get("quality") or {}).get(key)
        if isinstance(x, (int, float)) and isinstance(q, (int, float)):
            out.append(Point(v.name, float(x), float(q), bool(v.validation.get("passed"))))
    return out


def frontier(pts: list[Point], higher_better: bool) -> list[Point]:
    """The points no other point beats on both axes (smaller x, better quality), by x."""
    best: list[Point] = []
    for p in sorted(pts, key=lambda p: (p.x, -p.quality if higher_better else p.quality)):
        if not best or (p.quality > best[-1].quality if higher_better else p.quality < best[-1].quality):
            best.append(p)
    return best


def _draw(path: Path, pts: list[Point], *, xlabel: str, ylabel: str, higher_better: bool, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.add_subplot()
    front = frontier(pts, higher_better)
    ax.step([p.x for p in front], [p.quality for p in front], where="post", color="#d62728", lw=1.5,
            label="Pareto frontier", zorder=1)  # fmt: skip
    for p in pts:
        on = p in front
        ax.scatter([p.x], [p.quality], s=60 if on else 36, marker="o" if p.passed else "x",
                   color="#d62728" if on else "#1f77b4", zorder=2)  # fmt: skip
        ax.annotate(p.name, (p.x, p.quality), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if not higher_better:
        ax.set_yscale("log")
    ax.margins(0.15)  # room for the names
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def draw(folder: Path, group: Group) -> list[dict[str, str]]:
    """Write the setting's two plots into ``folder``; returns [{file, title}] for the page."""
    from .table import file_sizes

    key, ylabel, higher = quality_of(group.variants)
    plots = []
    for kind, label, x_of in (
        ("size", "size on disk (MB)", lambda v: sum(file_sizes(v.manifest).values()) / 1e6),
        ("peak", "peak memory while generating (MB)", lambda v: (v.validation.get("quantized") or {}).get("peak_memory", 0) / 1e6),
    ):  # fmt: skip
        name = f"pareto-{kind}-{group.slug}.png"
        title = f"{ylabel.split(' (')[0]} vs {label.split(' (')[0]} — {group.label}"
        _draw(folder / name, points(group.variants, x_of, key), xlabel=label, ylabel=ylabel, higher_better=higher,
              title=title)  # fmt: skip
        plots.append({"file": f"plots/{name}", "title": title})
    return plots
