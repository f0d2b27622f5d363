"""The compiled CPU kernels (numba): one pass per row statistic, each row read and written once.

Imported only by ``compiled.py``, on the first NumPy call that needs it (importing numba costs
about 0.3 s). Every kernel works on flat, contiguous 1-D buffers with element strides, so that the
innermost loop is always over contiguous memory and LLVM vectorizes it, whatever the row stride
of the 2-D view ``(rows, n)`` or the 3-D view ``(outer, n, inner)``:

* 2-D (softmax axis last): row ``i``, element ``j`` is ``buf[i * s0 + j]``;
* 3-D (softmax axis in the middle): ``buf[o * s0 + j * s1 + k]``, worked a tile of ``k`` at a
  time, so a middle axis never needs a transposed copy.

Masks are ``uint8`` buffers with their own strides (a broadcast mask has stride 0); a call
without a mask passes a one-element dummy and ``masked=False`` (one compiled function per layout
and dtype, not two).

Semantics are those of the generic backend (``backends/generic/softmax.py``, ``_normalize``),
written as selects so the loops stay branch-free: masked entries are ``-inf`` before the maximum;
a ``+inf`` row becomes ``0`` at its ``+inf`` entries and ``-inf`` elsewhere; a row whose unmasked
entries are all ``-inf`` is shifted by NaN; a fully masked row is shifted by 0 with sum 1; NaN
propagates through the maximum (``llvm.maximum``, which also vectorizes, where a compare-select
does not).

Floating-point flags: the reduction loops allow reassociation (``reassoc``, so sums and maxima
vectorize; the order is fixed by ``n`` alone, so results do not depend on the thread count) and
contraction (FMA); no ``nnan``/``ninf``, which would fold the special values away. The
exponential (:func:`exp32`, :func:`exp64`) is compiled with contraction only: reassociation would
merge its two-constant ``ln 2`` reduction (213 ulp instead of 1).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

_FLAGS = {"reassoc", "contract"}
# Row sums add float32 partial sums of this many elements (vectorized, reassociated) in float64:
# one float32 accumulator per lane over a row of 70000 was off by 5e-5 relative.
_CHUNK = 256
_JIT = {"nogil": True, "cache": True, "error_model": "numpy", "boundscheck": False}


# --------------------------------------------------------------------------------------------
# LLVM intrinsics numba does not expose


@intrinsic
def _bits_to_f32(typingctx, v):
    """The float32 whose bits are the int32 ``v``."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _bits_to_f64(typingctx, v):
    """The float64 whose bits are the int64 ``v``."""
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return sig, codegen


@intrinsic
def fmaximum(typingctx, a, b):
    """``llvm.maximum``: the larger of two floats, NaN if either is NaN (vectorizes)."""
    if not isinstance(a, types.Float) or a != b:
        return None
    sig = a(a, b)

    def codegen(context, builder, signature, args):
        ty = args[0].type
        fnty = ir.FunctionType(ty, [ty, ty])
        fn = builder.module.declare_intrinsic("llvm.maximum", [ty], fnty)
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def _f32_to_bits(typingctx, v):
    """The int32 bits of the float32 ``v``."""
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _half_to_f32(typingctx, v):
    """The float32 value of the float16 whose bits are the uint16 ``v`` (exact; ``fpext``, one
    ``vcvtph2ps`` lane on x86 with F16C)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_to_half(typingctx, v):
    """The uint16 bits of the float32 ``v`` rounded to float16 (to nearest, ties to even;
    ``fptrunc``), as NumPy's ``astype(float16)``."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


# --------------------------------------------------------------------------------------------
# the exponential: range reduction to 2^k exp(r), |r| <= ln(2)/2, a Taylor polynomial for
# exp(r), and 2^k built from its bits in two factors (so that results down to the subnormals
# and up to the largest finite value need no special case). Every special value falls out of
# the two final selects: -inf and underflow give 0, +inf and overflow +inf, NaN stays NaN.

_LOG2E = 1.4426950408889634
_LN2_HI32 = 0.693145751953125  # ln 2 to 16 bits: k * _LN2_HI32 is exact for |k| < 2^8
_LN2_LO32 = 1.428606765330187e-06
_LN2_HI64 = 0.6931471803691238  # ln 2 to 32 bits: k * _LN2_HI64 is exact for |k| < 2^20
_LN2_LO64 = 1.9082149292705877e-10


