"""Fast exact encoders: the libraries' bytes, computed with fewer passes over memory.

Each function here returns exactly what a library function returns for the same input — the
library stays the reference, in tests (tests/test_kernels.py: Gaussian, Student-t, all-zero
blocks, exact ties at the code-book midpoints, subnormals, the largest bfloat16 values) —
and is faster because it avoids the library's slowest step:

* :func:`quantize_4bit` = bitsandbytes' ``quantize_4bit`` (nf4/fp4, blocks of 64): the
  library ends in ``torch.bucketize`` over the 15 code-book midpoints (a binary search per
  value, ~45 Mparam/s on one core). Here a 65,536-entry table indexed by the upper 16 bits of
  each scaled float32 gives the code directly; only values whose 16-bit cell holds one of the
  midpoints (a few percent) are looked up with ``torch.bucketize`` itself.
* :func:`quantize_q8_0` = gguf-py's ``Q8_0`` (ggml's ``quantize_row_q8_0_ref``): the same
  float32 arithmetic in torch (one pass per step instead of gguf-py's seven for its
  round-half-away-from-zero), from bfloat16 without a numpy bit-shift conversion.

Everything runs on torch tensors, on the tensor's device (CPU or CUDA alike); no state.
Inputs the fast path does not cover (a trailing partial block) go to the library.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

BNB_BLOCK = 64  # bitsandbytes' 4-bit blocksize used by diffusers and transformers
Q8_0_BLOCK = 32  # ggml's QK8_0
_AMBIGUOUS = 255  # table entry: the cell holds a midpoint, ask torch.bucketize


@functools.lru_cache(maxsize=None)
def _bnb_bounds(quant_type: str) -> tuple[Any, Any]:
    import torch
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    return _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))


def _bnb_codes(scaled: Any, quant_type: str) -> Any:
    """What the library computes for scaled values: bucketize over the midpoints, then (fp4)
    the sorted index mapped back to the code's own order."""
    import torch

    bounds, order = _bnb_bounds(quant_type)
    bounds, order = bounds.to(scaled.device), order.to(scaled.device)
    q = torch.bucketize(scaled, bounds, out_int32=True)
    if quant_type != "nf4":
        q = order[q]
    return q.to(torch.uint8)


@functools.lru_cache(maxsize=None)
def _cell_table(quant_type: str) -> Any:
    """uint8[65536]: the 4-bit code of every float32 whose upper 16 bits are the index, or
    ``_AMBIGUOUS`` where the values sharing those bits do not all get one code.

    Within one cell (same sign, exponent and top 7 mantissa bits) the value is monotonic in
    the lower bits and bucketize is monotonic in the value, so the cell's lowest and highest
    patterns having one code means every pattern has it. Cells of exponent 255 (Inf, NaN) are
    marked ambiguous and left to the library.
    """
    import torch

    hi = torch.arange(65536, dtype=torch.int64)
    lo_bits = (hi << 16).to(torch.int64)
    first = _bits_to_f32(lo_bits)
    last = _bits_to_f32(lo_bits | 0xFFFF)
    a, b = _bnb_codes(first, quant_type), _bnb_codes(last, quant_type)
    table = torch.where(a == b, a, torch.full_like(a, _AMBIGUOUS))
    special = ((hi >> 7) & 0xFF) == 0xFF
    table[special] = _AMBIGUOUS
    return table.numpy()


def _bits_to_f32(bits: Any) -> Any:
    """int64 tensor of 32-bit patterns -> the float32 values they encode."""
    import numpy as np
    import torch

    return torch.from_numpy(bits.numpy().astype(np.uint32).view(np.float32))


# Values per pass of the blocked loops below: 256 Ki values (1 MiB of float32) keep a pass's
# temporaries in the core's cache; measured on one core, 3072x3072 bf16: nf4 150 Mparam/s at
# 2**18 against 136 at 2**16 and 140 at 2**20 (whole tensor at once: 73).
STEP = 1 << 18


