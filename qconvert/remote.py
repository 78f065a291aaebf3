"""Safetensors files read from the Hub with HTTP range requests, never copied to disk.

A Hub pipeline is converted from the repo itself: its small files (configs, tokenizers,
scheduler, indexes: a few MB) come through ``snapshot_download``; each weight file becomes a
:class:`RemoteFile`, whose header is fetched with one range request and whose tensors (or row
ranges of them) with one more each, so the disk a conversion uses is its output's. A file
already in the local Hub cache is read from there (mmap) instead.

Reads are retried (connection drops, 429 and 5xx) and resumed where the body stopped. The
bytes a conversion reads are hashed in file order as they arrive (a few out-of-order pieces
are held until their turn: the worker pool reads a tensor's row chunks concurrently) and the
whole file's sha256, which the Hub gives for LFS files, is checked when the conversion ends;
bytes it never read in order (tensors read out of file order, header padding) are fetched
then, once, sequentially. A mismatch is a :class:`~qconvert.errors.CorruptCheckpoint` before
anything is renamed into place or committed.

:class:`RemoteHandle` has the part of safetensors' ``safe_open`` API that
:class:`~qconvert.sources.TensorReader` uses (``keys``, ``get_slice`` + ``get_shape`` and a
row slice, ``get_tensor``), so the converters never know where bytes come from.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from . import faults
from .errors import CorruptCheckpoint, InputError

RETRIES = 5  # per range, each resumed where the last attempt stopped
_BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0)
_PENDING_LIMIT = 64 << 20  # out-of-order bytes held for hashing; beyond, re-read at the end
_BLOCK = 16 << 20  # sequential reads (copies, the hash's remainder)
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}

_TORCH = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


@dataclass(frozen=True)
class RemoteFile:
    """One file of a Hub repo at a commit (``path`` inside the repo)."""

    repo_id: str
    path: str
    commit: str
    size: int
    sha256: str | None = None
    endpoint: str | None = None
    # never shown (repr) and not part of the identity: the same file whoever reads it
    token: str | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def parent(self) -> PurePosixPath:
        return PurePosixPath(self.path).parent

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.path).suffix

    def __str__(self) -> str:
        return f"{self.repo_id}/{self.path}"

    def url(self) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, self.path, revision=self.commit, endpoint=self.endpoint)


# --- transfer counters (tests and the plan's numbers) ------------------------------------------

_stats_lock = threading.Lock()
STATS = {"bytes": 0, "requests": 0, "retries": 0}


def _count(**kw: int) -> None:
    with _stats_lock:
        for k, v in kw.items():
            STATS[k] += v


def fetch(rf: RemoteFile, offset: int, length: int, *, sink: Any = None) -> bytes:
    """Bytes ``offset:offset+length`` of ``rf`` (``sink(chunk)`` instead of collecting, for
    copies), retried and resumed."""
    from huggingface_hub.utils import build_hf_headers, get_session

    from .errors import transport_errors

    got: list[bytes] = []
    done = 0
    attempt = 0
    while done < length:
        faults.counted("fetch")
        start = offset + done
        headers = build_hf_headers(token=rf.token)
        headers["Range"] = f"bytes={start}-{offset + length - 1}"
        try:
            with get_session().stream("GET", rf.url(), headers=headers, follow_redirects=True) as r:
                _count(requests=1)
                if r.status_code in _RETRY_STATUS:
                    raise _Retry(r.status_code)
                _check_status(rf, r.status_code)
                for chunk in r.iter_bytes(1 << 20):
                    chunk = chunk[: length - done]
                    (sink(chunk) if sink else got.append(chunk))
                    done += len(chunk)
                    _count(bytes=len(chunk))
                    if done >= length:
                        break
            if done < length:
                raise _Retry("short body")
        except (_Retry, *transport_errors()) as e:
            if attempt >= RETRIES:
                raise InputError(f"reading {rf} from the Hub failed after {RETRIES + 1} attempts ({_why(e)})",
                                 hint="check the network or HF_ENDPOINT and run again (finished work is kept)") from None  # fmt: skip
            time.sleep(_BACKOFF[min(attempt, len(_BACKOFF) - 1)])
            attempt += 1
            _count(retries=1)
    return b"".join(got)


class _Retry(Exception):
    pass


def _why(e: BaseException) -> str:
    return f"HTTP {e.args[0]}" if isinstance(e, _Retry) and isinstance(e.args[0], int) else type(e).__name__


def _check_status(rf: RemoteFile, status: int) -> None:
    if status == 206:
        return
    if status in (401, 403):
        raise InputError(f"the Hub refused reading {rf} (HTTP {status})",
                         hint="set HF_TOKEN to a token that may read the repo (or run `hf auth login`); accept a gated repo's terms on its page")  # fmt: skip
    # a 200 would be the whole file: a server that ignores ranges cannot be streamed from
    raise InputError(f"reading {rf} from the Hub failed (HTTP {status}{', no range support' if status == 200 else ''})",
                     hint="retry later, or download the repo and pass the local folder")  # fmt: skip


# --- header --------------------------------------------------------------------------------------


def header_bytes(rf: RemoteFile) -> tuple[bytes, int]:
    """(the JSON header, the offset where tensor data starts), two small range requests."""
    if rf.size < 8:
        raise CorruptCheckpoint(f"{rf} is not a safetensors file (too short)", hint="re-upload or re-export it")
    (n,) = struct.unpack("<Q", fetch(rf, 0, 8))
    if n <= 1 or n > 100 * 1024 * 1024 or 8 + n > rf.size:
        raise CorruptCheckpoint(f"{rf} is not a valid safetensors file (bad header length)", hint="re-upload or re-export it")
    return fetch(rf, 8, n), 8 + n


# --- sha256 in file order ------------------------------------------------------------------------


class _Hasher:
    """sha256 of a file fed by pieces in any order: in-order bytes go straight in, later ones
    wait (up to ``_PENDING_LIMIT``), the rest is fetched in :meth:`finish`."""

    def __init__(self, rf: RemoteFile) -> None:
        self.rf = rf
        self.h = hashlib.sha256()
        self.done = 0
        self.pending: dict[int, bytes] = {}
        self.held = 0
        self.lock = threading.Lock()

    def feed(self, offset: int, data: bytes) -> None:
        with self.lock:
            if offset > self.done:
                if self.held + len(data) <= _PENDING_LIMIT and offset not in self.pending:
                    self.pending[offset] = data
                    self.held += len(data)
                return
            self._take(offset, data)
            self._drain()

    def _take(self, offset: int, data: bytes) -> None:
        skip = self.done - offset
        if skip < len(data):
            self.h.update(memoryview(data)[skip:])
            self.done = offset + len(data)

    def _drain(self) -> None:
        while True:
            ready = [o for o in self.pending if o <= self.done]
            if not ready:
                return
            for o in sorted(ready):
                data = self.pending.pop(o)
                self.held -= len(data)
                self._take(o, data)

    def finish(self) -> None:
        """Hash what was not read in order, then compare with the Hub's sha256."""
        if self.rf.sha256 is None:
            return
        with self.lock:
            while self.done < self.rf.size:
                n = min(_BLOCK, self.rf.size - self.done)
                self._take(self.done, fetch(self.rf, self.done, n))
                self._drain()
            digest = self.h.hexdigest()
        if digest != self.rf.sha256:
            raise CorruptCheckpoint(f"{self.rf} does not match the sha256 the Hub gives for it",
                                    hint="run again; if it persists, the repo's file is damaged")  # fmt: skip