@numba.njit(fastmath={"contract"}, **_JIT)
def exp32(x):
    """``exp`` of a float32, in float32 (max error 1 ulp over the finite range, tested)."""
    t = x * np.float32(_LOG2E)
    k = np.float32(np.rint(t))
    k = k if k > np.float32(-252.0) else np.float32(-252.0)  # (NaN goes to the bound)
    k = k if k < np.float32(254.0) else np.float32(254.0)
    r = (x - k * np.float32(_LN2_HI32)) - k * np.float32(_LN2_LO32)
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    ki = np.int32(k)
    half = ki >> 1
    s1 = _bits_to_f32((half + np.int32(127)) << np.int32(23))
    s2 = _bits_to_f32((ki - half + np.int32(127)) << np.int32(23))
    y = p * s1 * s2
    y = np.float32(0.0) if x < np.float32(-104.0) else y  # (NaN compares False: stays NaN)
    return np.float32(np.inf) if x > np.float32(88.8) else y


@numba.njit(fastmath={"contract"}, **_JIT)
def exp64(x):
    """``exp`` of a float64, in float64 (max error about 1 ulp, tested on samples)."""
    t = x * _LOG2E
    k = np.rint(t)
    k = k if k > -2044.0 else -2044.0
    k = k if k < 2046.0 else 2046.0
    r = (x - k * _LN2_HI64) - k * _LN2_LO64
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    ki = np.int64(k)
    half = ki >> 1
    s1 = _bits_to_f64((half + np.int64(1023)) << np.int64(52))
    s2 = _bits_to_f64((ki - half + np.int64(1023)) << np.int64(52))
    y = p * s1 * s2
    y = 0.0 if x < -746.0 else y
    return np.inf if x > 709.8 else y


@numba.njit(**_JIT)
def exp_array(x, out):
    """``out[i] = exp(x[i])`` (the exponential's own test and benchmark)."""
    for i in range(x.size):
        out[i] = _exp(x[i])


def _exp(x):  # pragma: no cover (replaced by the overload below inside compiled code)
    raise NotImplementedError


@overload(_exp, jit_options={"nogil": True, "error_model": "numpy"})
def _exp_overload(x):
    """``exp`` of a float in its own precision: :func:`exp32` or :func:`exp64`."""
    if x == types.float32:
        return lambda x: exp32(x)
    return lambda x: exp64(x)


# --------------------------------------------------------------------------------------------
# the narrow storage dtypes (float16, bfloat16) to and from their compute dtype, a block at a
# time: NumPy's casts of float16 run about 2 ns an element on the CI machine (three times the
# whole float32 softmax); these loops vectorize (vcvtph2ps / shifts)


@numba.njit(inline="always", **_JIT)
def _widen(bits, kind):
    """The float32 value of 16 storage bits: float16 (``kind`` 0) or bfloat16 (1, the high half
    of a float32)."""
    if kind == 0:
        return _half_to_f32(bits)
    return _bits_to_f32(np.int32(bits) << np.int32(16))


@numba.njit(inline="always", **_JIT)
def _narrow(v, kind):
    """The 16 storage bits of float32 ``v`` rounded to nearest, ties to even (NaN stays NaN)."""
    if kind == 0:
        return _f32_to_half(v)
    b = np.uint32(_f32_to_bits(v))
    if v != v:
        return np.uint16((b >> np.uint32(16)) | np.uint32(0x40))  # (a quiet NaN)
    b = b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))
    return np.uint16(b >> np.uint32(16))


@numba.njit(**_JIT)
def widen(src, s0, s1, dst, a, b, c, kind, neg):
    """``dst[(i b + j) c + k] = ±value(src[i s0 + j s1 + k])`` over an ``(a, b, c)`` block:
    16-bit storage (uint16 ``src``, ``kind`` as :func:`_widen`) to the float ``dst`` (float32
    or float64, contiguous), negated with ``neg`` (softmin)."""
    sign = np.float32(-1.0) if neg else np.float32(1.0)
    for i in range(a):
        for j in range(b):
            sb, db = _u(i * s0 + j * s1), _u((i * b + j) * c)
            for k in range(_u(c)):
                dst[db + k] = _widen(src[sb + k], kind) * sign


@numba.njit(**_JIT)
def narrow(src, dst, d0, d1, a, b, c, kind):
    """``dst[i d0 + j d1 + k]`` = the 16-bit storage of float32 ``src[(i b + j) c + k]``."""
    for i in range(a):
        for j in range(b):
            sb, db = _u((i * b + j) * c), _u(i * d0 + j * d1)
            for k in range(_u(c)):
                dst[db + k] = _narrow(src[sb + k], kind)


