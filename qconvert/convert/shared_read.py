"""One read of the source for many variants: conversions that run side by side share reads.

``qconvert flux --scheme a,b,c`` and ``qconvert release`` encode one source several ways. Run
one after the other, each conversion reads (and, cold, fetches from disk or the network) the
whole source again: a 33 GB FLUX.1-dev + T5-XXL source is read eight times for the eight
variants of ``releases/flux1-dev.toml``, on a machine whose page cache cannot hold it.

Here the variants' conversions run at the same time, each on its own thread with its own
scheduler, and read through one :class:`SharedReader`. The first conversion to ask for a
tensor reads it whole from the underlying reader; the others get rows of that copy. A tensor
is dropped as soon as every conversion that plans to read it has finished reading it (the
planned readers are counted up front), and the copies held are bounded by ``budget`` bytes:
a conversion that asks for a tensor while the budget is full of tensors the others have not
reached yet reads it uncached, without waiting (never a stall; only some repeated reads,
most where the conversions read in different orders, as GGUF and safetensors outputs do).
The outputs are those of separate runs, byte for byte: a chunk is the same rows of the same
tensor whichever reader produced it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BUDGET = 1 << 30  # bytes of whole tensors held for the conversions still behind


def _key(tensor: Any) -> tuple[Any, ...]:
    """The identity of a source tensor: where its bytes come from (segments) and its shape."""
    segs = tuple((str(s.path), s.key, s.start, s.stop) for s in tensor.segments)
    return (segs, tuple(tensor.shape), tensor.dtype)


@dataclass
class _Entry:
    readers: int = 0  # conversions planned to read this tensor that have not finished it
    value: Any = None
    nbytes: int = 0
    loading: bool = False


class SharedReader:
    """A ``TensorReader`` for several conversions at once (see the module docstring).

    Sharing is per stored tensor: a tensor a layout assembles from rows of several stored ones
    (GGUF's fused BFL q/k/v, a BFL single file's split) shares those stored tensors with the
    conversions that read them as they are. Each conversion's :meth:`view` counts what it
    plans to read (``expect``) and tells when it read a tensor's last rows. Counts:
    ``bytes_read`` (underlying reads), ``bytes_served`` (what the conversions asked for).
    """

    def __init__(self, reader: Any, budget: int = DEFAULT_BUDGET, conversions: int = 0) -> None:
        self.reader = reader
        self.budget = budget
        # reads wait until each of ``conversions`` has said what it will read (or ended): a
        # conversion that started early would otherwise take a shared tensor for its own
        self._unregistered = set(range(conversions))
        self.bytes_read = 0
        self.bytes_served = 0
        self._entries: dict[tuple[Any, ...], _Entry] = {}
        self._uses: dict[tuple[tuple[Any, ...], int], int] = {}  # (stored tensor, reader) -> reads left
        self._held = 0
        self._cond = threading.Condition()

    def view(self, reader_id: int) -> _View:
        """The reader one conversion uses."""
        return _View(self, reader_id)

    def _stored(self, tensor: Any) -> list[tuple[Any, int | None, int | None]]:
        """The stored tensors ``tensor`` is made of, each with the rows of it that it takes."""
        from ..sources import FileSegment, SourceTensor

        segs = tensor.segments
        if len(segs) == 1 and segs[0].start is None and segs[0].stop is None:
            return [(tensor, None, None)]
        out = []
        for seg in segs:
            shape = tuple(self.reader._handle(seg.path).get_slice(seg.key).get_shape())
            out.append((SourceTensor(seg.key, shape, tensor.dtype, (FileSegment(seg.path, seg.key),)), seg.start, seg.stop))
        return out

    def expect(self, tensors: Iterable[Any], reader_id: int) -> None:
        with self._cond:
            for t in tensors:
                if not t.shape:
                    continue
                for stored, _, _ in self._stored(t):
                    key = _key(stored)
                    entry = self._entries.setdefault(key, _Entry())
                    uses = self._uses.get((key, reader_id), 0)
                    entry.readers += uses == 0
                    self._uses[(key, reader_id)] = uses + 1

    def registered(self, reader_id: int) -> None:
        """Conversion ``reader_id`` has announced its reads (or will not read at all)."""
        with self._cond:
            self._unregistered.discard(reader_id)
            self._cond.notify_all()

    def load(self, tensor: Any, rows: tuple[int, int] | None = None) -> Any:
        import torch

        with self._cond:
            while self._unregistered:
                self._cond.wait()
        pieces = []
        for stored, lo, hi in self._stored(tensor) if tensor.shape else []:
            whole = self._whole(_key(stored), stored)
            if whole is None:
                pieces = None
                break
            pieces.append(whole if lo is None and hi is None else whole[lo:hi])
        if not pieces:  # not shared (one reader, over budget, a 0-d tensor): read as a plain reader
            part = self.reader.load(tensor, rows=rows)
            with self._cond:
                self.bytes_read += part.numel() * part.element_size()
        else:
            joined = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            part = joined if rows is None else joined[rows[0] : rows[1]]
        with self._cond:
            self.bytes_served += part.numel() * part.element_size()
        return part

    def finished(self, tensor: Any, reader_id: int) -> None:
        """Conversion ``reader_id`` read ``tensor``'s last rows: drop what nobody will read again."""
        if not tensor.shape:
            return
        with self._cond:
            for stored, _, _ in self._stored(tensor):
                key = _key(stored)
                uses = self._uses.get((key, reader_id), 0)
                if uses <= 0:
                    continue
                self._uses[(key, reader_id)] = uses - 1
                entry = self._entries[key]
                entry.readers -= uses == 1
                if entry.readers <= 0 and entry.value is not None:
                    self._held -= entry.nbytes
                    entry.value = None
                    self._cond.notify_all()

    def _whole(self, key: tuple[Any, ...], tensor: Any) -> Any:
        with self._cond:
            entry = self._entries.get(key)
            if entry is None or entry.readers <= 1 and entry.value is None:
                return None
            while entry.loading:
                self._cond.wait()
            if entry.value is not None:
                return entry.value
            nbytes = tensor.nbytes
            if nbytes > self.budget:
                return None
            if self._held + nbytes > self.budget and self._held > 0:
                # The budget is full of tensors the others have not reached: read uncached, never
                # wait. Waiting for room stalled both conversions of nf4 + Q8_0 at full size: the
                # GGUF's tensor order is not the safetensors', so each one's held tensors were the
                # ones the other reads later, and each chunk waited out a timeout.
                return None
            entry.loading = True
            self._held += nbytes
        try:
            value = self.reader.load(tensor)
        except BaseException:
            with self._cond:
                entry.loading = False
                self._held -= nbytes
                self._cond.notify_all()
            raise
        with self._cond:
            entry.value, entry.nbytes, entry.loading = value, nbytes, False
            self.bytes_read += nbytes
            self._cond.notify_all()
        return value


