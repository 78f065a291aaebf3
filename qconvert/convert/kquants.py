"""K-quant quantizers (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) in vectorized numpy.

gguf-py can *dequantize* the ggml K-quant types but raises NotImplementedError
when asked to quantize them.  This module fills that gap.

Contract (same as ``gguf.quants.quantize``): a float array whose last dimension
is a multiple of ``QK_K`` (256) goes in, a ``uint8`` array of shape
``(*data.shape[:-1], data.shape[-1] // 256 * type_size)`` comes out, holding the
blocks in ggml's exact byte layout, so ``gguf.quants.dequantize(out, qtype)``
(or llama.cpp / ComfyUI-GGUF) reads them back.

Algorithms follow ggml's reference quantizers (``quantize_row_q*_K_ref`` in
``ggml/src/ggml-quants.c``), re-expressed as array code:

* Q2_K / Q4_K / Q5_K: per sub-block affine fit ``x ~ scale * q - min`` with the
  iterative scale/min search of ``make_qkx2_quants`` (a fixed grid of trial
  inverse scales; for each, a weighted least-squares refit of scale and min;
  keep the trial with the lowest weighted error; the min used for the next
  trial is the best one so far).
* Q3_K: symmetric fit by ``make_q3_quants`` (weights x^2, a few rounds of
  coordinate descent over the levels, maximising (sum w x l)^2 / sum w l^2).
* Q6_K: symmetric fit by ``make_qx_quants`` (rmse_type 1: weights x^2, 19
  trial inverse scales around nmax/max).
* Then, as in ggml, the sub-block scales (and mins) are quantized against one
  fp16 super-block scale, and every weight is re-quantized with the scale it
  will really be decoded with.

Everything is vectorized across all blocks at once.  Internally the data of a
chunk is laid out transposed, shape ``(elements_per_sub_block, n_sub_blocks)``,
so that per-sub-block scalars broadcast along the contiguous axis and the
sums over a sub-block are cheap row additions.  The only Python loops run over
the fixed number of trial scales / descent steps.  Results are deterministic
and independent of the chunking (every operation is per block).

Checked against ggml's C reference (quantize_row_q*_K_ref built with -O2):
same relative error to ~1e-4, Q3_K byte-identical, Q2_K/Q6_K byte-identical
on ~99-100% of blocks and Q4_K/Q5_K on ~97-99%.  The remaining differences are
float32 rounding near-ties: sums are accumulated in a different order, and
Q4_K/Q5_K score a trial by the closed-form least-squares residual instead of
summing squared errors element by element (ggml's own bytes also change with
the compiler's FMA contraction).  Where a sub-block's decoded scale is exactly
0, ggml leaves whatever levels its search produced while this code writes
level 0; both decode to the same values.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = ["KQUANTS", "QK_K", "quantize_kquant", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)  # ggml: amax below this counts as an all-zero group

# Super-blocks handled per vectorized pass.  Keeps every temporary around
# CHUNK_BLOCKS * 1 KiB (1 MiB at 1024), i.e. cache friendly and bounded memory.
CHUNK_BLOCKS = 1024

_f32 = np.float32
_u8 = np.uint8


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------

def _fp16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round to fp16 (round-to-nearest-even, like GGML_FP32_TO_FP16).

    Returns (float16 array, its float32 value)."""
    with np.errstate(over="ignore"):
        h = v.astype(np.float16)
    return h, h.astype(_f32)


def _to_columns(blocks: np.ndarray, n: int) -> np.ndarray:
    """(C, 256) -> contiguous (n, C*256/n): column b is sub-block b."""
    return np.ascontiguousarray(blocks.reshape(-1, n).T)


def _from_columns(levels: np.ndarray, n_blocks: int) -> np.ndarray:
    """(n, C*256/n) float levels -> (C, 256) uint8, original element order."""
    return levels.astype(_u8).T.reshape(n_blocks, QK_K)


