"""The softmax family in pure array-API code: the reference every other path is tested against.

Every function here takes an array-API namespace ``xp`` (as returned by ``array_namespace``),
arrays of one real floating dtype and one shape, ``axes`` as a tuple of distinct non-negative
ints and ``mask`` as ``None`` or a boolean array already broadcast to the input's shape: the
fields of a validated :class:`~xpsoftmax._call.Call`; nothing here checks them again.

Half-precision inputs are computed in float32 and rounded back once at the end. Only array-API
operations are used, so the code stays lazy on Dask and traceable under ``jax.jit``.
"""

from __future__ import annotations

import math
from typing import Any

from ..._compat import device
from ..._dtypes import compute_dtype

Array = Any


def _upcast(xp: Any, x: Array) -> Array:
    ct = compute_dtype(xp, x.dtype)
    return x if ct == x.dtype else xp.astype(x, ct)


def _downcast(xp: Any, r: Array, dtype: Any) -> Array:
    return r if r.dtype == dtype else xp.astype(r, dtype)


def _normalize(xp: Any, x: Array, axes: tuple[int, ...], mask: Array | None):
    """Shifted logits ``z = x - max`` and the row sums ``s = sum(exp(z))``, with the limits handled.

    * Masked-out entries become ``-inf`` before anything else, so they carry no weight.
    * A row whose maximum is ``+inf`` is replaced by its limit: ``0`` at the ``+inf`` entries and
      ``-inf`` elsewhere, so the mass is split evenly over the ``+inf`` entries.
    * A fully masked row is shifted by ``0`` and given the sum ``1``: it comes out as all ``0``
      (log: all ``-inf``) rather than ``0/0``.
    * A row whose unmasked entries are all ``-inf`` is shifted by NaN, so it comes out NaN
      (as in torch and scipy) without an ``inf - inf`` floating-point warning.
    * NaN in an unmasked entry makes the row maximum NaN, which poisons that row only.
    """
    neg_inf = xp.asarray(-math.inf, dtype=x.dtype)
    if mask is not None:
        x = xp.where(mask, x, neg_inf)
    m = xp.max(x, axis=axes, keepdims=True)
    inf_row = m == math.inf
    x = xp.where(inf_row, xp.where(x == math.inf, xp.zeros_like(x), neg_inf), x)
    m = xp.where(inf_row, xp.zeros_like(m), m)
    shift = xp.where(m == -math.inf, xp.asarray(math.nan, dtype=x.dtype), m)
    if mask is not None:
        empty = ~xp.any(mask, axis=axes, keepdims=True)
        shift = xp.where(empty, xp.zeros_like(shift), shift)
    z = x - shift
    s = xp.sum(xp.exp(z), axis=axes, keepdims=True)
    if mask is not None:
        s = xp.where(empty, xp.ones_like(s), s)
    return z, s


def forward(xp: Any, x: Array, axes: tuple[int, ...], mask: Array | None, log: bool) -> Array:
    """softmax(x) (``log=False``) or log_softmax(x) (``log=True``) along ``axes``."""
    dtype = x.dtype
    z, s = _normalize(xp, _upcast(xp, x), axes, mask)
    r = z - xp.log(s) if log else xp.exp(z) / s
    if mask is not None:
        # Masked entries are exactly 0 (log: -inf) even in a row that a NaN poisons.
        fill = xp.asarray(-math.inf if log else 0.0, dtype=r.dtype, device=device(r))
        r = xp.where(mask, r, fill)
    return _downcast(xp, r, dtype)


def masked(xp: Any, v: Array, mask: Array | None) -> Array:
    return v if mask is None else xp.where(mask, v, xp.zeros_like(v))


def backward(
    xp: Any, y: Array, g: Array, axes: tuple[int, ...], mask: Array | None, log: bool
) -> Array:
    """Vector-Jacobian product from the forward output ``y`` and the cotangent ``g``.

    softmax: ``y * (g - sum(y * g))``; log-softmax: ``g - exp(y) * sum(g)``. Masked entries are
    left out of the sums and give exactly 0.
    """
    dtype = y.dtype
    # Masked cotangents are zeroed first, so an inf there never meets a 0 (no 0 * inf on Dask,
    # whose compute runs outside any floating-point error state set here).
    y, g = _upcast(xp, y), masked(xp, _upcast(xp, g), mask)
    if log:
        p = xp.exp(y)
        dot = xp.sum(masked(xp, g, mask), axis=axes, keepdims=True)
        r = g - p * dot
    else:
        dot = xp.sum(masked(xp, y * g, mask), axis=axes, keepdims=True)
        r = y * (g - dot)
    return _downcast(xp, masked(xp, r, mask), dtype)