# --------------------------------------------------------------------------------------------
# the softmax family
#
# Row statistics first (the maximum and, with a mask, the count of unmasked entries), then the
# shift and the +inf flag of the row as the generic ``_normalize`` defines them, then the passes
# that write. ``log``: False softmax, True log-softmax. ``kind`` of the products: 0 is
# ``y * (g - sum(y g))`` (softmax VJP and JVP), 1 ``g - exp(y) sum(g)`` (log-softmax VJP), 2
# ``g - sum(exp(y) g)`` (log-softmax JVP). Masked entries are left out of every sum and come out
# as exactly 0 (log-softmax forward: -inf), even in a row that a NaN poisons.


def _like(x, v):  # pragma: no cover (replaced by the overload below inside compiled code)
    raise NotImplementedError


@overload(_like, jit_options={"nogil": True})
def _like_overload(x, v):
    """The constant ``v`` in the floating type of ``x``."""
    if x == types.float32:
        return lambda x, v: np.float32(v)
    return lambda x, v: np.float64(v)


@numba.njit(inline="always", **_JIT)
def _row_shift(m, count, masked):
    """(shift, +inf row) of a row with maximum ``m`` and ``count`` unmasked entries."""
    inf_row = m == np.inf
    shift = m
    if inf_row or (masked and count == 0):
        shift = _like(m, 0.0)  # +inf row: replaced by its limit; fully masked: shift 0, sum 1
    elif m == -np.inf:
        shift = _like(m, np.nan)  # every unmasked entry is -inf: the row is NaN
    return shift, inf_row


@numba.njit(inline="always", **_JIT)
def _shifted(v, shift, inf_row):
    """The shifted logit of ``v`` (already -inf where masked)."""
    if inf_row:
        return _like(v, 0.0) if v == np.inf else _like(v, -np.inf)
    return v - shift


@numba.njit(inline="always", **_JIT)
def _dot_term(y, g, kind):
    if kind == 0:
        return y * g
    if kind == 1:
        return g
    return _exp(y) * g


@numba.njit(inline="always", **_JIT)
def _update(y, g, dot, kind):
    if kind == 0:
        return y * (g - dot)
    if kind == 1:
        return g - _exp(y) * dot
    return g - dot


@numba.njit(inline="always", **_JIT)
def _u(i):
    """An index as uint64: numba then skips the wraparound of negative indices (which would
    turn every access into a gather)."""
    return numba.uint64(i)


@numba.njit(fastmath=_FLAGS, **_JIT)
def _forward4(x, sx, out, so, i, n, log):
    """Rows ``i .. i + 3`` without a mask, worked side by side: four independent reductions in
    each loop hide the latency of the horizontal ones (measured on rows of 64: 1.6x faster
    than one row at a time; rows of 1024: 1.25x)."""
    x0, x1, x2, x3 = _u(i * sx), _u((i + 1) * sx), _u((i + 2) * sx), _u((i + 3) * sx)
    o0, o1, o2, o3 = _u(i * so), _u((i + 1) * so), _u((i + 2) * so), _u((i + 3) * so)
    m0 = m1 = m2 = m3 = _like(x[0], -np.inf)
    for j in range(_u(n)):
        m0 = fmaximum(m0, x[x0 + j])
        m1 = fmaximum(m1, x[x1 + j])
        m2 = fmaximum(m2, x[x2 + j])
        m3 = fmaximum(m3, x[x3 + j])
    h0, f0 = _row_shift(m0, n, False)
    h1, f1 = _row_shift(m1, n, False)
    h2, f2 = _row_shift(m2, n, False)
    h3, f3 = _row_shift(m3, n, False)
    t0 = t1 = t2 = t3 = 0.0
    for j0 in range(0, n, _CHUNK):
        c0 = c1 = c2 = c3 = _like(m0, 0.0)
        for jj in range(_u(min(_CHUNK, n - j0))):
            j = _u(j0) + jj
            e0 = _exp(_shifted(x[x0 + j], h0, f0))
            e1 = _exp(_shifted(x[x1 + j], h1, f1))
            e2 = _exp(_shifted(x[x2 + j], h2, f2))
            e3 = _exp(_shifted(x[x3 + j], h3, f3))
            if not log:
                out[o0 + j], out[o1 + j], out[o2 + j], out[o3 + j] = e0, e1, e2, e3
            c0 += e0
            c1 += e1
            c2 += e2
            c3 += e3
        t0 += c0
        t1 += c1
        t2 += c2
        t3 += c3
    s0, s1, s2, s3 = _like(m0, t0), _like(m0, t1), _like(m0, t2), _like(m0, t3)
    if log:
        l0, l1, l2, l3 = np.log(s0), np.log(s1), np.log(s2), np.log(s3)
        for j in range(_u(n)):
            out[o0 + j] = _shifted(x[x0 + j], h0, f0) - l0
            out[o1 + j] = _shifted(x[x1 + j], h1, f1) - l1
            out[o2 + j] = _shifted(x[x2 + j], h2, f2) - l2
            out[o3 + j] = _shifted(x[x3 + j], h3, f3) - l3
    else:
        # (times the reciprocal: within 1 ulp of the quotient, and vdivps costs a tenth of
        # the kernel's time on Zen 4)
        one = _like(s0, 1.0)
        i0, i1, i2, i3 = one / s0, one / s1, one / s2, one / s3
        for j in range(_u(n)):
            out[o0 + j] = out[o0 + j] * i0
            out[o1 + j] = out[o1 + j] * i1
            out[o2 + j] = out[o2 + j] * i2
            out[o3 + j] = out[o3 + j] * i3


