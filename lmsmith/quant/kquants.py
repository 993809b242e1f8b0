"""GGUF K-quants (Q3_K, Q4_K, Q5_K, Q6_K): 256-weight super-blocks, vectorised.

Every function here works on a whole stack of super-blocks at once:
`quantize_*(blocks)` takes float32 `(n_blocks, 256)` and returns uint8
`(n_blocks, type_size)` in the exact byte layout llama.cpp reads;
`dequantize_*(data)` is the inverse and reproduces the `gguf` package's
reference dequantizer bit for bit (same float32 operations in the same order).

Why the K-quants beat a plain min/max: each 16- or 32-weight sub-block gets its
own scale (and min) chosen by a small search that minimises the weighted
squared error, and only then are those sub-block scales themselves quantized
(to 6 bits, or int8 for Q6_K) against one fp16 super-block scale. The searches
follow llama.cpp's reference quantizers (`make_qkx2_quants` for the
scale+min formats, `make_qx_quants` / `make_q3_quants` for the symmetric ones);
the only Python loops are over the fixed list of candidate scales (or the 16
positions of a sub-block), never over blocks. The candidate loops keep just the
winning candidate per group (its levels are recomputed once at the end) and
reuse preallocated work arrays.
"""

from __future__ import annotations

import numpy as np

QK_K = 256  # weights per super-block
K_SCALE_SIZE = 12  # bytes of packed 6-bit scales in Q3_K/Q4_K/Q5_K
_EPS = 1e-15  # llama.cpp's GROUP_MAX_EPS: a group this small is all zero
_F16_MAX = 65504.0

_f32 = np.float32


def _f16(v: np.ndarray) -> np.ndarray:
    """Round float32 to fp16 (round-to-nearest-even, as F16C does), saturating.

    Saturating keeps an out-of-range super-block scale finite instead of inf.
    """
    return np.clip(v, -_F16_MAX, _F16_MAX).astype(np.float16)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """fp16 little-endian bytes of `v` as a `(n, 2)` uint8 array."""
    return _f16(v).reshape(-1, 1).view(np.uint8)


def _read_f16(data: np.ndarray, start: int) -> np.ndarray:
    """The fp16 at byte `start` of every block, as float32 `(n, 1)`."""
    return np.ascontiguousarray(data[:, start : start + 2]).view(np.float16).astype(_f32)


