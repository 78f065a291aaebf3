"""The comparison table, shared by the HTML page, the Markdown table and the cards' cross-links.

Measured figures depend on where and how they were measured, so variants are grouped by their
validation setting (device, image size, steps, dtype, prompts, seed): each measured column
belongs to one setting and says so in its header, and a variant measured elsewhere shows "not
measured" there. A CPU figure and a GPU figure never share a column. A figure that was not
measured (LPIPS without its weights, PSNR of identical images) is said to be so, never 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .collect import VariantData

NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class Cell:
    text: str
    sort: float | None = None  # None: sorts last (not measured, not applicable)
    title: str = ""  # the hover text: why it was not measured, the exact value, the files


@dataclass
class Group:
    """Variants validated with one setting; ``label`` is what every column of it says."""

    key: str
    label: str
    settings: dict[str, Any]
    short: str = ""  # "CPU 32²": what a Markdown column header says
    variants: list[VariantData] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return f"g{self.key[:8]}"


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    group: Group | None = None
    numeric: bool = True


@dataclass
class Row:
    name: str
    kind: str  # "variant" | "reference"
    cells: dict[str, Cell]
    repo_id: str | None = None


def _human(n: Any) -> str:
    from ..plan import human_bytes

    return human_bytes(int(n))


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def setting_of(v: VariantData) -> tuple[str, str, dict[str, Any]]:
    """(key, label, settings) of a variant's validation run."""
    s = v.validation.get("settings") or {}
    env = v.validation.get("environment") or {}
    device = str(s.get("device") or env.get("device") or "?")
    kind = "cuda" if device.startswith("cuda") else device
    name = str(env.get("device_name") or "") if kind == "cuda" else ""
    settings = {"device": kind, "device_name": name, "size": s.get("size"), "steps": s.get("steps"),
                "dtype": s.get("dtype"), "seed": s.get("seed"), "prompts": list(s.get("prompts") or [])}  # fmt: skip
    where = "GPU " + (name or "cuda") if kind == "cuda" else kind.upper()
    label = f"{where}, {s.get('size')}×{s.get('size')}, {s.get('steps')} steps, {s.get('dtype')}"
    import hashlib

    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return key, label, settings


def groups_of(variants: list[VariantData]) -> list[Group]:
    groups: dict[str, Group] = {}
    for v in variants:
        key, label, settings = setting_of(v)
        short = f"{label.split(',')[0]} {settings['size']}²"
        groups.setdefault(key, Group(key, label, settings, short)).variants.append(v)
    return list(groups.values())


def file_sizes(manifest: dict[str, Any]) -> dict[str, int]:
    """Every file the conversion wrote (from qconvert.json), path -> bytes."""
    entries = dict(manifest.get("files") or {})
    for comp in (manifest.get("components") or {}).values():
        entries.update(comp.get("files") or {})
    return {p: int(e.get("size") or 0) for p, e in sorted(entries.items()) if isinstance(e, dict)}


def files_cell(manifest: dict[str, Any]) -> Cell:
    files = file_sizes(manifest)
    total = sum(files.values())
    weights = [p for p in files if p.endswith((".safetensors", ".gguf"))]
    if weights and len(files) <= 3:  # single files (GGUF, fp8): name them, it is what people download
        text = ", ".join(p.split("/")[-1] for p in weights) + f" · {_human(total)}"
    else:
        text = f"pipeline folder, {len(files)} files · {_human(total)}"
    return Cell(text, float(total), "\n".join(f"{p}  {_human(n)}" for p, n in files.items()))


def _bytes_cell(value: Any, why: str = "") -> Cell:
    n = _num(value)
    return Cell(NOT_MEASURED, None, why) if n is None else Cell(_human(n), n, f"{int(n)} bytes")


def _seconds_cell(value: Any, digits: int) -> Cell:
    n = _num(value)
    return Cell(NOT_MEASURED) if n is None else Cell(f"{n:.{digits}f} s", n, f"{n:.6g} s")