@numba.njit(fastmath=_FLAGS, **_JIT)
def _product4(y, sy, g, sg, out, so, i, n, kind):
    """The product ``kind`` on rows ``i .. i + 3`` without a mask, side by side (see
    :func:`_forward4`)."""
    y0, y1, y2, y3 = _u(i * sy), _u((i + 1) * sy), _u((i + 2) * sy), _u((i + 3) * sy)
    g0, g1, g2, g3 = _u(i * sg), _u((i + 1) * sg), _u((i + 2) * sg), _u((i + 3) * sg)
    o0, o1, o2, o3 = _u(i * so), _u((i + 1) * so), _u((i + 2) * so), _u((i + 3) * so)
    zero = _like(y[0], 0.0)
    t0 = t1 = t2 = t3 = 0.0
    for j0 in range(0, n, _CHUNK):
        c0 = c1 = c2 = c3 = zero
        for jj in range(_u(min(_CHUNK, n - j0))):
            j = _u(j0) + jj
            c0 += _dot_term(y[y0 + j], g[g0 + j], kind)
            c1 += _dot_term(y[y1 + j], g[g1 + j], kind)
            c2 += _dot_term(y[y2 + j], g[g2 + j], kind)
            c3 += _dot_term(y[y3 + j], g[g3 + j], kind)
        t0 += c0
        t1 += c1
        t2 += c2
        t3 += c3
    d0, d1, d2, d3 = _like(zero, t0), _like(zero, t1), _like(zero, t2), _like(zero, t3)
    for j in range(_u(n)):
        out[o0 + j] = _update(y[y0 + j], g[g0 + j], d0, kind)
        out[o1 + j] = _update(y[y1 + j], g[g1 + j], d1, kind)
        out[o2 + j] = _update(y[y2 + j], g[g2 + j], d2, kind)
        out[o3 + j] = _update(y[y3 + j], g[g3 + j], d3, kind)


