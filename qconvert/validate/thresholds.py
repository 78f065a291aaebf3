"""Validation thresholds: package defaults per backend/scheme, a user file, then flags."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import UsageError, opt

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
        if key not in _KEYS:
            raise UsageError(f"unknown threshold {key!r} in {where}", hint=f"valid keys: {', '.join(sorted(_KEYS))}")
        if key == "max_memory" and isinstance(value, str):
            from ..convert.writers import parse_size

            try:
                value = parse_size(value)
                if value <= 0:
                    raise ValueError
            except ValueError:
                raise UsageError(f"max_memory {value!r} in {where} is not a size", hint="e.g. \"12GiB\"") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
            raise UsageError(f"threshold {key} in {where} must be a non-negative number, not {value!r}")
        setattr(t, key, value)


def check_thresholds(table: dict[str, Any], where: str) -> None:
    """Raise :class:`UsageError` for an unknown key or a bad value in ``table`` (nothing applied)."""
    _apply(Thresholds(), table, where)


def _tables(data: dict[str, Any], backend: str, scheme: str, where: str) -> list[tuple[dict[str, Any], str]]:
    """The [default] and [backend.scheme] tables of a thresholds file; anything else is an error
    (a key at the top or under [backend] alone would otherwise be silently ignored)."""
    from ..convert import SCHEMES

    for key, value in data.items():
        if key == "default" and isinstance(value, dict):
            continue
        if key in SCHEMES and isinstance(value, dict) and all(
            isinstance(v, dict) and k in SCHEMES[key] for k, v in value.items()
        ):
            continue
        raise UsageError(
            f"{where}: {key!r} is not a [default] or [<backend>.<scheme>] table",
            hint="e.g. [default] min_psnr = 20, or [bnb.nf4] max_forward_rel_error = 0.3",
        )
    return [(data.get("default", {}), f"{where} [default]"),
            (data.get(backend, {}).get(scheme, {}), f"{where} [{backend}.{scheme}]")]  # fmt: skip


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
        for table, label in _tables(data, backend, scheme, where):
            _apply(t, table, label)
    _apply(t, {k: v for k, v in (overrides or {}).items() if v is not None}, opt("overrides"))
    return t
