"""ggml's weighted ("importance matrix") quantizers in vectorized numpy.

ggml has two searches per GGUF type. ``quantize_row_*_ref`` (what gguf-py's Q4_0..Q5_1 and
qconvert's :mod:`.kquants` reproduce) is used when ``quantize_<type>(..., quant_weights=NULL)``;
given an importance matrix (one weight per column of the row, ``quant_weights[n_per_row]``),
``quantize_row_<type>_impl`` runs a longer weighted search instead. stable-diffusion.cpp passes
an all-ones matrix, which is what :func:`quantize_weighted` does by default; its error is lower
than the reference path's (Q4_0 0.0592 vs 0.0651 on sd.cpp's tensors).

Types with a weighted path (ggml-quants.c, ggml d99724f2):

=====  ========================================================================================
Q4_0   make_qx_quants(32, nmax 8) with w = qw*sqrt(sigma2 + x^2), sigma2 = mean x^2 of the ROW
Q5_0   make_qx_quants(32, nmax 16), same weights
Q4_1   make_qkx3_quants(32, nmax 15, rmin -0.9, rdelta 0.05, 36 steps), same weights
Q5_1   make_qkx3_quants(32, nmax 31, ...), same weights
Q2_K   qkx3 per 16 (nmax 3), w = qw*sqrt(sigma2 + x^2) with sigma2 = mean x^2 of the
       super-block; 4-bit scales and mins by make_qp_quants weighted by the sub-block sums
Q3_K   make_qx_quants per 16 (nmax 4), sigma2 = 2*mean x^2; 6-bit scales by make_qx_quants(32)
Q4_K   qkx3 per 32 (nmax 15), sigma2 = 2*mean x^2; 6-bit scales/mins by make_qp_quants(63)
Q5_K   as Q4_K with nmax 31
Q6_K   make_qx_quants per 16 (nmax 32) with w = qw itself (the reference uses w = x^2)
=====  ========================================================================================

Q8_0 (and F16/BF16) ignore quant_weights in ggml: there is no weighted path to take.

Exactness: every float operation is the one ggml's C code performs, in the same order, in
float32 (products associate as in C, sums run sequentially over a block: numpy's reduction
over axis 0 of an (n, B) array adds row after row), so the bytes equal ggml's built without
FMA contraction (x86-64 baseline ``-O2``, as bench/make_weighted_golden.py does). Levels that
ggml keeps from a search (a sub-block whose decoded scale is 0; the legacy types, which are
not re-quantized) are recomputed from the winning trial's inverse scale and offset, which
gives the same integers. Layout as in :mod:`.kquants`: a chunk is transposed to
``(elements_per_block, n_blocks)`` so per-block scalars broadcast along the contiguous axis.

Weights are pluggable: ``weights`` is ggml's ``quant_weights``, one float per column of the
row (shape ``(n_per_row,)``) or one per element (the data's shape); None means all ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .kquants import _fp16, _pack_2bit, _pack_scale_min_k4, _signed_absmax

__all__ = ["WEIGHTED_TYPES", "quantize_weighted"]

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
CHUNK_ELEMENTS = 1 << 18  # values per pass: 1 MiB temporaries stay in cache (at 1 << 20 Q4_0 ran 3x slower)

_f32 = np.float32
_u8 = np.uint8


# --------------------------------------------------------------------------
# helpers (columns layout: x is (n, B), one block per column)
# --------------------------------------------------------------------------

def _sum0(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in row order: ggml's sequential ``for (i...) s += a[i]``."""
    return a.sum(axis=0)


def _cols(a: np.ndarray, n: int) -> np.ndarray:
    """(..., k*n) -> contiguous (n, B): column b is block b of n consecutive values."""
    return np.ascontiguousarray(a.reshape(-1, n).T)


def _uncols(levels: np.ndarray, n_rows: int) -> np.ndarray:
    """(n, B) levels -> (n_rows, B*n/n_rows) uint8 in the original element order."""
    return _wrap8(levels).T.reshape(n_rows, -1)


