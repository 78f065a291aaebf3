"""Validation thresholds: package defaults per backend/scheme, a user file, then flags."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class Thresholds:
    min_memory_reduction: float = 1.5
    max_forward_rel_error: float = 0.5
    min_psnr: float = 12.0
    min_ssim: float = 0.3
    max_lpips: float | None = None  # a check only when set: LPIPS needs torchvision + local weights
    max_memory: int | None = None  # bytes: peak memory budget (release gates)
    max_step_time: float | None = None  # seconds per denoising step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_KEYS = {f.name for f in fields(Thresholds)}


def _apply(t: Thresholds, table: dict[str, Any], where: str) -> None:
    for key, value in table.items():
        if isinstance(value, dict):
            continue
        if key not in _KEYS:
            raise UsageError(f"unknown threshold {key!r} in {where}", hint=f"valid keys: {', '.join(sorted(_KEYS))}")
        if key == "max_memory" and isinstance(value, str):
            from ..convert.writers import parse_size

            value = parse_size(value)
        setattr(t, key, value)


def load_thresholds(
    backend: str, scheme: str, *, file: Path | None = None, overrides: dict[str, Any] | None = None
) -> Thresholds:
    t = Thresholds()
    tables = [("defaults", tomllib.loads(resources.files(__package__).joinpath("thresholds.toml").read_text()))]
    if file is not None:
        try:
            tables.append((str(file), tomllib.loads(Path(file).read_text())))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise UsageError(f"cannot read thresholds file {file}: {e}") from None
    for where, data in tables:
        _apply(t, data.get("default", {}), where)
        _apply(t, data.get(backend, {}).get(scheme, {}), where)
    _apply(t, {k: v for k, v in (overrides or {}).items() if v is not None}, "the overrides")
    return t
