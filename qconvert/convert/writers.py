"""Streaming safetensors shard writer shared by the pipeline-folder backends.

Tensors arrive one at a time and their bytes go straight into the shard file, after a space
reserved for the header (``header_reserve`` bytes). The header is only known at the end (it
carries metadata such as torchao's per-tensor JSON, repeated in every shard), so it is written
into that space when the file is finished, padded with spaces: safetensors pads its header
with spaces itself, and a JSON parser ignores them. A shard is full at ``max_shard_bytes``,
checked per *group*, so a bnb weight and its quant_state never land in different shards.
Only one tensor is ever in memory and every byte is written once. Should a header outgrow
its reservation (the callers' sizing leaves ample room), the data is moved once behind it.

File names follow diffusers/transformers: ``<base>.safetensors`` for one shard, else
``<base>-00001-of-0000N.safetensors`` plus ``<base>.safetensors.index.json``.
"""

from __future__ import annotations

import math

import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}  # fmt: skip


def st_dtype(torch_dtype: Any) -> str:
    return _ST_DTYPES[str(torch_dtype).replace("torch.", "")]


def tensor_bytes(t: Any) -> memoryview:
    """Raw little-endian bytes of a CPU tensor, without an extra copy where possible."""
    import torch

    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")


@dataclass
class _Shard:
    scratch: Path
    fh: Any
    entries: list[tuple[str, str, list[int], int, int]] = field(default_factory=list)
    size: int = 0


class ShardedSafetensorsWriter:
    """Shards of one component. With a ``sink`` (upload as you go), each finished shard file is
    handed to it and gone from the disk: ``sink(path) -> (sha256, size)`` uploads it (without
    committing) and deletes it. A shard is finished when it is full if ``early_metadata`` (the
    header's ``__metadata__``) is known before the last tensor, else when the component ends."""

    def __init__(self, folder: Path, base_name: str, max_shard_bytes: int, header_reserve: int = 1 << 20,
                 sink: Any = None, early_metadata: dict[str, str] | None = None) -> None:  # fmt: skip
        self.folder = Path(folder)
        self.sink = sink
        self.early_metadata = early_metadata
        self._sunk: dict[int, tuple[str, int]] = {}  # shard index -> (sha256, size) handed to the sink
        self.base_name = base_name
        self.max_shard_bytes = max_shard_bytes
        self.header_reserve = -(-header_reserve // 8) * 8  # keep the data 8-byte aligned
        # closed shards: scratch data file + header entries (name, dtype, shape, start, end)
        self._closed: list[tuple[Path, list[tuple[str, str, list[int], int, int]]]] = []
        self._current: _Shard | None = None
        self.total_size = 0
        self.names: set[str] = set()

    def add_group(self, tensors: list[tuple[str, Any]]) -> None:
        """Add tensors that must share a shard (e.g. a weight and its quantization state)."""
        group_bytes = sum(t.numel() * t.element_size() for _, t in tensors)
        cur = self._current
        if cur is not None and cur.entries and cur.size + group_bytes > self.max_shard_bytes:
            self._close_current()
        if self._current is None:
            idx = len(self._closed)
            scratch = self.folder / f".{self.base_name}.{idx:05d}.partial"
            fh = open(scratch, "wb")
            fh.seek(8 + self.header_reserve)
            self._current = _Shard(scratch, fh)
        cur = self._current
        for name, t in tensors:
            if name in self.names:
                raise ValueError(f"duplicate tensor name {name}")
            self.names.add(name)
            data = tensor_bytes(t)
            cur.fh.write(data)
            n = len(data)
            cur.entries.append((name, st_dtype(t.dtype), list(t.shape), cur.size, cur.size + n))
            cur.size += n
            self.total_size += n

    def _close_current(self) -> None:
        cur = self._current
        assert cur is not None
        cur.fh.close()
        self._closed.append((cur.scratch, cur.entries))
        self._current = None
        if self.sink is not None and self.early_metadata is not None:
            # the bytes of the shard do not depend on its name (which needs the shard count)
            idx = len(self._closed) - 1
            ready = self._finalize(cur.scratch, cur.entries, self.early_metadata, cur.scratch.with_suffix(".ready"))
            self._sunk[idx] = self.sink(ready)

    def finish(self, metadata: dict[str, str] | None = None) -> list[Path]:
        """Write the final shard files (and index); return their paths."""
        if self._current is not None:
            self._close_current()
        n = len(self._closed)
        if n == 0:
            raise ValueError("no tensors were written")
        if self._sunk and metadata != self.early_metadata:
            raise ValueError("shard metadata changed after shards were uploaded")
        files: list[Path] = []
        weight_map: dict[str, str] = {}
        self.uploaded: dict[str, tuple[str, int]] = {}  # file name -> (sha256, size): not on disk
        for i, (scratch, entries) in enumerate(self._closed):
            fname = (
                f"{self.base_name}.safetensors"
                if n == 1
                else f"{self.base_name}-{i + 1:05d}-of-{n:05d}.safetensors"
            )
            weight_map.update((name, fname) for name, *_ in entries)
            final = self.folder / fname
            if i not in self._sunk:
                self._finalize(scratch, entries, metadata, final)
                if self.sink is not None:  # a header known only now: uploaded at the end
                    self._sunk[i] = self.sink(final)
            if i in self._sunk:
                self.uploaded[fname] = self._sunk[i]
            files.append(final)
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": dict(sorted(weight_map.items())),
            }
            idx_path = self.folder / f"{self.base_name}.safetensors.index.json"
            idx_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            files.append(idx_path)
        return files

    def _finalize(self, scratch: Path, entries: list[tuple[str, str, list[int], int, int]],
                  metadata: dict[str, str] | None, final: Path) -> Path:  # fmt: skip
        """Write the header into the scratch file and move it to ``final``."""
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        for name, dtype, shape, start, end in entries:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) <= self.header_reserve:
            raw += b" " * (self.header_reserve - len(raw))
            with open(scratch, "r+b") as fh:
                fh.write(struct.pack("<Q", len(raw)))
                fh.write(raw)
            os.replace(scratch, final)
        else:  # the header outgrew its reservation: move the data once
            raw += b" " * (-(len(raw)) % 8)
            with open(final, "wb") as out, open(scratch, "rb") as src:
                out.write(struct.pack("<Q", len(raw)))
                out.write(raw)
                src.seek(8 + self.header_reserve)
                shutil.copyfileobj(src, out, 16 << 20)
            os.unlink(scratch)
        return final

    def abort(self) -> None:
        if self._current is not None:
            self._current.fh.close()
            self._current.scratch.unlink(missing_ok=True)
        for scratch, _ in self._closed:
            scratch.unlink(missing_ok=True)


def parse_size(text: str | int) -> int:
    """'10GB' -> 10_000_000_000 (decimal units as huggingface_hub), '512MiB' -> binary."""
    if isinstance(text, int):
        return text
    s = text.strip().upper()
    units = {
        "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
        "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1,
    }  # fmt: skip
    for u, mult in units.items():
        if s.endswith(u):
            number = float(s[: -len(u)])
            if not math.isfinite(number):  # "infGB", "nanMB": int() would raise OverflowError
                raise ValueError(f"not a finite size: {text!r}")
            return int(number * mult)
    return int(s)