@numba.njit(fastmath=_FLAGS, **_JIT)
def forward_rows(x, sx, mk, sm, masked, out, so, r0, r1, n, log):
    """Rows ``r0 <= i < r1`` of a 2-D view: ``x[i * sx + j]``, ``mk[i * sm + j]`` and
    ``out[i * so + j]``.

    (Each row is sliced first: indices known to be non-negative let LLVM drop numba's
    wraparound of negative indices, which otherwise turns every access into a gather.)
    """
    neg = _like(x[0], -np.inf)
    zero = _like(x[0], 0.0)
    if not masked:
        while r0 + 4 <= r1:
            _forward4(x, sx, out, so, r0, n, log)
            r0 += 4
        if r0 < r1:
            # The last rows go through the same 4-row code, padded with copies of the last:
            # every row is then computed alike wherever it sits in a block (a Dask chunking
            # or a thread's share gives the same bits).
            w = np.empty(4 * n, dtype=x.dtype)
            wo = np.empty(4 * n, dtype=x.dtype)
            for q in range(4):
                src = min(r0 + q, r1 - 1) * sx
                w[q * n : q * n + n] = x[src : src + n]
            _forward4(w, n, wo, n, 0, n, log)
            for q in range(r1 - r0):
                out[(r0 + q) * so : (r0 + q) * so + n] = wo[q * n : q * n + n]
        return
    for i in range(r0, r1):
        xr, orow = x[i * sx : i * sx + n], out[i * so : i * so + n]
        mr = mk[i * sm : i * sm + n] if masked else mk
        m = neg
        count = n
        if masked:
            count = 0
            for j in range(n):
                m = fmaximum(m, xr[j] if mr[j] else neg)
                count += np.int64(mr[j])
        else:
            for j in range(n):
                m = fmaximum(m, xr[j])
        shift, inf_row = _row_shift(m, count, masked)
        total = 0.0
        for j0 in range(0, n, _CHUNK):
            j1 = min(j0 + _CHUNK, n)
            xc, oc = xr[j0:j1], orow[j0:j1]
            mc = mr[j0:j1] if masked else mr
            c = zero
            for j in range(j1 - j0):
                v = xc[j] if not masked or mc[j] else neg
                e = _exp(_shifted(v, shift, inf_row))
                if not log:
                    oc[j] = e
                c += e
            total += c
        s = _like(m, 1.0) if masked and count == 0 else _like(m, total)
        if log:
            ls = np.log(s)
            for j in range(n):
                keep = not masked or mr[j]
                v = xr[j] if keep else neg
                orow[j] = _shifted(v, shift, inf_row) - ls if keep else neg
        else:
            inv = _like(s, 1.0) / s
            for j in range(n):
                keep = not masked or mr[j]
                orow[j] = orow[j] * inv if keep else zero


@numba.njit(fastmath=_FLAGS, **_JIT)
def forward_cols(x, sx0, sx1, mk, sm0, sm1, masked, out, so0, so1, o0, o1, k0, k1, n, log):
    """A tile of a 3-D view: ``x[o * sx0 + j * sx1 + k]`` for ``o0 <= o < o1``, all ``j < n``,
    ``k0 <= k < k1``; the innermost loop runs along ``k`` (contiguous)."""
    bk = k1 - k0
    neg = _like(x[0], -np.inf)
    zero = _like(x[0], 0.0)
    m = np.empty(bk, dtype=x.dtype)
    s = np.empty(bk, dtype=np.float64)
    ls = np.empty(bk, dtype=x.dtype)
    shift = np.empty(bk, dtype=x.dtype)
    count = np.empty(bk, dtype=np.int64)
    inf_col = np.empty(bk, dtype=np.bool_)
    for o in range(o0, o1):
        m[:] = neg
        count[:] = 0 if masked else n
        s[:] = 0
        for j in range(n):
            xb, mb = _u(o * sx0 + j * sx1 + k0), _u(o * sm0 + j * sm1 + k0)
            if masked:
                for k in range(_u(bk)):
                    m[k] = fmaximum(m[k], x[xb + k] if mk[mb + k] else neg)
                    count[k] += np.int64(mk[mb + k])
            else:
                for k in range(_u(bk)):
                    m[k] = fmaximum(m[k], x[xb + k])
        for k in range(bk):
            shift[k], inf_col[k] = _row_shift(m[k], count[k], masked)
        for j in range(n):
            xb, mb = _u(o * sx0 + j * sx1 + k0), _u(o * sm0 + j * sm1 + k0)
            ob = _u(o * so0 + j * so1 + k0)
            for k in range(_u(bk)):
                v = x[xb + k] if not masked or mk[mb + k] else neg
                e = _exp(_shifted(v, shift[k], inf_col[k]))
                s[k] += e
                if not log:
                    out[ob + k] = e
        for k in range(bk):
            sk = _like(neg, 1.0) if masked and count[k] == 0 else _like(neg, s[k])
            ls[k] = (
                np.log(sk) if log else _like(sk, 1.0) / sk
            )  # (log: the log of the sum; else its inverse)
        for j in range(n):
            xb, mb = _u(o * sx0 + j * sx1 + k0), _u(o * sm0 + j * sm1 + k0)
            ob = _u(o * so0 + j * so1 + k0)
            for k in range(_u(bk)):
                keep = not masked or mk[mb + k]
                if log:
                    v = x[xb + k] if keep else neg
                    out[ob + k] = _shifted(v, shift[k], inf_col[k]) - ls[k] if keep else neg
                else:
                    out[ob + k] = out[ob + k] * ls[k] if keep else zero


