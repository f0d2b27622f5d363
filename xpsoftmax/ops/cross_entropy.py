"""Cross-entropy on logits: validation into one :class:`~xpsoftmax._call.XentCall`, then the
backend registry (the fused CUDA kernels for CuPy arrays and CUDA tensors, the generic backend
otherwise, whose log-softmax runs on the array's fastest backend).

The validation here also serves the losses (``xpsoftmax.losses``), which start from
probabilities or log-probabilities and share the generic code of
``backends/generic/cross_entropy.py``.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import numpy as np

from .. import _compat, _config, backends
from .._call import (
    CROSS_ENTROPY,
    CROSS_ENTROPY_TARGET_VJP,
    CROSS_ENTROPY_VJP,
    Op,
    XentCall,
    _broadcasts_to,
    _same_shape,
    expand_axes,
    float_dtype,
    is_empty,
    mask,
    namespace,
    normalize_axes,
    same_namespace,
)
from .._dtypes import compute_dtype
from ..backends.generic.cross_entropy import pick

Array = Any

__all__ = [
    "REDUCTIONS",
    "WRT",
    "check_dloss",
    "check_reduction",
    "cross_entropy",
    "cross_entropy_backward",
    "prepare",
    "restore",
    "validate_dloss",
]

#: Reductions of the cross-entropy and the log-likelihood losses.
REDUCTIONS = ("mean", "sum", "none")


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


def _class_axes(axis: Any, ndim: int, name: str) -> tuple[int, ...]:
    """The class axes, sorted and non-negative: one int, or a non-empty tuple of ints."""
    items = axis if isinstance(axis, tuple) else (axis,)
    if not items or any(isinstance(a, bool) or not isinstance(a, (int, np.integer)) for a in items):
        msg = f"axis must be an int or a non-empty tuple of ints (the class axes), got {axis!r}"
        raise TypeError(msg)
    if ndim == 0:
        msg = f"{name} must have at least one dimension (the classes), got a 0-d array"
        raise ValueError(msg)
    return normalize_axes(axis, ndim)


def _classes_last(xp: Any, a: Array, axes: tuple[int, ...]) -> Array:
    """``a`` with its class axes ``axes`` moved to the end and flattened into one (C order)."""
    rest = tuple(i for i in range(a.ndim) if i not in axes)
    n = math.prod(a.shape[i] for i in axes)
    return xp.reshape(xp.permute_dims(a, rest + axes), tuple(a.shape[i] for i in rest) + (n,))


def restore(p: XentCall, a: Array) -> Array:
    """An array of the call's input shape (``p.x_in``) in the layout of the input as given:
    the flattened class axis of several class axes put back where they were."""
    if p.layout is None:
        return a
    shape, axes = p.layout
    rest = tuple(i for i in range(len(shape)) if i not in axes)
    order = rest + axes
    a = p.xp.reshape(a, tuple(shape[i] for i in order))
    return p.xp.permute_dims(a, tuple(order.index(i) for i in range(len(shape))))


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


def prepare(
    x: Any,
    x_name: str,
    targets: Any,
    axis: Any,
    ignore_index: Any,
    where: Any,
    *,
    op: Op = CROSS_ENTROPY,
    reduction: str = "mean",
    eps: float = 0.0,
    weight: Any = None,
) -> XentCall:
    """Validate an input, its targets, the class axis, ``ignore_index`` and ``where``.

    Targets with an integer dtype are class indices, of the input's shape without ``axis``;
    targets with a real floating dtype are probabilities, of the input's shape or broadcast to
    it. Index values are
    checked against the number of classes (and the mask) at once; on Dask the range check runs
    in the graph, when the result is computed, and under ``jax.jit`` values are not checked.
    """
    xp, x = namespace(x, x_name)
    dtype = float_dtype(xp, x, x_name)
    axes = _class_axes(axis, x.ndim, x_name)
    # for the messages
    label = f"axis {axes[0]}" if len(axes) == 1 else f"axes {axes}"
    given = f"axes {axis}" if isinstance(axis, tuple) else f"axis {axis}"
    targets = same_namespace(xp, x, x_name, targets, "targets")
    ignore = _check_ignore_index(ignore_index)
    loss_shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
    if xp.isdtype(targets.dtype, "integral"):
        kind = "index"
        if tuple(targets.shape) != loss_shape:
            msg = (
                f"class-index targets must have the shape of {x_name} without {given}, "
                f"{loss_shape}, got {tuple(targets.shape)}"
            )
            raise ValueError(msg)
    elif xp.isdtype(targets.dtype, "real floating"):
        kind = "prob"
        t_shape, x_shape = tuple(targets.shape), tuple(x.shape)
        if not _same_shape(t_shape, x_shape):
            if not _broadcasts_to(t_shape, x_shape):
                msg = (
                    f"probability targets must have the shape of {x_name}, {x_shape}, or "
                    f"broadcast to it, got {t_shape} (class-index targets need an integer dtype)"
                )
                raise ValueError(msg)
            targets = xp.broadcast_to(targets, x.shape)
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
    m = _xent_mask(xp, x, x_name, where, axes, loss_shape)
    layout = None
    if len(axes) > 1:
        # Several class axes: one problem along a last axis of their product, the gradient
        # put back by restore().
        layout = (tuple(x.shape), axes)
        x = _classes_last(xp, x, axes)
        m = None if m is None else _classes_last(xp, m, axes)
        if kind == "prob":
            targets = _classes_last(xp, targets, axes)
    ax = axes[0] if layout is None else x.ndim - 1
    # Samples with no unmasked class: 0 loss, 0 gradient, left out of the mean.
    kept = None if m is None else xp.any(m, axis=ax)
    ctype = compute_dtype(xp, dtype)
    x_in = x if x.dtype == dtype else xp.astype(x, dtype)
    index = valid = None
    n = x.shape[ax]
    if kind == "prob":
        targets = targets if targets.dtype == ctype else xp.astype(targets, ctype)
    else:
        if _compat.is_dask_array(targets):
            # Reading Dask values would compute: check each block when the graph runs instead
            # (before the cast below, which would wrap uint64 values of 2**63 and more).
            check = functools.partial(_check_block, n=n, ignore=ignore, where=(label, x_name))
            targets = targets.map_blocks(check, dtype=targets.dtype)
        elif targets.dtype == xp.uint64 and not _is_lazy(targets):
            _check_unsigned(xp, targets, n, label, x_name)
        # int64, which torch's gather needs and which holds any ignore_index; JAX without x64
        # has no int64 and keeps its int32.
        if targets.dtype != xp.int64 and not _jax_int32_only(targets):
            targets = xp.astype(targets, xp.int64)
        index = targets
        if ignore is not None:
            valid = targets != ignore
            targets = xp.where(valid, targets, xp.zeros_like(targets))
        if not _is_lazy(targets):
            _check_indices(xp, targets, valid, m, kept, ax, label, n, x_name)
    if kept is not None:
        valid = kept if valid is None else valid & kept
    mode = _config.get_kernels()
    w = _check_weight(xp, x, x_name, weight, n, ctype)
    return XentCall(
        op,
        xp,
        x_in,
        dtype,
        ctype,
        ax,
        kind,
        targets,
        index,
        ignore,
        valid,
        m,
        mode,
        reduction,
        eps,
        weight=w,
        layout=layout,
    )


def _xent_mask(
    xp: Any, x: Array, x_name: str, where: Any, axes: tuple[int, ...], loss_shape: tuple[int, ...]
) -> Array | None:
    """``where`` broadcast to ``x``'s shape: a per-class mask (broadcastable to ``x``) as it is,
    a per-sample mask (of the loss shape, not broadcastable to ``x``) expanded along the class
    axes ``axes``."""
    if where is not None and not isinstance(where, bool):
        where = same_namespace(xp, x, x_name, where, "where")
        w_shape, x_shape = tuple(where.shape), tuple(x.shape)
        if not _broadcasts_to(w_shape, x_shape):
            if not _same_shape(w_shape, loss_shape):
                msg = (
                    f"where of shape {w_shape} neither broadcasts to {x_name} of shape "
                    f"{x_shape} nor has the per-sample loss shape {loss_shape}"
                )
                raise ValueError(msg)
            where = expand_axes(xp, where, axes)
    return mask(xp, x, where)


def _check_weight(xp: Any, x: Array, x_name: str, weight: Any, n: int, ctype: Any) -> Any:
    """Class weights: None, or a 1-D real floating array of ``x``'s namespace, one per class."""
    if weight is None:
        return None
    weight = same_namespace(xp, x, x_name, weight, "weight")
    if not xp.isdtype(weight.dtype, "real floating"):
        msg = f"weight must have a real floating dtype, got {weight.dtype}"
        raise TypeError(msg)
    if tuple(weight.shape) != (n,):
        msg = (
            f"weight must be 1-D with one entry per class, shape ({n},), got {tuple(weight.shape)}"
        )
        raise ValueError(msg)
    return weight if weight.dtype == ctype else xp.astype(weight, ctype)