def _safe_inv(v: np.ndarray) -> np.ndarray:
    """1/v where v != 0, else 0."""
    nz = v != 0
    return np.where(nz, 1.0 / np.where(nz, v, 1), 0).astype(v.dtype)


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sum of a*b over the last axis."""
    return np.einsum("...i,...i->...", a, b)


# --------------------------------------------------------------------------
# scale searches (vectorised over groups: x is (n_groups, group_size))


def _search_scale_min(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Best `scale, min` for x ~ scale*L - min with L in [0, nmax] (llama.cpp make_qkx2_quants).

    Starts from the min/max fit, then tries `nstep+1` candidate inverse scales
    `(nmax + rmin + rdelta*k) / (max - min)`; for each candidate's levels it solves
    the weighted least-squares scale and offset in closed form and keeps the fit
    with the lowest weighted squared error. The offset is clamped to <= 0 because
    the format stores a non-negative `min` that is subtracted.
    Returns `(scale (n,), min (n,) >= 0, L (n, g) uint8)`.
    """
    mn = np.minimum(x.min(axis=-1), 0)
    mx = x.max(axis=-1)
    inv_range = _safe_inv(mx - mn)
    sum_w = w.sum(axis=-1, dtype=np.float64)
    sum_x = _rowdot(w, x).astype(np.float64)
    sum_xx = _rowdot(w * x, x).astype(np.float64)
    xs = x - mn[:, None]

    iscale = nmax * inv_range
    scale = _safe_inv(iscale)
    cand = np.multiply(xs, iscale[:, None])
    np.rint(cand, out=cand)
    np.clip(cand, 0, nmax, out=cand)
    wl = np.empty_like(cand)
    wl64 = np.empty(cand.shape, np.float64)
    ones = np.ones(x.shape[-1])
    d = scale[:, None] * cand + mn[:, None] - x
    best = _rowdot(w, np.square(d, out=d)).astype(np.float64)
    best_min = mn.astype(np.float64)
    best_mult = iscale.copy()

    for k in range(nstep + 1):
        mult = (rmin + rdelta * k + nmax) * inv_range
        np.multiply(xs, mult[:, None], out=cand)
        np.rint(cand, out=cand)
        np.clip(cand, 0, nmax, out=cand)
        np.multiply(w, cand, out=wl)
        wl64[...] = wl
        sum_l = wl64 @ ones
        sum_l2 = _rowdot(wl, cand).astype(np.float64)
        sum_xl = _rowdot(wl, x).astype(np.float64)
        det = sum_w * sum_l2 - sum_l * sum_l
        solvable = det > 0
        # an unsolvable candidate's inf/nan fit is never taken (`better` needs solvable);
        # a solvable one has sum_l2 > 0
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            inv_det = 1.0 / det
            this_scale = (sum_w * sum_xl - sum_x * sum_l) * inv_det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) * inv_det
            # a positive offset is not representable: refit the scale alone through 0
            clamp = this_min > 0
            np.copyto(this_scale, sum_xl / sum_l2, where=clamp)
            np.copyto(this_min, 0.0, where=clamp)
            # sum w*(s*l + m - x)^2 expanded into the sums already at hand (float64:
            # the terms nearly cancel), which saves a pass over the weights per candidate
            s64, m64 = this_scale, this_min
            err = (
                sum_xx
                + s64 * s64 * sum_l2
                + m64 * m64 * sum_w
                + 2 * s64 * m64 * sum_l
                - 2 * s64 * sum_xl
                - 2 * m64 * sum_x
            )
            better = err < best
        better &= solvable
        np.copyto(best_mult, mult, where=better)
        np.copyto(best, err, where=better)
        np.copyto(scale, this_scale, where=better)  # float32, as the result is
        np.copyto(best_min, this_min, where=better)

    np.multiply(xs, best_mult[:, None], out=cand)
    np.rint(cand, out=cand)
    L = np.clip(cand, 0, nmax, out=cand)
    flat = mx == mn
    scale = np.where(flat, 0, scale)
    L = np.where(flat[:, None], 0, L)
    return scale.astype(_f32), (-best_min).astype(_f32), L.astype(np.uint8)


def _signed_max(x: np.ndarray) -> np.ndarray:
    """The element of largest magnitude per row, with its sign (first on ties)."""
    idx = np.abs(x).argmax(axis=-1)
    return np.take_along_axis(x, idx[:, None], axis=-1)[:, 0]


def _search_symmetric(x: np.ndarray, nmax: int, w: np.ndarray | None = None):
    """Best signed scale for x ~ scale*l with l in [-nmax, nmax-1] (llama.cpp make_qx_quants, rmse 1).

    The largest-magnitude weight is mapped to -nmax (the asymmetric range has
    one more negative level, so the scale takes the opposite sign of that
    weight). Then 18 candidate inverse scales `-(nmax + 0.1*k)/max` are tried,
    each refitted by weighted least squares with weights x^2, and the one with
    the largest `sumlx^2/suml2` (the lowest weighted error) wins.
    Returns `(scale (n,), L (n, g) uint8 in [0, 2*nmax))`.
    """
    amax_signed = _signed_max(x)
    live = np.abs(amax_signed) >= _EPS
    # normalise each group: the search is scale-invariant and this keeps x^2 and
    # the sums finite for tiny or huge weights
    norm = np.where(live, np.abs(amax_signed), 1).astype(_f32)
    xn = x / norm[:, None]
    w = xn * xn if w is None else w.astype(_f32)  # calibrated: the importance-based weights
    base = -_safe_inv(np.where(live, amax_signed / norm, 0))
    l = np.empty_like(xn)
    wl = np.empty_like(xn)

    def fit(mult: np.ndarray):
        np.multiply(xn, mult[:, None], out=l)
        np.rint(l, out=l)
        np.clip(l, -nmax, nmax - 1, out=l)
        np.multiply(w, l, out=wl)
        return _rowdot(wl, xn), _rowdot(wl, l)

    # only the winning candidate's multiplier is kept; its levels are recomputed at the end
    best_mult = nmax * base
    sumlx, suml2 = fit(best_mult)
    scale = sumlx * _safe_inv(suml2)
    best = scale * sumlx
    with np.errstate(divide="ignore", invalid="ignore"):  # 1/b is only used where b > 0
        for k in range(-9, 10):
            if k == 0:
                continue
            mult = (nmax + 0.1 * k) * base
            a, b = fit(mult)
            better = (b > 0) & (a * a > best * b)
            np.copyto(best_mult, mult, where=better)
            np.copyto(scale, a * (1.0 / b), where=better)
            np.copyto(best, scale * a, where=better)
    L = np.clip(np.rint(xn * best_mult[:, None], out=l), -nmax, nmax - 1, out=l)
    scale = np.where(live, scale * norm, 0)
    L = np.where(live[:, None], L + nmax, nmax)
    return scale.astype(_f32), L.astype(np.uint8)