@numba.njit(fastmath=_FLAGS, **_JIT)
def product_rows(y, sy, g, sg, mk, sm, masked, out, so, r0, r1, n, kind):
    """The VJP/JVP ``kind`` on rows ``r0 <= i < r1`` of 2-D views (see :func:`forward_rows`)."""
    zero = _like(y[0], 0.0)
    if not masked:
        while r0 + 4 <= r1:
            _product4(y, sy, g, sg, out, so, r0, n, kind)
            r0 += 4
        if r0 < r1:  # the last rows through the same code (see forward_rows)
            wy = np.empty(4 * n, dtype=y.dtype)
            wg = np.empty(4 * n, dtype=y.dtype)
            wo = np.empty(4 * n, dtype=y.dtype)
            for q in range(4):
                src = min(r0 + q, r1 - 1)
                wy[q * n : q * n + n] = y[src * sy : src * sy + n]
                wg[q * n : q * n + n] = g[src * sg : src * sg + n]
            _product4(wy, n, wg, n, wo, n, 0, n, kind)
            for q in range(r1 - r0):
                out[(r0 + q) * so : (r0 + q) * so + n] = wo[q * n : q * n + n]
        return
    for i in range(r0, r1):
        yr, gr, orow = y[i * sy : i * sy + n], g[i * sg : i * sg + n], out[i * so : i * so + n]
        mr = mk[i * sm : i * sm + n] if masked else mk
        total = 0.0
        for j0 in range(0, n, _CHUNK):
            j1 = min(j0 + _CHUNK, n)
            yc, gc = yr[j0:j1], gr[j0:j1]
            mc = mr[j0:j1] if masked else mr
            c = zero
            for j in range(j1 - j0):
                t = _dot_term(yc[j], gc[j], kind)
                c += t if not masked or mc[j] else zero
            total += c
        dot = _like(zero, total)
        for j in range(n):
            r = _update(yr[j], gr[j], dot, kind)
            orow[j] = r if not masked or mr[j] else zero


@numba.njit(fastmath=_FLAGS, **_JIT)
def product_cols(
    y, sy0, sy1, g, sg0, sg1, mk, sm0, sm1, masked, out, so0, so1, o0, o1, k0, k1, n, kind
):
    """The VJP/JVP ``kind`` on a tile of 3-D views (see :func:`forward_cols`)."""
    bk = k1 - k0
    zero = _like(y[0], 0.0)
    total = np.empty(bk, dtype=np.float64)
    dot = np.empty(bk, dtype=y.dtype)
    for o in range(o0, o1):
        total[:] = 0
        for j in range(n):
            yb, gb = _u(o * sy0 + j * sy1 + k0), _u(o * sg0 + j * sg1 + k0)
            mb = _u(o * sm0 + j * sm1 + k0)
            for k in range(_u(bk)):
                t = _dot_term(y[yb + k], g[gb + k], kind)
                total[k] += t if not masked or mk[mb + k] else zero
        for k in range(bk):
            dot[k] = _like(zero, total[k])
        for j in range(n):
            yb, gb = _u(o * sy0 + j * sy1 + k0), _u(o * sg0 + j * sg1 + k0)
            mb, ob = _u(o * sm0 + j * sm1 + k0), _u(o * so0 + j * so1 + k0)
            for k in range(_u(bk)):
                r = _update(y[yb + k], g[gb + k], dot[k], kind)
                out[ob + k] = r if not masked or mk[mb + k] else zero


# --------------------------------------------------------------------------------------------
# logsumexp: the forward pass's row statistics, written as one value per row; and its VJP,
# ``exp(x - lse) * dl`` in one pass (a row whose lse is +inf takes the limit: dl split over
# its +inf entries)


@numba.njit(inline="always", **_JIT)
def _lse(m, total):
    """The logsumexp of a row with maximum ``m`` and sum ``total`` of ``exp(x - m)``: the
    limits for a maximum that is not finite (+inf, -inf for an empty or all -inf row, NaN)."""
    if m == np.inf or m == -np.inf or m != m:
        return m
    return _like(m, np.float64(m) + np.log(total))


