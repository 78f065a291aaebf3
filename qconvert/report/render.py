"""Writing the report folder: ``index.html`` (+ ``images/``, ``plots/``), ``report.md`` and
``report.json``. Deterministic: the same validation results give the same bytes (the blind
mode shuffles in the browser, when the page loads)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from .collect import VariantData
from .table import MEASURED, NOT_MEASURED, Group, Table

TEMPLATE = Path(__file__).with_name("template.html")
HTML_NAME = "index.html"
MARKDOWN_NAME = "report.md"
DATA_NAME = "report.json"
REPORT_KIND = "qconvert-report"


def sortkey(value: float | None) -> str:
    if value is None:
        return ""
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(float(value))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def copy_images(folder: Path, group: Group) -> list[dict[str, Any]]:
    """The image grid of one setting: per prompt, the reference's image then each variant's.

    Images are copied byte for byte under ``images/<setting>/``.
    """
    from ..output import copy_file

    prompts = list(group.settings.get("prompts") or [])
    reference = group.variants[0].images("reference")
    rows = []
    for i, prompt in enumerate(prompts):
        images = []
        for label, files in [("reference", reference), *((v.name, v.images("quantized")) for v in group.variants)]:
            if i < len(files):
                rel = f"images/{group.slug}/{_safe(label)}-{i}.png"
                copy_file(files[i], folder / rel)
                images.append({"src": rel, "label": label})
        rows.append({"prompt": prompt, "images": images})
    return rows


def html(table: Table, *, title: str, intro: str, grid: dict[str, Any], plots: dict[str, Any],
         plots_note: str) -> str:
    import jinja2

    from .. import __version__
    from ..cards.data import HUB_URL

    env = jinja2.Environment(autoescape=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    template = env.from_string(TEMPLATE.read_text(encoding="utf-8"))
    measured = [c for c in table.columns if c.group is not None]
    return template.render(
        title=title, intro=intro, version=__version__, groups=table.groups, rows=table.rows, columns=table.columns,
        static_before=[c for c in table.columns if c.group is None and c.key != "result"],
        measured_columns=measured, measured_count=len(MEASURED), grid=grid, plots=plots, plots_note=plots_note,
        hub_url=HUB_URL, sortkey=sortkey,
    )  # fmt: skip


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(table: Table, *, current: str | None = None, link: bool = True) -> str:
    """The variants table in Markdown; ``current``: the repo id (or name) of the row to mark."""
    from ..cards.data import HUB_URL

    head = []
    for c in table.columns:
        head.append(f"{c.label} ({c.group.short})" if c.group is not None else c.label)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if c.numeric else "---" for c in table.columns) + "|"]
    for r in table.rows:
        cells = []
        for c in table.columns:
            text = _md_cell(r.cells[c.key].text)
            if c.key == "variant":
                if link and r.repo_id:
                    text = f"[{text}]({HUB_URL}/{r.repo_id})"
                if current is not None and current in (r.repo_id, r.name):
                    text = f"**{text}** (this one)"
            cells.append(text if text != NOT_MEASURED else f"_{text}_")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def settings_note(table: Table) -> str:
    if len(table.groups) == 1:
        return f"Measured on {table.groups[0].label}."
    return "Measured with " + "; ".join(g.label for g in table.groups) + " (each in its own columns)."


def markdown(table: Table, *, title: str, intro: str, plots: dict[str, Any]) -> str:
    parts = [f"# {title}", "", intro, "", markdown_table(table), settings_note(table), ""]
    for g in table.groups:
        parts += [f"![{p['title']}]({p['file']})" for p in plots.get(g.slug, [])]
    return "\n".join(parts).rstrip("\n") + "\n"


def data(variants: list[VariantData], table: Table, source: dict[str, Any]) -> dict[str, Any]:
    """``report.json``: what the report shows, as data (also the marker of a report folder)."""
    from .. import __version__

    rows = [{"name": r.name, "kind": r.kind, "repo_id": r.repo_id,
             "cells": {k: {"text": c.text, "value": c.sort if c.sort is None or math.isfinite(c.sort) else None}
                       for k, c in r.cells.items()}} for r in table.rows]  # fmt: skip
    return {"kind": REPORT_KIND, "format": 1, "qconvert_version": __version__, "source": source,
            "variants": [v.name for v in variants], "settings": [g.label for g in table.groups], "rows": rows}  # fmt: skip
