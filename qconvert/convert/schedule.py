"""The one scheduler every backend's tensors go through: row chunks -> worker pool -> plan order.

A backend is a *codec* (:class:`Codec`, implemented by :class:`~qconvert.convert.base.Backend`):

* ``chunk_rows(plan)``: rows per chunk for a tensor, a multiple of whatever the backend's
  blocks need (:func:`rows_per_chunk` with its alignment), or None to encode it whole;
* ``encode_chunk(component, plan, rows)``: rows of the source tensor -> an
  :class:`EncodedChunk` (runs on the worker pool);
* ``finish_tensor(component, plan, chunks)``: all of one tensor's encoded chunks, in row
  order -> its output tensors (runs in plan order on the calling thread; bnb's double-quant
  statistics are computed here, over every chunk's absmax).

:class:`Scheduler` splits each planned tensor into row chunks by that one rule, reads every
chunk from the mmapped source (:class:`~qconvert.sources.TensorReader`), checks it, encodes it
on ``jobs`` threads (or spawned processes: GGUF's ``pool="process"``) with at most
``jobs + 1`` chunks in flight, and hands the results back in plan order, whatever order they
finish in, so the bytes never depend on ``jobs``. The container writers take them from here:
:meth:`Scheduler.tensors` (finished tensors, for safetensors shards) or :meth:`Scheduler.chunks`
(each tensor's encoded chunks in row order, for GGUF's streaming write).
"""

from __future__ import annotations

import gc
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from ..plan import TensorPlan
from ..sources import SourceTensor, TensorReader

# The one chunk size. Quantizing a big tensor at once needs several float32 temporaries of
# its size (bitsandbytes' CPU quantizer ~20 bytes per value), so big tensors are read and
# encoded in row chunks of about this many values: 16 MB as float32, whatever the backend.
CHUNK_VALUES = 1 << 22

CheckFn = Callable[[str, Any], None]
Rows = tuple[int, int] | None  # a row range [start, stop) of dim 0, or None: the whole tensor


