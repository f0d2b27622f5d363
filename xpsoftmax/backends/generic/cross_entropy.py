"""Cross-entropy in array-API code: log-softmax through the registry, then a few array operations.

The loss works on log-probabilities ``ly``: the loss of a sample is ``-sum(q * ly)`` over the
classes for the target distribution ``q`` (the one-hot of a class index, or the given
probabilities, mixed with the uniform distribution by label smoothing), and its gradient with
respect to ``ly`` is ``-w * q`` for the sample's weight ``w`` (from the reduction and ``dloss``).
Index targets are gathered with ``take_along_axis``; no one-hot matrix of floats is formed (the
backward compares class ids with the targets, a boolean it needs once to place ``q``).

The log-softmax (and its VJP) is a sub-call through the backend registry, so it runs on the
fastest backend for the array (the blocked NumPy path, Dask block by block, the CUDA kernels);
everything else is elementwise, so it stays lazy on Dask and traceable under ``jax.jit``. The
functions below also serve the losses of ``xpsoftmax.losses`` (which start from
log-probabilities).
"""

from __future__ import annotations

import math
from typing import Any

from ... import _compat
from ..._call import LOG_SOFTMAX, LOG_SOFTMAX_VJP, Call, XentCall, is_empty
from .. import run
from .softmax import masked

Array = Any

__all__ = [
    "backward",
    "forward",
    "logp_gradient",
    "mean_scale",
    "reduce",
    "sample_losses",
    "sample_weights",
    "target_gradient",
]


def _log_softmax_call(p: XentCall) -> Call:
    x = p.x
    return Call(
        LOG_SOFTMAX, p.xp, (x,), (p.axis,), p.mask, None, p.ctype, p.mode, is_empty(x.shape)
    )


def forward(p: XentCall) -> Array:
    """The loss of :data:`~xpsoftmax._call.CROSS_ENTROPY`, reduced."""
    ly = run(_log_softmax_call(p))
    return reduce(p, sample_losses(p, ly, p.eps), p.reduction)


def backward(p: XentCall) -> Array:
    """d(loss)/d(logits) of :data:`~xpsoftmax._call.CROSS_ENTROPY_VJP`, in the result dtype."""
    lsm = _log_softmax_call(p)
    ly = run(lsm)
    g = logp_gradient(p, sample_weights(p, p.reduction, p.dloss), p.eps)
    dx = run(lsm.derive(op=LOG_SOFTMAX_VJP, arrays=(ly, g)))
    dx = _zero_ignored(p, dx)
    return dx if dx.dtype == p.dtype else p.xp.astype(dx, p.dtype)


def target_gradient(p: XentCall) -> Array:
    """d(loss)/d(targets) of :data:`~xpsoftmax._call.CROSS_ENTROPY_TARGET_VJP` (probability
    targets): ``-(1 - eps) * weight * ly`` times each sample's weight, in the compute dtype (the
    public function sums it over broadcast targets before rounding). Masked classes and samples
    left out get exactly 0, not the NaN of ``0 * -inf``."""
    xp = p.xp
    # Masked first: a fully masked sample is then all 0 (its weight is 0 too), and no 0 * -inf
    # is formed (Dask would warn about it when it computes, outside our errstate).
    ly = masked(xp, run(_log_softmax_call(p)), p.mask)
    w = xp.expand_dims(sample_weights(p, p.reduction, p.dloss), axis=p.axis)
    return 0.0 - ((1.0 - p.eps) * w) * _weighted(p, ly)  # +0 (not -0) where ly is 0


def pick(xp: Any, a: Array, t: Array, ax: int) -> Array:
    """The entry of ``a`` at each sample's class index ``t`` along ``ax``."""
    if hasattr(xp, "take_along_axis"):
        return xp.squeeze(xp.take_along_axis(a, xp.expand_dims(t, axis=ax), axis=ax), axis=ax)
    # Dask has no take_along_axis: select by comparing class ids (a boolean, chunk by chunk).
    hit = _class_ids(xp, a, ax) == xp.expand_dims(t, axis=ax)
    return xp.any(hit & a, axis=ax) if xp.isdtype(a.dtype, "bool") else _sum_where(xp, hit, a, ax)


def _sum_where(xp: Any, hit: Array, a: Array, ax: int) -> Array:
    return xp.sum(xp.where(hit, a, xp.zeros_like(a)), axis=ax)


def _class_ids(xp: Any, a: Array, ax: int) -> Array:
    ids = xp.arange(a.shape[ax], device=_compat.device(a))
    return xp.reshape(ids, tuple(-1 if i == ax else 1 for i in range(a.ndim)))


def _uniform(p: XentCall, eps: float) -> Array | float:
    """``eps / n``: the smoothing mass of each class, ``n`` the (unmasked) classes per sample."""
    if p.mask is None:
        return eps / p.n_classes
    xp = p.xp
    count = xp.sum(xp.astype(p.mask, p.ctype), axis=p.axis, keepdims=True)
    return eps / xp.maximum(count, xp.ones_like(count))  # a fully masked sample has no classes


def _weighted(p: XentCall, a: Array) -> Array:
    """``a`` times the class weights along the class axis (``a`` itself without weights)."""
    if p.weight is None:
        return a
    shape = tuple(-1 if i == p.axis else 1 for i in range(p.x_in.ndim))
    return a * p.xp.reshape(p.weight, shape)