def quantize_4bit(w: Any, quant_type: str) -> tuple[Any, Any]:
    """bitsandbytes ``quantize_4bit(w, blocksize=64, quant_type=…, quant_storage=uint8)``'s
    packed data (``(n/2, 1)`` uint8) and absmax (float32), byte for byte.

    Packing, two codes per byte (the first value of each pair in the high nibble)::

        byte i = code[2i] << 4 | code[2i+1]
    """
    import numpy as np
    import torch

    n = w.numel()
    if n % BNB_BLOCK or w.device.type != "cpu" or sys.byteorder != "little":
        return _library_4bit(w, quant_type)
    flat = w.detach().reshape(-1)
    packed = np.empty(n // 2, dtype=np.uint8)
    absmax = torch.empty(n // BNB_BLOCK, dtype=torch.float32)
    table = _cell_table(quant_type)
    for i in range(0, n, STEP):
        j = min(i + STEP, n)
        _4bit_pass(flat[i:j], packed[i // 2 : j // 2], absmax[i // BNB_BLOCK : j // BNB_BLOCK], table, quant_type)
    return torch.from_numpy(packed).unsqueeze(1), absmax


def _4bit_pass(src: Any, packed: Any, absmax: Any, table: Any, quant_type: str) -> None:
    import numpy as np
    import torch

    x = src.reshape(-1, BNB_BLOCK).to(torch.float32, copy=True)  # scaled in place below
    # the library's arithmetic: absmax per block (max(|max|, |min|) = max |x|: one pass with
    # no temporary; abs() on both so that an all-zero block gives +0.0, never -0.0), then
    # x * (1 / absmax) with the reciprocal taken once per block
    low, high = torch.aminmax(x, dim=1)
    torch.maximum(high.abs_(), low.abs_(), out=absmax)
    x.mul_(1.0 / absmax.clamp(min=1e-38).view(-1, 1))
    # clamp(-1, 1) is left out: every midpoint lies inside (-1, 1), so a value just beyond
    # +-1 gets the same code as +-1 itself.
    scaled = x.reshape(-1)
    # the upper 16 bits of each float32 are the odd uint16 halves (little-endian)
    codes = table[scaled.numpy().view(np.uint16)[1::2]]
    ambiguous = np.flatnonzero(codes == _AMBIGUOUS)
    if ambiguous.size:
        codes[ambiguous] = _bnb_codes(scaled[torch.from_numpy(ambiguous)], quant_type).numpy()
    np.bitwise_or(codes[0::2] << 4, codes[1::2], out=packed)


def _library_4bit(w: Any, quant_type: str) -> tuple[Any, Any]:
    import bitsandbytes.functional as F
    import torch

    q, state = F.quantize_4bit(
        w, blocksize=BNB_BLOCK, compress_statistics=False, quant_type=quant_type, quant_storage=torch.uint8
    )
    return q, state.absmax


def quantize_int8(w: Any) -> tuple[Any, Any]:
    """bitsandbytes ``int8_vectorwise_quant(w.to(float16))``'s int8 rows and float32 row
    scales (``SCB``), byte for byte: ``round(w * (127 / max|row|))``, halves to even, in
    float32 from the float16 values. In slabs of rows, written into the result directly."""
    import torch

    rows, cols = w.shape
    cb = torch.empty(rows, cols, dtype=torch.int8, device=w.device)
    scb = torch.empty(rows, dtype=torch.float32, device=w.device)
    slab = max(1, STEP // max(cols, 1))
    for r in range(0, rows, slab):
        a = w[r : r + slab].to(torch.float16)
        stats = a.abs().amax(dim=1).float()
        scb[r : r + slab] = stats
        x = a.float().mul_((127.0 / stats).unsqueeze(-1))
        cb[r : r + slab].copy_(x.round_())
    return cb, scb


def quantize_q8_0(x: Any) -> Any:
    """gguf-py ``quantize(x, Q8_0)`` for rows of ``x`` (float32, bfloat16 or float16; width a
    multiple of 32), as a uint8 tensor of the GGUF bytes, ``(rows, 34 * width / 32)``.

    Block layout (34 bytes per 32 values)::

        | d: float16 (2 bytes) | qs[0..31]: int8 |      x[i] ~ d * qs[i]

    A width that is not a multiple of 32 is gguf-py's error. ``d = max|x| / 127`` in float32 (then rounded to float16), ``qs = round(x * (1/d))`` with
    halves away from zero, ``1/d`` taken as 0 for an all-zero block.
    """
    import torch

    shape = (*x.shape[:-1], x.shape[-1] // Q8_0_BLOCK * (Q8_0_BLOCK + 2))
    flat = x.detach().reshape(-1)
    nb = flat.numel() // Q8_0_BLOCK
    out = torch.empty(nb, Q8_0_BLOCK + 2, dtype=torch.uint8, device=x.device)
    per = STEP // Q8_0_BLOCK
    for b in range(0, nb, per):
        e = min(b + per, nb)
        _q8_0_pass(flat[b * Q8_0_BLOCK : e * Q8_0_BLOCK], out[b:e])
    return out.reshape(shape)


def _q8_0_pass(src: Any, out: Any) -> None:
    import torch

    blocks = src.reshape(-1, Q8_0_BLOCK).to(torch.float32, copy=True)  # scaled in place below
    low, high = torch.aminmax(blocks, dim=1, keepdim=True)
    d = torch.maximum(high.abs_(), low.abs_()) / 127  # max |x|, +0.0 for a zero block
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    n = blocks.mul_(inv)
    # round half away from zero, exactly as gguf-py's np_roundf for |n| < 2**22 (here
    # |n| <= 127.00002): n + copysign(0.5, n) is exact, and the int8 cast truncates to zero.
    n.add_(torch.copysign(torch.tensor(0.5, device=n.device), n))
    out[:, 2:].view(torch.int8).copy_(n)
    out[:, :2].view(torch.float16).copy_(d)