# --- safe_open's API -----------------------------------------------------------------------------


class RemoteHandle:
    """``safe_open``'s reading API over range requests."""

    def __init__(self, rf: RemoteFile) -> None:
        self.rf = rf
        self.hasher = _Hasher(rf)
        raw, self.base = header_bytes(rf)
        self.hasher.feed(0, struct.pack("<Q", len(raw)))
        self.hasher.feed(8, raw)
        header = json.loads(raw)
        header.pop("__metadata__", None)
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {
            k: (v["dtype"], tuple(v["shape"]), *v["data_offsets"]) for k, v in header.items()
        }

    def keys(self) -> list[str]:
        return list(self.entries)

    def get_slice(self, key: str) -> _RemoteSlice:
        return _RemoteSlice(self, key)

    def get_tensor(self, key: str) -> Any:
        return _RemoteSlice(self, key)[:]

    def read(self, key: str, lo: int, hi: int) -> Any:
        """Rows ``lo:hi`` of tensor ``key`` (all of a 0-d one) as a torch tensor."""
        import torch

        dtype, shape, start, end = self.entries[key]
        row = (end - start) // shape[0] if shape and shape[0] else 0
        a, b = (start + lo * row, start + hi * row) if shape else (start, end)
        raw = fetch(self.rf, self.base + a, b - a) if b > a else b""
        self.hasher.feed(self.base + a, raw)
        data = bytearray(raw)  # torch wants a writable buffer
        del raw
        out_shape = ((hi - lo), *shape[1:]) if shape else ()
        tdtype = getattr(torch, _TORCH[dtype])
        if not data:
            return torch.empty(out_shape, dtype=tdtype)
        return torch.frombuffer(data, dtype=tdtype).reshape(out_shape)

    def finish(self) -> None:
        self.hasher.finish()


class _RemoteSlice:
    def __init__(self, handle: RemoteHandle, key: str) -> None:
        self.handle, self.key = handle, key

    def get_shape(self) -> list[int]:
        return list(self.handle.entries[self.key][1])

    def __getitem__(self, sl: Any) -> Any:
        shape = self.get_shape()
        if not shape:
            return self.handle.read(self.key, 0, 0)
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            raise TypeError("remote tensors are read by row ranges only")
        lo, hi, _ = sl.indices(shape[0])
        return self.handle.read(self.key, lo, max(lo, hi))


def copy_to(rf: RemoteFile, dst: Any) -> None:
    """Stream a whole remote file into ``dst`` (a copied component's weights), sha256-checked."""
    h = hashlib.sha256()
    with open(dst, "wb") as fh:
        def sink(chunk: bytes) -> None:
            h.update(chunk)
            fh.write(chunk)

        fetch(rf, 0, rf.size, sink=sink) if rf.size else None
    if rf.sha256 is not None and h.hexdigest() != rf.sha256:
        raise CorruptCheckpoint(f"{rf} does not match the sha256 the Hub gives for it",
                                hint="run again; if it persists, the repo's file is damaged")  # fmt: skip


def copy_files(files: list[RemoteFile], dst: Any) -> list[Any]:
    """Stream Hub files into the folder ``dst``, nothing cached; their paths there."""
    out = []
    for rf in files:
        dst.mkdir(parents=True, exist_ok=True)
        copy_to(rf, dst / rf.name)
        out.append(dst / rf.name)
    return out