def _signed_absmax(x: np.ndarray, axis: int) -> np.ndarray:
    """Value (with sign) of the element of largest magnitude along `axis` of a
    2-D array; the first one wins on ties (as ggml's strict `>` scan)."""
    hi = x.max(axis=axis)
    lo = x.min(axis=axis)
    res = np.where(hi >= -lo, hi, lo)
    tie = (hi == -lo) & (hi != 0)  # +a and -a both present: the first one counts
    if tie.any():
        sub = np.compress(tie, x, axis=1 - axis)  # 2-D only
        idx = np.abs(sub).argmax(axis=axis)
        res[tie] = np.take_along_axis(sub, np.expand_dims(idx, axis), axis=axis).squeeze(axis)
    return res


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum(a * b, axis=0) for (n, B) arrays."""
    return np.einsum("ij,ij->j", a, b)


def _pack_2bit(levels: np.ndarray) -> np.ndarray:
    """(C, 256) levels 0..3 -> (C, 64): byte 32*h + l holds elements
    128*h + 32*k + l at bits 2k..2k+1 (k = 0..3)."""
    q = levels.reshape(-1, 2, 4, 32)
    out = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return out.reshape(-1, 64)


def _requant(x: np.ndarray, d: np.ndarray, lo: int, hi: int, offset: np.ndarray | None = None) -> np.ndarray:
    """Levels clip(rint((x + offset) / d), lo, hi) with per-column d/offset;
    columns with d == 0 get level `lo` (they decode to the same value anyway)."""
    zero = d == 0
    d_safe = np.where(zero, _f32(1), d)
    t = x + offset if offset is not None else x.copy()
    np.divide(t, d_safe, out=t)
    np.rint(t, out=t)
    np.clip(t, lo, hi, out=t)
    if zero.any():
        t[:, zero] = lo
    return t


# --------------------------------------------------------------------------
# per-sub-block searches (all on the transposed (n, B) layout)
# --------------------------------------------------------------------------

def _make_qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
               nstep: int, use_mad: bool) -> tuple[np.ndarray, np.ndarray]:
    """Affine fit x ~ scale * l + min, l in 0..nmax, per column (ggml's make_qkx2_quants).

    Trial k = 0..nstep sets iscale = (rmin + rdelta*k + nmax) / (max - min),
    rounds, refits scale and min by weighted least squares (min clamped to
    <= 0) and keeps the trial if its weighted error (squared, or absolute with
    use_mad) beats the best so far.  As in ggml, the min of the best trial so
    far is the offset used by the following trials.

    Returns (scale, the_min) with the_min = -min >= 0, each shape (B,)."""
    mn = np.minimum(x.min(axis=0), _f32(0))
    mx = x.max(axis=0)
    degen = mx == mn                      # constant >= 0 column: scale 0, min = -x
    mx = np.where(degen, mn + _f32(1), mx)  # any finite range; such columns never update
    sum_w = w.sum(axis=0)
    sum_x = _rowdot(w, x)

    t = np.empty_like(x)
    wl = np.empty_like(x)

    def levels(iscale: np.ndarray, m: np.ndarray) -> None:
        np.subtract(x, m, out=t)
        np.multiply(t, iscale, out=t)
        np.rint(t, out=t)
        np.clip(t, 0, nmax, out=t)

    def sums():
        np.multiply(w, t, out=wl)
        return wl.sum(axis=0), _rowdot(wl, t), _rowdot(wl, x)  # sum w l, sum w l^2, sum w l x

    if use_mad:
        e = np.empty_like(x)

        def mad(s, m):  # sum w |s l + m - x|
            np.multiply(t, s, out=e)
            np.subtract(e, x, out=e)
            np.add(e, m, out=e)
            np.abs(e, out=e)
            return _rowdot(w, e)
    else:
        sum_x2 = _rowdot(w * x, x)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = _f32(nmax) / (mx - mn)
        scale = _f32(1) / iscale
        levels(iscale, mn)
        if use_mad:
            best = mad(scale, mn)
        else:
            # error of the plain min/max fit, expanded on the sums (float64: no fit
            # identity to lean on here, so guard against cancellation)
            s1, s2, sxl = (v.astype(np.float64) for v in sums())
            s, m = scale.astype(np.float64), mn.astype(np.float64)
            best = (s * s * s2 + 2 * s * m * s1 - 2 * s * sxl + m * m * sum_w
                    - 2 * m * sum_x + sum_x2).astype(_f32)

        for k in range(nstep + 1):
            iscale = (_f32(rmin) + _f32(rdelta) * _f32(k) + _f32(nmax)) / (mx - mn)
            levels(iscale, mn)
            s1, s2, sxl = sums()
            D = sum_w * s2 - s1 * s1
            this_scale = (sum_w * sxl - sum_x * s1) / D
            this_min = (s2 * sum_x - s1 * sxl) / D
            pos = this_min > 0
            if pos.any():  # min clamped to 0: refit the scale alone
                this_min = np.where(pos, _f32(0), this_min)
                this_scale = np.where(pos, sxl / s2, this_scale)
            if use_mad:
                cur = mad(this_scale, this_min)
            else:
                # weighted least-squares residual: sum w x^2 - s*sum w l x - m*sum w x
                cur = sum_x2 - this_scale * sxl - this_min * sum_x
            upd = (D > 0) & (cur < best)
            scale = np.where(upd, this_scale, scale)
            mn = np.where(upd, this_min, mn)
            best = np.where(upd, cur, best)

    scale = np.where(degen, _f32(0), scale).astype(_f32)
    return scale, (-mn).astype(_f32)


def _make_qx(x: np.ndarray, nmax: int) -> np.ndarray:
    """Symmetric fit, levels -nmax..nmax-1, weights x^2 (ggml's make_qx_quants, rmse_type 1).

    Returns the (signed) scale per column; the column's largest-magnitude
    element maps to level -nmax, i.e. scale has the opposite sign of it."""
    mx = _signed_absmax(x, axis=0)
    zero = np.abs(mx) < GROUP_MAX_EPS
    mx = np.where(zero, _f32(1), mx)
    w = x * x
    t = np.empty_like(x)
    wl = np.empty_like(x)

    def sums(iscale):
        np.multiply(x, iscale, out=t)
        np.rint(t, out=t)
        np.clip(t, -nmax, nmax - 1, out=t)
        np.multiply(w, t, out=wl)
        return _rowdot(wl, x), _rowdot(wl, t)  # sum w x l, sum w l^2

    with np.errstate(divide="ignore", invalid="ignore"):
        sumlx, suml2 = sums(_f32(-nmax) / mx)
        scale = np.where(suml2 > 0, sumlx / suml2, _f32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            sumlx, suml2 = sums(-(_f32(nmax) + _f32(0.1) * _f32(step)) / mx)
            upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            scale = np.where(upd, sumlx / suml2, scale)
            best = np.where(upd, scale * sumlx, best)
    return np.where(zero, _f32(0), scale).astype(_f32)


def _make_q3(x: np.ndarray, nmax: int = 4, n_iter: int = 5) -> np.ndarray:
    """Symmetric fit, levels -nmax..nmax-1, weights x^2, refined by coordinate
    descent (ggml's make_q3_quants with do_rmse).  Returns the signed scale."""
    mx = _signed_absmax(x, axis=0)
    zero = np.abs(mx) < GROUP_MAX_EPS
    mx = np.where(zero, _f32(1), mx)
    L = x * (_f32(-nmax) / mx)
    np.rint(L, out=L)
    np.clip(L, -nmax, nmax - 1, out=L)
    w = x * x
    wx = w * x
    sumlx = _rowdot(wx, L)
    suml2 = _rowdot(w * L, L)
    # ggml stops a sub-block's descent after a sweep without change; such a
    # sub-block is at a fixed point, so only the columns that changed in the
    # previous sweep are carried into the next one (usually ~20%, then ~5%...).
    cols = None
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(n_iter):
            if cols is None:
                xs, ws, wxs, Ls = x, w, wx, L
                slx_all, sl2_all = sumlx, suml2
            else:
                xs, ws, wxs, Ls = x[:, cols], w[:, cols], wx[:, cols], L[:, cols]
                slx_all, sl2_all = sumlx[cols], suml2[cols]
            changed = _q3_sweep(xs, ws, wxs, Ls, slx_all, sl2_all, nmax)
            if cols is None:
                cols = np.flatnonzero(changed)
            else:
                L[:, cols] = Ls
                sumlx[cols] = slx_all
                suml2[cols] = sl2_all
                cols = cols[changed]
            if cols.size == 0:
                break
        scale = np.where(suml2 > 0, sumlx / suml2, _f32(0))
    return np.where(zero, _f32(0), scale).astype(_f32)


def _q3_sweep(x, w, wx, L, sumlx, suml2, nmax) -> np.ndarray:
    """One Gauss-Seidel sweep of make_q3_quants over the positions of the
    sub-blocks (columns), in ggml's order; updates L, sumlx, suml2 in place.
    Returns the mask of columns where some level changed."""
    changed = np.zeros(x.shape[1], dtype=bool)
    for i in range(x.shape[0]):
        xi, wi, wxi, li = x[i], w[i], wx[i], L[i]
        slx0 = sumlx - wxi * li
        sl20 = suml2 - wi * li * li
        new_l = np.rint(xi * sl20 / slx0)
        np.clip(new_l, -nmax, nmax - 1, out=new_l)
        slx = slx0 + wxi * new_l
        sl2 = sl20 + wi * new_l * new_l
        acc = (slx0 > 0) & (new_l != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
        idx = np.flatnonzero(acc)  # few columns accept per position
        if idx.size:
            changed[idx] = True
            li[idx] = new_l[idx]
            sumlx[idx] = slx[idx]
            suml2[idx] = sl2[idx]
    return changed


# --------------------------------------------------------------------------
# the types
# --------------------------------------------------------------------------

class _KQuant:
    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]

    def __init__(self) -> None:
        raise TypeError("K-quant classes are used through their classmethods")

    def __init_subclass__(cls, qtype: GGMLQuantizationType) -> None:
        cls.qtype = qtype
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        assert cls.block_size == QK_K

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """(n_blocks, 256) float32 -> (n_blocks, type_size) uint8."""
        raise NotImplementedError

    @classmethod
    def quantize(cls, data: np.ndarray, chunk_blocks: int = CHUNK_BLOCKS) -> np.ndarray:
        data = np.asarray(data)
        if data.ndim == 0 or data.shape[-1] % QK_K != 0:
            raise ValueError(
                f"cannot quantize shape {data.shape} to {cls.qtype.name}: "
                f"last dimension must be a multiple of {QK_K}")
        out_shape = (*data.shape[:-1], data.shape[-1] // QK_K * cls.type_size)
        blocks = data.reshape(-1, QK_K)
        out = np.empty((blocks.shape[0], cls.type_size), dtype=_u8)
        for start in range(0, blocks.shape[0], chunk_blocks):
            chunk = np.ascontiguousarray(blocks[start:start + chunk_blocks], dtype=_f32)
            res = cls.quantize_blocks(chunk)
            assert res.dtype == _u8 and res.shape == (chunk.shape[0], cls.type_size)
            out[start:start + chunk.shape[0]] = res
        return out.reshape(out_shape)


# Q2_K  (84 bytes per 256 weights, 2.625 bpw), value = d*sc*q - dmin*m
#
#   offset size  field
#   0      16    scales[16]: sub-block j (16 weights each, j = 0..15) in byte j:
#                  low nibble = sc_j (4-bit scale), high nibble = m_j (4-bit min)
#   16     64    qs[64]: 2-bit levels q in 0..3.  Byte 32*h + l (h = 0..1,
#                  l = 0..31) holds weight 128*h + 32*k + l at bits 2k..2k+1
#                  (k = 0..3), i.e. four weights 32 apart share a byte
#   80     2     d    fp16, super-block scale of the sub-block scales
#   82     2     dmin fp16, super-block scale of the sub-block mins
#
#   weight i decodes as d*sc_j*q_i - dmin*m_j with j = i // 16.
class Q2_K(_KQuant, qtype=GGMLQuantizationType.Q2_K):
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        C = blocks.shape[0]
        x = _to_columns(blocks, 16)                                # (16, C*16)
        scales, mins = _make_qkx2(x, np.abs(x), 3, -0.5, 0.1, 15, use_mad=True)
        scales, mins = scales.reshape(C, 16), mins.reshape(C, 16)

        with np.errstate(divide="ignore", invalid="ignore"):
            max_scale = np.maximum(scales.max(axis=1), _f32(0))
            max_min = np.maximum(mins.max(axis=1), _f32(0))
            has_s, has_m = max_scale > 0, max_min > 0
            ls = np.rint(scales * np.where(has_s, _f32(15) / max_scale, _f32(0))[:, None])
            lm = np.rint(mins * np.where(has_m, _f32(15) / max_min, _f32(0))[:, None])
            ls = np.clip(ls, 0, 15).astype(_u8)
            lm = np.clip(lm, 0, 15).astype(_u8)
            d16, d = _fp16(np.where(has_s, max_scale / _f32(15), _f32(0)))
            m16, dm = _fp16(np.where(has_m, max_min / _f32(15), _f32(0)))

        dj = (d[:, None] * ls).reshape(-1)
        mj = (dm[:, None] * lm).reshape(-1)
        L = _from_columns(_requant(x, dj, 0, 3, offset=mj), C)

        return np.concatenate([
            ls | (lm << 4),
            _pack_2bit(L),
            d16.view(_u8).reshape(C, 2),
            m16.view(_u8).reshape(C, 2),
        ], axis=1)


# Q3_K  (110 bytes per 256 weights, 3.4375 bpw), value = d*(s-32)*(q-4), symmetric
#
#   offset size  field
#   0      32    hmask[32]: high (third) bit of each level.  Weight i sits in
#                  byte i % 32 at bit i // 32.  Bit set means q >= 4; note that
#                  the *clear* bit is the one that subtracts 4 on decode.
#   32     64    qs[64]: low two bits of the levels, same 2-bit packing as Q2_K
#                  (byte 32*h + l, bits 2k..2k+1 <-> weight 128*h + 32*k + l)
#   96     12    scales: sixteen 6-bit sub-block scales s_j (0..63, stored
#                  +32 offset, i.e. the signed scale is s_j - 32):
#                  bytes 0..7:  low nibble = s_j & 15 (j = 0..7),
#                               high nibble = s_{j+8} & 15
#                  bytes 8..11: byte 8+k holds (s_{4g+k} >> 4) at bits 2g..2g+1
#                               (g = 0..3)
#   108    2     d   fp16 super-block scale
#
#   weight i decodes as d*(s_j - 32)*(q_i - 4) with j = i // 16, q_i in 0..7.
#   ggml maps the largest-magnitude scale of a super-block to -32 (and the
#   largest-magnitude weight of a sub-block to level -4), using the asymmetric
#   ranges fully; d may therefore be negative.
class Q3_K(_KQuant, qtype=GGMLQuantizationType.Q3_K):
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        C = blocks.shape[0]
        x = _to_columns(blocks, 16)                                # (16, C*16)
        scales = _make_q3(x).reshape(C, 16)

        max_scale = _signed_absmax(scales, axis=1)
        has = max_scale != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = np.where(has, _f32(-32) / np.where(has, max_scale, _f32(1)), _f32(0))
            ls = np.clip(np.rint(iscale[:, None] * scales), -32, 31) + 32
            d16, d = _fp16(np.where(has, _f32(1) / np.where(has, iscale, _f32(1)), _f32(0)))
        ls = np.where(has[:, None], ls, _f32(0)).astype(_u8)       # ggml: all-zero bytes

        dj = (d[:, None] * (ls.astype(_f32) - 32)).reshape(-1)
        L = _from_columns(_requant(x, dj, -4, 3) + 4, C)           # 0..7

        hi = (L >> 2).reshape(C, 8, 32)
        hmask = np.zeros((C, 32), dtype=_u8)
        for b in range(8):
            hmask |= hi[:, b] << b
        sc = np.empty((C, 12), dtype=_u8)
        sc[:, 0:8] = (ls[:, 0:8] & 0xF) | ((ls[:, 8:16] & 0xF) << 4)
        h = (ls >> 4).reshape(C, 4, 4)                             # [g, k] = s_{4g+k} >> 4
        sc[:, 8:12] = h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)

        return np.concatenate([
            hmask,
            _pack_2bit(L & 3),
            sc,
            d16.view(_u8).reshape(C, 2),
        ], axis=1)


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins (C, 8) -> the 12 bytes of Q4_K/Q5_K.

    bytes 0..3:  bits 0..5 = sc_j (j = 0..3),  bits 6..7 = sc_{j+4} >> 4
    bytes 4..7:  bits 0..5 = m_j  (j = 0..3),  bits 6..7 = m_{j+4} >> 4
    bytes 8..11: low nibble = sc_{j+4} & 15,  high nibble = m_{j+4} & 15
    (ggml's get_scale_min_k4 is the inverse)."""
    out = np.empty((ls.shape[0], 12), dtype=_u8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _affine_32(blocks: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Shared Q4_K/Q5_K path: returns (levels (C,256) uint8, ls, lm, d16, dmin16)."""
    C = blocks.shape[0]
    x = _to_columns(blocks, 32)                                    # (32, C*8)
    # ggml weights: sqrt(mean x^2) of the sub-block + |x|
    av_x = np.sqrt(_rowdot(x, x) / _f32(32))
    w = np.abs(x)
    w += av_x
    scales, mins = _make_qkx2(x, w, nmax, rmin, 0.1, nstep, use_mad=False)
    scales, mins = scales.reshape(C, 8), mins.reshape(C, 8)

    with np.errstate(divide="ignore", invalid="ignore"):
        max_scale = np.maximum(scales.max(axis=1), _f32(0))
        max_min = np.maximum(mins.max(axis=1), _f32(0))
        inv_s = np.where(max_scale > 0, _f32(63) / max_scale, _f32(0))
        inv_m = np.where(max_min > 0, _f32(63) / max_min, _f32(0))
        ls = np.clip(np.rint(inv_s[:, None] * scales), 0, 63).astype(_u8)
        lm = np.clip(np.rint(inv_m[:, None] * mins), 0, 63).astype(_u8)
        d16, d = _fp16(max_scale / _f32(63))
        m16, dm = _fp16(max_min / _f32(63))

    dj = (d[:, None] * ls).reshape(-1)
    mj = (dm[:, None] * lm).reshape(-1)
    L = _from_columns(_requant(x, dj, 0, nmax, offset=mj), C)
    return L, ls, lm, d16, m16


# Q4_K  (144 bytes per 256 weights, 4.5 bpw), value = d*sc*q - dmin*m
#
#   offset size  field
#   0      2     d    fp16 super-block scale of the 6-bit sub-block scales
#   2      2     dmin fp16 super-block scale of the 6-bit sub-block mins
#   4      12    scales: eight 6-bit scales sc_j and eight 6-bit mins m_j
#                  (sub-blocks of 32 weights), packed as in _pack_scale_min_k4
#   16     128   qs: 4-bit levels.  Byte 32*c + l (c = 0..3, l = 0..31):
#                  low nibble = weight 64*c + l, high nibble = weight 64*c + 32 + l
#
#   weight i decodes as d*sc_j*q_i - dmin*m_j with j = i // 32, q_i in 0..15.
class Q4_K(_KQuant, qtype=GGMLQuantizationType.Q4_K):
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        C = blocks.shape[0]
        L, ls, lm, d16, m16 = _affine_32(blocks, 15, -1.0, 20)
        q = L.reshape(C, 4, 2, 32)
        qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(C, 128)
        return np.concatenate([
            d16.view(_u8).reshape(C, 2),
            m16.view(_u8).reshape(C, 2),
            _pack_scale_min_k4(ls, lm),
            qs,
        ], axis=1)


# Q5_K  (176 bytes per 256 weights, 5.5 bpw), value = d*sc*q - dmin*m
#
#   offset size  field
#   0      2     d    fp16
#   2      2     dmin fp16
#   4      12    scales: as Q4_K (_pack_scale_min_k4)
#   16     32    qh: fifth bit of the levels.  Byte l (l = 0..31) holds at bit
#                  2*c   the high bit of weight 64*c + l and at bit
#                  2*c+1 the high bit of weight 64*c + 32 + l  (c = 0..3)
#   48     128   qs: low 4 bits, packed exactly as Q4_K's qs
#
#   weight i decodes as d*sc_j*q_i - dmin*m_j with j = i // 32, q_i in 0..31.
class Q5_K(_KQuant, qtype=GGMLQuantizationType.Q5_K):
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        C = blocks.shape[0]
        L, ls, lm, d16, m16 = _affine_32(blocks, 31, -0.5, 15)
        q = L.reshape(C, 4, 2, 32)
        lo = q & 0xF
        hi = q >> 4
        qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(C, 128)
        qh = np.zeros((C, 32), dtype=_u8)
        for c in range(4):
            qh |= (hi[:, c, 0] << (2 * c)) | (hi[:, c, 1] << (2 * c + 1))
        return np.concatenate([
            d16.view(_u8).reshape(C, 2),
            m16.view(_u8).reshape(C, 2),
            _pack_scale_min_k4(ls, lm),
            qh,
            qs,
        ], axis=1)


# Q6_K  (210 bytes per 256 weights, 6.5625 bpw), value = d*sc*(q-32), symmetric
#
#   offset size  field
#   0      128   ql: low 4 bits of the 6-bit levels.  For half h = 0..1 and
#                  l = 0..31 (weight index 128*h + 32*k + l, k = 0..3):
#                    byte 64*h + l      : low nibble k=0, high nibble k=2
#                    byte 64*h + 32 + l : low nibble k=1, high nibble k=3
#   128    64    qh: high 2 bits.  Byte 32*h + l holds weight 128*h + 32*k + l
#                  at bits 2k..2k+1
#   192    16    scales: int8 (two's complement) sub-block scales, one per 16
#                  weights; the largest-magnitude one is -128, others clipped
#                  to <= 127
#   208    2     d   fp16 super-block scale (may be negative)
#
#   weight i decodes as d*scales[i // 16]*(q_i - 32), q_i in 0..63.
class Q6_K(_KQuant, qtype=GGMLQuantizationType.Q6_K):
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        C = blocks.shape[0]
        x = _to_columns(blocks, 16)                                # (16, C*16)
        scales = _make_qx(x, 32).reshape(C, 16)

        max_scale = _signed_absmax(scales, axis=1)
        zero = np.abs(max_scale) < GROUP_MAX_EPS
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = _f32(-128) / np.where(zero, _f32(1), max_scale)
            sc = np.clip(np.rint(iscale[:, None] * scales), -128, 127)
            d16, d = _fp16(_f32(1) / iscale)
        sc = np.where(zero[:, None], _f32(0), sc).astype(np.int8)
        d16 = np.where(zero, np.float16(0), d16)
        d = np.where(zero, _f32(0), d)

        dj = (d[:, None] * sc).reshape(-1).astype(_f32)
        L = _from_columns(_requant(x, dj, -32, 31) + 32, C)        # 0..63
        q = L.reshape(C, 2, 4, 32)
        lo = q & 0xF
        hi = q >> 4
        ql = (lo[:, :, 0:2] | (lo[:, :, 2:4] << 4)).reshape(C, 128)
        qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(C, 64)
        return np.concatenate([
            ql,
            qh,
            sc.view(_u8),
            d16.view(_u8).reshape(C, 2),
        ], axis=1)


KQUANTS: dict[GGMLQuantizationType, type[_KQuant]] = {
    GGMLQuantizationType.Q2_K: Q2_K,
    GGMLQuantizationType.Q3_K: Q3_K,
    GGMLQuantizationType.Q4_K: Q4_K,
    GGMLQuantizationType.Q5_K: Q5_K,
    GGMLQuantizationType.Q6_K: Q6_K,
}


def quantize_kquant(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Quantize float data to a ggml K-quant type (Q2_K..Q6_K).

    Same contract as ``gguf.quants.quantize``: last dim must be a multiple of
    256 (ValueError otherwise); returns uint8 of shape
    (*data.shape[:-1], data.shape[-1]//256*type_size).  Input must be finite;
    as in ggml the super-block scales are fp16, so magnitudes above ~1e6
    (Q2_K) to ~1e8 (Q6_K) overflow them."""
    try:
        cls = KQUANTS[GGMLQuantizationType(qtype)]
    except (KeyError, ValueError):
        raise ValueError(f"{qtype!r} is not a K-quant type this module quantizes "
                         f"({', '.join(t.name for t in KQUANTS)})") from None
    return cls.quantize(data)
