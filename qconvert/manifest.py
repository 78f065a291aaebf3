"""``qconvert.json``: what an output is, how it was made, and every file's digest.

Written last into the temporary output folder (so a folder with a manifest is complete),
read by ``validate``, ``card``, ``push`` and ``release``. No timestamps, no thread counts: the
same input and options give the same bytes. What is published keeps no local paths
(:meth:`qconvert.identity.SourceIdentity.public`, applied by
:func:`qconvert.output.public_file`).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from . import __version__
from .errors import InputError
from .output import file_entries

MANIFEST_NAME = "qconvert.json"
MANIFEST_FORMAT = 1
RUNTIME_OPTIONS = frozenset({"jobs", "pool"})  # change how fast, not what is written


def library_versions(*extra: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "qconvert": __version__}
    for pkg in ("torch", "diffusers", "transformers", "huggingface_hub", "safetensors", *extra):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return dict(sorted(out.items()))


def manifest_options(
    options: dict[str, Any], components: tuple[str, ...], defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The options as ``qconvert.json`` records them: those that change what is written.

    Options that change how fast, not what is written (``RUNTIME_OPTIONS``), stay out: the
    manifest, like every other file, must not depend on them. ``defaults`` (a backend's
    ``recorded_defaults``) are recorded when not given, so an output says e.g. which GGUF
    search wrote it even when the default did.
    """
    merged = {**(defaults or {}), **{k: v for k, v in options.items() if v is not None}}
    opts = {k: v for k, v in sorted(merged.items()) if v is not None and k not in RUNTIME_OPTIONS}
    opts["components"] = list(components)
    return opts


def build_manifest(
    source: Any,
    plan: Any,
    backend: Any,
    root: Path,
    written: dict[str, list[Path]],
    components: tuple[str, ...],
    options: dict[str, Any],
) -> dict[str, Any]:
    comps: dict[str, Any] = {}
    entry = file_entries([p for files in written.values() for p in files])
    for cp in plan.components:
        files = written.get(cp.name, [])
        entries = {
            p.relative_to(root).as_posix(): entry[p]
            for p in sorted(files)
        }
        comps[cp.name] = {
            "action": cp.action,
            "scheme": cp.scheme,
            "tensors": len(cp.tensors),
            "quantized_tensors": cp.quantized_count,
            "bytes_in": cp.bytes_in,
            "bytes_out": sum(e["size"] for e in entries.values()),
            "files": entries,
        }
    other = {
        p.relative_to(root).as_posix(): entry[p]
        for p in sorted(written.get("_root", []))
    }
    return {
        "format": MANIFEST_FORMAT,
        "tool": "qconvert",
        "qconvert_version": __version__,
        "source": source.identity.to_dict(),
        "family": source.family.name,
        "backend": plan.backend,
        "scheme": plan.scheme,
        "layout": plan.layout,
        "options": manifest_options(options, components, getattr(backend, "recorded_defaults", None)),
        "components": comps,
        "files": other,
        "bytes_in": plan.bytes_in,
        "bytes_out": sum(c["bytes_out"] for c in comps.values()) + sum(e["size"] for e in other.values()),
        "versions": library_versions(*backend.version_packages),
    }


def read_manifest(out: Path) -> dict[str, Any]:
    out = Path(out)
    if not out.is_dir():
        raise InputError(f"{out} is not a folder", hint="pass the --out folder of a qconvert conversion")
    path = out / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"{out} has no {MANIFEST_NAME}: not a qconvert output", hint="convert with `qconvert flux` first")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise InputError(f"{path} is not readable JSON", hint="convert again") from None
    if not isinstance(data, dict) or not {"backend", "scheme", "source", "components"} <= set(data):
        raise InputError(f"{path} is not a qconvert manifest", hint="convert again")
    return data


def manifest_family(manifest: dict[str, Any]) -> Any:
    """The model family of an output (manifests before families were recorded: FLUX.1)."""
    from .families import family

    return family(str(manifest.get("family", "flux")))