def _search_positive(x: np.ndarray, nmax: int, w: np.ndarray):
    """Best scale for non-negative x ~ scale*l with l in [0, nmax], weighted (llama.cpp make_qp_quants).

    Used for the super-block scale of calibrated Q4_K/Q5_K: the 8 sub-block scales (or mins) are
    quantized to 6 bits weighting each by its sub-block's total importance. 8 candidate inverse
    scales `(nmax + 0.1k)/max`, then up to 5 passes of coordinate descent on the levels.
    Returns `(scale (n,), L (n, g) uint8)`.
    """
    x, w = x.astype(_f32), w.astype(_f32)
    mx = x.max(axis=1)
    live = mx >= _EPS
    inv = np.where(live, 1 / np.where(live, mx, 1), 0).astype(_f32)

    def levels(iscale):
        return np.minimum(nmax, np.rint(x * iscale[:, None]))

    def mse(iscale):
        d = x - levels(iscale) * _safe_inv(iscale)[:, None]
        return _rowdot(w, d * d)

    best_is = nmax * inv
    best = mse(best_is)
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        cand = (_f32(0.1) * k + nmax) * inv
        err = mse(cand)
        better = err < best
        np.copyto(best_is, cand, where=better)
        np.copyto(best, err, where=better)
    L = levels(best_is)
    sumlx, suml2 = _rowdot(w * x, L), _rowdot(w, L * L)
    for _ in range(5):
        changed = np.zeros(x.shape[0], bool)
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], L[:, i]
            slx, sl2 = sumlx - wi * xi * li, suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                new = np.minimum(nmax, np.rint(xi * sl2 / np.where(ok, slx, 1)))
            slx2, sl22 = slx + wi * xi * new, sl2 + wi * new * new
            take = ok & (new != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i] = np.where(take, new, li)
            sumlx, suml2 = np.where(take, slx2, sumlx), np.where(take, sl22, suml2)
            changed |= take
        if not changed.any():
            break
    scale = np.where(live & (suml2 > 0), sumlx * _safe_inv(suml2), 0).astype(_f32)
    return scale, np.where(live[:, None], L, 0).astype(np.uint8)


def _calibrated_weights(blocks: np.ndarray, qw: np.ndarray, group: int) -> np.ndarray:
    """llama.cpp's weights with an importance matrix: qw * sqrt(sigma2 + x^2), sigma2 = 2 mean(x^2)
    over the super-block; as (n_blocks * 256 / group, group)."""
    sigma2 = 2 * np.mean(blocks * blocks, axis=1, keepdims=True)
    return (qw * np.sqrt(sigma2 + blocks * blocks)).astype(_f32).reshape(-1, group)


