"""Tests for the numpy K-quant quantizers (qconvert.convert.kquants).

Bytes are always decoded with gguf-py's own ``gguf.quants.dequantize``, so a
wrong bit layout shows up either as a large error or as a failed exact
round-trip below.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from qconvert.convert.kquants import KQUANTS, QK_K, quantize_kquant

Q = GGMLQuantizationType
K_TYPES = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]

# ggml's typical relative error ||deq - x|| / ||x|| on Gaussian weights.
GGML_TYPICAL_GAUSS = {Q.Q6_K: 0.018, Q.Q5_K: 0.036, Q.Q4_K: 0.071, Q.Q3_K: 0.15, Q.Q2_K: 0.30}

# Regression values of this implementation on the seeded data below (ggml's C reference
# quantize_row_q*_K_ref gives the same to ~1e-4; its bytes are compared directly at the end).
GOLDEN_GAUSS = {Q.Q2_K: 0.29652, Q.Q3_K: 0.15090, Q.Q4_K: 0.07134, Q.Q5_K: 0.03614, Q.Q6_K: 0.01774}
GOLDEN_STUDENT_T3 = {Q.Q2_K: 0.35194, Q.Q3_K: 0.18994, Q.Q4_K: 0.09284, Q.Q5_K: 0.04700, Q.Q6_K: 0.02551}

TOL = 0.02  # relative band around the golden values


def _rel_err(x: np.ndarray, qtype: GGMLQuantizationType) -> float:
    d = quants.dequantize(quantize_kquant(x, qtype), qtype)
    assert d.shape == x.shape
    return float(np.linalg.norm(d - x) / np.linalg.norm(x))


@pytest.fixture(scope="module")
def gauss() -> np.ndarray:
    return np.random.default_rng(1234).standard_normal((256, 4096), dtype=np.float32)


@pytest.fixture(scope="module")
def student_t3() -> np.ndarray:
    return np.random.default_rng(5678).standard_t(3, size=(256, 4096)).astype(np.float32)


def test_registry_covers_k_types():
    assert set(KQUANTS) == set(K_TYPES)
    for qt, cls in KQUANTS.items():
        assert cls.qtype == qt
        assert (cls.block_size, cls.type_size) == GGML_QUANT_SIZES[qt]


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_shapes_and_sizes(qtype):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    assert block_size == QK_K
    rng = np.random.default_rng(0)
    for shape in [(256,), (3, 512), (2, 3, 768)]:
        x = rng.standard_normal(shape, dtype=np.float32)
        q = quantize_kquant(x, qtype)
        assert q.dtype == np.uint8
        assert q.shape == (*shape[:-1], shape[-1] // QK_K * type_size)
        # bytes per block exactly as gguf says
        assert q.size == x.size // block_size * type_size
        d = quants.dequantize(q, qtype)
        assert d.shape == x.shape and d.dtype == np.float32
    # leading dims are just rows: same bytes as the flattened 2-D input
    x = rng.standard_normal((2, 3, 768), dtype=np.float32)
    assert np.array_equal(quantize_kquant(x, qtype).reshape(6, -1),
                          quantize_kquant(x.reshape(6, 768), qtype))
    # float16 / float64 input is accepted (computed in float32)
    assert np.array_equal(quantize_kquant(x.astype(np.float64), qtype), quantize_kquant(x, qtype))


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(4, 100), (255,), (2, 257), ()])
def test_shape_error(qtype, shape):
    with pytest.raises(ValueError):
        quantize_kquant(np.zeros(shape, dtype=np.float32), qtype)


def test_non_kquant_type_rejected():
    with pytest.raises(ValueError):
        quantize_kquant(np.zeros((1, 256), dtype=np.float32), Q.Q8_0)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_gaussian_error(qtype, gauss):
    err = _rel_err(gauss, qtype)
    assert err <= 1.02 * GGML_TYPICAL_GAUSS[qtype], err
    assert err == pytest.approx(GOLDEN_GAUSS[qtype], rel=TOL)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_student_t_error(qtype, student_t3):
    err = _rel_err(student_t3, qtype)
    assert err == pytest.approx(GOLDEN_STUDENT_T3[qtype], rel=TOL)


def test_error_ordering(gauss):
    errs = [_rel_err(gauss[:32], qt) for qt in K_TYPES]  # Q2_K .. Q6_K
    assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_deterministic_and_chunk_independent(qtype):
    x = np.random.default_rng(7).standard_t(4, size=(40, 512)).astype(np.float32)
    a = quantize_kquant(x, qtype)
    b = quantize_kquant(x.copy(), qtype)
    assert np.array_equal(a, b)
    c = KQUANTS[qtype].quantize(x, chunk_blocks=7)  # odd chunking, same per-block result
    assert np.array_equal(a, c)


# --------------------------------------------------------------------------
# exactly representable data: decodes bit-for-bit, which pins every field of
# the layout (sub-block scales and mins take many different 6/4/8-bit values,
# high bits included, and the levels cover the full range in every sub-block)
# --------------------------------------------------------------------------

def _exact_affine(rng, n_blocks, sub, nmax, s_den, n_sc, m_den, n_m, odd_mins=False):
    """x = s_j * l - m_j with s_j = k_j / s_den (k_j in 1..n_sc, n_sc present),
    m_j = q_j / m_den (q_j in 0..n_m, n_m present; odd only with odd_mins),
    l in 0..nmax (0 and nmax present in every sub-block)."""
    nsub = QK_K // sub
    k = rng.integers(1, n_sc + 1, size=(n_blocks, nsub))
    k[:, 0] = n_sc
    if odd_mins:
        q = 2 * rng.integers(0, (n_m + 1) // 2, size=(n_blocks, nsub)) + 1
    else:
        q = rng.integers(0, n_m + 1, size=(n_blocks, nsub))
        q[:, 2] = 0
    q[:, 1] = n_m
    lv = rng.integers(0, nmax + 1, size=(n_blocks, nsub, sub))
    lv[:, :, 0] = 0
    lv[:, :, 1] = nmax
    x = (k / s_den)[..., None] * lv - (q / m_den)[..., None]
    return x.reshape(n_blocks, QK_K).astype(np.float32)


def _exact_symmetric(rng, n_blocks, nmax, c_max):
    """Sub-blocks of 16: x = sign_j * c_j / c_max * l, l in -nmax..nmax-1 with
    -nmax present; sign_j = -1 on some sub-blocks (their scale has the opposite
    sign of the super-block maximum, so c_j <= c_max - 1 there)."""
    nsub = QK_K // 16
    sign = np.where(rng.random((n_blocks, nsub)) < 0.3, -1, 1)
    sign[:, 0] = 1
    c = rng.integers(1, c_max + 1, size=(n_blocks, nsub))
    c[:, 0] = c_max
    c = np.where(sign < 0, np.minimum(c, c_max - 1), c)
    lv = rng.integers(-nmax, nmax, size=(n_blocks, nsub, 16))
    lv[:, :, 3] = -nmax
    x = (sign * c / c_max)[..., None] * lv
    return x.reshape(n_blocks, QK_K).astype(np.float32)


def _exact_data(qtype, n_blocks=64):
    rng = np.random.default_rng(99)
    if qtype == Q.Q2_K:   # d = 1/16, dmin = 1/32, 4-bit scales and mins
        # ggml weights Q2_K's fit by |x|, so exact zeros carry no weight and are
        # not guaranteed to come back (ggml's C code behaves the same); odd
        # mins (q_j/32, q_j odd) keep every x non-zero.
        x = _exact_affine(rng, n_blocks, 16, 3, 16, 15, 32, 15, odd_mins=True)
        assert not (x == 0).any()
        return x
    if qtype == Q.Q4_K:   # d = 1/64, dmin = 1/128, 6-bit scales and mins
        return _exact_affine(rng, n_blocks, 32, 15, 64, 63, 128, 63)
    if qtype == Q.Q5_K:
        return _exact_affine(rng, n_blocks, 32, 31, 64, 63, 128, 63)
    if qtype == Q.Q3_K:   # d = -1/32, 6-bit signed scales (-32..31)
        return _exact_symmetric(rng, n_blocks, 4, 32)
    if qtype == Q.Q6_K:   # d = -1/128, int8 scales (-128..127)
        return _exact_symmetric(rng, n_blocks, 32, 128)
    raise AssertionError(qtype)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_exactly_representable_roundtrip(qtype):
    x = _exact_data(qtype)
    d = quants.dequantize(quantize_kquant(x, qtype), qtype)
    np.testing.assert_array_equal(d, x)


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_degenerate_rows_no_nan(qtype):
    rows = np.zeros((8, 512), dtype=np.float32)
    rows[1] = 0.5
    rows[2] = -1.25
    rows[3, :256] = 3.0               # one constant block next to an all-zero one
    rows[4] = 1e-20                   # below every fp16 scale: decodes to ~0
    rows[5, 17] = 7.0                 # a single non-zero weight
    rows[6, ::2] = 1.0                # two values
    rows[6, 1::2] = -1.0
    rows[7] = -0.0
    d = quants.dequantize(quantize_kquant(rows, qtype), qtype)
    assert np.isfinite(d).all()
    np.testing.assert_array_equal(d[0], 0)
    np.testing.assert_array_equal(d[7], 0)
    np.testing.assert_array_equal(d[3, 256:], 0)
    assert np.abs(d[4]).max() < 1e-6
    # constant and near-constant rows come back close (fp16 scale rounding only)
    for i in (1, 2, 3, 5):
        np.testing.assert_allclose(d[i], rows[i], rtol=2e-3, atol=2e-3 * np.abs(rows[i]).max())
    # +-1: exact for the affine types; Q3_K's levels -4..3 plus ggml's descent
    # settle on levels -4/+3 (scale -0.28: 1.12 / -0.84), as ggml's C code does
    assert np.abs(d[6] - rows[6]).max() < (0.17 if qtype == Q.Q3_K else 2e-3)


# --------------------------------------------------------------------------
# Golden test against ggml's C reference (quantize_row_q*_K_ref), bytes stored in
# tests/data/ggml_kquants.json by bench/make_kquant_golden.py from fixed inputs.


def _ggml_golden():
    import base64
    import json
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "bench"))
    from make_kquant_golden import golden_inputs

    doc = json.loads((root / "tests" / "data" / "ggml_kquants.json").read_text())
    return golden_inputs(), {k: base64.b64decode(v) for k, v in doc["cases"].items()}


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("dist", ["gauss", "t3"])
def test_matches_ggml_reference_bytes(qtype, dist):
    """Block by block against ggml's own bytes: all but near-ties identical (measured: 32 of 32
    blocks, Q6_K Gaussian 30), and where a block differs, no worse than ggml's choice."""
    inputs, golden = _ggml_golden()
    x = inputs[dist]
    type_size = GGML_QUANT_SIZES[qtype][1]
    ours = quantize_kquant(x, qtype).reshape(len(x), type_size)
    ref = np.frombuffer(golden[f"{qtype.name}/{dist}"], dtype=np.uint8).reshape(len(x), type_size)
    same = (ours == ref).all(axis=1)
    assert same.sum() >= len(x) - 2, f"{int(same.sum())}/{len(x)} blocks identical"
    for i in np.flatnonzero(~same):
        err = lambda q: float(np.linalg.norm(quants.dequantize(q, qtype) - x[i]))  # noqa: E731
        assert err(ours[i]) <= 1.01 * err(ref[i]), f"block {i}"