@numba.njit(fastmath=_FLAGS, **_JIT)
def lse_rows(x, sx, mk, sm, masked, out, r0, r1, n):
    """``out[i]`` = logsumexp of row ``i`` for ``r0 <= i < r1`` (see :func:`forward_rows`)."""
    neg = _like(x[0], -np.inf)
    zero = _like(x[0], 0.0)
    for i in range(r0, r1):
        xr = x[i * sx : i * sx + n]
        mr = mk[i * sm : i * sm + n] if masked else mk
        m = neg
        if masked:
            for j in range(n):
                m = fmaximum(m, xr[j] if mr[j] else neg)
        else:
            for j in range(n):
                m = fmaximum(m, xr[j])
        shift = m if -np.inf < m < np.inf else zero
        total = 0.0
        for j0 in range(0, n, _CHUNK):
            j1 = min(j0 + _CHUNK, n)
            xc = xr[j0:j1]
            mc = mr[j0:j1] if masked else mr
            c = zero
            for j in range(j1 - j0):
                v = xc[j] if not masked or mc[j] else neg
                c += _exp(v - shift)
            total += c
        out[i] = _lse(m, total)


@numba.njit(fastmath=_FLAGS, **_JIT)
def lse_cols(x, sx0, sx1, mk, sm0, sm1, masked, out, so, o0, o1, k0, k1, n):
    """``out[o * so + k]`` = logsumexp along ``j`` of a tile of a 3-D view (see
    :func:`forward_cols`)."""
    bk = k1 - k0
    neg = _like(x[0], -np.inf)
    zero = _like(x[0], 0.0)
    m = np.empty(bk, dtype=x.dtype)
    shift = np.empty(bk, dtype=x.dtype)
    s = np.empty(bk, dtype=np.float64)
    for o in range(o0, o1):
        m[:] = neg
        s[:] = 0
        for j in range(n):
            xb, mb = _u(o * sx0 + j * sx1 + k0), _u(o * sm0 + j * sm1 + k0)
            for k in range(_u(bk)):
                m[k] = fmaximum(m[k], x[xb + k] if not masked or mk[mb + k] else neg)
        for k in range(bk):
            shift[k] = m[k] if -np.inf < m[k] < np.inf else zero
        for j in range(n):
            xb, mb = _u(o * sx0 + j * sx1 + k0), _u(o * sm0 + j * sm1 + k0)
            for k in range(_u(bk)):
                v = x[xb + k] if not masked or mk[mb + k] else neg
                s[k] += _exp(v - shift[k])
        for k in range(bk):
            out[o * so + k0 + k] = _lse(m[k], s[k])


@numba.njit(fastmath=_FLAGS, **_JIT)
def lse_grad_rows(x, sx, mk, sm, masked, lse, dl, out, so, r0, r1, n):
    """``out[i, j]`` = ``exp(x[i, j] - lse[i]) * dl[i]`` for rows ``r0 <= i < r1``; masked
    entries 0; a row whose ``lse`` is +inf: ``dl[i] / k`` at its ``k`` +inf entries."""
    zero = _like(x[0], 0.0)
    for i in range(r0, r1):
        xr, orow = x[i * sx : i * sx + n], out[i * so : i * so + n]
        mr = mk[i * sm : i * sm + n] if masked else mk
        li, di = lse[i], dl[i]
        if li == np.inf:
            k = 0
            for j in range(n):
                k += np.int64(xr[j] == np.inf and (not masked or mr[j]))
            share = di / _like(zero, max(k, 1))
            for j in range(n):
                hit = xr[j] == np.inf and (not masked or mr[j])
                orow[j] = share if hit else zero
            continue
        for j in range(n):
            r = _exp(xr[j] - li) * di
            orow[j] = r if not masked or mr[j] else zero


@numba.njit(fastmath=_FLAGS, **_JIT)
def lse_grad_cols(x, sx0, sx1, mk, sm0, sm1, masked, lse, dl, sl, out, so0, so1, o0, o1, k0, k1, n):
    """:func:`lse_grad_rows` on a tile of a 3-D view: ``lse[o * sl + k]`` and ``dl`` alike."""
    bk = k1 - k0
    zero = _like(x[0], 0.0)
    share = np.empty(bk, dtype=x.dtype)
    for o in range(o0, o1):
        lb = _u(o * sl + k0)
        inf_cols = False
        for k in range(bk):
            inf_cols = inf_cols or lse[lb + k] == np.inf
        if inf_cols:  # (rare: count the +inf entries of the tile's columns)
            count = np.zeros(bk, dtype=np.int64)
            for j in range(n):
                xb, mb = _u(o * sx0 + j * sx1 + k0), _u(o * sm0 + j * sm1 + k0)
                for k in range(bk):
                    hit = x[xb + k] == np.inf and (not masked or mk[mb + k])
                    count[k] += np.int64(hit)
            for k in range(bk):
                share[k] = dl[lb + k] / _like(zero, max(count[k], 1))
        for j in range(n):
            xb, mb = _u(o * sx0 + j * sx1 + k0), _u(o * sm0 + j * sm1 + k0)
            ob = _u(o * so0 + j * so1 + k0)
            for k in range(_u(bk)):
                v = x[xb + k]
                li = lse[lb + k]
                r = _exp(v - li) * dl[lb + k]
                if li == np.inf:
                    r = share[k] if v == np.inf else zero
                out[ob + k] = r if not masked or mk[mb + k] else zero