def _range_error(bad: int, n: int, label: str, x_name: str) -> ValueError:
    msg = (
        f"targets contain the class index {bad}, out of range for {n} classes along "
        f"{label} of {x_name} (valid: 0 to {n - 1}, or ignore_index)"
    )
    return ValueError(msg)


def _check_unsigned(xp: Any, t: Array, n: int, label: str, x_name: str) -> None:
    """uint64 indices of 2**63 and more, which int64 would wrap to negative numbers (and
    ``ignore_index=-100`` would then silently ignore): out of range, named as given."""
    if is_empty(tuple(t.shape)):
        return
    hi = int(xp.max(t))
    if hi > np.iinfo(np.int64).max:
        raise _range_error(hi, n, label, x_name)


def _check_block(block: Any, n: int, ignore: int | None, where: tuple[str, str]) -> Any:
    """One NumPy block of Dask targets, checked when the graph is computed."""
    bad = (block < 0) | (block >= n)
    if ignore is not None:
        bad &= block != ignore
    if bad.any():
        raise _range_error(int(block[bad].flat[0]), n, *where)
    return block


def _check_indices(
    xp: Any,
    t: Array,
    valid: Array | None,
    mask: Array | None,
    kept: Array | None,
    ax: int,
    label: str,
    n: int,
    x_name: str,
) -> None:
    if is_empty(tuple(t.shape)):
        return
    bad = (t < 0) | (t >= n)
    if valid is not None:
        bad = bad & valid  # ignored samples hold 0 here, out of range only when n == 0
    if bool(xp.any(bad)):  # one device sync on the way that succeeds
        lo, hi = int(xp.min(t)), int(xp.max(t))
        raise _range_error(lo if lo < 0 else hi, n, label, x_name)
    if mask is not None:
        hit = pick(xp, mask, t, ax) | ~kept  # a fully masked sample is left out, not an error
        if valid is not None:
            hit = hit | ~valid
        if not bool(xp.all(hit)):
            msg = "targets contain a class index that where= masks out (its loss is infinite)"
            raise ValueError(msg)


