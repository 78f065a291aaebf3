"""The variants a report compares: read from output folders, a release workdir or a Hub collection.

Every variant is one conversion output with a ``qconvert.json`` and a ``validation.json``; its
sample images are the PNGs that validation listed (``samples/quantized-<i>.png`` and the
reference's ``samples/reference-<i>.png``). All variants must come from one source model: a
report comparing quantizations of different models would compare nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, UsageError

VALIDATION = "validation.json"
MANIFEST = "qconvert.json"
RELEASE_REPORT = "release-report.json"
RELEASE_STATE = "release-state.json"
_SLUG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[^/]+$")


@dataclass
class VariantData:
    """One variant: what it is (manifest), how it measured (validation) and its images."""

    name: str
    manifest: dict[str, Any]
    validation: dict[str, Any]
    folder: Path  # where its samples are (a temporary download for a Hub collection)
    repo_id: str | None = None

    @property
    def source(self) -> dict[str, Any]:
        from ..identity import SourceIdentity

        return SourceIdentity.from_dict(self.manifest.get("source") or {}).public().to_dict()

    def images(self, kind: str) -> list[Path]:
        """``kind`` "quantized" or "reference": the sample PNGs, in prompt order."""
        listed = [s for s in self.validation.get("samples") or [] if re.fullmatch(rf"samples/{kind}-\d+\.png", str(s))]
        listed.sort(key=lambda s: int(re.findall(r"\d+", s)[-1]))
        return [self.folder / s for s in listed if (self.folder / s).is_file()]


@dataclass
class Collected:
    variants: list[VariantData]
    label: str  # what the report is of: the workdir, the folders or the collection
    default_out: Path
    collection: dict[str, Any] | None = None  # slug, title, url of a Hub collection
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path}: {e}", hint="validate the output again (qconvert validate)") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a qconvert file", hint="validate the output again (qconvert validate)")
    return data


def read_folder(folder: Path, *, repo_id: str | None = None, name: str | None = None) -> VariantData:
    """One output folder that holds ``qconvert.json`` and ``validation.json``."""
    for needed in (MANIFEST, VALIDATION):
        if not (folder / needed).is_file():
            raise InputError(f"{folder} has no {needed}: no validation results to report",
                             hint=f"run `qconvert validate {folder}` first")  # fmt: skip
    return VariantData(name or folder.resolve().name, _read_json(folder / MANIFEST),
                       _read_json(folder / VALIDATION), folder, repo_id)  # fmt: skip


def _workdir_order(workdir: Path) -> dict[str, tuple[int, str | None]]:
    """Variant name -> (plan position, repo id if it was pushed) from the release's report and state."""
    path, state_path = workdir / RELEASE_REPORT, workdir / RELEASE_STATE
    if not path.is_file():
        return {}
    rows = _read_json(path).get("variants") or []
    state = _read_json(state_path) if state_path.is_file() else {}
    pushed = {name for name, entry in state.items() if isinstance(entry, dict) and entry.get("pushed")}
    return {str(r.get("name")): (i, r.get("repo_id") if r.get("name") in pushed else None)
            for i, r in enumerate(rows) if isinstance(r, dict)}  # fmt: skip


def read_workdir(workdir: Path) -> list[VariantData]:
    """The validated outputs inside a release workdir, in plan order."""
    order = _workdir_order(workdir)
    found = [p for p in sorted(workdir.iterdir()) if p.is_dir() and not p.name.startswith(".")
             and (p / VALIDATION).is_file() and (p / MANIFEST).is_file()]  # fmt: skip
    found.sort(key=lambda p: (order.get(p.name, (len(order), None))[0], p.name))
    return [read_folder(p, repo_id=order.get(p.name, (0, None))[1]) for p in found]


def collect_local(paths: list[Path]) -> Collected:
    """Output folders and/or release workdirs."""
    variants: list[VariantData] = []
    for p in paths:
        if not p.is_dir():
            raise InputError(f"{p} is not a folder", hint="pass a release workdir, output folders or a Hub collection slug")
        found = [read_folder(p)] if (p / VALIDATION).is_file() else read_workdir(p)
        if not found:
            raise InputError(f"{p} holds no validation results (no validation.json in it or its subfolders)",
                             hint="pass a release workdir or validated output folders (qconvert validate OUT)")  # fmt: skip
        variants += found
    names = [v.name for v in variants]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise UsageError(f"two variants are named {dup!r}", hint="pass output folders with different names")
    single_workdir = len(paths) == 1 and not (paths[0] / VALIDATION).is_file()
    default = paths[0] / "report" if single_workdir else Path("report")
    label = str(paths[0]) if len(paths) == 1 else ", ".join(str(p) for p in paths)
    return Collected(variants, label, default)


def looks_like_collection(spec: str) -> bool:
    """A Hub collection slug (``namespace/title-slug-id``) or ``namespace/title``, not a local path."""
    return not Path(spec).exists() and bool(_SLUG_RE.match(spec))


def check_one_source(variants: list[VariantData]) -> None:
    """Every variant converted from the same source model."""
    first = variants[0]
    for v in variants[1:]:
        if v.source != first.source:
            raise UsageError(
                f"{v.name} and {first.name} were converted from different source models "
                f"({_source_label(v.source)} vs {_source_label(first.source)})",
                hint="report the variants of one model at a time",
            )


def _source_label(source: dict[str, Any]) -> str:
    from ..identity import SourceIdentity

    ident = SourceIdentity.from_dict(source)
    rev = f"@{ident.revision[:12]}" if ident.revision else ""
    return f"{ident.label}{rev}"


def source_label(variants: list[VariantData]) -> str:
    return _source_label(variants[0].source)