def _search_q3(x: np.ndarray, nmax: int = 4, n_iter: int = 5):
    """Signed scale for 3-bit groups with coordinate descent (llama.cpp make_q3_quants).

    Start from l = round(-nmax/max * x); then, one position at a time, move l_i
    to the level that is best for the scale the other weights imply, and keep
    the move if it raises `sumlx^2/suml2` (weights x^2). Unlike llama.cpp's
    reference (which only accepts moves when the partial `sumlx` is positive and
    so skips groups whose largest weight is positive), the test here is sign
    agnostic. Returns `(scale (n,), L (n, g) uint8 in [0, 2*nmax))`.
    """
    amax_signed = _signed_max(x)
    live = np.abs(amax_signed) >= _EPS
    norm = np.where(live, np.abs(amax_signed), 1).astype(_f32)
    xn = (x / norm[:, None]).astype(np.float64)
    w = xn * xn
    iscale = -nmax * _safe_inv(np.where(live, amax_signed / norm, 0).astype(np.float64))
    L = np.clip(np.rint(xn * iscale[:, None]), -nmax, nmax - 1)
    sumlx = _rowdot(w * xn, L)
    suml2 = _rowdot(w, L * L)
    # position-major copies: each position's column is contiguous. A group whose
    # state did not change in a whole pass over its positions would repeat that
    # pass exactly, so it is done: later passes run on the still-moving groups only
    # (same result as n_iter full passes). Work arrays are reused across positions.
    g = x.shape[1]
    xT = np.ascontiguousarray(xn.T)
    wT = np.ascontiguousarray(w.T)
    wxT = wT * xT
    LT = np.ascontiguousarray(L.T)
    active = np.arange(x.shape[0])
    # 1/slx is inf where slx == 0: such a move is never taken (`take` needs slx != 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(n_iter):
            if active.size == 0:
                break
            full = active.size == x.shape[0]
            if full:
                xa, wa, wxa, La, slx_a, sl2_a = xT, wT, wxT, LT, sumlx, suml2
            else:
                xa, wa, wxa, La = xT[:, active], wT[:, active], wxT[:, active], LT[:, active]
                slx_a, sl2_a = sumlx[active], suml2[active]
            m = active.size
            changed = np.zeros(m, bool)
            slx, sl2, t, nl, slx2, sl22, a, b = np.empty((8, m))
            take, tb = np.empty((2, m), bool)
            for i in range(g):
                xi, wi, wxi, li = xa[i], wa[i], wxa[i], La[i]
                np.subtract(slx_a, np.multiply(wxi, li, out=t), out=slx)  # sumlx without i
                np.multiply(wi, li, out=t)
                t *= li
                np.subtract(sl2_a, t, out=sl2)  # suml2 without i
                np.multiply(xi, sl2, out=nl)
                nl *= np.divide(1.0, slx, out=t)
                np.clip(np.rint(nl, out=nl), -nmax, nmax - 1, out=nl)  # best level for i
                np.add(slx, np.multiply(wxi, nl, out=t), out=slx2)
                np.multiply(wi, nl, out=t)
                t *= nl
                np.add(sl2, t, out=sl22)
                np.multiply(slx2, slx2, out=a)
                a *= sl2_a
                np.multiply(slx_a, slx_a, out=b)
                b *= sl22
                np.greater(a, b, out=take)
                take &= np.not_equal(slx, 0, out=tb)
                take &= np.not_equal(nl, li, out=tb)
                take &= np.greater(sl22, 0, out=tb)
                np.copyto(li, nl, where=take)
                np.copyto(slx_a, slx2, where=take)
                np.copyto(sl2_a, sl22, where=take)
                changed |= take
            if not full:
                LT[:, active] = La
                sumlx[active] = slx_a
                suml2[active] = sl2_a
            active = active[changed]
    L = LT.T
    scale = np.where(live, sumlx * _safe_inv(suml2) * norm, 0)
    L = np.where(live[:, None], L + nmax, nmax)
    return scale.astype(_f32), L.astype(np.uint8)


# --------------------------------------------------------------------------
# 6-bit scale packing shared by Q4_K and Q5_K (8 scales + 8 mins in 12 bytes)
#   bytes 0-3 : scale[j] low 6 bits | scale[j+4] high 2 bits << 6
#   bytes 4-7 : min[j]   low 6 bits | min[j+4]   high 2 bits << 6
#   bytes 8-11: scale[j+4] low 4 bits | min[j+4] low 4 bits << 4