def check_dloss(p: XentCall, dloss: Any, reduction: str) -> Array | float:
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
    dloss = same_namespace(xp, ref, "the loss input", dloss, "dloss")
    float_dtype(xp, dloss, "dloss")
    shape = tuple(dloss.shape)
    if shape != () and (reduction != "none" or shape != tuple(loss_shape)):
        what = "a scalar" if reduction != "none" else f"a scalar or of shape {tuple(loss_shape)}"
        msg = f"dloss must be {what} for reduction={reduction!r}, got shape {shape}"
        raise ValueError(msg)
    return dloss if dloss.dtype == dtype else xp.astype(dloss, dtype)


# --------------------------------------------------------------------------------------------
# public functions


def _start(op, logits, targets, axis, reduction, label_smoothing, ignore_index, where, weight):
    reduction = check_reduction(reduction)
    eps = _check_smoothing(label_smoothing)
    return prepare(
        logits,
        "logits",
        targets,
        axis,
        ignore_index,
        where,
        op=op,
        reduction=reduction,
        eps=eps,
        weight=weight,
    )


# fmt: off
def cross_entropy(
    logits: Array, targets: Array, /, axis: int | tuple[int, ...] = -1, *,
    reduction: str = "mean", label_smoothing: float = 0.0, ignore_index: int | None = None,
    where: Array | None = None, weight: Array | None = None,
) -> Array:
    # fmt: on
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
        Either class indices, an integer array of ``logits``' shape without ``axis`` exactly (no
        one-hot matrix is formed), or probabilities, a real floating array of ``logits``' shape
        or broadcastable to it, as in TensorFlow's ``softmax_cross_entropy_with_logits`` (one
        distribution of shape ``(n,)`` for every sample, say; the result dtype is then
        ``result_type(logits, targets)``).
    axis : int or tuple of ints, optional
        The class axis (default ``-1``). torch's class axis is 1: ``cross_entropy(x, t, 1)``
        equals ``torch.nn.functional.cross_entropy(x, t)``. A tuple of axes, as optax's
        ``axis=(1, 2)``: the classes are the flattened product of those axes (C order over the
        axes in increasing order), index targets have ``logits``' shape without all of them and
        index that flattened class space, ``weight`` has one entry per flattened class.
    reduction : {"mean", "sum", "none"}, optional
        ``"none"``: one loss per sample (``logits``' shape without ``axis``); ``"sum"``: their
        sum; ``"mean"`` (default): the sum divided by the number of counted samples, those not
        ignored (``ignore_index``) and not fully masked (``where``); NaN when none counts, as
        in torch when all are ignored. With class weights and index targets, the divisor is
        the sum of ``weight[t]`` over the counted samples.
    label_smoothing : float, optional
        In ``[0, 1]``; mixes the target distribution with the uniform one, as torch does for
        both kinds of targets.
    ignore_index : int, optional
        Samples whose class index equals it contribute 0 loss and 0 gradient and are left out of
        the mean. ``None`` (default) ignores nothing; pass ``-100`` for torch's default. Only for
        index targets (``ValueError`` with probability targets).
    where : array of bool, optional
        Per class, broadcastable to ``logits``: classes where it is False are left out, as in
        :func:`~xpsoftmax.softmax`. The loss is that of the sample restricted to its unmasked
        classes: they take no part in the normalization, probability targets on them are
        dropped, label smoothing spreads over the unmasked classes only (``n`` is their count),
        and their gradient is exactly 0. An index target on a masked class raises
        ``ValueError``. Or per sample, as optax's: of the loss's shape (``logits``' shape without
        ``axis``) and *not* broadcastable to ``logits``, it is expanded along ``axis``, a False
        masking every class of its sample. A shape that is both (``logits`` (4, 4), ``where``
        (4,)) is per class; pass ``xp.expand_dims(where, axis=axis)`` to mean per sample. A
        sample with every class masked, either way, contributes 0 loss and 0 gradient and is
        left out of ``"mean"``, whatever its target.
    weight : array, optional
        Class weights, as torch's ``weight=``: a 1-D real floating array of ``logits``'
        namespace with one entry per class. Each class term of the loss is multiplied by its
        weight (``-sum(weight * q * ly)``; for an index target ``t`` without smoothing
        ``-weight[t] * ly[t]``). ``"mean"`` then divides by the sum of ``weight[t]`` over the
        non-ignored samples for index targets (also with label smoothing, as torch), by the
        number of samples for probability targets.

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
    On CuPy arrays and torch CUDA tensors, index targets along the last axis without ``where``
    run one fused kernel that reads each row of logits once (online max and sum; on torch, the
    backward of autograd is the fused gradient kernel); other cases take the generic path. Rows of
    logits with ``+inf``, ``-inf`` or NaN follow :func:`~xpsoftmax.log_softmax`.

    torch has no ``where``; a fully masked sample is 0 as in optax (which has no reduction) and
    is left out of ``"mean"`` as torch leaves out ignored samples, so that masking a sample
    equals dropping it. torch wants probability targets of the logits' shape; here they
    broadcast, as in TensorFlow, so one shared distribution need not be copied per sample.

    Examples
    --------
    >>> import numpy as np
    >>> import xpsoftmax
    >>> logits = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    >>> round(float(xpsoftmax.cross_entropy(logits, np.array([0, 2]), reduction="sum")), 4)
    1.3382
    """
    p = _start(
        CROSS_ENTROPY, logits, targets, axis, reduction, label_smoothing, ignore_index, where,
        weight,
    )
    return backends.run(p)


#: What :func:`cross_entropy_backward` differentiates with respect to.
WRT = ("logits", "targets")


# fmt: off
def cross_entropy_backward(
    logits: Array, targets: Array, /, axis: int | tuple[int, ...] = -1, *,
    reduction: str = "mean", label_smoothing: float = 0.0, ignore_index: int | None = None,
    where: Array | None = None, weight: Array | None = None, dloss: Array | float | None = None,
    wrt: str = "logits",
) -> Array:
    # fmt: on
    r"""Gradient of :func:`cross_entropy` with respect to the logits (or the targets).

    With the same arguments as :func:`cross_entropy` it returns
    ``(softmax(logits) * sum(q) - q) * w``, ``q`` the sample's target distribution (``sum(q)``
    is 1 unless probability targets do not sum to 1) and ``w`` its weight: ``dloss`` (times
    ``1 / count`` for ``"mean"``), 0 for samples left out (ignored, fully masked). It equals
    torch autograd's gradient of :func:`torch.nn.functional.cross_entropy`.

    With ``wrt="targets"`` it returns the gradient with respect to probability targets,
    ``-(1 - label_smoothing) * weight * ly * w`` for ``ly = log_softmax(logits, axis)``
    (restricted to the unmasked classes), as torch autograd gives it for the ``target`` of
    :func:`torch.nn.functional.cross_entropy` (and TensorFlow for the ``labels`` of
    ``softmax_cross_entropy_with_logits`` v2).

    Parameters
    ----------
    logits, targets, axis, reduction, label_smoothing, ignore_index, where, weight
        As in :func:`cross_entropy` (``q`` above then includes the class weights).
    dloss : float or array, optional
        The upstream gradient d(total)/d(loss): a scalar for ``"mean"`` and ``"sum"``, a scalar
        or an array of the per-sample loss shape for ``"none"``. ``None`` (default) is 1, the
        gradient of the loss itself (of its sum for ``"none"``).
    wrt : {"logits", "targets"}, optional
        What to differentiate with respect to: the logits (default), or the targets, which must
        then be probabilities (class indices are not differentiable: ``ValueError``).

    Returns
    -------
    array
        ``d(loss)/d(logits)``: the namespace, device and shape of ``logits``, the dtype of the
        :func:`cross_entropy` result; or for ``wrt="targets"`` ``d(loss)/d(targets)``, of the
        shape of ``targets`` as given (summed over the axes they were broadcast along) and the
        same dtype. Masked classes and samples left out get exactly 0 (also where ``ly`` is
        ``-inf``).

    Notes
    -----
    For ``wrt="targets"`` the result has the dtype of the loss, ``result_type(logits,
    targets)``, where torch's ``target.grad`` has the targets' dtype: one dtype for both
    gradients, as for the loss itself.

    Examples
    --------
    >>> import numpy as np
    >>> import xpsoftmax
    >>> g = xpsoftmax.cross_entropy_backward(np.zeros((1, 4)), np.array([1]))
    >>> g  # softmax minus one-hot, for the mean over one sample
    array([[ 0.25, -0.75,  0.25,  0.25]])
    >>> xpsoftmax.cross_entropy_backward(np.zeros((1, 2)), np.array([[0.5, 0.5]]), wrt="targets")
    array([[0.69314718, 0.69314718]])
    """
    if not isinstance(wrt, str) or wrt not in WRT:
        msg = f"wrt must be one of {', '.join(map(repr, WRT))}, got {wrt!r}"
        raise ValueError(msg)
    op = CROSS_ENTROPY_VJP if wrt == "logits" else CROSS_ENTROPY_TARGET_VJP
    p = _start(
        op, logits, targets, axis, reduction, label_smoothing, ignore_index, where, weight
    )
    if wrt == "logits":
        return restore(p, backends.run(p.derive(dloss=check_dloss(p, dloss, p.reduction))))
    if p.kind != "prob":
        msg = (
            "wrt='targets' needs probability targets (a real floating array); class indices "
            "are not differentiable"
        )
        raise ValueError(msg)
    g = restore(p, backends.run(p.derive(dloss=check_dloss(p, dloss, p.reduction))))
    g = _sum_to(p.xp, g, tuple(np.shape(targets)))
    return g if g.dtype == p.dtype else p.xp.astype(g, p.dtype)


def _sum_to(xp: Any, g: Array, shape: tuple[int, ...]) -> Array:
    """``g`` summed over the axes along which an array of ``shape`` was broadcast to it."""
    lead = g.ndim - len(shape)
    if lead:
        g = xp.sum(g, axis=tuple(range(lead)))
    axes = tuple(i for i, (d, e) in enumerate(zip(shape, g.shape, strict=True)) if d == 1 != e)
    return xp.sum(g, axis=axes, keepdims=True) if axes else g