# --------------------------------------------------------------------------------------------
# fused cross-entropy (class indices along the last axis, no mask): the row statistics of the
# forward pass, then the loss or the gradient of each row, without the log-softmax array


@numba.njit(fastmath=_FLAGS, **_JIT)
def xent_rows(x, sx, t, wc, weighted, r0, r1, n, eps, loss):
    """``loss[i]`` = ``-(1 - eps) W[t] ly[t] - eps / n sum_c W_c ly_c`` of rows
    ``r0 <= i < r1`` (``ly`` the log-softmax of the row, as :func:`forward_rows` defines it;
    ``W`` the class weights ``wc`` when ``weighted``, else 1)."""
    zero = _like(x[0], 0.0)
    wsum = 0.0
    if weighted:
        for j in range(n):
            wsum += wc[j]
    for i in range(r0, r1):
        xr = x[i * sx : i * sx + n]
        m = _like(x[0], -np.inf)
        for j in range(n):
            m = fmaximum(m, xr[j])
        shift, inf_row = _row_shift(m, n, False)
        total, zsum = 0.0, 0.0
        for j0 in range(0, n, _CHUNK):
            j1 = min(j0 + _CHUNK, n)
            xc = xr[j0:j1]
            c, cz = zero, zero
            if weighted:
                wcc = wc[j0:j1]
                for j in range(j1 - j0):
                    z = _shifted(xc[j], shift, inf_row)
                    c += _exp(z)
                    cz += wcc[j] * z
            else:
                for j in range(j1 - j0):
                    z = _shifted(xc[j], shift, inf_row)
                    c += _exp(z)
                    cz += z
            total += c
            zsum += cz
        ls = np.log(_like(m, total))
        picked = _shifted(xr[t[i]], shift, inf_row) - ls
        r = -picked * wc[t[i]] if weighted else -picked
        if eps != 0:
            mean = (_like(m, zsum) - (wsum if weighted else n) * ls) / n
            r = (1 - eps) * r - eps * mean
        loss[i] = r


@numba.njit(fastmath=_FLAGS, **_JIT)
def xent_grad_rows(x, sx, t, w, wc, weighted, r0, r1, n, eps, out, so):
    """``out[i, j]`` = ``w[i] (softmax_j S - q_j W_j)``, ``q`` the one-hot of ``t[i]`` mixed
    with the uniform distribution by ``eps``, ``W`` the class weights ``wc`` when ``weighted``
    (else 1) and ``S = sum_c q_c W_c``: d(loss)/d(logits) of rows ``r0 <= i < r1``."""
    zero = _like(x[0], 0.0)
    wsum = 0.0
    if weighted:
        for j in range(n):
            wsum += wc[j]
    for i in range(r0, r1):
        xr, orow = x[i * sx : i * sx + n], out[i * so : i * so + n]
        m = _like(x[0], -np.inf)
        for j in range(n):
            m = fmaximum(m, xr[j])
        shift, inf_row = _row_shift(m, n, False)
        total = 0.0
        for j0 in range(0, n, _CHUNK):
            j1 = min(j0 + _CHUNK, n)
            xc, oc = xr[j0:j1], orow[j0:j1]
            c = zero
            for j in range(j1 - j0):
                e = _exp(_shifted(xc[j], shift, inf_row))
                oc[j] = e
                c += e
            total += c
        wi = _like(zero, w[i])
        if weighted:
            wt = wc[t[i]]
            s = (1 - eps) * wt + eps / n * wsum
            scale = _like(zero, wi * s) / _like(zero, total)
            off = _like(zero, wi * eps / n)
            for j in range(n):
                orow[j] = orow[j] * scale - off * wc[j]
            orow[t[i]] -= _like(zero, wi * (1 - eps) * wt)
        else:
            scale = wi / _like(zero, total)
            off = _like(zero, wi * eps / n)
            for j in range(n):
                orow[j] = orow[j] * scale - off
            orow[t[i]] -= _like(zero, wi * (1 - eps))