def _pack_scale_min(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    out = np.empty((ls.shape[0], K_SCALE_SIZE), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return out


def _unpack_scale_min(s: np.ndarray):
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


def _quantize_scale_min_blocks(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                               qw: np.ndarray | None = None):
    """Shared front half of Q4_K/Q5_K: 8 sub-blocks of 32 with scale and min.

    `qw` (n, 256): importance of every weight (an importance matrix's column values); then the
    search weights and steps are llama.cpp's calibrated ones (quantize_row_q4_K_impl) and the
    super-block scales are searched too, weighted by each sub-block's importance.
    Returns `(d16, dmin16, packed_scales (n,12), L (n, 256) uint8)`.
    """
    nb = blocks.shape[0]
    x = blocks.reshape(nb * 8, 32)
    if qw is None:
        # weights: rms of the sub-block plus |x| — large weights matter more, but
        # small ones are not ignored (llama.cpp's choice for the no-imatrix path)
        av_x = np.sqrt(np.mean(x * x, axis=1, keepdims=True))
        w = av_x + np.abs(x)
    else:
        w = _calibrated_weights(blocks, qw, 32)
        rmin, rdelta, nstep = -0.9, 0.05, 36  # make_qkx3_quants' steps
    scales, mins, L = _search_scale_min(x, w, nmax, rmin, rdelta, nstep)
    scales = np.maximum(scales, 0).reshape(nb, 8)
    mins = np.maximum(mins, 0).reshape(nb, 8)

    # quantize the 8 scales and 8 mins to 6 bits: against the largest of each, or (calibrated)
    # by a search weighted with the sub-blocks' importance
    if qw is None:
        max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
        ls = np.minimum(np.rint(scales * (63 * _safe_inv(max_scale))[:, None]), 63).astype(np.uint8)
        lm = np.minimum(np.rint(mins * (63 * _safe_inv(max_min))[:, None]), 63).astype(np.uint8)
        d16, dmin16 = _f16(max_scale / _f32(63)), _f16(max_min / _f32(63))
    else:
        sw = w.reshape(nb, 8, 32).sum(axis=2)
        d_block, ls = _search_positive(scales, 63, sw)
        m_block, lm = _search_positive(mins, 63, sw)
        d16, dmin16 = _f16(d_block), _f16(m_block)

    # requantize every weight against the scale/min the file will really hold
    d_sub = (d16.astype(_f32)[:, None] * ls).reshape(nb * 8, 1)
    m_sub = (dmin16.astype(_f32)[:, None] * lm).reshape(nb * 8, 1)
    live = d_sub != 0
    q = np.clip(np.rint((x + m_sub) * _safe_inv(np.where(live, d_sub, 0))), 0, nmax)
    L = np.where(live, q, L).astype(np.uint8).reshape(nb, QK_K)
    return d16, dmin16, _pack_scale_min(ls, lm), L


# --------------------------------------------------------------------------
# Q4_K: f16 d, f16 dmin, scales[12], qs[128]; x = d*sc*q - dmin*m, q in [0, 15]


def quantize_q4_k(blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 `(n, 256)` super-blocks to Q4_K bytes `(n, 144)` (`qw`: importance, calibrated)."""
    nb = blocks.shape[0]
    d16, dmin16, scales, L = _quantize_scale_min_blocks(blocks, 15, -1.0, 0.1, 20, qw)
    # qs: each 32-byte chunk holds sub-block 2c in the low nibbles, 2c+1 in the high
    L = L.reshape(nb, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(nb, 128)
    return np.concatenate([_f16_bytes(d16), _f16_bytes(dmin16), scales, qs], axis=1)


def _sub_block_scales(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K header (f16 d, f16 dmin, 12 bytes of 6-bit scales/mins) -> per-sub-block (n, 8, 1) scale, min."""
    nb = data.shape[0]
    sc, m = _unpack_scale_min(data[:, 4:16])
    d_sub = (_read_f16(data, 0) * sc.astype(_f32)).reshape(nb, 8, 1)
    m_sub = (_read_f16(data, 2) * m.astype(_f32)).reshape(nb, 8, 1)
    return d_sub, m_sub


def dequantize_q4_k(data: np.ndarray) -> np.ndarray:
    """Q4_K bytes `(n, 144)` to float32 `(n, 256)`."""
    nb = data.shape[0]
    d_sub, m_sub = _sub_block_scales(data)
    qs = data[:, 16:144].reshape(nb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(nb, 8, 32).astype(_f32)
    return (d_sub * q - m_sub).reshape(nb, QK_K)


# --------------------------------------------------------------------------
# Q5_K: f16 d, f16 dmin, scales[12], qh[32], qs[128]; q in [0, 31]
# the 5th bit of weight j of sub-block s is bit s of qh[j]


def quantize_q5_k(blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 `(n, 256)` super-blocks to Q5_K bytes `(n, 176)` (`qw`: importance, calibrated)."""
    nb = blocks.shape[0]
    d16, dmin16, scales, L = _quantize_scale_min_blocks(blocks, 31, -0.5, 0.1, 15, qw)
    L = L.reshape(nb, 8, 32)
    high = (L >> 4) << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    qh = np.bitwise_or.reduce(high, axis=1)
    low = (L & 0x0F).reshape(nb, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)
    return np.concatenate([_f16_bytes(d16), _f16_bytes(dmin16), scales, qh, qs], axis=1)


def dequantize_q5_k(data: np.ndarray) -> np.ndarray:
    """Q5_K bytes `(n, 176)` to float32 `(n, 256)`."""
    nb = data.shape[0]
    d_sub, m_sub = _sub_block_scales(data)
    qh = data[:, 16:48].reshape(nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    ql = data[:, 48:176].reshape(nb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = ((ql & 0x0F).reshape(nb, 8, 32) | ((qh & 1) << 4)).astype(_f32)
    return (d_sub * q - m_sub).reshape(nb, QK_K)


# --------------------------------------------------------------------------
# Q6_K: ql[128], qh[64], int8 scales[16], f16 d; x = d*scale*(q - 32), q in [0, 63]
# each 128-weight half: ql[l] = w[l] | w[l+64] << 4, ql[l+32] = w[l+32] | w[l+96] << 4,
# qh[l] = 2 high bits of w[l], w[l+32], w[l+64], w[l+96] at shifts 0, 2, 4, 6


def quantize_q6_k(blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 `(n, 256)` super-blocks to Q6_K bytes `(n, 210)`.

    `qw` (n, 256): importance; the sub-block search then weights by it (llama.cpp's Q6_K uses the
    importance values themselves)."""
    nb = blocks.shape[0]
    x = blocks.reshape(nb * 16, 16)
    scales, L = _search_symmetric(x, 32, None if qw is None else qw.reshape(nb * 16, 16))
    scales = scales.reshape(nb, 16)

    # int8 sub-block scales against one fp16 d; the largest maps to -128
    max_scale = _signed_max(scales)
    live = np.abs(max_scale) >= _EPS
    iscale = np.where(live, -128 * _safe_inv(np.where(live, max_scale, 0)), 0).astype(_f32)
    sc = np.clip(np.rint(scales * iscale[:, None]), -128, 127).astype(np.int8)
    d16 = _f16(_safe_inv(iscale))

    d_sub = (d16.astype(_f32)[:, None] * sc).reshape(nb * 16, 1)
    nz = d_sub != 0
    q = np.clip(np.rint(x * _safe_inv(np.where(nz, d_sub, 0))), -32, 31) + 32
    L = np.where(nz, q, L).astype(np.uint8).reshape(nb, 2, 4, 32)

    lo = L & 0x0F
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    qh = np.bitwise_or.reduce((L >> 4) << np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1), axis=2)
    return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), _f16_bytes(d16)], axis=1)


def dequantize_q6_k(data: np.ndarray) -> np.ndarray:
    """Q6_K bytes `(n, 210)` to float32 `(n, 256)`."""
    nb = data.shape[0]
    sc = np.ascontiguousarray(data[:, 192:208]).view(np.int8).astype(_f32)
    d = _read_f16(data, 208)
    d_sub = (d * sc).reshape(nb, 16, 1)
    ql = data[:, 0:128].reshape(nb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(nb, 2, 4, 32)
    qh = data[:, 128:192].reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & 0x03).reshape(nb, 2, 4, 32)
    q = (ql | (qh << 4)).astype(np.int8) - np.int8(32)
    return (d_sub * q.reshape(nb, 16, 16).astype(_f32)).reshape(nb, QK_K)


# --------------------------------------------------------------------------
# Q3_K: hmask[32], qs[64], scales[12], f16 d; x = d*(scale-32)*(q - 4), q in [0, 7]
# low 2 bits: qs[32h + l] holds weights 128h + 32g + l at shift 2g;
# high bit: bit (j // 32) of hmask[j % 32];
# 16 six-bit scales: low nibbles in bytes 0-7 (j, then j-8 in the high nibble),
# the 2 high bits of scale j at shift 2*(j // 4) of byte 8 + j % 4


def quantize_q3_k(blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 `(n, 256)` super-blocks to Q3_K bytes `(n, 110)`.

    `qw` (n, 256): importance; then sub-blocks and the super-block scale are searched with
    llama.cpp's calibrated weights (quantize_row_q3_K_impl)."""
    nb = blocks.shape[0]
    x = blocks.reshape(nb * 16, 16)
    if qw is None:
        scales, L = _search_q3(x)
    else:
        w = _calibrated_weights(blocks, qw, 16)
        scales, L = _search_symmetric(x, 4, w)
    scales = scales.reshape(nb, 16)

    if qw is None:
        # 6-bit signed sub-block scales (stored +32) against one fp16 d; largest maps to -32
        # (searching d as well gains under 0.1% relative RMSE here, not worth the time)
        max_scale = _signed_max(scales)
        live = np.abs(max_scale) >= _EPS
        iscale = np.where(live, -32 * _safe_inv(np.where(live, max_scale, 0)), 0).astype(_f32)
        ls = (np.clip(np.rint(scales * iscale[:, None]), -32, 31) + 32).astype(np.uint8)
        ls = np.where(live[:, None], ls, 32).astype(np.uint8)  # dead block: every scale 0
        d16 = _f16(_safe_inv(iscale))
    else:  # the 16 scales searched too, each weighted by its sub-block's importance
        d_block, ls = _search_symmetric(scales, 32, w.reshape(nb, 16, 16).sum(axis=2))
        d16 = _f16(d_block)

    d_sub = (d16.astype(_f32)[:, None] * (ls.astype(_f32) - 32)).reshape(nb * 16, 1)
    nz = d_sub != 0
    q = np.clip(np.rint(x * _safe_inv(np.where(nz, d_sub, 0))), -4, 3) + 4
    L = np.where(nz, q, L).astype(np.uint8).reshape(nb, QK_K)

    hmask = np.bitwise_or.reduce((L.reshape(nb, 8, 32) >> 2) << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1)
    low = (L & 0x03).reshape(nb, 2, 4, 32)
    qs = np.bitwise_or.reduce(low << np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1), axis=2)
    packed = np.empty((nb, K_SCALE_SIZE), np.uint8)
    packed[:, 0:8] = (ls[:, 0:8] & 0x0F) | ((ls[:, 8:16] & 0x0F) << 4)
    hi = (ls >> 4).reshape(nb, 4, 4)  # [j // 4, j % 4]
    packed[:, 8:12] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return np.concatenate([hmask, qs.reshape(nb, 64), packed, _f16_bytes(d16)], axis=1)


def dequantize_q3_k(data: np.ndarray) -> np.ndarray:
    """Q3_K bytes `(n, 110)` to float32 `(n, 256)`."""
    nb = data.shape[0]
    hmask = data[:, 0:32]
    qs = data[:, 32:96]
    s = data[:, 96:108]
    d = _read_f16(data, 108)
    low = (s[:, 0:8].reshape(nb, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(nb, 16)
    high = (s[:, 8:12].reshape(nb, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(nb, 16)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).astype(np.int8) - np.int8(32)
    d_sub = (d * sc.astype(_f32)).reshape(nb, 16, 1)
    ql = (qs.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 0x03
    qh = (hmask.reshape(nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 0x01
    # a clear high bit means "subtract 4": q = low - 4*(1 - high)
    q = ql.reshape(nb, 16, 16).astype(np.int8) - ((qh.reshape(nb, 16, 16) ^ 1) << 2).astype(np.int8)
    return (d_sub * q.astype(_f32)).reshape(nb, QK_K)
