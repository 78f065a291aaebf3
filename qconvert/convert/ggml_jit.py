"""Compiled inner loops for :mod:`.ggml_weighted` (numba, optional).

The numpy searches make one pass over a chunk per float operation: make_qkx3_quants' 38 trials
cost ~15 passes each, which holds the weighted K-quants near ggml's own C speed. Here each
trial is two fused passes (levels and their three sums; the error of the fit), vectorized
across blocks: the chunk stays in the columns layout ``(n, B)`` of :mod:`.ggml_weighted`, the
inner loop runs over the B blocks of one row, and every per-block scalar of ggml's loop
becomes an array of B.

Exactness: the float32 operations are ggml's, in ggml's order (sums start at 0 and add the
block's elements one after the other; products associate as in C). numba compiles without
fast-math, so LLVM neither contracts a*b + c into an FMA nor reorders a sum; vector width
changes nothing. ``tests/test_ggml_weighted.py`` checks the bytes against ggml's golden file
and against the numpy path on every golden input.

numba comes with the ``gguf`` extra (``pip install qconvert[gguf]``): without it, or with
``QCONVERT_NO_JIT=1``, the four entry points below are None and the numpy path runs.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["k_prologue", "make_qp_search", "make_qx_search", "qkx3_search"]


try:
    import numba
except ImportError:  # the numpy path runs
    numba = None

f32 = np.float32
ZERO, ONE, MAGIC = f32(0.0), f32(1.0), f32(12582912.0)  # MAGIC = 1.5 * 2**23
GROUP_MAX_EPS = f32(1e-15)
_jit = numba.njit(nogil=True, cache=True, error_model="numpy") if numba is not None else None
_inline = numba.njit(inline="always", cache=True, error_model="numpy") if numba is not None else None  # inlined in numba's IR: the loops stay vectorized

TILE = 128  # blocks searched together (a multiple of any vector width): x, w and levels, 3 x 16 KiB, stay near L1


if _jit is not None:
    @_jit
    def _c_nearest_int(t, scratch):
        # ggml's nearest_int: the low 23 bits of t + 1.5*2**23, less 2**22 (any t, inf, NaN)
        scratch[0] = t + MAGIC
        return f32((scratch.view(np.int32)[0] & 0x007FFFFF) - 0x00400000)

    @_inline
    def _add_level(x, w, i, b, l, lv, s_l, s_l2, s_xl):
        """Store level l of element i of block b; add it to ggml's sum_l, sum_l2, sum_xl."""
        lv[i, b] = l
        wl = w[i, b] * l
        s_l[b] += wl
        s_l2[b] += wl * l
        s_xl[b] += wl * x[i, b]

    @_jit
    def _levels_sums(x, w, iscale, mn, nmax, lv, s_l, s_l2, s_xl):
        """lv = clip(rint(iscale*(x - min)), 0, nmax) and ggml's sum_l, sum_l2, sum_xl, for the
        tile's columns (rint = nearest_int where iscale did not overflow: see _fix_overflowed)."""
        s_l[:] = ZERO
        s_l2[:] = ZERO
        s_xl[:] = ZERO
        for i in range(x.shape[0]):
            for b in range(TILE):
                _add_level(x, w, i, b, min(max(np.rint(iscale[b] * (x[i, b] - mn[b])), ZERO), nmax),
                           lv, s_l, s_l2, s_xl)

    @_jit
    def _fix_overflowed(x, w, iscale, mn, xmin, xmax, nmax, lv, s_l, s_l2, s_xl, scratch):
        """Redo the columns whose iscale*(x - min) is not finite (subnormal or float-max data)
        with C's nearest_int, which differs from rint there. Rare: one check per column."""
        for b in range(TILE):
            if np.isfinite(iscale[b] * (xmax[b] - mn[b])) and np.isfinite(iscale[b] * (xmin[b] - mn[b])):
                continue
            s_l[b] = ZERO
            s_l2[b] = ZERO
            s_xl[b] = ZERO
            for i in range(x.shape[0]):
                l = min(max(_c_nearest_int(iscale[b] * (x[i, b] - mn[b]), scratch), ZERO), nmax)
                _add_level(x, w, i, b, l, lv, s_l, s_l2, s_xl)

    @_jit
    def _errors(x, w, lv, scale, mn, err):
        """ggml's sum over the block of w * d*d, d = scale*l + min - x."""
        err[:] = ZERO
        for i in range(x.shape[0]):
            for b in range(TILE):
                d = scale[b] * lv[i, b] + mn[b] - x[i, b]
                err[b] += w[i, b] * (d * d)

    @_jit
    def _range_and_sums(x, w, xmin, xmax, sum_w, sum_x):
        xmin[:] = x[0]
        xmax[:] = x[0]
        sum_w[:] = ZERO
        sum_x[:] = ZERO
        for i in range(x.shape[0]):
            for b in range(TILE):
                v = x[i, b]
                if v < xmin[b]:
                    xmin[b] = v
                if v > xmax[b]:
                    xmax[b] = v
                sum_w[b] += w[i, b]
                sum_x[b] += w[i, b] * v

    @_jit
    def _fit(sum_w, sum_x, s_l, s_l2, s_xl, t_scale, t_min, D):
        """Weighted least-squares scale and min (min clamped to <= 0), and D, as ggml."""
        for b in range(TILE):
            D[b] = sum_w[b] * s_l2[b] - s_l[b] * s_l[b]
            ts = (sum_w[b] * s_xl[b] - sum_x[b] * s_l[b]) / D[b]
            tm = (s_l2[b] * sum_x[b] - s_l[b] * s_xl[b]) / D[b]
            if tm > ZERO:
                tm = ZERO
                ts = s_xl[b] / s_l2[b]
            t_scale[b] = ts
            t_min[b] = tm

    @_jit
    def _search_tile(x, w, nmax, rmin, rdelta, nstep, scale, mn, best_is, offset, xmin, xmax, degen):
        """make_qkx3_quants on the TILE columns of x, w (outputs: the views given)."""
        sum_w, sum_x, mx, iscale = np.empty(TILE, f32), np.empty(TILE, f32), np.empty(TILE, f32), np.empty(TILE, f32)
        s_l, s_l2, s_xl = np.empty(TILE, f32), np.empty(TILE, f32), np.empty(TILE, f32)
        best, cur, t_scale, t_min, D = (np.empty(TILE, f32), np.empty(TILE, f32), np.empty(TILE, f32),
                                        np.empty(TILE, f32), np.empty(TILE, f32))
        lv = np.empty_like(x)
        scratch = np.empty(1, f32)
        _range_and_sums(x, w, xmin, xmax, sum_w, sum_x)
        for b in range(TILE):
            mn[b] = ZERO if xmin[b] > ZERO else xmin[b]  # `if (min > 0) min = 0;` (-0.0 stays)
            degen[b] = xmax[b] <= mn[b]
            mx[b] = mn[b] + ONE if degen[b] else xmax[b]  # any finite range; never updated
            iscale[b] = nmax / (mx[b] - mn[b])
            scale[b] = ONE / iscale[b]
        _levels_sums(x, w, iscale, mn, nmax, lv, s_l, s_l2, s_xl)
        _fix_overflowed(x, w, iscale, mn, xmin, xmax, nmax, lv, s_l, s_l2, s_xl, scratch)
        _errors(x, w, lv, scale, mn, best)
        best_is[:] = iscale
        offset[:] = mn
        for k in range(nstep + 1):
            step = rmin + rdelta * f32(k) + nmax
            for b in range(TILE):
                iscale[b] = step / (mx[b] - mn[b])
            _levels_sums(x, w, iscale, mn, nmax, lv, s_l, s_l2, s_xl)
            _fix_overflowed(x, w, iscale, mn, xmin, xmax, nmax, lv, s_l, s_l2, s_xl, scratch)
            _fit(sum_w, sum_x, s_l, s_l2, s_xl, t_scale, t_min, D)
            _errors(x, w, lv, t_scale, t_min, cur)
            for b in range(TILE):
                if D[b] > ZERO and cur[b] < best[b] and not degen[b]:
                    best_is[b] = iscale[b]
                    offset[b] = mn[b]
                    best[b] = cur[b]
                    scale[b] = t_scale[b]
                    mn[b] = t_min[b]
        for b in range(TILE):
            if degen[b]:
                scale[b] = ZERO

    @_inline
    def _load_tile(x, w, b0, xt, wt):
        """Columns b0.. of x, w into the TILE-wide buffers; past the end, all-zero blocks (which
        every search leaves alone: degenerate or all-zero). Contiguous copies, because rows
        B*4 bytes apart would alias in L1."""
        m = min(x.shape[1], b0 + TILE) - b0
        if m < TILE:
            xt[:] = ZERO
            wt[:] = ZERO
        xt[:, :m] = x[:, b0:b0 + m]
        wt[:, :m] = w[:, b0:b0 + m]

    @_jit
    def _qkx3(x, w, nmax, rmin, rdelta, nstep):
        """make_qkx3_quants (mse) for every column of x (n, B), TILE columns at a time.

        Returns (scale, min, iscale and min of the winning trial, xmin, xmax, degenerate)."""
        n, B = x.shape
        Bp = -(-B // TILE) * TILE  # the last tile padded with all-zero blocks (degenerate, no update)
        scale, mn, best_is, offset = np.empty(Bp, f32), np.empty(Bp, f32), np.empty(Bp, f32), np.empty(Bp, f32)
        xmin, xmax, degen = np.empty(Bp, f32), np.empty(Bp, f32), np.empty(Bp, np.bool_)
        xt, wt = np.zeros((n, TILE), f32), np.zeros((n, TILE), f32)
        for b0 in range(0, B, TILE):
            _load_tile(x, w, b0, xt, wt)
            b1 = b0 + TILE
            _search_tile(xt, wt, nmax, rmin, rdelta, nstep, scale[b0:b1], mn[b0:b1],
                         best_is[b0:b1], offset[b0:b1], xmin[b0:b1], xmax[b0:b1], degen[b0:b1])
        scale, mn, best_is, offset = scale[:B], mn[:B], best_is[:B], offset[:B]
        xmin, xmax, degen = xmin[:B], xmax[:B], degen[:B]
        return scale, mn, best_is, offset, xmin, xmax, degen

    @_jit
    def _qx_sums(x, w, iscale, nmax, bad, scratch, s_lx, s_l2):
        """ggml's sumlx, suml2 for l = clip(nearest_int(iscale*x), -nmax, nmax-1)."""
        s_lx[:] = ZERO
        s_l2[:] = ZERO
        for i in range(x.shape[0]):
            for b in range(TILE):
                l = min(max(np.rint(iscale[b] * x[i, b]), -nmax), nmax - ONE)
                s_lx[b] += w[i, b] * x[i, b] * l
                s_l2[b] += w[i, b] * l * l
        for b in range(TILE):  # rare: iscale overflowed or NaN data, where rint != nearest_int
            if bad[b]:
                s_lx[b] = ZERO
                s_l2[b] = ZERO
                for i in range(x.shape[0]):
                    l = min(max(_c_nearest_int(iscale[b] * x[i, b], scratch), -nmax), nmax - ONE)
                    s_lx[b] += w[i, b] * x[i, b] * l
                    s_l2[b] += w[i, b] * l * l

    @_jit
    def _qx_tile(x, w, nmax, scale, best_is, mx, zero, nan):
        """make_qx_quants(n, nmax, x, L, rmse_type 1, qw=w) on the TILE columns of x, w."""
        bad = np.empty(TILE, np.bool_)
        nan[:] = False
        iscale, s_lx, s_l2, best = np.empty(TILE, f32), np.empty(TILE, f32), np.empty(TILE, f32), np.empty(TILE, f32)
        scratch = np.empty(1, f32)
        amax = np.zeros(TILE, f32)
        mx[:] = ZERO
        for i in range(x.shape[0]):
            for b in range(TILE):
                ax = abs(x[i, b])
                if ax > amax[b]:  # NaN is skipped, as C's fabsf(x) > amax
                    amax[b] = ax
                    mx[b] = x[i, b]
                if x[i, b] != x[i, b]:
                    nan[b] = True
        for b in range(TILE):
            zero[b] = amax[b] < GROUP_MAX_EPS
            if zero[b]:
                mx[b] = ONE
            iscale[b] = -nmax / mx[b]
            bad[b] = nan[b] or not np.isfinite(iscale[b] * mx[b])
        _qx_sums(x, w, iscale, nmax, bad, scratch, s_lx, s_l2)
        for b in range(TILE):
            scale[b] = s_lx[b] / s_l2[b] if s_l2[b] != ZERO else ZERO
            best[b] = scale[b] * s_lx[b]
            best_is[b] = iscale[b]
        for step in range(-9, 10):
            if step == 0:
                continue
            for b in range(TILE):
                iscale[b] = -(nmax + f32(0.1) * f32(step)) / mx[b]
                bad[b] = nan[b] or not np.isfinite(iscale[b] * mx[b])
            _qx_sums(x, w, iscale, nmax, bad, scratch, s_lx, s_l2)
            for b in range(TILE):
                if s_l2[b] > ZERO and s_lx[b] * s_lx[b] > best[b] * s_l2[b]:
                    scale[b] = s_lx[b] / s_l2[b]
                    best[b] = scale[b] * s_lx[b]
                    best_is[b] = iscale[b]
        for b in range(TILE):
            if zero[b]:
                scale[b] = ZERO

    @_jit
    def _make_qx(x, w, nmax):
        """make_qx_quants over the columns of x (n, B): (scale, winning iscale, signed max, all-zero,
        has NaN)."""
        n, B = x.shape
        Bp = -(-B // TILE) * TILE
        scale, best_is, mx = np.empty(Bp, f32), np.empty(Bp, f32), np.empty(Bp, f32)
        zero, nan = np.empty(Bp, np.bool_), np.empty(Bp, np.bool_)
        xt, wt = np.zeros((n, TILE), f32), np.zeros((n, TILE), f32)
        for b0 in range(0, B, TILE):
            _load_tile(x, w, b0, xt, wt)
            b1 = b0 + TILE
            _qx_tile(xt, wt, nmax, scale[b0:b1], best_is[b0:b1], mx[b0:b1], zero[b0:b1], nan[b0:b1])
        return scale[:B], best_is[:B], mx[:B], zero[:B], nan[:B]

    @_jit
    def _wrap8(v):
        # (uint8_t)(int) v as x86 converts: out of int32's range (inf, NaN) -> INT_MIN -> 0
        return f32(np.int32(v) & 0xFF) if abs(v) < f32(2147483648.0) else ZERO

    @_jit
    def _qp_column(x, w, b, nmax, L):
        """make_qp_quants(n, nmax, x[:, b], L[:, b], quant_weights=w[:, b]); returns the scale."""
        n = x.shape[0]
        mx = ZERO
        for i in range(n):
            mx = x[i, b] if x[i, b] > mx else mx  # MAX(max, x[i])
        if mx < GROUP_MAX_EPS:
            L[:, b] = ZERO
            return ZERO
        iscale = nmax / mx
        scale = ONE / iscale
        best = ZERO
        for i in range(n):
            L[i, b] = _wrap8(np.rint(iscale * x[i, b]))  # uint8_t L[i] = nearest_int(...)
            diff = x[i, b] - scale * L[i, b]
            best += w[i, b] * diff * diff
        for step in range(-4, 5):
            if step == 0:
                continue
            is_ = (f32(0.1) * f32(step) + nmax) / mx
            sc = ONE / is_
            mse = ZERO
            for i in range(n):
                diff = x[i, b] - sc * min(np.rint(is_ * x[i, b]), nmax)
                mse += w[i, b] * diff * diff
            if mse < best:
                best = mse
                iscale = is_
        sumlx, suml2 = ZERO, ZERO
        for i in range(n):
            l = min(np.rint(iscale * x[i, b]), nmax)
            L[i, b] = _wrap8(l)
            sumlx += w[i, b] * x[i, b] * l
            suml2 += w[i, b] * l * l
        for _ in range(5):
            changed = False
            for i in range(n):
                wi, li = w[i, b], L[i, b]
                slx = sumlx - wi * x[i, b] * li
                sl2 = suml2 - wi * li * li
                if slx > ZERO and sl2 > ZERO:
                    new_l = min(np.rint(x[i, b] * sl2 / slx), nmax)
                    if new_l != li:
                        slx += wi * x[i, b] * new_l
                        sl2 += wi * new_l * new_l
                        if slx * slx * suml2 > sumlx * sumlx * sl2:
                            L[i, b] = _wrap8(new_l)
                            sumlx, suml2 = slx, sl2
                            changed = True
            if not changed:
                break
        return sumlx / suml2 if suml2 > ZERO else ZERO

    @_jit
    def _make_qp(x, w, nmax):
        n, C = x.shape
        scale, L = np.empty(C, f32), np.empty((n, C), f32)
        for b in range(C):
            scale[b] = _qp_column(x, w, b, nmax, L)
        return scale, L

    @_jit
    def _k_prologue(blocks, sub, sigma_factor):
        """ggml's K-type preamble: x in the columns layout, w = sqrt(sigma2 + x*x) with
        sigma2 = sigma_factor * (sum of x*x over the super-block) / 256, sw = sums of w per block."""
        C, N = blocks.shape
        per = N // sub
        x, w = np.empty((sub, C * per), f32), np.empty((sub, C * per), f32)
        sw = np.empty((C, per), f32)
        for c in range(C):
            sumx2 = ZERO
            for j in range(N):
                sumx2 += blocks[c, j] * blocks[c, j]
            sigma2 = sigma_factor * sumx2 / f32(N)
            sw[c] = ZERO
            for i in range(sub):  # row i of the columns layout: element i of each block
                for k in range(per):
                    v = blocks[c, k * sub + i]
                    x[i, c * per + k] = v
                    w[i, c * per + k] = np.sqrt(sigma2 + v * v)
                    sw[c, k] += w[i, c * per + k]
        return x, w, sw


def _qkx3_search(x, w, nmax, rmin=-0.9, rdelta=0.05, nstep=36):
    """make_qkx3_quants over the columns of x, w ((n, B) float32): see ggml_weighted._Qkx3."""
    return _qkx3(np.ascontiguousarray(x, dtype=f32), np.ascontiguousarray(w, dtype=f32),
                 f32(nmax), f32(rmin), f32(rdelta), nstep)


def _make_qp_search(x, w, nmax):
    """make_qp_quants over the columns of x, w ((n, C) float32): (scale, uint8 levels)."""
    scale, L = _make_qp(np.ascontiguousarray(x, dtype=f32), np.ascontiguousarray(w, dtype=f32), f32(nmax))
    return scale, L.astype(np.uint8)


def _k_prologue_cols(blocks, sub, sigma_factor):
    """(x, w, sw) of ggml_weighted._k_prologue for all-ones importance weights."""
    return _k_prologue(np.ascontiguousarray(blocks, dtype=f32), sub, f32(sigma_factor))


def _make_qx_search(x, w, nmax):
    """make_qx_quants over the columns of x, w ((n, B) float32): (scale, winning iscale, max,
    all-zero, has NaN)."""
    return _make_qx(np.ascontiguousarray(x, dtype=f32), np.ascontiguousarray(w, dtype=f32), f32(nmax))


_ON = _jit is not None and not os.environ.get("QCONVERT_NO_JIT")
make_qp_search = _make_qp_search if _ON else None
k_prologue = _k_prologue_cols if _ON else None
make_qx_search = _make_qx_search if _ON else None
qkx3_search = _qkx3_search if _ON else None