def _quality_cells(v: VariantData) -> dict[str, Cell]:
    q = v.validation.get("quality") or {}
    psnr = _num(q.get("psnr"))
    if psnr is None and q.get("identical_images"):
        psnr_cell = Cell("∞ (identical)", float("inf"), "the images equal the reference's")
    else:
        psnr_cell = Cell(NOT_MEASURED) if psnr is None else Cell(f"{psnr:.2f} dB", psnr)
    lp = _num(q.get("lpips"))
    lp_cell = Cell(NOT_MEASURED, None, str(q.get("lpips_note") or "")) if lp is None else Cell(f"{lp:.4f}", lp)
    ssim, fwd = _num(q.get("ssim")), _num(q.get("forward_rel_error"))
    return {"psnr": psnr_cell, "ssim": Cell(NOT_MEASURED) if ssim is None else Cell(f"{ssim:.4f}", ssim),
            "lpips": lp_cell,
            "forward": Cell(NOT_MEASURED) if fwd is None else Cell(f"{fwd:.4f}", fwd, "relative error of one transformer forward")}  # fmt: skip


MEASURED = (("memory_after_load", "memory after load"), ("peak_memory", "peak memory"), ("step_s", "s/step"),
            ("load_s", "load time"), ("psnr", "PSNR"), ("ssim", "SSIM"), ("lpips", "LPIPS"),
            ("forward", "forward error"))  # fmt: skip


def _measured_cells(stats: dict[str, Any], quality: dict[str, Cell] | None) -> dict[str, Cell]:
    cells = {"memory_after_load": _bytes_cell(stats.get("memory_after_load")),
             "peak_memory": _bytes_cell(stats.get("peak_memory")),
             "step_s": _seconds_cell(stats.get("step_s"), 4), "load_s": _seconds_cell(stats.get("load_s"), 2)}  # fmt: skip
    ref = Cell("reference", None, "the unquantized source the variants are compared with")
    for key in ("psnr", "ssim", "lpips", "forward"):
        cells[key] = quality[key] if quality is not None else ref
    return cells


def columns(groups: list[Group]) -> list[Column]:
    cols = [Column("variant", "variant", numeric=False), Column("format", "format", numeric=False),
            Column("scheme", "scheme", numeric=False), Column("files", "files · size on disk")]  # fmt: skip
    for g in groups:
        cols += [Column(f"{g.slug}:{key}", label, g) for key, label in MEASURED]
    cols.append(Column("result", "validation", numeric=False))
    return cols


def _format_text(manifest: dict[str, Any]) -> str:
    from ..convert import container_of

    container = container_of(manifest)
    return f"{manifest.get('backend')} ({'diffusers folder' if container == 'pipeline' else 'single files'})"


def _result_cell(validation: dict[str, Any]) -> Cell:
    if validation.get("passed"):
        return Cell("pass", 1.0)
    failed = ", ".join(str(x) for x in validation.get("failed") or [])
    return Cell(f"FAIL ({failed})" if failed else "FAIL", 0.0)


def variant_row(v: VariantData, groups: list[Group]) -> Row:
    cells = {"variant": Cell(v.name), "format": Cell(_format_text(v.manifest)),
             "scheme": Cell(str(v.manifest.get("scheme"))), "files": files_cell(v.manifest),
             "result": _result_cell(v.validation)}  # fmt: skip
    for g in groups:
        if v in g.variants:
            measured = _measured_cells(v.validation.get("quantized") or {}, _quality_cells(v))
        else:
            measured = {k: Cell(NOT_MEASURED, None, f"{v.name} was not validated with: {g.label}") for k, _ in MEASURED}
        cells.update({f"{g.slug}:{k}": c for k, c in measured.items()})
    return Row(v.name, "variant", cells, v.repo_id)


def reference_row(groups: list[Group]) -> Row:
    """The unquantized source: its size and, per setting, its own measurements."""
    first = groups[0].variants[0]
    dtype = groups[0].settings.get("dtype")
    size = _num(first.manifest.get("bytes_in"))
    cells = {"variant": Cell(f"source ({dtype})"), "format": Cell("unquantized"), "scheme": Cell(str(dtype)),
             "files": Cell(NOT_MEASURED) if size is None else Cell(f"{_human(size)} (converted components)", size),
             "result": Cell("reference")}  # fmt: skip
    for g in groups:
        stats = g.variants[0].validation.get("reference") or {}
        cells.update({f"{g.slug}:{k}": c for k, c in _measured_cells(stats, None).items()})
    return Row(cells["variant"].text, "reference", cells)


@dataclass
class Table:
    groups: list[Group]
    columns: list[Column]
    rows: list[Row]


def build_table(variants: list[VariantData]) -> Table:
    groups = groups_of(variants)
    rows = [reference_row(groups), *(variant_row(v, groups) for v in variants)]
    return Table(groups, columns(groups), rows)
