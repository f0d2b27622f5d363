"""The block functions of the split path: one block of NumPy or CuPy in, never a Dask array.

They are array-API code on the block's namespace, so NumPy chunks run NumPy and CuPy chunks run
CuPy (the fused kernels need whole rows, which a split block does not hold). Half precision is
computed in float32; the forward statistics are float64, so the ``+inf`` and entry counts stay
exact. The rules are those of ``backends/generic/softmax.py``, and no floating-point warning
leaves a block (Dask computes outside any error state set while the graph was built).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ... import _compat
from ..._call import Op
from ..._dtypes import compute_dtype
from ..generic import softmax as generic

#: The fields of the forward statistics, along their last axis.
MAX, SUMEXP, N_INF, N_KEPT = range(4)


def _kept(xp: Any, a: Any, mask: Any, fill: float) -> Any:
    """``a`` in the compute dtype, ``fill`` at the masked entries (whose values are not used)."""
    a = xp.astype(a, compute_dtype(xp, a.dtype), copy=False)
    return a if mask is None else xp.where(mask, a, xp.asarray(fill, dtype=a.dtype))


def _count(xp: Any, flags: Any, axes: tuple[int, ...]) -> Any:
    return xp.astype(xp.count_nonzero(flags, axis=axes, keepdims=True), xp.float64)


def stats_block(x: Any, mask: Any, *, axes: tuple[int, ...]) -> Any:
    """One block's partial forward statistics: keepdims shape plus a last axis of 4 (float64)."""
    xp = _compat.array_namespace(x)
    shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    if any(x.shape[a] == 0 for a in axes):  # an empty chunk: the neutral partial
        neutral = (-math.inf, 0.0, 0.0, 0.0)
        return xp.stack([xp.full(shape, v, dtype=xp.float64) for v in neutral], axis=-1)
    with np.errstate(all="ignore"):
        xm = _kept(xp, x, mask, -math.inf)
        m = xp.max(xm, axis=axes, keepdims=True)
        finite = xp.isfinite(m)
        # Rows whose maximum is not finite are shifted by +inf: their sum (NaN or 0) is dropped
        # below, as the combined row decides what they give. No full-size select is needed.
        s = xp.sum(xp.exp(xm - xp.where(finite, m, math.inf)), axis=axes, keepdims=True)
        s = xp.where(finite, s, xp.zeros_like(s))
        if xp.any(m == math.inf):  # (a row-sized test: the count costs a pass only then)
            n_inf = _count(xp, xm == math.inf, axes)
        else:
            n_inf = xp.zeros(shape, dtype=xp.float64)
        if mask is None:
            n_kept = xp.full(shape, math.prod(x.shape[a] for a in axes), dtype=xp.float64)
        else:
            n_kept = _count(xp, mask, axes)
        parts = (m, s, n_inf, n_kept)
        return xp.stack([xp.astype(p, xp.float64) for p in parts], axis=-1)


def combine_stats(stats: Any, axis: tuple[int, ...], keepdims: bool = True, **_: Any) -> Any:
    """Partials side by side along ``axis`` combined into one: max, rescaled sums, counts."""
    xp = _compat.array_namespace(stats)
    m_i, s_i = stats[..., MAX], stats[..., SUMEXP]
    m = xp.max(m_i, axis=axis, keepdims=True)  # NaN wins, then +inf
    finite = xp.isfinite(m)
    # m_i - m is <= 0 or -inf (a -inf partial adds exactly 0) where the row maximum is finite.
    scale = xp.exp(xp.where(finite, m_i - xp.where(finite, m, xp.zeros_like(m)), -math.inf))
    s = xp.sum(s_i * scale, axis=axis, keepdims=True)
    n_inf = xp.sum(stats[..., N_INF], axis=axis, keepdims=True)
    n_kept = xp.sum(stats[..., N_KEPT], axis=axis, keepdims=True)
    return xp.stack([m, xp.where(finite, s, xp.zeros_like(s)), n_inf, n_kept], axis=-1)