def rows_per_chunk(shape: tuple[int, ...], align: int = 1) -> int | None:
    """Rows per chunk of about :data:`CHUNK_VALUES` values, a multiple of ``align`` rows, or
    None when the tensor fits in one chunk (or has no rows to split: 0-d and 1-d)."""
    if len(shape) < 2:
        return None
    row = 1
    for d in shape[1:]:
        row *= d
    rows = max(align, CHUNK_VALUES // max(row, 1) // align * align)
    return rows if rows < shape[0] else None


def row_ranges(n_rows: int, rows: int | None) -> list[Rows]:
    """The chunks of a tensor of ``n_rows`` rows, ``rows`` at a time (None: one, the whole)."""
    if not rows or rows >= n_rows:
        return [None]
    return [(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


@dataclass
class EncodedChunk:
    """Rows of one tensor, encoded: named parts (tensors or arrays, in output order, each
    covering the chunk's rows on dim 0) and anything else the backend's finish step needs."""

    parts: dict[str, Any]
    meta: Any = None


class Codec(Protocol):
    """What the scheduler needs of a backend (see the module docstring)."""

    name: str
    # Whether its encoder leaves reference cycles for the scheduler to collect (GarbageBound).
    reference_cycles: bool

    def chunk_rows(self, plan: TensorPlan) -> int | None: ...

    def encode_chunk(self, component: str, plan: TensorPlan, rows: Any) -> EncodedChunk: ...

    def finish_tensor(self, component: str, plan: TensorPlan, chunks: list[EncodedChunk]) -> list[tuple[str, Any]]: ...


@dataclass(frozen=True)
class _Unit:
    """One chunk to read and encode."""

    plan: TensorPlan
    source: SourceTensor
    rows: Rows
    last: bool  # the tensor's last chunk


def encode_rows(
    codec: Codec, component: str, plan: TensorPlan, source: SourceTensor, rows: Rows,
    reader: TensorReader, check: CheckFn,
) -> EncodedChunk:  # fmt: skip
    """Read rows of a source tensor (only those leave the mmapped file), check and encode them."""
    part = reader.load(source, rows=rows)
    check(plan.name, part)
    encoded = codec.encode_chunk(component, plan, part)
    del part
    if rows is not None and codec.reference_cycles:
        gc.collect(1)  # a chunk's cycles, freed while young (a whole tensor's: GarbageBound)
    return encoded


_PROCESS_READER: TensorReader | None = None


def _encode_in_process(
    codec: Codec, component: str, plan: TensorPlan, source: SourceTensor, rows: Rows, check: CheckFn
) -> EncodedChunk:
    """Process-pool unit: the worker reads its rows with its own mmapped handles, so only the
    lazy tensor's description and the encoded chunk cross the process boundary (``codec`` and
    ``check`` must be picklable: a backend object, a module-level function)."""
    global _PROCESS_READER
    if _PROCESS_READER is None:
        _PROCESS_READER = TensorReader()
    return encode_rows(codec, component, plan, source, rows, _PROCESS_READER, check)


class GarbageBound:
    """Keep garbage from reference cycles bounded while streaming.

    Quantizer libraries leave reference cycles (torchao's tensor subclasses, module
    parametrizations); freed only by the cyclic collector, they would pile up to a sizeable
    part of the model. A young-generation collection after every chunk and tensor
    (microseconds) frees them while they are young; a full one runs every ``every`` bytes for
    whatever got promoted. The objects alive when streaming starts (diffusers', torch's and the
    quantizers' modules: ~0.5 M objects, ~0.5 s per full collection) are frozen out of the
    collector's sight (``gc.freeze``) until :meth:`close`, so a full collection only scans
    what the conversion made: ~0.5 s every GB was ~17 s of the main thread at full size.
    """

    # conversions running side by side (convert_many) share the process's one frozen set: the
    # first to start freezes, the last to end unfreezes
    _lock = threading.Lock()
    _active = 0

    def __init__(self, every: int = 1 << 30) -> None:
        self.every = every
        self.pending = 0
        with GarbageBound._lock:
            if GarbageBound._active == 0:
                gc.collect()  # what is garbage already is freed now, not frozen
                gc.freeze()
            GarbageBound._active += 1

    def step(self, nbytes: int) -> None:
        gc.collect(1)
        self.pending += nbytes
        if self.pending >= self.every:
            gc.collect()
            self.pending = 0

    def close(self) -> None:
        with GarbageBound._lock:
            GarbageBound._active -= 1
            if GarbageBound._active == 0:
                gc.unfreeze()  # the frozen objects go back to the oldest generation


class Scheduler:
    """Read, encode and order the chunks of a conversion; a context manager holding the pool.

    One per conversion (a spawned process pool is worth keeping across components). With
    ``jobs`` > 1 the quantizers' kernels (torch, bitsandbytes, numpy) and the mmapped reads
    release the GIL, so threads overlap one chunk's read with another's encoding.
    """

    def __init__(
        self, reader: TensorReader, check: CheckFn, *, jobs: int = 1, pool: str = "thread", name: str = "qconvert"
    ) -> None:
        self.reader = reader
        self.check = check
        self.jobs = jobs
        self.pool = pool
        self.name = name
        self._executor: Executor | None = None
        self._torch_threads: int | None = None
        self._garbage: GarbageBound | None = None

    def __enter__(self) -> Scheduler:
        if self.jobs > 1 and self.pool == "process":
            import multiprocessing as mp

            self._executor = ProcessPoolExecutor(self.jobs, mp_context=mp.get_context("spawn"))
        elif self.jobs > 1:
            import torch

            # Split the cores between the workers: each torch kernel would otherwise start a
            # team of all-cores threads, jobs x cores threads in all, which thrashes many-core machines.
            self._torch_threads = torch.get_num_threads()
            torch.set_num_threads(max(1, self._torch_threads // self.jobs))
            self._executor = ThreadPoolExecutor(self.jobs, thread_name_prefix=f"qconvert-{self.name}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self._torch_threads is not None:
            import torch

            torch.set_num_threads(self._torch_threads)
            self._torch_threads = None

    # --- what the container writers consume --------------------------------------------------

    def tensors(
        self, codec: Codec, component: str, items: list[tuple[TensorPlan, SourceTensor]]
    ) -> Iterator[tuple[TensorPlan, list[tuple[str, Any]]]]:
        """Each planned tensor's finished output tensors, in plan order."""
        self._garbage = GarbageBound() if codec.reference_cycles else None
        chunks: list[EncodedChunk] = []
        stream = self._in_order(self._units(codec, items), codec, component)
        try:
            for unit, encoded in stream:
                chunks.append(encoded)
                if unit.last:
                    finished = codec.finish_tensor(component, unit.plan, chunks)
                    chunks = []
                    yield unit.plan, finished
                    del finished
                    self._collect(unit.plan.bytes_in)
        finally:
            stream.close()  # on an error, stop the workers now, not when the generator is collected
            self._end_garbage()

    def chunks(
        self, codec: Codec, component: str, items: list[tuple[TensorPlan, SourceTensor]]
    ) -> Iterator[tuple[TensorPlan, Iterator[EncodedChunk]]]:
        """Each planned tensor with an iterator of its encoded chunks in row order, in plan
        order: a streaming writer writes them as they come and never holds a whole tensor.
        Consume each tensor's chunks before asking for the next tensor."""
        self._garbage = GarbageBound() if codec.reference_cycles else None
        stream = self._in_order(self._units(codec, items), codec, component)

        def one_tensor() -> Iterator[EncodedChunk]:
            for unit, encoded in stream:
                yield encoded
                if unit.last:
                    return

        try:
            for plan, _ in items:
                current = one_tensor()
                yield plan, current
                for _ in current:  # whatever the writer left of this tensor
                    pass
                self._collect(plan.bytes_in)
        finally:
            stream.close()
            self._end_garbage()

    # --- the schedule --------------------------------------------------------------------------

    def _collect(self, nbytes: int) -> None:
        if self._garbage is not None:
            self._garbage.step(nbytes)

    def _end_garbage(self) -> None:
        if self._garbage is not None:
            self._garbage.close()
            self._garbage = None

    @staticmethod
    def _units(codec: Codec, items: list[tuple[TensorPlan, SourceTensor]]) -> Iterator[_Unit]:
        """Chunks in plan order, each tensor split by its backend's one chunking rule."""
        for plan, source in items:
            n_rows = source.shape[0] if source.shape else 0
            ranges = row_ranges(n_rows, codec.chunk_rows(plan))
            for i, rows in enumerate(ranges):
                yield _Unit(plan, source, rows, i == len(ranges) - 1)

    def _submit(self, codec: Codec, component: str, unit: _Unit) -> Future:
        args = (codec, component, unit.plan, unit.source, unit.rows)
        if isinstance(self._executor, ProcessPoolExecutor):
            return self._executor.submit(_encode_in_process, *args, self.check)
        assert self._executor is not None
        return self._executor.submit(encode_rows, *args, self.reader, self.check)

    def _in_order(self, units: Iterator[_Unit], codec: Codec, component: str) -> Iterator[tuple[_Unit, EncodedChunk]]:
        """(unit, encoded chunk) in plan order; at most ``jobs + 1`` chunks in flight, which
        bounds the extra memory to a few chunks' sources, temporaries and outputs."""
        if self._executor is None:  # one job: encode lazily, on this thread
            for unit in units:
                yield unit, encode_rows(codec, component, unit.plan, unit.source, unit.rows, self.reader, self.check)
            return
        pending: deque[tuple[_Unit, Future]] = deque()
        try:
            while True:
                while len(pending) <= self.jobs:
                    unit = next(units, None)
                    if unit is None:
                        break
                    pending.append((unit, self._submit(codec, component, unit)))
                if not pending:
                    return
                unit, future = pending.popleft()
                yield unit, future.result()
        finally:
            for _, future in pending:
                future.cancel()
