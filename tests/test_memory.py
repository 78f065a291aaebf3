"""Bounded memory: converting the width-3072 slim model streams tensor by tensor."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


@pytest.mark.slow
@pytest.mark.parametrize("backend,scheme", [("torchao", "int8wo"), ("fp8", "e4m3fn")])
def test_slim_conversion_anonymous_memory_is_bounded(backend, scheme, slim_path, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "convert_memory.py"), "--source", "slim-flux",
         "--backend", backend, "--scheme", scheme, "--components", "transformer"],
        capture_output=True, text=True, cwd=tmp_path, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(r, indent=1))
    # The bound is a third of the model's bytes; measured ~0.1x here.
    assert r["anon_above_baseline"] < r["model_bytes"] / 3, r
    assert r["peak_anon"] < 3 * 1024**3, r
    assert r["bytes_out"] < r["model_bytes"]


_FAULTS = """
import ctypes, ctypes.util, resource, sys, torch
from qconvert.memory import tune_heap
if sys.argv[1] == "tuned":
    assert tune_heap()
else:  # a low fixed mmap threshold (1 MiB, qconvert's setting before tune_heap)
    ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 1 << 20)
def chunks(n):
    for _ in range(n):
        torch.empty(1 << 22).fill_(1.0)  # a chunk-sized float32 temporary (16 MiB), then freed
chunks(20)  # warm-up: the heap grows to its working size
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
chunks(20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_tune_heap_reuses_chunk_sized_blocks():
    """After tune_heap, freed chunk-sized blocks are reused from the heap: no page faults per
    chunk, where a fresh mapping of 16 MiB faults in its 4,096 pages each time."""

    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    pages = (16 << 20) // 4096
    assert faults("tuned") < pages, "tuned: the 20 blocks should come from the heap"
    assert faults("mmapped") > 19 * pages, "a low threshold: each block a fresh mapping (the check's premise)"