def _shift_and_sum(xp: Any, stats: Any, ctype: Any) -> tuple[Any, Any, Any]:
    """From combined statistics: the rows' shift, sum and +inf flag, as the generic code has them.

    The shift is the maximum (0 for +inf rows and fully masked rows; NaN for rows of -inf and
    NaN rows); the sum is the sum of exp (the +inf count for +inf rows; 1 where it is unused).
    """
    m, s = stats[..., MAX], stats[..., SUMEXP]
    n_inf, n_kept = stats[..., N_INF], stats[..., N_KEPT]
    inf_row = m == math.inf
    empty = n_kept == 0
    zero, one = xp.zeros_like(m), xp.ones_like(m)
    shift = xp.where(inf_row | empty, zero, xp.where(m == -math.inf, math.nan, m))
    total = xp.where(inf_row, n_inf, xp.where(xp.isfinite(m), s, one))
    return xp.astype(shift, ctype), xp.astype(total, ctype), inf_row


def forward_block(x: Any, mask: Any, stats: Any, *, log: bool) -> Any:
    """One output block of softmax / log-softmax from the row's combined statistics."""
    xp = _compat.array_namespace(x)
    with np.errstate(all="ignore"):
        xm = _kept(xp, x, mask, -math.inf)
        shift, total, inf_row = _shift_and_sum(xp, stats, xm.dtype)
        if xp.any(inf_row):  # the limit: 0 at the +inf entries, -inf elsewhere
            neg_inf = xp.asarray(-math.inf, dtype=xm.dtype)
            xm = xp.where(inf_row, xp.where(xm == math.inf, xp.zeros_like(xm), neg_inf), xm)
        z = xm - shift
        if log:
            z -= xp.log(total)
        else:
            z = xp.exp(z)
            z /= total
        if mask is not None:
            z = xp.where(mask, z, -math.inf if log else 0.0)
        return xp.astype(z, x.dtype, copy=False)


def _inputs(xp: Any, y: Any, g: Any, mask: Any) -> tuple[Any, Any]:
    """``y`` and ``g`` in the compute dtype, 0 at the masked entries (so no ``0 * inf``)."""
    return _kept(xp, y, mask, 0.0), _kept(xp, g, mask, 0.0)


def dot_block(y: Any, g: Any, mask: Any, *, op: Op, axes: tuple[int, ...]) -> Any:
    """One block's partial row dot of a VJP or JVP (keepdims shape, compute dtype): ``sum(y *
    dy)`` (softmax), ``sum(dy)`` (log-softmax VJP) or ``sum(exp(y) * t)`` (log-softmax JVP);
    masked entries add exactly 0."""
    xp = _compat.array_namespace(y)
    with np.errstate(all="ignore"):
        y, g = _inputs(xp, y, g, mask)
        if op.log and op.kind == "vjp":
            terms = g
        elif op.log:
            terms = xp.exp(y) * g
        else:
            terms = y * g
        return xp.sum(terms, axis=axes, keepdims=True)


def combine_dots(dots: Any, axis: tuple[int, ...], keepdims: bool = True, **_: Any) -> Any:
    """Partial row dots side by side along ``axis`` summed into one."""
    return _compat.array_namespace(dots).sum(dots, axis=axis, keepdims=True)


def grad_block(y: Any, g: Any, mask: Any, dot: Any, *, op: Op) -> Any:
    """One output block of a VJP or JVP from the row's combined dot."""
    xp = _compat.array_namespace(y)
    with np.errstate(all="ignore"):
        yc, gc = _inputs(xp, y, g, mask)
        if op.log and op.kind == "vjp":
            r = gc - xp.exp(yc) * dot
        elif op.log:
            r = gc - dot
        else:
            r = yc * (gc - dot)
        if mask is not None:
            r = xp.where(mask, r, xp.zeros_like(r))
        return xp.astype(r, y.dtype, copy=False)


def lse_block(stats: Any, *, rtype: Any) -> Any:
    """A block of logsumexp from combined statistics (the statistics' last axis dropped)."""
    xp = _compat.array_namespace(stats)
    with np.errstate(all="ignore"):
        m, s = stats[..., MAX], stats[..., SUMEXP]
        finite = xp.isfinite(m)
        # A maximum that is not finite is the result: +inf, NaN, or -inf for a row with
        # nothing kept (or only -inf).
        r = xp.where(finite, m + xp.log(xp.where(finite, s, xp.ones_like(s))), m)
        return xp.astype(r, rtype)


def lse_grad_block(x: Any, lse: Any, dl: Any, n_inf: Any, mask: Any = None) -> Any:
    """A block of the logsumexp VJP: the generic code's, with the row's ``n_inf`` +inf entries
    counted over the whole row (by a reduction) rather than in the block."""
    xp = _compat.array_namespace(x)
    with np.errstate(all="ignore"):
        return generic.logsumexp_backward(xp, x, lse, dl, (), mask, n_inf)
