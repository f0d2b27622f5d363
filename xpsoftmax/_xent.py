"""Cross-entropy on logits, and the negative log-likelihood core that the losses share.

:func:`cross_entropy` and :func:`cross_entropy_backward` validate once, infer the namespace and
route: CuPy arrays with class-index targets on the last axis go to the fused kernels of
``kernels/cross_entropy.cu``; everything else takes the generic path, written with the public
:func:`~xpsoftmax.log_softmax` and :func:`~xpsoftmax.log_softmax_backward` and a few array-API
operations, so it runs on every backend (lazily on Dask, under ``jax.jit``).

The generic path works on log-probabilities ``ly``: the loss of a sample is ``-sum(q * ly)`` over
the classes for the target distribution ``q`` (the one-hot of a class index, or the given
probabilities, mixed with the uniform distribution by label smoothing), and its gradient with
respect to ``ly`` is ``-w * q`` for the sample's weight ``w`` (from the reduction and ``dloss``).
Index targets are gathered with ``take_along_axis``; no one-hot matrix of floats is formed (the
backward compares class ids with the targets, a boolean it needs once to place ``q``).
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _api, _compat, _dispatch
from ._api import log_softmax, log_softmax_backward
from ._kernel_specs import CTYPES

Array = Any

__all__ = ["cross_entropy", "cross_entropy_backward"]

#: Reductions of the cross-entropy and the log-likelihood losses.
REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------
# validation


@dataclass(frozen=True)
class Problem:
    """A validated input (logits or log-probabilities) with its targets.

    Attributes
    ----------
    xp : namespace
    x_in : array
        The input in the result dtype (what the kernels read); ``x`` is it in the compute dtype,
        made on first use.
    dtype : dtype
        The dtype of the results.
    ctype : dtype
        The compute dtype: float32 for half precision, else ``dtype``.
    axis : int
        The class axis, non-negative.
    kind : {"index", "prob"}
    targets : array
        Class indices (int64; ignored entries replaced by 0) or probabilities (compute dtype).
    index : array or None
        Class indices as int64 with ignored entries kept (what the kernels read).
    ignore : int or None
    valid : array of bool or None
        The non-ignored samples; None when nothing can be ignored.
    mask : array of bool or None
        ``where`` broadcast to the input's shape.
    """

    xp: Any
    x_in: Array
    dtype: Any
    ctype: Any
    axis: int
    kind: str
    targets: Array
    index: Array | None
    ignore: int | None
    valid: Array | None
    mask: Array | None

    @functools.cached_property
    def x(self) -> Array:
        """The input in the compute dtype (the generic path's; the kernels read ``x_in``)."""
        x = self.x_in
        return x if x.dtype == self.ctype else self.xp.astype(x, self.ctype)

    @property
    def n_classes(self) -> int:
        return self.x_in.shape[self.axis]

    @property
    def loss_shape(self) -> tuple[int, ...]:
        return tuple(d for i, d in enumerate(self.x_in.shape) if i != self.axis)


def check_reduction(reduction: Any, allowed: tuple[str, ...] = REDUCTIONS) -> str:
    """``reduction`` if it is one of ``allowed``, else a ValueError listing them."""
    if not isinstance(reduction, str) or reduction not in allowed:
        msg = f"reduction must be one of {', '.join(map(repr, allowed))}, got {reduction!r}"
        raise ValueError(msg)
    return reduction


def _check_smoothing(label_smoothing: Any) -> float:
    if isinstance(label_smoothing, bool) or not isinstance(
        label_smoothing, (int, float, np.integer, np.floating)
    ):
        msg = f"label_smoothing must be a real number in [0, 1], got {label_smoothing!r}"
        raise TypeError(msg)
    value = float(label_smoothing)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        msg = f"label_smoothing must be in [0, 1], got {label_smoothing!r}"
        raise ValueError(msg)
    return value


def _check_ignore_index(ignore_index: Any) -> int | None:
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        msg = f"ignore_index must be an int or None, got {ignore_index!r}"
        raise TypeError(msg)
    return operator.index(ignore_index)


def _class_axis(axis: Any, ndim: int, name: str) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        msg = f"axis must be a single int (the class axis), got {axis!r}"
        raise TypeError(msg)
    if ndim == 0:
        msg = f"{name} must have at least one dimension (the classes), got a 0-d array"
        raise ValueError(msg)
    return _api._axes(axis, ndim)[0]


def _is_lazy(x: Array) -> bool:
    """True when reading values would compute a graph (Dask) or is impossible (JAX tracing)."""
    if _compat.is_dask_array(x):
        return True
    if _compat.is_jax_array(x):
        import jax

        return isinstance(x, jax.core.Tracer)
    return False


def _jax_int32_only(x: Array) -> bool:
    if not _compat.is_jax_array(x):
        return False
    import jax

    return not jax.config.jax_enable_x64


def prepare(x: Any, x_name: str, targets: Any, axis: Any, ignore_index: Any, where: Any) -> Problem:
    """Validate an input, its targets, the class axis, ``ignore_index`` and ``where``.

    Targets with an integer dtype are class indices, of the input's shape without ``axis``;
    targets with a real floating dtype are probabilities, of the input's shape. Index values are
    checked against the number of classes (and the mask) at once; on Dask the range check runs
    in the graph, when the result is computed, and under ``jax.jit`` values are not checked.
    """
    xp, x = _api._namespace(x, x_name)
    dtype = _api._float_dtype(xp, x, x_name)
    ax = _class_axis(axis, x.ndim, x_name)
    targets = _api._same_namespace(xp, x, x_name, targets, "targets")
    ignore = _check_ignore_index(ignore_index)
    loss_shape = tuple(d for i, d in enumerate(x.shape) if i != ax)
    if xp.isdtype(targets.dtype, "integral"):
        kind = "index"
        if tuple(targets.shape) != loss_shape:
            msg = (
                f"class-index targets must have the shape of {x_name} without axis {axis}, "
                f"{loss_shape}, got {tuple(targets.shape)}"
            )
            raise ValueError(msg)
    elif xp.isdtype(targets.dtype, "real floating"):
        kind = "prob"
        if tuple(targets.shape) != tuple(x.shape):
            msg = (
                f"probability targets must have the shape of {x_name}, {tuple(x.shape)}, got "
                f"{tuple(targets.shape)} (class-index targets need an integer dtype)"
            )
            raise ValueError(msg)
        if ignore is not None:
            msg = "ignore_index applies only to class-index targets, not to probability targets"
            raise ValueError(msg)
        dtype = xp.result_type(dtype, targets.dtype)
    else:
        msg = (
            "targets must be class indices (an integer array) or probabilities (a real floating "
            f"array), got dtype {targets.dtype}"
        )
        raise TypeError(msg)
    mask = _api._mask(xp, x, where)
    ctype = xp.float32 if xp.finfo(dtype).bits < 32 else dtype
    x_in = x if x.dtype == dtype else xp.astype(x, dtype)
    index = valid = None
    if kind == "prob":
        targets = targets if targets.dtype == ctype else xp.astype(targets, ctype)
    else:
        # int64, which torch's gather needs and which holds any ignore_index; JAX without x64
        # has no int64 and keeps its int32.
        if targets.dtype != xp.int64 and not _jax_int32_only(targets):
            targets = xp.astype(targets, xp.int64)
        if _compat.is_dask_array(targets):
            # Reading Dask values would compute: check each block when the graph runs instead.
            check = functools.partial(
                _check_block, n=x.shape[ax], ignore=ignore, where=(ax, x_name)
            )
            targets = targets.map_blocks(check, dtype=targets.dtype)
        index = targets
        if ignore is not None:
            valid = targets != ignore
            targets = xp.where(valid, targets, xp.zeros_like(targets))
        if not _is_lazy(targets):
            _check_indices(xp, targets, valid, mask, ax, x.shape[ax], x_name)
    return Problem(xp, x_in, dtype, ctype, ax, kind, targets, index, ignore, valid, mask)


def _range_error(bad: int, n: int, ax: int, x_name: str) -> ValueError:
    msg = (
        f"targets contain the class index {bad}, out of range for {n} classes along axis "
        f"{ax} of {x_name} (valid: 0 to {n - 1}, or ignore_index)"
    )
    return ValueError(msg)


def _check_block(block: Any, n: int, ignore: int | None, where: tuple[int, str]) -> Any:
    """One NumPy block of Dask targets, checked when the graph is computed."""
    bad = (block < 0) | (block >= n)
    if ignore is not None:
        bad &= block != ignore
    if bad.any():
        raise _range_error(int(block[bad].flat[0]), n, *where)
    return block


def _check_indices(
    xp: Any, t: Array, valid: Array | None, mask: Array | None, ax: int, n: int, x_name: str
) -> None:
    if _api._is_empty(tuple(t.shape)):
        return
    bad = (t < 0) | (t >= n)
    if valid is not None:
        bad = bad & valid  # ignored samples hold 0 here, out of range only when n == 0
    if bool(xp.any(bad)):  # one device sync on the way that succeeds
        lo, hi = int(xp.min(t)), int(xp.max(t))
        raise _range_error(lo if lo < 0 else hi, n, ax, x_name)
    if mask is not None:
        hit = _pick(xp, mask, t, ax)
        if valid is not None:
            hit = hit | ~valid
        if not bool(xp.all(hit)):
            msg = "targets contain a class index that where= masks out (its loss is infinite)"
            raise ValueError(msg)


def check_dloss(p: Problem, dloss: Any, reduction: str) -> Array | float:
    """The upstream gradient of a cross-entropy or log-likelihood loss, in the compute dtype."""
    return validate_dloss(p.xp, p.x_in, p.ctype, p.loss_shape, dloss, reduction)


def validate_dloss(
    xp: Any, ref: Array, dtype: Any, loss_shape: tuple[int, ...], dloss: Any, reduction: str
) -> Array | float:
    """The upstream gradient of a loss: a float, or an array of ``ref``'s namespace in ``dtype``.

    ``None`` is 1; a scalar (Python number or 0-d array) is accepted for every reduction and, for
    ``"none"``, also an array of the per-sample loss shape ``loss_shape``.
    """
    if dloss is None:
        return 1.0
    if isinstance(dloss, (int, float, np.integer, np.floating)) and not isinstance(dloss, bool):
        return float(dloss)
    dloss = _api._same_namespace(xp, ref, "the loss input", dloss, "dloss")
    _api._float_dtype(xp, dloss, "dloss")
    shape = tuple(dloss.shape)
    if shape != () and (reduction != "none" or shape != tuple(loss_shape)):
        what = "a scalar" if reduction != "none" else f"a scalar or of shape {tuple(loss_shape)}"
        msg = f"dloss must be {what} for reduction={reduction!r}, got shape {shape}"
        raise ValueError(msg)
    return dloss if dloss.dtype == dtype else xp.astype(dloss, dtype)


# --------------------------------------------------------------------------------------------
# the generic computation


def _pick(xp: Any, a: Array, t: Array, ax: int) -> Array:
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


def _masked(xp: Any, a: Array, mask: Array | None) -> Array:
    return a if mask is None else xp.where(mask, a, xp.zeros_like(a))


def _uniform(p: Problem, eps: float) -> Array | float:
    """``eps / n``: the smoothing mass of each class, ``n`` the (unmasked) classes per sample."""
    if p.mask is None:
        return eps / p.n_classes
    xp = p.xp
    count = xp.sum(xp.astype(p.mask, p.ctype), axis=p.axis, keepdims=True)
    return eps / xp.maximum(count, xp.ones_like(count))  # a fully masked sample has no classes


def _soft_targets(p: Problem, eps: float) -> Array:
    """Probability targets mixed with the uniform distribution, 0 at masked classes."""
    q = p.targets
    if eps:
        q = (1.0 - eps) * q + _uniform(p, eps)
    return _masked(p.xp, q, p.mask)


def sample_losses(p: Problem, ly: Array, eps: float) -> Array:
    """``-sum(q * ly)`` for each sample (compute dtype); 0 for ignored samples.

    A target probability of 0 contributes 0, also where ``ly`` is ``-inf`` (masked classes).
    """
    xp = p.xp
    if p.kind == "index":
        loss = -_pick(xp, ly, p.targets, p.axis)
        if eps:
            smooth = -xp.sum(_masked(xp, ly, p.mask) * _uniform(p, 1.0), axis=p.axis)
            loss = (1.0 - eps) * loss + eps * smooth
        if p.valid is not None:
            loss = xp.where(p.valid, loss, xp.zeros_like(loss))
        return loss
    q = _soft_targets(p, eps)
    return -xp.sum(q * xp.where(q == 0, xp.zeros_like(ly), ly), axis=p.axis)


def _n_samples(p: Problem) -> Array | float:
    """The divisor of reduction "mean": non-ignored samples for index targets (an array), else
    all samples (a number)."""
    xp = p.xp
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


def reduce(p: Problem, loss: Array, reduction: str) -> Array:
    """Reduce per-sample losses and round to the result dtype."""
    xp = p.xp
    if reduction == "sum":
        loss = xp.sum(loss)
    elif reduction == "mean":
        loss = _divide(xp, xp.sum(loss), _n_samples(p))
    return loss if loss.dtype == p.dtype else xp.astype(loss, p.dtype)


def sample_weights(p: Problem, reduction: str, dloss: Array | float) -> Array:
    """d(loss)/d(sample loss) for every sample (compute dtype); 0 for ignored samples."""
    xp = p.xp
    w = dloss
    if isinstance(w, float):
        w = xp.asarray(w, dtype=p.ctype, device=_compat.device(p.x_in))
    if reduction == "mean":
        w = _divide(xp, w, _n_samples(p))
    w = xp.broadcast_to(w, p.loss_shape)
    if p.valid is not None:
        w = xp.where(p.valid, w, xp.zeros_like(w))
    return w


def logp_gradient(p: Problem, w: Array, eps: float) -> Array:
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
    return 0.0 - wx * _masked(xp, q, p.mask)


def _zero_ignored(p: Problem, g: Array) -> Array:
    if p.valid is None:
        return g
    xp = p.xp
    return xp.where(xp.expand_dims(p.valid, axis=p.axis), g, xp.zeros_like(g))


# --------------------------------------------------------------------------------------------
# the fused CuPy kernels (kernels/cross_entropy.cu)


def _kernel_takes(p: Problem) -> bool:
    """Whether the fused kernels cover this call: CuPy, index targets, last axis, no mask."""
    return (
        _compat.is_cupy_array(p.x_in)
        and _dispatch.get_kernels() != "never"
        and p.kind == "index"
        and p.axis == p.x_in.ndim - 1
        and p.mask is None
        and str(p.x_in.dtype) in CTYPES
    )


def _launch(direction: str, p: Problem, rows: int, head: tuple[Any, ...], eps: float) -> None:
    """Launch one kernel: a block per row, grid-stride over rows (kernel arguments: ``head``,
    then rows, classes, ignore_index, whether it is set, label smoothing)."""
    from . import _kernels

    name = f"xps_xent_{direction}<{CTYPES[str(p.x_in.dtype)]}>"
    kernel = _kernels.get_function("cross_entropy.cu", name)
    n = p.n_classes
    block = 32 if n <= 128 else 64 if n <= 512 else 128 if n <= 2048 else 256
    grid = max(1, min(rows, _kernels.occupancy_grid(kernel, block)))
    ignore = np.int64(0 if p.ignore is None else p.ignore)
    tail = (np.int64(rows), np.int64(n), ignore, np.int32(p.ignore is not None), np.float64(eps))
    kernel((grid,), (block,), (*head, *tail))


def _kernel_rows(p: Problem) -> tuple[Any, Array, Array, int]:
    import cupy

    rows = math.prod(p.loss_shape)
    x = cupy.ascontiguousarray(p.x_in).reshape(rows, p.n_classes)
    t = cupy.ascontiguousarray(p.index).reshape(rows)
    return cupy, x, t, rows


def _cupy_forward(p: Problem, reduction: str, eps: float) -> Array:
    cupy, x, t, rows = _kernel_rows(p)
    loss = cupy.empty(rows, dtype=p.ctype)  # float32 for float16, rounded once in reduce()
    if rows:
        _launch("fwd", p, rows, (x, t, loss), eps)
    return reduce(p, loss.reshape(p.loss_shape), reduction)


def _cupy_backward(p: Problem, reduction: str, eps: float, dloss: Array | float) -> Array:
    cupy, x, t, rows = _kernel_rows(p)
    dx = cupy.empty(x.shape, dtype=x.dtype)
    if rows and p.n_classes:
        if reduction == "none" and not isinstance(dloss, float) and dloss.ndim:
            scale, stride = cupy.ascontiguousarray(dloss, dtype=p.ctype).reshape(rows), 1
        else:  # one scale for every row; ignored rows are zeroed by the kernel
            scale = cupy.asarray(dloss, dtype=p.ctype).reshape(1)
            if reduction == "mean":
                scale = _divide(p.xp, scale, _n_samples(p))
            stride = 0
        _launch("bwd", p, rows, (x, t, scale, np.int64(stride), dx), eps)
    return dx.reshape(p.x_in.shape)


# --------------------------------------------------------------------------------------------
# public functions


def _start(logits, targets, axis, reduction, label_smoothing, ignore_index, where):
    reduction = check_reduction(reduction)
    eps = _check_smoothing(label_smoothing)
    return prepare(logits, "logits", targets, axis, ignore_index, where), reduction, eps


def cross_entropy(
    logits: Array,
    targets: Array,
    /,
    axis: int = -1,
    *,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int | None = None,
    where: Array | None = None,
) -> Array:
    r"""Cross-entropy between ``softmax(logits)`` and targets, computed from the logits.

    Matches :func:`torch.nn.functional.cross_entropy` (values and gradients, see
    :func:`cross_entropy_backward`) with the class axis at ``axis`` instead of 1. For a sample
    with log-probabilities ``ly = log_softmax(logits, axis)`` and ``n`` classes, the loss is
    ``-sum(q * ly)`` with target distribution

    * class-index target ``t``: ``q = (1 - label_smoothing) * onehot(t) + label_smoothing / n``;
    * probability targets ``p``: ``q = (1 - label_smoothing) * p + label_smoothing / n``.

    Parameters
    ----------
    logits : array
        Unnormalized scores, classes along ``axis``. Integer input promotes to the default
        floating dtype; float16 is computed in float32 and rounded once.
    targets : array
        Either class indices, an integer array of ``logits``' shape without ``axis`` (no one-hot
        matrix is formed), or probabilities, a real floating array of ``logits``' shape (the
        result dtype is then ``result_type(logits, targets)``).
    axis : int, optional
        The class axis (default ``-1``). torch's class axis is 1: ``cross_entropy(x, t, 1)``
        equals ``torch.nn.functional.cross_entropy(x, t)``.
    reduction : {"mean", "sum", "none"}, optional
        ``"none"``: one loss per sample (``logits``' shape without ``axis``); ``"sum"``: their
        sum; ``"mean"`` (default): the sum divided by the number of non-ignored samples for index
        targets (NaN when all are ignored, as in torch), by the number of samples for
        probability targets.
    label_smoothing : float, optional
        In ``[0, 1]``; mixes the target distribution with the uniform one, as torch does for
        both kinds of targets.
    ignore_index : int, optional
        Samples whose class index equals it contribute 0 loss and 0 gradient and are left out of
        the mean. ``None`` (default) ignores nothing; pass ``-100`` for torch's default. Only for
        index targets (``ValueError`` with probability targets).
    where : array of bool, optional
        Broadcastable to ``logits``: classes where it is False are left out, as in
        :func:`~xpsoftmax.softmax`. The loss is that of the sample restricted to its unmasked
        classes: they take no part in the normalization, probability targets on them are
        dropped, label smoothing spreads over the unmasked classes only (``n`` is their count),
        and their gradient is exactly 0. An index target on a masked class raises
        ``ValueError``.

    Returns
    -------
    array
        The loss in the namespace and on the device of ``logits``: 0-d for ``"mean"`` and
        ``"sum"``, per sample for ``"none"``.

    Raises
    ------
    TypeError
        Bad types: targets neither integer nor real floating, a non-integer ``axis`` or
        ``ignore_index``, arrays of different libraries.
    ValueError
        Bad values: target shape, a class index outside ``[0, n)`` (the message names it; on
        Dask raised when the result is computed, not checked inside ``jax.jit``), an index
        target on a masked class (not checked on Dask or inside ``jax.jit``, where its loss is
        ``inf``), ``label_smoothing`` outside ``[0, 1]``, an unknown ``reduction``.

    Notes
    -----
    On CuPy, index targets along the last axis without ``where`` run one fused kernel that reads
    each row of logits once (online max and sum); other cases take the generic path. Rows of
    logits with ``+inf``, ``-inf`` or NaN follow :func:`~xpsoftmax.log_softmax`.

    Examples
    --------
    >>> import numpy as np
    >>> import xpsoftmax
    >>> logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    >>> round(float(xpsoftmax.cross_entropy(logits, np.array([0, 2]), reduction="sum")), 4)
    1.3382
    """
    p, reduction, eps = _start(
        logits, targets, axis, reduction, label_smoothing, ignore_index, where
    )
    with np.errstate(all="ignore"):
        if _kernel_takes(p):
            # CuPy, index targets, last axis, no mask: the fused kernel.
            return _cupy_forward(p, reduction, eps)
        ly = log_softmax(p.x, p.axis, where=p.mask)
        return reduce(p, sample_losses(p, ly, eps), reduction)


def cross_entropy_backward(
    logits: Array,
    targets: Array,
    /,
    axis: int = -1,
    *,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    ignore_index: int | None = None,
    where: Array | None = None,
    dloss: Array | float | None = None,
) -> Array:
    r"""Gradient of :func:`cross_entropy` with respect to the logits.

    With the same arguments as :func:`cross_entropy` it returns
    ``(softmax(logits) * sum(q) - q) * w``, ``q`` the sample's target distribution (``sum(q)``
    is 1 unless probability targets do not sum to 1) and ``w`` its weight: ``dloss`` (times
    ``1 / count`` for ``"mean"``), 0 for ignored samples. It equals torch autograd's gradient of
    :func:`torch.nn.functional.cross_entropy`.

    Parameters
    ----------
    logits, targets, axis, reduction, label_smoothing, ignore_index, where
        As in :func:`cross_entropy`.
    dloss : float or array, optional
        The upstream gradient d(total)/d(loss): a scalar for ``"mean"`` and ``"sum"``, a scalar
        or an array of the per-sample loss shape for ``"none"``. ``None`` (default) is 1, the
        gradient of the loss itself (of its sum for ``"none"``).

    Returns
    -------
    array
        ``d(loss)/d(logits)``: the namespace, device and shape of ``logits``, the dtype of the
        :func:`cross_entropy` result. Masked classes and ignored samples get exactly 0.

    Examples
    --------
    >>> import numpy as np
    >>> import xpsoftmax
    >>> g = xpsoftmax.cross_entropy_backward(np.zeros((1, 4)), np.array([1]))
    >>> g  # softmax minus one-hot, for the mean over one sample
    array([[ 0.25, -0.75,  0.25,  0.25]])
    """
    p, reduction, eps = _start(
        logits, targets, axis, reduction, label_smoothing, ignore_index, where
    )
    dloss = check_dloss(p, dloss, reduction)
    xp = p.xp
    with np.errstate(all="ignore"):
        if _kernel_takes(p):
            # CuPy, index targets, last axis, no mask: the fused kernel.
            return _cupy_backward(p, reduction, eps, dloss)
        ly = log_softmax(p.x, p.axis, where=p.mask)
        g = logp_gradient(p, sample_weights(p, reduction, dloss), eps)
        dx = _zero_ignored(p, log_softmax_backward(ly, g, p.axis, where=p.mask))
        return dx if dx.dtype == p.dtype else xp.astype(dx, p.dtype)
