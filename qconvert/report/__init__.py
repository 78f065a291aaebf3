"""Comparison reports: every variant of a release side by side ("which file should I download?").

``build_report(inputs, out)`` reads the validation results of a release workdir, of output
folders, or of the published repos of a Hub collection (``namespace/collection-slug`` or
``namespace/Collection title``), and writes a folder:

* ``index.html``: one static page (no server, nothing fetched from elsewhere, a few lines of
  inline script): the variants table (format, scheme, files and size on disk, memory after
  load, peak memory, s/step, load time, PSNR/SSIM/LPIPS and forward error vs the reference,
  pass/fail), sortable by any column; the Pareto plots; the image grid (rows: prompts; columns:
  the reference and each variant, same seeds); and the blind comparison ("spot the quantized
  model": each prompt's images shuffled, revealed on a click);
* ``images/`` (the validation samples, copied), ``plots/`` (PNG; drawn when matplotlib, the
  ``report`` extra, is installed; the page says so otherwise);
* ``report.md``: the same table in Markdown; ``report.json``: the table as data.

Variants measured with different settings (CPU and GPU, other image sizes) get separate columns
(see :mod:`qconvert.report.table`). The folder is written next to ``out`` and renamed into place
when complete; an existing ``out`` is replaced only when it is an earlier report. Bad input (no
validation results, a collection that does not exist, variants of different source models) is a
one-line error and writes nothing.

``qconvert release`` writes ``<workdir>/report`` at the end of a run; with ``--push`` it also
publishes the report (:mod:`qconvert.report.hub`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import OutputExists, UsageError
from ..output import replace_folder
from .collect import Collected, VariantData, check_one_source, collect_local, looks_like_collection, source_label
from .render import DATA_NAME, HTML_NAME, MARKDOWN_NAME, REPORT_KIND
from .table import Table, build_table

__all__ = ["ReportResult", "build_report", "write_report", "HTML_NAME", "MARKDOWN_NAME"]


@dataclass
class ReportResult:
    out: Path
    variants: list[VariantData]
    table: Table
    source: str
    collection: dict[str, Any] | None = None
    plots: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def html(self) -> Path:
        return self.out / HTML_NAME

    @property
    def markdown(self) -> Path:
        return self.out / MARKDOWN_NAME

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "html": str(self.html), "markdown": str(self.markdown), "source": self.source,
                "variants": [v.name for v in self.variants], "plots": self.plots, "notes": self.notes}  # fmt: skip


def _collect(specs: list[str], token: str | None, endpoint: str | None, scratch: Path) -> Collected:
    if not specs:
        raise UsageError("nothing to report on", hint="pass a release workdir, output folders or a Hub collection")
    hub = [s for s in specs if looks_like_collection(s)]
    if hub and len(specs) > 1:
        raise UsageError(f"{hub[0]} is not a local folder; a Hub collection is reported on its own",
                         hint="pass either one collection or local folders")  # fmt: skip
    if hub:
        from .hub import collect_collection

        return collect_collection(hub[0], token=token, endpoint=endpoint, scratch=scratch)
    return collect_local([Path(s) for s in specs])


def check_report_out(out: Path) -> None:
    """``out`` may be new, empty or an earlier report; anything else is never replaced."""
    if out.exists() and not out.is_dir():
        raise OutputExists(f"{out} exists and is not a folder", hint="choose another --out")
    if out.is_dir() and any(out.iterdir()):
        import json

        try:
            kind = json.loads((out / DATA_NAME).read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind != REPORT_KIND:
            raise OutputExists(f"{out} exists and is not a qconvert report (no {DATA_NAME})",
                               hint="choose another --out, or remove that folder yourself")  # fmt: skip


def build_report(inputs: list[str | Path], out: Path | str | None = None, *, token: str | None = None,
                 endpoint: str | None = None) -> ReportResult:
    """Read the variants of ``inputs`` and write their report to ``out`` (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="qconvert-report-") as scratch:  # Hub downloads
        collected = _collect([str(i) for i in inputs], token, endpoint, Path(scratch))
        check_one_source(collected.variants)
        target = Path(out) if out is not None else collected.default_out
        check_report_out(target)
        result = write_report(collected, target)
    return result


def write_report(collected: Collected, out: Path) -> ReportResult:
    """Write the report folder atomically: built in a hidden sibling, renamed when complete."""
    from ..errors import mapped_os_errors

    out = Path(out).absolute()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        with mapped_os_errors(f"writing the report {out}", fix="choose another --out"):
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            result = _write_files(collected, tmp)
            replace_folder(out, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.out = out
    return result


def _write_files(collected: Collected, folder: Path) -> ReportResult:
    from . import plots, render
    from ..output import write_json

    variants = collected.variants
    table = build_table(variants)
    label = source_label(variants)
    title = f"{label}: {len(variants)} quantized variant{'s' if len(variants) != 1 else ''} compared"
    intro = (f"Every variant was loaded the way its users load it, generated the same prompts with the same seeds "
             f"and was compared with the unquantized source. {render.settings_note(table)}")  # fmt: skip
    grid = {g.slug: render.copy_images(folder, g) for g in table.groups}
    drawn: dict[str, Any] = {}
    note = ""
    if plots.available():
        (folder / "plots").mkdir()
        drawn = {g.slug: plots.draw(folder / "plots", g) for g in table.groups}
    else:
        note = f"Plots not drawn: matplotlib is not installed (pip install 'qconvert[{plots.EXTRA}]')."
    page = render.html(table, title=title, intro=intro, grid=grid, plots=drawn, plots_note=note)
    (folder / HTML_NAME).write_text(page, encoding="utf-8")
    (folder / MARKDOWN_NAME).write_text(render.markdown(table, title=title, intro=intro, plots=drawn), encoding="utf-8")
    write_json(folder / DATA_NAME, render.data(variants, table, variants[0].source))
    notes = [*collected.notes, *([note] if note else [])]
    return ReportResult(folder, variants, table, label, collected.collection, bool(drawn), notes)