class _View:
    def __init__(self, shared: SharedReader, reader_id: int) -> None:
        self.shared, self.reader_id = shared, reader_id
        self._rows: dict[tuple[Any, ...], int] = {}  # tensor -> rows read so far
        self._lock = threading.Lock()

    def expect(self, tensors: Iterable[Any]) -> None:
        self.shared.expect(tensors, self.reader_id)
        self.shared.registered(self.reader_id)

    def load(self, tensor: Any, rows: tuple[int, int] | None = None) -> Any:
        part = self.shared.load(tensor, rows)
        # finished once every row was read: the pool reads a tensor's chunks in any order
        if rows is None or not tensor.shape:
            done = True
        else:
            with self._lock:
                key = _key(tensor)
                self._rows[key] = self._rows.get(key, 0) + rows[1] - rows[0]
                done = self._rows[key] >= tensor.shape[0]
                if done:
                    del self._rows[key]
        if done:
            self.shared.finished(tensor, self.reader_id)
        return part

    def __getattr__(self, name: str) -> Any:
        return getattr(self.shared.reader, name)


@dataclass
class Variant:
    """One output of :func:`convert_many`: what :func:`qconvert.convert.convert` takes."""

    backend: str
    scheme: str
    out: Any
    options: dict[str, Any] = field(default_factory=dict)


def convert_many(source: Any, variants: list[Variant], *, components: tuple[str, ...], overwrite: bool = False,
                 budget: int = DEFAULT_BUDGET) -> tuple[list[Any], dict[str, int]]:  # fmt: skip
    """Convert ``source`` into every variant at once, reading it once (see the module
    docstring). Returns each variant's ``ConvertResult`` or the exception it raised, in
    order, and the read counts. Each output is atomic on its own, as with ``convert``."""
    import torch

    from ..sources import TensorReader
    from . import convert

    results: list[Any] = [None] * len(variants)
    _import_first(source, variants, components)
    threads = torch.get_num_threads()
    with TensorReader() as base:
        shared = SharedReader(base, budget, conversions=len(variants))

        def one(i: int, v: Variant) -> None:
            try:
                options = {**v.options, "jobs": v.options.get("jobs") or max(1, threads // len(variants))}
                results[i] = convert(source, v.backend, v.scheme, v.out, components=components, overwrite=overwrite,
                                     progress=False, options=options, reader=shared.view(i))  # fmt: skip
            except BaseException as e:  # noqa: BLE001 - handed back to the caller, in order
                results[i] = e
            finally:
                shared.registered(i)  # one that failed before announcing its reads

        workers = [threading.Thread(target=one, args=(i, v), name=f"qconvert-variant-{i}") for i, v in enumerate(variants)]
        torch.set_num_threads(max(1, threads // len(variants)))
        try:
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        finally:
            torch.set_num_threads(threads)
    return results, {"bytes_read": shared.bytes_read, "bytes_served": shared.bytes_served}


def _import_first(source: Any, variants: list[Variant], components: tuple[str, ...]) -> None:
    """Import on this thread what the conversions import lazily: diffusers' and transformers'
    lazy modules are not safe to import from several threads at once (a thread can see
    ``diffusers`` without ``FluxTransformer2DModel`` while another is importing it)."""
    import importlib

    from . import backend_class

    for v in variants:
        for module in (*backend_class(v.backend).import_names, *backend_class(v.backend).warm_up_modules):
            importlib.import_module(module)
    for name in source.family.resolve_components(components):
        comp = source.components.get(name)
        if comp is not None and comp.library in ("diffusers", "transformers") and comp.class_name:
            getattr(importlib.import_module(comp.library), comp.class_name)
