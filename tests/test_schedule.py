"""The shared scheduler: one chunking rule, plan order whatever finishes first, bounded in flight."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from qconvert.convert import schedule
from qconvert.convert.schedule import EncodedChunk, Scheduler, row_ranges, rows_per_chunk
from qconvert.plan import QUANTIZE, TensorPlan
from qconvert.sources import SourceTensor


def test_rows_per_chunk_is_one_rule_with_an_alignment(monkeypatch):
    monkeypatch.setattr(schedule, "CHUNK_VALUES", 1000)
    assert rows_per_chunk((100, 77)) == 12  # 1000 // 77
    assert rows_per_chunk((100, 77), align=64) == 64  # never below the alignment
    assert rows_per_chunk((100, 10), align=8) == 96
    assert rows_per_chunk((12, 77)) is None  # fits in one chunk
    assert rows_per_chunk((5000,)) is None  # 1-D: whole
    assert row_ranges(30, 12) == [(0, 12), (12, 24), (24, 30)]
    assert row_ranges(30, None) == row_ranges(30, 40) == [None]


class _Reader:
    """Rows of a tensor numbered by row: row i of tensor t holds t * 1000 + i."""

    def load(self, source: SourceTensor, rows=None):
        lo, hi = rows or (0, source.shape[0])
        base = int(source.name) * 1000
        return torch.arange(base + lo, base + hi, dtype=torch.float32)[:, None].expand(-1, source.shape[1]).clone()


class _Codec:
    """Sleeps a random while per chunk (finishing out of order) and counts chunks in flight."""

    name = "fake"
    reference_cycles = False

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = self.most = 0

    def chunk_rows(self, plan):
        return rows_per_chunk(plan.shape, align=2)

    def encode_chunk(self, component, plan, rows):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(random.random() / 200)
        with self.lock:
            self.running -= 1
        return EncodedChunk({plan.name: rows[:, 0].clone()})

    def finish_tensor(self, component, plan, chunks):
        return [(plan.name, torch.cat([c.parts[plan.name] for c in chunks]))]


def _items(n: int = 6):
    sources = [SourceTensor(str(i), (10 + 7 * i, 4), "F32", ()) for i in range(n)]
    return [(TensorPlan(s.name, s.shape, "F32", QUANTIZE, "x", 0, 0), s) for s in sources]


@pytest.mark.parametrize("jobs", [1, 3])
def test_results_come_in_plan_order(jobs, monkeypatch):
    monkeypatch.setattr(schedule, "CHUNK_VALUES", 16)  # 4 rows of 4 values per chunk
    codec, items = _Codec(), _items()
    with Scheduler(_Reader(), lambda name, t: None, jobs=jobs) as s:
        got = list(s.tensors(codec, "c", items))
        streamed = [(plan.name, [c.parts[plan.name] for c in chunks]) for plan, chunks in s.chunks(codec, "c", items)]
    assert [p.name for p, _ in got] == [p.name for p, _ in items]
    for (plan, [(name, values)]), (_, chunks) in zip(got, streamed, strict=True):
        want = torch.arange(plan.shape[0], dtype=torch.float32) + int(plan.name) * 1000
        assert name == plan.name and torch.equal(values, want)
        assert len(chunks) == len(row_ranges(plan.shape[0], 4)) and torch.equal(torch.cat(chunks), want)
    assert codec.most <= jobs  # never more than the pool's workers at once ...


def test_at_most_jobs_plus_one_chunks_in_flight(monkeypatch):
    monkeypatch.setattr(schedule, "CHUNK_VALUES", 16)
    submitted = []
    real = Scheduler._submit

    def counting(self, codec, component, unit):
        submitted.append(unit)
        return real(self, codec, component, unit)

    monkeypatch.setattr(Scheduler, "_submit", counting)
    codec, items = _Codec(), _items()
    with Scheduler(_Reader(), lambda name, t: None, jobs=2) as s:
        stream = s.chunks(codec, "c", items)
        _, first = next(stream)
        next(first)
        assert len(submitted) == 3  # ... and only jobs + 1 read and encoded ahead of the writer