def _wrap8(v: np.ndarray) -> np.ndarray:
    """int -> uint8_t as C stores it (modulo 256)."""
    return v.astype(np.int32).astype(_u8)


def _c_nearest_int(t: np.ndarray) -> np.ndarray:
    """ggml's nearest_int bit for bit, also where np.rint differs: |t| >= 2**22, inf, NaN
    (C: the bits of t + 1.5*2**23; inf -> -4194304, NaN -> 0)."""
    with np.errstate(invalid="ignore", over="ignore"):
        v = (t.astype(_f32) + _f32(12582912)).view(np.int32)
    return ((v & 0x007FFFFF) - 0x00400000).astype(_f32)


def _round_cols(t: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """rint in place, with C's nearest_int on the columns flagged ``bad`` (a scale that
    overflowed: subnormal or float-max data); those are rare, so the common path is one pass."""
    if bad.any():
        idx = np.flatnonzero(bad)
        fix = _c_nearest_int(t[:, idx])
        np.rint(t, out=t)
        t[:, idx] = fix
        return t
    return np.rint(t, out=t)


def _weights(x: np.ndarray, sigma2: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """ggml's qw[i] * sqrtf(sigma2 + x[i]*x[i]); qw None = all ones (1*y == y exactly)."""
    w = x * x
    w += sigma2
    np.sqrt(w, out=w)
    if qw is not None:
        w = qw * w
    return w


# --------------------------------------------------------------------------
# the three searches of ggml-quants.c
# --------------------------------------------------------------------------

def _qx_levels(x: np.ndarray, iscale: np.ndarray, nmax: int, mx: np.ndarray, nan: np.ndarray) -> np.ndarray:
    t = x * iscale
    with np.errstate(invalid="ignore", over="ignore"):
        bad = ~np.isfinite(iscale * mx) | nan  # |x| <= |max|: only an overflowed iscale (or NaN) can go wrong
    _round_cols(t, bad)
    return np.clip(t, -nmax, nmax - 1, out=t)


def _make_qx(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type 1, qw=w): symmetric levels -nmax..nmax-1.

    The largest-magnitude element maps to -nmax; 18 more trial inverse scales
    -(nmax + 0.1*is)/max; a trial wins if (sum w x l)^2 / sum w l^2 grows; the scale is the
    weighted least-squares fit. Returns (scale, stored levels l + nmax, 0 for all-zero)."""
    from .ggml_jit import make_qx_search
    if make_qx_search is not None:  # the search compiled (one fused pass per trial); levels here
        scale, best_is, mx, zero, nan = make_qx_search(x, w, nmax)  # nan: Q3_K's second level on float-max data
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            levels = _qx_levels(x, best_is, nmax, mx, nan) + _f32(nmax)
        levels[:, zero] = 0
        return scale, levels
    mx = _signed_absmax(x, axis=0)
    nan = np.isnan(mx)
    if nan.any():  # NaN scales (weights overflowed on float-max data): C's `fabsf(x) > amax` skips them
        nan = np.isnan(x).any(axis=0)
        mx = _signed_absmax(np.where(np.isnan(x), _f32(0), x), axis=0)
    zero = np.abs(mx) < GROUP_MAX_EPS
    mx = np.where(zero, _f32(1), mx)
    wx = w * x

    def sums(iscale):
        lv = _qx_levels(x, iscale, nmax, mx, nan)
        return _sum0(wx * lv), _sum0(w * lv * lv)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        best_is = _f32(-nmax) / mx
        sumlx, suml2 = sums(best_is)
        scale = np.where(suml2 != 0, sumlx / suml2, _f32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(_f32(nmax) + _f32(0.1) * _f32(step)) / mx
            sumlx, suml2 = sums(iscale)
            upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            scale = np.where(upd, sumlx / suml2, scale)
            best = np.where(upd, scale * sumlx, best)
            best_is = np.where(upd, iscale, best_is)
        levels = _qx_levels(x, best_is, nmax, mx, nan) + _f32(nmax)
    levels[:, zero] = 0
    return np.where(zero, _f32(0), scale).astype(_f32), levels


class _Qkx3:
    """make_qkx3_quants(n, nmax, x, weights, ..., rmin -0.9, rdelta 0.05, nstep 36, mse).

    Affine fit x ~ scale*l + min (min <= 0), l in 0..nmax. Trial k sets the inverse scale
    (rmin + rdelta*k + nmax)/(max - min) with the min of the best trial so far, refits scale
    and min by weighted least squares and keeps the trial if sum w (scale*l + min - x)^2
    (summed element by element, as ggml does) is lower. Attributes after the search:
    scale, the_min (= -min), and the winning (iscale, offset) pair that reproduces the levels."""

    def __init__(self, x: np.ndarray, w: np.ndarray, nmax: int, rmin: float = -0.9,
                 rdelta: float = 0.05, nstep: int = 36) -> None:
        self.x, self.nmax = x, nmax
        from .ggml_jit import qkx3_search
        if qkx3_search is not None:  # the same search compiled: two fused passes per trial
            (self.scale, mn, self.iscale, self.offset, self.xmin, self.xmax,
             self.degen) = qkx3_search(x, w, nmax, rmin, rdelta, nstep)
            self.the_min = (-mn).astype(_f32)
            return
        self.w = w
        self.xmin, self.xmax = x.min(axis=0), x.max(axis=0)
        mn = np.where(self.xmin > 0, _f32(0), self.xmin)  # `if (min > 0) min = 0;` (-0.0 stays, as in C)
        self.degen = self.xmax <= mn
        mx = np.where(self.degen, mn + _f32(1), self.xmax)  # any finite range; never updated below
        self.sum_w, self.sum_x = _sum0(w), _sum0(w * x)
        self._lv, self._tmp = np.empty_like(x), np.empty_like(x)
        xm = x - mn  # x - min for the current min; refreshed where a trial changes the min
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            iscale = _f32(nmax) / (mx - mn)
            scale = _f32(1) / iscale
            best = self._error(self._levels(xm, iscale, mn), scale, mn)
            self.iscale, self.offset = iscale, mn
            for k in range(nstep + 1):
                iscale = (_f32(rmin) + _f32(rdelta) * _f32(k) + _f32(nmax)) / (mx - mn)
                t_scale, t_min, D = self._fit(self._levels(xm, iscale, mn))
                cur = self._error(self._lv, t_scale, t_min)
                upd = (D > 0) & (cur < best) & ~self.degen
                if not upd.any():
                    continue
                self.iscale = np.where(upd, iscale, self.iscale)
                self.offset = np.where(upd, mn, self.offset)
                best = np.where(upd, cur, best)
                scale = np.where(upd, t_scale, scale)
                mn = np.where(upd, t_min, mn)
                np.subtract(x, mn, out=xm)  # one contiguous pass beats a column gather/scatter
        self.scale = np.where(self.degen, _f32(0), scale).astype(_f32)
        self.the_min = (-mn).astype(_f32)
        del self._lv, self._tmp, self.w

    def _levels(self, xm: np.ndarray, iscale: np.ndarray, mn: np.ndarray) -> np.ndarray:
        """clip(nearest_int(iscale*(x - min)), 0, nmax) into the levels buffer."""
        t = np.multiply(xm, iscale, out=self._lv)
        bad = ~(np.isfinite(iscale * (self.xmax - mn)) & np.isfinite(iscale * (self.xmin - mn)))
        _round_cols(t, bad)
        return np.clip(t, 0, self.nmax, out=t)

    def _fit(self, lv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Weighted least-squares scale and min for levels lv (min clamped to <= 0), and D."""
        wl = np.multiply(self.w, lv, out=self._tmp)
        s_l = _sum0(wl)
        s_xl = _sum0(wl * self.x)
        s_l2 = _sum0(np.multiply(wl, lv, out=wl))
        sum_w, sum_x = self.sum_w, self.sum_x
        D = sum_w * s_l2 - s_l * s_l
        t_scale = (sum_w * s_xl - sum_x * s_l) / D
        t_min = (s_l2 * sum_x - s_l * s_xl) / D
        pos = t_min > 0
        return np.where(pos, s_xl / s_l2, t_scale), np.where(pos, _f32(0), t_min), D

    def _error(self, lv, scale, mn) -> np.ndarray:
        """sum w*d*d with d = scale*l + min - x, element by element (as ggml)."""
        e = np.multiply(lv, scale, out=self._tmp)
        e += mn
        e -= self.x
        e *= e
        e *= self.w
        return _sum0(e)

    def levels(self, cols: np.ndarray | slice = slice(None)) -> np.ndarray:
        """The levels ggml keeps from the search (all columns, or the selected ones)."""
        iscale, off = self.iscale[cols], self.offset[cols]
        t = self.x[:, cols] - off
        t *= iscale
        with np.errstate(invalid="ignore", over="ignore"):
            bad = ~(np.isfinite(iscale * (self.xmax[cols] - off)) & np.isfinite(iscale * (self.xmin[cols] - off)))
        _round_cols(t, bad)
        np.clip(t, 0, self.nmax, out=t)
        t[:, self.degen[cols]] = 0
        return t


def _make_qp(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants(n, nmax, x, L, quant_weights=w): non-negative levels 0..nmax for the
    sub-block scales (or mins) of a super-block, one super-block per column.

    9 trial inverse scales (0.1*is + nmax)/max by weighted squared error, then up to 5
    coordinate-descent sweeps maximising (sum w x l)^2 / sum w l^2. Returns (scale, levels
    as the uint8_t array ggml stores)."""
    from .ggml_jit import make_qp_search
    if make_qp_search is not None:  # the same code compiled, one column at a time
        return make_qp_search(x, w, nmax)
    mx = np.maximum(x.max(axis=0), _f32(0))
    zero = mx < GROUP_MAX_EPS
    mx = np.where(zero, _f32(1), mx)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = _f32(nmax) / mx
        lv = _wrap8(np.rint(iscale * x)).astype(_f32)  # read back from uint8_t L[]
        diff = x - (_f32(1) / iscale) * lv
        best = _sum0(w * diff * diff)
        for step in range(-4, 5):
            if step == 0:
                continue
            is_ = (_f32(0.1) * _f32(step) + _f32(nmax)) / mx
            lv = np.minimum(np.rint(is_ * x), _f32(nmax))
            diff = x - (_f32(1) / is_) * lv
            mse = _sum0(w * diff * diff)
            upd = mse < best
            best = np.where(upd, mse, best)
            iscale = np.where(upd, is_, iscale)
        lv = np.minimum(np.rint(iscale * x), _f32(nmax))
        wx = w * x
        sumlx, suml2 = _sum0(wx * lv), _sum0(w * lv * lv)
        L = _wrap8(lv).astype(_f32)  # uint8_t L[]: the descent reads the stored value
        _qp_descent(x, w, wx, L, sumlx, suml2, nmax)
        scale = np.where(suml2 > 0, sumlx / suml2, _f32(0))
    L[:, zero] = 0
    return np.where(zero, _f32(0), scale).astype(_f32), L.astype(_u8)


def _qp_descent(x, w, wx, L, sumlx, suml2, nmax: int) -> None:
    """make_qp_quants' sweeps, in place. A sweep that changes nothing leaves the state as it
    was, so running every column through all 5 sweeps equals ggml's early exit."""
    for _ in range(5):
        any_change = False
        for i in range(x.shape[0]):
            li = L[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            ok = (slx > 0) & (sl2 > 0)
            new_l = np.minimum(np.rint(x[i] * sl2 / slx), _f32(nmax))
            slx = slx + wx[i] * new_l
            sl2 = sl2 + w[i] * new_l * new_l
            acc = ok & (new_l != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            if acc.any():
                any_change = True
                L[i] = np.where(acc, _wrap8(new_l), li)
                sumlx[...] = np.where(acc, slx, sumlx)
                suml2[...] = np.where(acc, sl2, suml2)
        if not any_change:
            return


# --------------------------------------------------------------------------
# legacy types (blocks of 32, sigma2 over the whole row, levels straight from the search)
# --------------------------------------------------------------------------

def _legacy_prologue(rows: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """rows (R, N) -> (x, w) in the (32, R*N/32) columns layout."""
    R, N = rows.shape
    sumx2 = _sum0(np.ascontiguousarray(rows.T) ** 2)            # sequential over the row
    sigma2 = np.repeat(sumx2 / _f32(N), N // 32)
    x = _cols(rows, 32)
    return x, _weights(x, sigma2, None if qw is None else _cols(qw, 32))


def _qh_bits(L: np.ndarray) -> np.ndarray:
    """(B, 32) levels 0..31 -> (B, 4) qh: bit j of the little-endian uint32 = bit 4 of L[j]."""
    hi = (L >> 4).astype(np.uint32)
    qh = np.zeros(L.shape[0], dtype=np.uint32)
    for j in range(32):
        qh |= hi[:, j] << np.uint32(j)
    return qh.astype("<u4").view(_u8).reshape(-1, 4)


def _nibbles(L: np.ndarray) -> np.ndarray:
    """(B, 32) -> (B, 16): byte j = (L[j] & 15) | (L[j+16] & 15) << 4."""
    return (L[:, :16] & 0xF) | ((L[:, 16:] & 0xF) << 4)


# Q4_0 (18 bytes / 32): d fp16 | qs[16] (byte j: low nibble = weight j, high = weight j+16),
#   weight = d * (q - 8).  Q5_0 (22 bytes): d | qh u32 (bit j = 5th bit of weight j) | qs[16],
#   weight = d * (q - 16).
def _q4_0(rows, qw):
    x, w = _legacy_prologue(rows, qw)
    scale, L = _make_qx(x, w, 8)
    L = _wrap8(L).T
    return np.concatenate([_fp16(scale)[0].view(_u8).reshape(-1, 2), _nibbles(L)], axis=1)


def _q5_0(rows, qw):
    x, w = _legacy_prologue(rows, qw)
    scale, L = _make_qx(x, w, 16)
    L = _wrap8(L).T
    return np.concatenate([_fp16(scale)[0].view(_u8).reshape(-1, 2), _qh_bits(L), _nibbles(L)], axis=1)


# Q4_1 (20 bytes / 32): d fp16 | m fp16 | qs[16], weight = d*q + m.  Q5_1 (24 bytes):
#   d | m | qh u32 | qs[16].  m is the (non-positive) min of the affine fit.
def _affine_legacy(rows, qw, nmax):
    x, w = _legacy_prologue(rows, qw)
    fit = _Qkx3(x, w, nmax)
    L = _wrap8(fit.levels()).T
    d16 = _fp16(fit.scale)[0].view(_u8).reshape(-1, 2)
    m16 = _fp16(-fit.the_min)[0].view(_u8).reshape(-1, 2)
    return L, d16, m16


def _q4_1(rows, qw):
    L, d16, m16 = _affine_legacy(rows, qw, 15)
    return np.concatenate([d16, m16, _nibbles(L)], axis=1)


def _q5_1(rows, qw):
    L, d16, m16 = _affine_legacy(rows, qw, 31)
    return np.concatenate([d16, m16, _qh_bits(L), _nibbles(L)], axis=1)


# --------------------------------------------------------------------------
# K types (super-blocks of 256, sigma2 per super-block, re-quantized with the decoded scales)
# --------------------------------------------------------------------------

def _k_prologue(blocks, qw, sub: int, sigma_factor: float):
    """blocks (C, 256) -> (x, w, sw) with x, w (sub, C*256/sub), sw (C, 256/sub)."""
    from .ggml_jit import k_prologue
    if k_prologue is not None and qw is None:  # one pass instead of a transpose and five
        return k_prologue(blocks, sub, sigma_factor)
    C = blocks.shape[0]
    sumx2 = _sum0(np.ascontiguousarray(blocks.T) ** 2)
    sigma2 = np.repeat(_f32(sigma_factor) * sumx2 / _f32(QK_K), QK_K // sub)
    x = _cols(blocks, sub)
    w = _weights(x, sigma2, None if qw is None else _cols(qw, sub))
    return x, w, _sum0(w).reshape(C, QK_K // sub)


def _requant(x, d, lo, hi, offset, search_levels) -> np.ndarray:
    """clip(rint((x + offset)/d), lo, hi) per column; where d == 0 ggml skips the column and
    keeps the search's levels: ``search_levels(mask)`` supplies them."""
    zero = d == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        t = x + offset if offset is not None else x.copy()
        t /= np.where(zero, _f32(1), d)
        big = ~(np.abs(t) < _f32(4194304))  # overflowed or beyond nearest_int's range (inf, NaN)
        if big.any():
            t = np.where(big, _c_nearest_int(t), np.rint(t))
        else:
            np.rint(t, out=t)
        np.clip(t, lo, hi, out=t)
    if zero.any():
        t[:, zero] = search_levels(zero)
    return t


def _unpack_scale_min_k4(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's get_scale_min_k4 for j = 0..7 over (C, 12) bytes -> (C, 8) scales, (C, 8) mins."""
    d = np.concatenate([sc[:, 0:4] & 63, (sc[:, 8:12] & 0xF) | ((sc[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([sc[:, 4:8] & 63, (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)], axis=1)
    return d, m


# Q2_K (84 bytes): scales[16] (low nibble scale, high nibble min, per 16) | qs[64] (2-bit,
#   byte 32h + l holds weights 128h + 32k + l at bits 2k) | d fp16 | dmin fp16;
#   weight = d*sc*q - dmin*m.  Same layout as kquants.Q2_K.
def _q2_k(blocks, qw):
    C = blocks.shape[0]
    x, w, sw = _k_prologue(blocks, qw, 16, 1.0)
    fit = _Qkx3(x, w, 3)
    sw_t = np.ascontiguousarray(sw.T)
    dm, Ls = _make_qp(np.ascontiguousarray(fit.scale.reshape(C, 16).T), sw_t, 15)
    mm, Lm = _make_qp(np.ascontiguousarray(fit.the_min.reshape(C, 16).T), sw_t, 15)
    d16, d = _fp16(dm)
    m16, m = _fp16(mm)
    sc = Ls.T | (Lm.T << 4)                                         # uint8_t, wraps as in C
    dj = (d[:, None] * (sc & 0xF)).reshape(-1)
    mj = (m[:, None] * (sc >> 4)).reshape(-1)
    L = _requant(x, dj, 0, 3, mj, fit.levels)
    return np.concatenate([sc, _pack_2bit(_uncols(L, C)), d16.view(_u8).reshape(C, 2),
                           m16.view(_u8).reshape(C, 2)], axis=1)


# Q3_K (110 bytes): hmask[32] (bit i//32 of byte i%32 = level >= 4) | qs[64] (low 2 bits,
#   Q2_K packing) | scales[12] (sixteen 6-bit s+32: bytes 0..7 low nibbles of s_j / s_j+8,
#   byte 8+k bits 2g = s_{4g+k} >> 4) | d fp16;  weight = d*(s-32)*(q-4).
def _q3_k(blocks, qw):
    C = blocks.shape[0]
    x, w, sw = _k_prologue(blocks, qw, 16, 2.0)
    scales, search_L = _make_qx(x, w, 4)
    d_block, Ls = _make_qx(np.ascontiguousarray(scales.reshape(C, 16).T), np.ascontiguousarray(sw.T), 32)
    Ls = _wrap8(Ls).T                                               # (C, 16), 0..63
    d16, d = _fp16(d_block)
    dj = (d[:, None] * (Ls.astype(_f32) - 32)).reshape(-1)
    L = _uncols(_requant(x, dj, -4, 3, None, lambda z: search_L[:, z] - 4) + 4, C)
    hi = (L >> 2).reshape(C, 8, 32)
    hmask = np.zeros((C, 32), dtype=_u8)
    for b in range(8):
        hmask |= hi[:, b] << b
    sc = np.empty((C, 12), dtype=_u8)
    sc[:, 0:8] = (Ls[:, 0:8] & 0xF) | ((Ls[:, 8:16] & 0xF) << 4)
    h = (Ls >> 4).reshape(C, 4, 4)
    sc[:, 8:12] = h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)
    return np.concatenate([hmask, _pack_2bit(L & 3), sc, d16.view(_u8).reshape(C, 2)], axis=1)


def _affine_k(blocks, qw, nmax: int):
    """Q4_K/Q5_K: returns (levels (C, 256), packed scales (C, 12), d16, dmin16)."""
    C = blocks.shape[0]
    x, w, sw = _k_prologue(blocks, qw, 32, 2.0)
    fit = _Qkx3(x, w, nmax)
    sw_t = np.ascontiguousarray(sw.T)
    d_block, Ls = _make_qp(np.ascontiguousarray(fit.scale.reshape(C, 8).T), sw_t, 63)
    m_block, Lm = _make_qp(np.ascontiguousarray(fit.the_min.reshape(C, 8).T), sw_t, 63)
    Ls, Lm = Ls.T, Lm.T
    if nmax == 31:  # quantize_row_q5_K_impl clamps, q4_K's does not
        Ls, Lm = np.minimum(Ls, 63), np.minimum(Lm, 63)
    packed = _pack_scale_min_k4(Ls, Lm)
    sc, mn = _unpack_scale_min_k4(packed)
    d16, d = _fp16(d_block)
    m16, m = _fp16(m_block)
    dj = (d[:, None] * sc).reshape(-1)
    mj = (m[:, None] * mn).reshape(-1)
    L = _uncols(_requant(x, dj, 0, nmax, mj, fit.levels), C)
    return L, packed, d16.view(_u8).reshape(C, 2), m16.view(_u8).reshape(C, 2)


# Q4_K (144 bytes): d | dmin | scales[12] (kquants._pack_scale_min_k4) | qs[128] (byte 32c + l:
#   low nibble weight 64c + l, high nibble weight 64c + 32 + l).
def _q4_k(blocks, qw):
    L, packed, d16, m16 = _affine_k(blocks, qw, 15)
    q = L.reshape(-1, 4, 2, 32)
    return np.concatenate([d16, m16, packed, (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)], axis=1)


# Q5_K (176 bytes): d | dmin | scales[12] | qh[32] (byte l, bit 2c / 2c+1 = 5th bit of weight
#   64c + l / 64c + 32 + l) | qs[128] (as Q4_K, low 4 bits).
def _q5_k(blocks, qw):
    L, packed, d16, m16 = _affine_k(blocks, qw, 31)
    q = L.reshape(-1, 4, 2, 32)
    lo, hi = q & 0xF, q >> 4
    qh = np.zeros((q.shape[0], 32), dtype=_u8)
    for c in range(4):
        qh |= (hi[:, c, 0] << (2 * c)) | (hi[:, c, 1] << (2 * c + 1))
    return np.concatenate([d16, m16, packed, qh, (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)], axis=1)


# Q6_K (210 bytes): ql[128] | qh[64] | scales int8[16] | d fp16; weight = d*sc*(q-32).
#   ql byte 64h + l: nibbles of weights 128h + l (low) / 128h + 64 + l (high); byte 64h + 32 + l:
#   128h + 32 + l / 128h + 96 + l; qh byte 32h + l: bits 2k = high 2 bits of 128h + 32k + l.
def _q6_k(blocks, qw):
    C = blocks.shape[0]
    x = _cols(blocks, 16)
    w = np.ones_like(x) if qw is None else _cols(qw, 16)  # weights = quant_weights themselves
    scales, search_L = _make_qx(x, w, 32)
    scales = scales.reshape(C, 16)
    max_scale = _signed_absmax(scales, axis=1)
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = _f32(-128) / np.where(zero, _f32(1), max_scale)
        sc = np.minimum(np.rint(iscale[:, None] * scales), _f32(127)).astype(np.int8)
        d16, d = _fp16(_f32(1) / iscale)
    dj = (d[:, None] * sc).reshape(-1).astype(_f32)
    L = _uncols(_requant(x, dj, -32, 31, None, lambda z: search_L[:, z] - 32) + 32, C)
    q = L.reshape(C, 2, 4, 32)
    lo, hi = q & 0xF, q >> 4
    out = np.concatenate([
        (lo[:, :, 0:2] | (lo[:, :, 2:4] << 4)).reshape(C, 128),
        (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(C, 64),
        sc.view(_u8), d16.view(_u8).reshape(C, 2),
    ], axis=1)
    out[zero] = 0  # ggml: memset(&y[i], 0, ...) for an all-zero super-block
    return out


# type -> (block size, bytes per block, encoder, whether blocks need whole rows)
_TYPES: dict[str, tuple[int, int, Any, bool]] = {
    "Q4_0": (32, 18, _q4_0, True), "Q4_1": (32, 20, _q4_1, True),
    "Q5_0": (32, 22, _q5_0, True), "Q5_1": (32, 24, _q5_1, True),
    "Q2_K": (256, 84, _q2_k, False), "Q3_K": (256, 110, _q3_k, False),
    "Q4_K": (256, 144, _q4_k, False), "Q5_K": (256, 176, _q5_k, False),
    "Q6_K": (256, 210, _q6_k, False),
}  # fmt: skip
WEIGHTED_TYPES = tuple(_TYPES)


def _as_weights(weights: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    if weights is None:
        return None
    w = np.asarray(weights, dtype=_f32)
    if w.shape not in ((shape[-1],), shape):
        raise ValueError(f"weights of shape {w.shape} for data of shape {shape}: "
                         f"give one per column ({shape[-1]},) or one per element")
    return np.broadcast_to(w, shape)


def quantize_weighted(data: np.ndarray, qtype: str, weights: Any = None, *,
                      chunk_elements: int | None = None) -> np.ndarray:
    """Quantize float rows with ggml's weighted search (``quantize_<qtype>(..., quant_weights)``).

    ``data``: float array, last dimension = ggml's n_per_row (a multiple of the block size).
    ``weights``: ggml's importance matrix, shape ``(n_per_row,)`` (or ``data.shape``); None
    = all ones, what stable-diffusion.cpp passes. Returns uint8 of shape
    ``(*data.shape[:-1], n_per_row // block * type_size)``, ggml's exact bytes, whatever
    ``chunk_elements`` (values per vectorized pass, whole rows; default CHUNK_ELEMENTS: larger
    passes hold the GIL for a smaller share of the time, smaller ones stay in cache)."""
    name = getattr(qtype, "name", qtype)
    if name not in _TYPES:
        raise ValueError(f"{name!r} has no weighted search here ({', '.join(WEIGHTED_TYPES)})")
    block, size, encode, whole_rows = _TYPES[name]
    data = np.asarray(data)
    if data.ndim == 0 or data.shape[-1] % block != 0:
        raise ValueError(f"cannot quantize shape {data.shape} to {name}: "
                         f"last dimension must be a multiple of {block}")
    N = data.shape[-1]
    rows = data.reshape(-1, N)
    qw = _as_weights(weights, data.shape)
    qw = None if qw is None else qw.reshape(-1, N)
    out = np.empty((rows.shape[0], N // block * size), dtype=_u8)
    step = max(1, (chunk_elements or CHUNK_ELEMENTS) // N)  # whole rows per pass (the legacy types' sigma2 is per row)
    for r in range(0, rows.shape[0], step):
        x = np.ascontiguousarray(rows[r:r + step], dtype=_f32)
        w = None if qw is None else np.ascontiguousarray(qw[r:r + step])
        src = x if whole_rows else x.reshape(-1, QK_K)
        ww = w if (whole_rows or w is None) else w.reshape(-1, QK_K)
        # inf/NaN on float-max data are ggml's own arithmetic, reproduced: no warnings
        with np.errstate(all="ignore"):
            out[r:r + x.shape[0]] = encode(src, ww).reshape(x.shape[0], -1)
    return out.reshape(*data.shape[:-1], out.shape[-1])
