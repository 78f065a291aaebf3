"""qconvert.convert.kernels: byte for byte the libraries' own quantizers on golden inputs.

The references are the library functions the backends used before the kernels existed:
bitsandbytes' ``quantize_4bit`` / ``int8_vectorwise_quant`` and gguf-py's ``quantize(…, Q8_0)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qconvert.convert import kernels as K

bnb_F = pytest.importorskip("bitsandbytes.functional", reason="the bnb extra is part of the dev install")
gguf = pytest.importorskip("gguf")

ROWS, COLS = 32, 512  # 16,384 values: 256 bnb blocks, 512 Q8_0 blocks


def _gaussian(seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((ROWS, COLS), dtype=np.float32) * 0.02)


def _student_t(seed: int) -> torch.Tensor:  # heavy tails: a few huge values per block
    return torch.from_numpy(np.random.default_rng(seed).standard_t(2.0, (ROWS, COLS)).astype(np.float32))


def _zero_blocks() -> torch.Tensor:
    x = _gaussian(1)
    x[::3] = 0.0  # whole zero rows: all-zero blocks for both block sizes
    x[1, :64] = 0.0
    return x


def _extremes() -> torch.Tensor:
    """The largest bfloat16 values, subnormals (bf16 and float32) and mixes of both in one block."""
    x = _gaussian(2)
    big = torch.finfo(torch.bfloat16).max
    x[0] = big
    x[1, ::2] = -big
    x[2] = torch.finfo(torch.float32).tiny / 8  # float32 subnormals
    x[3] = 9.2e-41  # a bfloat16 subnormal
    x[4, ::7] = big  # a huge value among ordinary ones
    x[5, 1::5] = 1e-39
    return x


def _bnb_ties(quant_type: str) -> torch.Tensor:
    """Blocks of absmax 1 whose other values are exactly the code-book midpoints (and their
    float32 neighbours): where bucketize's ``right=False`` decides."""
    code = bnb_F.get_4bit_type(quant_type, device="cpu").float()
    srt = torch.sort(code).values
    mids = (srt[:-1] + srt[1:]) / 2
    near = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
    block = torch.cat([torch.tensor([1.0]), near, torch.zeros(64 - 1 - near.numel())])[:64]
    blocks = torch.stack([block * s for s in (1.0, -1.0, 0.5, 3.0, 1e-3)])
    return blocks.repeat(ROWS * COLS // 64 // blocks.shape[0] + 1, 1)[: ROWS * COLS // 64].reshape(ROWS, COLS)


def _q8_ties() -> torch.Tensor:
    """Blocks of max 127 (d = 1, 1/d = 1): values k + 0.5 exactly, the round-half-away cases."""
    halves = torch.arange(-15.5, 16.0, 1.0)  # 32 values
    block = torch.cat([torch.tensor([127.0]), halves[1:]])
    return block.repeat(ROWS * COLS // 32).reshape(ROWS, COLS)


INPUTS = {
    "gaussian": lambda: _gaussian(0),
    "student_t": lambda: _student_t(0),
    "zero_blocks": _zero_blocks,
    "extremes": _extremes,
}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (torch.equal takes -0.0 for +0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _library_4bit(w, quant_type):
    q, st = bnb_F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type=quant_type, quant_storage=torch.uint8)
    return q, st.absmax


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("case", [*INPUTS, "ties"])
def test_quantize_4bit_equals_bitsandbytes(case, quant_type, dtype):
    x = _bnb_ties(quant_type) if case == "ties" else INPUTS[case]()
    w = x.to(dtype)
    before = w.clone()
    q, absmax = K.quantize_4bit(w, quant_type)
    ref_q, ref_absmax = _library_4bit(w, quant_type)
    assert same_bits(q, ref_q)
    assert same_bits(absmax, ref_absmax)
    assert same_bits(w, before)  # the input is left as it was


def test_ties_reach_the_ambiguous_cells():
    """The tie inputs really exercise the bucketize fallback (cells that hold a midpoint)."""
    table = K._cell_table("nf4")
    scaled = _bnb_ties("nf4").reshape(-1, 64)
    scaled = (scaled / scaled.abs().amax(dim=1, keepdim=True)).reshape(-1)
    cells = scaled.numpy().view(np.uint16)[1::2]
    assert (table[cells] == K._AMBIGUOUS).sum() >= 15


def test_quantize_4bit_partial_block_goes_to_the_library():
    w = _gaussian(3).reshape(-1)[:1000].to(torch.bfloat16)  # 1000 % 64 != 0
    q, absmax = K.quantize_4bit(w, "nf4")
    ref_q, ref_absmax = _library_4bit(w, "nf4")
    assert same_bits(q, ref_q) and same_bits(absmax, ref_absmax)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", [*INPUTS, "ties"])
def test_quantize_int8_equals_bitsandbytes(case, dtype):
    x = _q8_ties() / 16 if case == "ties" else INPUTS[case]()
    w = x.to(dtype)
    cb, scb = K.quantize_int8(w)
    ref_cb, ref_scb, _ = bnb_F.int8_vectorwise_quant(w.to(torch.float16))
    assert same_bits(cb, ref_cb)
    assert same_bits(scb, ref_scb)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", [*INPUTS, "ties"])
def test_quantize_q8_0_equals_gguf_py(case, dtype):
    x = _q8_ties() if case == "ties" else INPUTS[case]()
    w = x.to(dtype)
    before = w.clone()
    got = K.quantize_q8_0(w).numpy()
    ref = gguf.quants.quantize(w.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert np.array_equal(got, ref)
    assert same_bits(w, before)


def test_quantize_q8_0_one_dimensional():
    w = _gaussian(4).reshape(-1)[:4096]
    ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    got = K.quantize_q8_0(w).numpy()
    assert got.shape == ref.shape and np.array_equal(got, ref)


def test_blocked_passes_cover_several_steps(monkeypatch):
    """Inputs longer than one pass (STEP values) give the same bytes as one pass."""
    monkeypatch.setattr(K, "STEP", 4096)
    w = _student_t(5).to(torch.bfloat16)
    assert all(map(same_bits, K.quantize_4bit(w, "nf4"), _library_4bit(w, "nf4")))
    assert np.array_equal(K.quantize_q8_0(w).numpy(), gguf.quants.quantize(w.float().numpy(), gguf.GGMLQuantizationType.Q8_0))
    assert all(map(same_bits, K.quantize_int8(w), bnb_F.int8_vectorwise_quant(w.to(torch.float16))[:2]))