def jvp(xp: Any, y: Array, t: Array, axes: tuple[int, ...], mask: Array | None, log: bool) -> Array:
    """Jacobian-vector product from the forward output ``y`` and the input tangent ``t``.

    softmax: ``y * (t - sum(y * t))`` (the Jacobian is symmetric, so this is the VJP formula);
    log-softmax: ``t - sum(exp(y) * t)``.
    """
    if not log:
        return backward(xp, y, t, axes, mask, log=False)
    dtype = y.dtype
    y, t = _upcast(xp, y), masked(xp, _upcast(xp, t), mask)
    dot = xp.sum(masked(xp, xp.exp(y) * t, mask), axis=axes, keepdims=True)
    return _downcast(xp, masked(xp, t - dot, mask), dtype)


def logsumexp(
    xp: Any, x: Array, axes: tuple[int, ...], mask: Array | None, keepdims: bool
) -> Array:
    """``log(sum(exp(x)))`` along ``axes`` (masked entries left out), from the row maximum.

    A row whose maximum is not finite is shifted by 0 instead, so the limits fall out of the
    arithmetic: a ``+inf`` entry gives ``+inf``, a row of ``-inf`` (or fully masked) gives
    ``log(0) = -inf``, a NaN gives NaN.
    """
    dtype = x.dtype
    x = _upcast(xp, x)
    if mask is not None:
        x = xp.where(mask, x, xp.asarray(-math.inf, dtype=x.dtype))
    m = xp.max(x, axis=axes, keepdims=True)
    shift = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    r = xp.log(xp.sum(xp.exp(x - shift), axis=axes, keepdims=True)) + shift
    if not keepdims:
        r = xp.reshape(r, tuple(d for i, d in enumerate(x.shape) if i not in axes))
    return _downcast(xp, r, dtype)


def logsumexp_backward(
    xp: Any,
    x: Array,
    lse: Array,
    dl: Array,
    axes: tuple[int, ...],
    mask: Array | None,
    n_inf: Array | None = None,
) -> Array:
    """``exp(x - lse) * dl``, ``lse`` and ``dl`` with the reduced axes kept as size 1.

    A row whose logsumexp is ``+inf`` gets the limit of the gradient (the limit of softmax): the
    cotangent split evenly over its ``+inf`` entries, 0 elsewhere. Masked entries are exactly 0.
    ``n_inf``, the rows' counts of unmasked ``+inf`` entries (keepdims), is counted along
    ``axes`` unless given (a Dask block of a split row holds only part of it).
    """
    dtype = x.dtype
    x, lse, dl = _upcast(xp, x), _upcast(xp, lse), _upcast(xp, dl)
    is_inf = x == math.inf
    if mask is not None:
        is_inf = is_inf & mask
    if n_inf is None:
        k = xp.sum(xp.astype(is_inf, x.dtype), axis=axes, keepdims=True)
    else:
        k = xp.astype(n_inf, x.dtype)
    limit = xp.where(is_inf, 1.0 / xp.where(k == 0, xp.ones_like(k), k), xp.zeros_like(x))
    p = xp.where(lse == math.inf, limit, xp.exp(x - lse))
    return _downcast(xp, masked(xp, p * dl, mask), dtype)


def jacobian(xp: Any, y: Array) -> Array:
    """``diag(y) - y y^T`` over the last axis of ``y``: shape ``y.shape + (n,)``."""
    dtype = y.dtype
    y = _upcast(xp, y)
    n = y.shape[-1]
    eye = xp.eye(n, dtype=y.dtype, device=device(y))
    col = xp.expand_dims(y, axis=-1)
    row = xp.expand_dims(y, axis=-2)
    return _downcast(xp, col * eye - col * row, dtype)