def _target_weights(p: XentCall) -> Array:
    """``weight[t]`` of each sample's class index (index targets with weights); 0 if ignored."""
    xp = p.xp
    # (the weights broadcast along the samples: a view, not an array of the input's size)
    shape = tuple(-1 if i == p.axis else 1 for i in range(p.x_in.ndim))
    full = xp.broadcast_to(xp.reshape(p.weight, shape), tuple(p.x_in.shape))
    wt = pick(xp, full, p.targets, p.axis)
    return wt if p.valid is None else xp.where(p.valid, wt, xp.zeros_like(wt))


def _soft_targets(p: XentCall, eps: float) -> Array:
    """Probability targets mixed with the uniform distribution, 0 at masked classes."""
    q = p.targets
    if eps:
        q = (1.0 - eps) * q + _uniform(p, eps)
    return masked(p.xp, _weighted(p, q), p.mask)


def sample_losses(p: XentCall, ly: Array, eps: float) -> Array:
    """``-sum(q * ly)`` for each sample (compute dtype); 0 for the samples left out (ignored,
    or with every class masked).

    A target probability of 0 contributes 0, also where ``ly`` is ``-inf`` (masked classes).
    """
    xp = p.xp
    if p.kind == "index":
        loss = -pick(xp, ly, p.targets, p.axis)
        if p.weight is not None:
            if p.valid is not None:  # (a fully masked sample picks -inf, and its weight is 0)
                loss = xp.where(p.valid, loss, xp.zeros_like(loss))
            loss = loss * _target_weights(p)
        if eps:
            smooth = -xp.sum(_weighted(p, masked(xp, ly, p.mask)) * _uniform(p, 1.0), axis=p.axis)
            loss = (1.0 - eps) * loss + eps * smooth
        if p.valid is not None:
            loss = xp.where(p.valid, loss, xp.zeros_like(loss))
        return loss
    q = _soft_targets(p, eps)
    loss = -xp.sum(q * xp.where(q == 0, xp.zeros_like(ly), ly), axis=p.axis)
    return loss if p.valid is None else xp.where(p.valid, loss, xp.zeros_like(loss))


def _n_samples(p: XentCall) -> Array | float:
    """The divisor of reduction "mean": the counted samples (not ignored, not fully masked: an
    array), else all samples (a number); for index targets with class weights, the sum of the
    counted targets' weights (as torch)."""
    xp = p.xp
    if p.weight is not None and p.kind == "index":
        return xp.sum(_target_weights(p))
    if p.valid is not None:
        return xp.sum(xp.astype(p.valid, p.ctype))
    return float(math.prod(p.loss_shape))


def _divide(xp: Any, a: Array, n: Array | float) -> Array:
    """``a / n``, NaN where ``n`` is 0 (no sample, or every sample ignored: as torch), with no
    warning even when Dask computes it later, outside our ``errstate``."""
    if isinstance(n, float):
        return a / n if n else xp.full_like(a, math.nan)
    empty = n == 0
    return xp.where(empty, xp.full_like(a, math.nan), a / xp.where(empty, xp.ones_like(n), n))


def mean_scale(p: XentCall, a: Array) -> Array:
    """``a`` divided by the count of reduction "mean" (NaN where there is nothing to count)."""
    return _divide(p.xp, a, _n_samples(p))


def reduce(p: XentCall, loss: Array, reduction: str) -> Array:
    """Reduce per-sample losses and round to the result dtype."""
    xp = p.xp
    if reduction == "sum":
        loss = xp.sum(loss)
    elif reduction == "mean":
        loss = mean_scale(p, xp.sum(loss))
    return loss if loss.dtype == p.dtype else xp.astype(loss, p.dtype)


def sample_weights(p: XentCall, reduction: str, dloss: Array | float) -> Array:
    """d(loss)/d(sample loss) for every sample (compute dtype); 0 for samples left out."""
    xp = p.xp
    w = dloss
    if isinstance(w, float):
        w = xp.asarray(w, dtype=p.ctype, device=_compat.device(p.x_in))
    if reduction == "mean":
        w = mean_scale(p, w)
    w = xp.broadcast_to(w, p.loss_shape)
    if p.valid is not None:
        w = xp.where(p.valid, w, xp.zeros_like(w))
    return w


def logp_gradient(p: XentCall, w: Array, eps: float) -> Array:
    """d(loss)/d(ly) = ``-w * q``: the input's shape, compute dtype, 0 at masked classes."""
    xp = p.xp
    wx = xp.expand_dims(w, axis=p.axis)
    # 0.0 - w * q: +0 (not -0) where q is 0.
    if p.kind == "prob":
        return 0.0 - wx * _soft_targets(p, eps)
    hit = _class_ids(xp, p.x_in, p.axis) == xp.expand_dims(p.targets, axis=p.axis)
    q = xp.astype(hit, p.ctype)
    if eps:
        q = (1.0 - eps) * q + _uniform(p, eps)
    return 0.0 - wx * masked(xp, _weighted(p, q), p.mask)


def _zero_ignored(p: XentCall, g: Array) -> Array:
    if p.valid is None:
        return g
    xp = p.xp
    return xp.where(xp.expand_dims(p.valid, axis=p.axis), g, xp.zeros_like(g))
