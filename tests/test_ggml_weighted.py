"""ggml's weighted quantizers (qconvert.convert.ggml_weighted) against ggml's own bytes.

tests/data/ggml_weighted.json holds what ggml's ``quantize_<type>(..., quant_weights)`` wrote
(ggml d99724f2, built by bench/make_weighted_golden.py) for all-ones weights on fixed inputs,
and for one non-uniform importance vector; every block must be identical. Bytes are decoded
with gguf-py's own ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import base64
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from qconvert.convert import ggml_jit, ggml_weighted
from qconvert.convert.ggml_weighted import WEIGHTED_TYPES, quantize_weighted
from qconvert.convert.kquants import quantize_kquant

ROOT = Path(__file__).resolve().parent.parent
Q = GGMLQuantizationType


@pytest.fixture(scope="module")
def golden():
    sys.path.insert(0, str(ROOT / "bench"))
    from make_weighted_golden import COLS, golden_inputs

    doc = json.loads((ROOT / "tests" / "data" / "ggml_weighted.json").read_text())
    assert doc["ggml_commit"].startswith("d99724f2")
    w = (1.0 + np.arange(COLS, dtype=np.float32) % 7) / 4
    return golden_inputs(), w, {k: base64.b64decode(v) for k, v in doc["cases"].items()}


def _quiet(x, qtype, weights=None):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy warning escapes (they are all handled)
        return quantize_weighted(x, qtype, weights)


_COMPILED = ("qkx3_search", "make_qp_search", "make_qx_search", "k_prologue")


@pytest.fixture(params=["compiled", "numpy"])
def search_impl(request, monkeypatch):
    """Both implementations of the searches: ggml_jit's compiled loops and the numpy path."""
    if request.param == "numpy":
        for name in _COMPILED:
            monkeypatch.setattr(ggml_jit, name, None)
    return request.param


def test_compiled_loops_are_installed():
    """numba is part of qconvert[all]: the fast path must not silently fall back."""
    assert all(getattr(ggml_jit, name) is not None for name in _COMPILED)


@pytest.mark.parametrize("qtype", WEIGHTED_TYPES)
def test_compiled_equals_numpy(qtype, monkeypatch):
    """Block counts that leave a partial tile, Student-t data, per-column importance weights."""
    x = np.random.default_rng(5).standard_t(3, size=(7, 1280)).astype(np.float32)
    w = np.random.default_rng(6).exponential(size=1280).astype(np.float32)
    compiled = _quiet(x, qtype), _quiet(x, qtype, w)
    for name in _COMPILED:
        monkeypatch.setattr(ggml_jit, name, None)
    assert np.array_equal(compiled[0], _quiet(x, qtype))
    assert np.array_equal(compiled[1], _quiet(x, qtype, w))


@pytest.mark.parametrize("qtype", WEIGHTED_TYPES)
def test_matches_ggml_bytes(qtype, golden, search_impl):
    """Every case (Gaussian, Student-t, all-zero blocks, ties, subnormals, large, the largest
    bf16 values) and the non-uniform importance vector: all blocks identical to ggml's."""
    inputs, w, cases = golden
    size = GGML_QUANT_SIZES[Q[qtype]][1]
    for dist, x in [*inputs.items(), ("gauss/imatrix", inputs["gauss"])]:
        ours = _quiet(x, qtype, w if dist.endswith("imatrix") else None).reshape(-1, size)
        ref = np.frombuffer(cases[f"{qtype}/{dist}"], dtype=np.uint8).reshape(-1, size)
        same = (ours == ref).all(axis=1)
        assert same.all(), f"{dist}: {int(same.sum())}/{len(same)} blocks identical"


def test_types_with_a_weighted_path():
    assert set(WEIGHTED_TYPES) == {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    with pytest.raises(ValueError, match="no weighted search"):
        quantize_weighted(np.zeros((1, 32), np.float32), "Q8_0")  # ggml's Q8_0 ignores quant_weights


def _err(x, qtype, q):
    return float(np.linalg.norm(quants.dequantize(q, Q[qtype]) - x) / np.linalg.norm(x))


def _reference(x, qtype):
    return quantize_kquant(x, Q[qtype]) if qtype.endswith("_K") else quants.quantize(x, Q[qtype])


@pytest.mark.parametrize("qtype", WEIGHTED_TYPES)
def test_lower_error_than_reference(qtype):
    x = np.random.default_rng(3).standard_normal((8, 3072), dtype=np.float32)
    weighted, reference = _err(x, qtype, _quiet(x, qtype)), _err(x, qtype, _reference(x, qtype))
    assert weighted < reference, (weighted, reference)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q2_K", "Q6_K"])
def test_shapes_chunks_and_weights(qtype, monkeypatch):
    block, size = GGML_QUANT_SIZES[Q[qtype]]
    x = np.random.default_rng(1).standard_t(4, size=(2, 3, 512)).astype(np.float32)
    q = _quiet(x, qtype)
    assert q.dtype == np.uint8 and q.shape == (2, 3, 512 // block * size)
    assert np.array_equal(q.reshape(6, -1), _quiet(x.reshape(6, 512), qtype))
    assert np.array_equal(q, _quiet(x.astype(np.float64), qtype))
    # all ones given explicitly = the default; per-column and per-element weights agree
    assert np.array_equal(q, _quiet(x, qtype, np.ones(512, np.float32)))
    w = np.random.default_rng(2).exponential(size=512).astype(np.float32)
    assert np.array_equal(_quiet(x, qtype, w), _quiet(x, qtype, np.broadcast_to(w, x.shape).copy()))
    assert not np.array_equal(_quiet(x, qtype, w), q)  # the weights are used
    monkeypatch.setattr(ggml_weighted, "CHUNK_ELEMENTS", 512)  # one row per pass: same bytes
    assert np.array_equal(q, _quiet(x, qtype))
    assert np.array_equal(q, quantize_weighted(x, qtype, chunk_elements=1 << 22))


@pytest.mark.parametrize("shape", [(4, 100), (255,), ()])
def test_shape_errors(shape):
    with pytest.raises(ValueError, match="multiple of"):
        quantize_weighted(np.zeros(shape, np.float32), "Q4_0" if shape != (255,) else "Q4_K")
    with pytest.raises(ValueError, match="weights of shape"):
        quantize_weighted(np.zeros((2, 256), np.float32), "Q4_K", np.ones(128, np.float32))
