"""The public functions: validate once, infer the namespace, route, write ``out``."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _compat, _dispatch, _generic

Array = Any
Axis = int | tuple[int, ...] | None

__all__ = [
    "check_vjp",
    "log_softmax",
    "log_softmax_backward",
    "log_softmax_jvp",
    "softmax",
    "softmax_backward",
    "softmax_jacobian",
    "softmax_jvp",
]


# --------------------------------------------------------------------------------------------
# validation helpers


def _namespace(x: Any, name: str) -> tuple[Any, Array]:
    """The array-API namespace of ``x``; array-likes (lists, scalars) become NumPy arrays."""
    if not _compat.is_array_api_obj(x):
        kind = type(x).__name__
        try:
            x = np.asarray(x)
        except Exception as exc:
            msg = f"{name} must be an array or array-like, got {kind}"
            raise TypeError(msg) from exc
        if x.dtype == object:
            msg = f"{name} must be a numeric array, got an object array from {kind}"
            raise TypeError(msg)
    return _compat.array_namespace(x), x


def _same_namespace(xp: Any, a: Array, a_name: str, b: Array, b_name: str) -> Array:
    """Check that ``b`` lives in the namespace of ``a`` (array-likes are converted)."""
    if not _compat.is_array_api_obj(b):
        _, b = _namespace(b, b_name)
        if _compat.is_numpy_array(a) or _compat.is_array_api_strict_namespace(xp):
            return xp.asarray(b)
        msg = (
            f"{b_name} must be an array of the same kind as {a_name} "
            f"({type(a).__module__}.{type(a).__qualname__}), got {type(b).__name__}"
        )
        raise TypeError(msg)
    if _compat.array_namespace(b) is not xp:
        msg = (
            f"{a_name} and {b_name} must come from the same array library, got "
            f"{type(a).__module__}.{type(a).__qualname__} and "
            f"{type(b).__module__}.{type(b).__qualname__}"
        )
        raise TypeError(msg)
    return b


# NumPy/CuPy float dtypes, checked first: xp.isdtype is slow and this runs on every call.
_NP_FLOATS = frozenset(np.dtype(t) for t in ("float16", "float32", "float64"))


def _float_dtype(xp: Any, x: Array, name: str) -> Any:
    """The floating dtype the result has for input ``x``."""
    dtype = x.dtype
    if isinstance(dtype, np.dtype) and dtype in _NP_FLOATS:
        # (array-api-strict dtypes hash like NumPy's and warn when compared with them)
        return dtype
    if xp.isdtype(dtype, "complex floating"):
        msg = f"{name} must be real, got complex dtype {dtype}"
        raise TypeError(msg)
    if xp.isdtype(dtype, "real floating"):
        return dtype
    if xp.isdtype(dtype, ("integral", "bool")):
        info = xp.__array_namespace_info__()
        return info.default_dtypes(device=_compat.device(x))["real floating"]
    msg = f"{name} must have a real numeric dtype, got {dtype}"
    raise TypeError(msg)


def _axes(axis: Axis, ndim: int) -> tuple[int, ...]:
    """Normalize ``axis`` to a sorted tuple of distinct non-negative ints."""
    if axis is None:
        return tuple(range(ndim))
    items = axis if isinstance(axis, tuple) else (axis,)
    out = []
    for a in items:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            msg = f"axis must be an int, a tuple of ints or None, got {axis!r}"
            raise TypeError(msg)
        a = operator.index(a)
        if not -ndim <= a < ndim:
            msg = f"axis {a} is out of bounds for an array of dimension {ndim}"
            raise np.exceptions.AxisError(msg)
        out.append(a % ndim)
    if len(set(out)) != len(out):
        msg = f"axis contains a repeated axis: {axis!r}"
        raise ValueError(msg)
    return tuple(sorted(out))


def _known(d: Any) -> bool:
    # Dask arrays of unknown chunk sizes have NaN (or None) entries in their shape.
    return d is not None and not (isinstance(d, float) and d != d)


def _is_empty(shape: tuple[Any, ...]) -> bool:
    return any(d == 0 for d in shape if _known(d))


def _same_shape(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Equal shapes; an unknown (Dask) size matches any size."""
    pairs = zip(a, b, strict=False)
    return len(a) == len(b) and all(p == q or not (_known(p) and _known(q)) for p, q in pairs)


def _broadcasts_to(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether shape ``a`` broadcasts to shape ``b``; an unknown (Dask) size matches any size."""
    pairs = zip(a[::-1], b[::-1], strict=False)
    return len(a) <= len(b) and all(p in (1, q) or not (_known(p) and _known(q)) for p, q in pairs)


def _mask(xp: Any, x: Array, where: Any) -> Array | None:
    if where is None:
        return None
    if isinstance(where, bool):
        where = xp.asarray(where, device=_compat.device(x))
    where = _same_namespace(xp, x, "x", where, "where")
    if not xp.isdtype(where.dtype, "bool"):
        msg = f"where must be a boolean array, got dtype {where.dtype}"
        raise TypeError(msg)
    w_shape, x_shape = tuple(where.shape), tuple(x.shape)
    if not _broadcasts_to(w_shape, x_shape):
        msg = f"where of shape {w_shape} does not broadcast to x of shape {x_shape}"
        raise ValueError(msg)
    if _same_shape(w_shape, x_shape):
        return where  # nothing to broadcast (Dask cannot broadcast to unknown sizes)
    return xp.broadcast_to(where, x.shape)


def _check_out(xp: Any, out: Any, shape: tuple[Any, ...], dtype: Any, ref: Array) -> None:
    if out is None:
        return
    if not _compat.is_array_api_obj(out) or _compat.array_namespace(out) is not xp:
        msg = (
            f"out must be an array of the same kind as the input "
            f"({type(ref).__module__}.{type(ref).__qualname__}), got {type(out).__name__}"
        )
        raise TypeError(msg)
    if _compat.is_numpy_array(out) and not out.flags.writeable:
        msg = "out is a read-only NumPy array; pass a writeable one"
        raise TypeError(msg)
    if not _compat.is_writeable_array(out):
        msg = (
            f"out= needs a writeable array; {type(out).__module__}.{type(out).__qualname__} "
            "arrays are immutable or lazy, use the returned array instead"
        )
        raise TypeError(msg)
    if tuple(out.shape) != tuple(shape):
        msg = f"out has shape {tuple(out.shape)}, expected {tuple(shape)}"
        raise ValueError(msg)
    if out.dtype != dtype:
        msg = f"out has dtype {out.dtype}, expected {dtype}"
        raise ValueError(msg)


def _finish(xp: Any, result: Array, out: Array | None) -> Array:
    if out is None or result is out:
        return result
    out[...] = result
    return out


def _prepare(arrays: tuple[tuple[Any, str], ...], axis: Axis, where: Any, out: Any):
    """Validate inputs: returns (xp, arrays cast to the result dtype, axes, mask, dtype)."""
    (x, x_name), *rest = arrays
    xp, x = _namespace(x, x_name)
    items = [x]
    for b, b_name in rest:
        b = _same_namespace(xp, x, x_name, b, b_name)
        if not _same_shape(tuple(b.shape), tuple(x.shape)):
            msg = (
                f"{x_name} and {b_name} must have the same shape, got "
                f"{tuple(x.shape)} and {tuple(b.shape)}"
            )
            raise ValueError(msg)
        items.append(b)
    dtypes = [_float_dtype(xp, a, n) for a, (_, n) in zip(items, arrays, strict=True)]
    dtype = dtypes[0] if len(dtypes) == 1 else xp.result_type(*dtypes)
    items = [a if a.dtype == dtype else xp.astype(a, dtype) for a in items]
    axes = _axes(axis, x.ndim)
    mask = _mask(xp, x, where)
    _check_out(xp, out, tuple(x.shape), dtype, x)
    return xp, items, axes, mask, dtype


def _empty(xp: Any, x: Array, dtype: Any, out: Array | None) -> Array:
    if out is not None:
        return out
    return xp.empty(x.shape, dtype=dtype, device=_compat.device(x))


def _forward(x, axis, where, out, log):
    xp, (x,), axes, mask, dtype = _prepare(((x, "x"),), axis, where, out)
    if _is_empty(tuple(x.shape)):
        return _empty(xp, x, dtype, out)
    with np.errstate(all="ignore"):
        kernels = _dispatch.select(x, axes)
        if kernels is not None:
            return _finish(xp, kernels.forward(xp, x, axes, mask, log, out), out)
        return _finish(xp, _generic.forward(xp, x, axes, mask, log), out)


def _backward(y, g, axis, where, out, log, names, jvp):
    xp, (y, g), axes, mask, dtype = _prepare(((y, names[0]), (g, names[1])), axis, where, out)
    if _is_empty(tuple(y.shape)):
        return _empty(xp, y, dtype, out)
    with np.errstate(all="ignore"):
        kernels = _dispatch.select(y, axes)
        if kernels is not None:
            if jvp:
                r = kernels.jvp(xp, y, g, axes, mask, log, out)
            else:
                r = kernels.backward(xp, y, g, axes, mask, log, out)
            return _finish(xp, r, out)
        impl = _generic.jvp if jvp else _generic.backward
        return _finish(xp, impl(xp, y, g, axes, mask, log), out)


# --------------------------------------------------------------------------------------------
# public functions


def softmax(x: Array, /, axis: Axis = -1, *, where: Array | None = None, out: Array | None = None):
    r"""Softmax along ``axis``: ``exp(x - max) / sum(exp(x - max))``.

    Parameters
    ----------
    x : array
        Logits, from any array-API library (NumPy, CuPy, PyTorch, JAX, Dask,
        array-api-strict); lists are converted with NumPy. Integer and boolean inputs promote to
        the namespace's default floating dtype; complex input raises ``TypeError``.
    axis : int or tuple of ints or None, optional
        Axis or axes along which softmax normalizes (default ``-1``); negative values count from
        the end, ``None`` means all axes, as in :func:`scipy.special.softmax`. An axis out of range
        raises :class:`numpy.exceptions.AxisError` (a ``ValueError``).
    where : array of bool, optional
        Broadcastable to ``x``. Entries where it is False are left out of the normalization and
        come out as exactly 0; a fully masked row is all 0, never NaN (``jax.nn.softmax``
        semantics).
    out : array, optional
        A writeable array (NumPy, CuPy, torch, array-api-strict) of ``x``'s shape and the result
        dtype to write into; it is returned. JAX and Dask arrays raise ``TypeError``.

    Returns
    -------
    array
        Same namespace, device and shape as ``x``; float16 is accumulated in float32 and
        returned as float16.

    Notes
    -----
    The row maximum is subtracted first, so large logits do not overflow. ``-inf`` entries give
    exactly 0. A NaN poisons only its own row. A row that contains ``+inf`` gives the limit: its
    mass is split evenly over the ``+inf`` entries. A row of all ``-inf`` (without ``where``)
    is NaN, as in torch and scipy. Empty arrays and size-0 axes give empty results.

    Examples
    --------
    >>> import numpy as np
    >>> import xpsoftmax
    >>> xpsoftmax.softmax(np.array([0.0, np.log(3.0)]))
    array([0.25, 0.75])
    """
    return _forward(x, axis, where, out, log=False)


def log_softmax(
    x: Array, /, axis: Axis = -1, *, where: Array | None = None, out: Array | None = None
):
    r"""Log-softmax along ``axis``: ``x - max - log(sum(exp(x - max)))``.

    Computed directly, not as ``log(softmax(x))``, so it stays finite where softmax underflows.

    Parameters
    ----------
    x : array
        Logits; see :func:`softmax` for the accepted types and dtype rules.
    axis : int or tuple of ints or None, optional
        As in :func:`softmax`.
    where : array of bool, optional
        Broadcastable to ``x``; masked entries come out as ``-inf`` and a fully masked row is all
        ``-inf``, never NaN.
    out : array, optional
        As in :func:`softmax`.

    Returns
    -------
    array
        Same namespace, device, shape and dtype rules as :func:`softmax`. ``-inf`` inputs give
        ``-inf``; a row containing ``+inf`` gives ``-log(k)`` at its ``k`` ``+inf`` entries and
        ``-inf`` elsewhere.

    Examples
    --------
    >>> import numpy as np
    >>> import xpsoftmax
    >>> xpsoftmax.log_softmax(np.array([0.0, 0.0]))
    array([-0.69314718, -0.69314718])
    """
    return _forward(x, axis, where, out, log=True)


def softmax_backward(
    y: Array,
    dy: Array,
    /,
    axis: Axis = -1,
    *,
    where: Array | None = None,
    out: Array | None = None,
):
    r"""Vector-Jacobian product of softmax, from its output: ``dx = y * (dy - sum(y * dy))``.

    This is how softmax passes a gradient back for *any* loss: ``dy`` is d(loss)/d(y), the
    result is d(loss)/d(x), and no Jacobian is formed.

    Parameters
    ----------
    y : array
        The forward output ``softmax(x, axis, where=where)``.
    dy : array
        The upstream gradient, same namespace and shape as ``y``.
    axis : int or tuple of ints or None, optional
        The axis the forward pass normalized over.
    where : array of bool, optional
        The forward pass's mask; masked entries get exactly 0 gradient and are left out of the
        sum, so a fully masked row gives 0 (finite even where ``dy`` is not).
    out : array, optional
        As in :func:`softmax`.

    Returns
    -------
    array
        ``dx`` in the namespace, device and shape of ``y``, dtype ``result_type(y, dy)``.

    Raises
    ------
    TypeError
        If ``y`` and ``dy`` come from different array libraries.
    ValueError
        If their shapes differ.

    Examples
    --------
    >>> import numpy as np
    >>> import xpsoftmax
    >>> y = xpsoftmax.softmax(np.array([1.0, 2.0, 3.0]))
    >>> dx = xpsoftmax.softmax_backward(y, np.array([1.0, 0.0, 0.0]))
    >>> bool(abs(dx.sum()) < 1e-15)
    True
    """
    return _backward(y, dy, axis, where, out, log=False, names=("y", "dy"), jvp=False)


def log_softmax_backward(
    ly: Array,
    dy: Array,
    /,
    axis: Axis = -1,
    *,
    where: Array | None = None,
    out: Array | None = None,
):
    r"""Vector-Jacobian product of log-softmax, from its output: ``dx = dy - exp(ly) * sum(dy)``.

    Parameters
    ----------
    ly : array
        The forward output ``log_softmax(x, axis, where=where)``.
    dy : array
        The upstream gradient, same namespace and shape as ``ly``.
    axis : int or tuple of ints or None, optional
        The axis the forward pass normalized over.
    where : array of bool, optional
        The forward pass's mask; masked entries get exactly 0 gradient and are left out of the sum.
    out : array, optional
        As in :func:`softmax`.

    Returns
    -------
    array
        ``dx`` in the namespace, device and shape of ``ly``.

    Examples
    --------
    >>> import numpy as np
    >>> import xpsoftmax
    >>> ly = xpsoftmax.log_softmax(np.array([0.0, 0.0]))
    >>> xpsoftmax.log_softmax_backward(ly, np.array([1.0, 0.0]))
    array([ 0.5, -0.5])
    """
    return _backward(ly, dy, axis, where, out, log=True, names=("ly", "dy"), jvp=False)


def softmax_jvp(y: Array, dx: Array, /, axis: Axis = -1, *, where: Array | None = None):
    r"""Jacobian-vector product of softmax: the tangent of ``y`` for a tangent ``dx`` of ``x``.

    ``dy = y * (dx - sum(y * dx))``; the softmax Jacobian is symmetric, so this is the VJP formula.

    Parameters
    ----------
    y : array
        The forward output ``softmax(x, axis, where=where)``.
    dx : array
        The input tangent, same namespace and shape as ``y``.
    axis : int or tuple of ints or None, optional
        The axis the forward pass normalized over.
    where : array of bool, optional
        The forward pass's mask; masked entries get exactly 0.

    Returns
    -------
    array
        The output tangent, in the namespace, device and shape of ``y``.

    Examples
    --------
    >>> import numpy as np
    >>> import xpsoftmax
    >>> y = xpsoftmax.softmax(np.zeros(4))
    >>> xpsoftmax.softmax_jvp(y, np.ones(4))  # shifting every logit changes nothing
    array([0., 0., 0., 0.])
    """
    return _backward(y, dx, axis, where, None, log=False, names=("y", "dx"), jvp=True)


def log_softmax_jvp(ly: Array, dx: Array, /, axis: Axis = -1, *, where: Array | None = None):
    r"""Jacobian-vector product of log-softmax: ``dly = dx - sum(exp(ly) * dx)``.

    Parameters
    ----------
    ly : array
        The forward output ``log_softmax(x, axis, where=where)``.
    dx : array
        The input tangent, same namespace and shape as ``ly``.
    axis : int or tuple of ints or None, optional
        The axis the forward pass normalized over.
    where : array of bool, optional
        The forward pass's mask; masked entries get exactly 0.

    Returns
    -------
    array
        The output tangent, in the namespace, device and shape of ``ly``.

    Examples
    --------
    >>> import numpy as np
    >>> import xpsoftmax
    >>> ly = xpsoftmax.log_softmax(np.zeros(2))
    >>> xpsoftmax.log_softmax_jvp(ly, np.array([1.0, 0.0]))
    array([ 0.5, -0.5])
    """
    return _backward(ly, dx, axis, where, None, log=True, names=("ly", "dx"), jvp=True)


def softmax_jacobian(y: Array, /, axis: Axis = -1):
    r"""The full softmax Jacobian ``J[..., i, j] = dy_i / dx_j = y_i (delta_ij - y_j)``.

    Forming it costs ``n**2`` memory per row; prefer :func:`softmax_backward` (VJP) or
    :func:`softmax_jvp` to apply it. It is meant for inspection, teaching and tests.

    Parameters
    ----------
    y : array
        The forward output ``softmax(x, axis)``.
    axis : int or tuple of ints or None, optional
        The axis the forward pass normalized over. Several axes are moved to the end, in order,
        and flattened into one of length ``n``.

    Returns
    -------
    array
        Shape: ``y``'s shape with ``axis`` moved last, plus a trailing ``n``.

    Examples
    --------
    >>> import numpy as np
    >>> import xpsoftmax
    >>> xpsoftmax.softmax_jacobian(np.array([0.5, 0.5]))
    array([[ 0.25, -0.25],
           [-0.25,  0.25]])
    """
    xp, (y,), axes, _, dtype = _prepare(((y, "y"),), axis, None, None)
    rest = [a for a in range(y.ndim) if a not in axes]
    y = xp.permute_dims(y, (*rest, *axes))
    n = math.prod(y.shape[len(rest) :])
    y = xp.reshape(y, (*y.shape[: len(rest)], n))
    if _is_empty(tuple(y.shape)):
        return xp.empty((*y.shape, n), dtype=dtype, device=_compat.device(y))
    return _generic.jacobian(xp, y)


def check_vjp(
    f: Callable[..., Array],
    vjp: Callable[..., Array],
    x: Array,
    /,
    axis: Axis = -1,
    *,
    rtol: float = 1e-6,
    atol: float = 1e-9,
    eps: float = 1e-6,
    seed: int = 0,
    n_directions: int = 4,
) -> bool:
    r"""Check a vector-Jacobian product against central finite differences, in float64.

    For random cotangents ``dy`` and random directions ``v`` it compares
    ``<vjp(f(x), dy), v>`` with ``<dy, (f(x + eps v) - f(x - eps v)) / (2 eps)>``.
    A derivative that leaves out the off-diagonal Jacobian terms (the elementwise
    ``y * (1 - y)`` shortcut) fails it.

    Parameters
    ----------
    f : callable
        ``f(x, axis=axis)``, the forward function.
    vjp : callable
        ``vjp(f(x, axis=axis), dy, axis=axis)``, the convention of :func:`softmax_backward` and
        :func:`log_softmax_backward` (forward output first).
    x : array
        The point to check at; converted to float64 in its own namespace (to NumPy where the
        namespace has no float64, such as JAX without ``jax_enable_x64``).
    axis : int or tuple of ints or None, optional
        Passed to ``f`` and ``vjp``.
    rtol, atol : float, optional
        Tolerances on each directional derivative, relative to the larger of the two sides.
    eps : float, optional
        The finite-difference step.
    seed : int, optional
        Seed of the random cotangents and directions.
    n_directions : int, optional
        How many random (cotangent, direction) pairs to try.

    Returns
    -------
    bool
        True when every pair agrees within the tolerances.

    Examples
    --------
    >>> import numpy as np
    >>> import xpsoftmax
    >>> x = np.random.default_rng(0).normal(size=(3, 5))
    >>> xpsoftmax.check_vjp(xpsoftmax.softmax, xpsoftmax.softmax_backward, x)
    True
    >>> wrong = lambda y, dy, axis=-1: y * (1 - y) * dy
    >>> xpsoftmax.check_vjp(xpsoftmax.softmax, wrong, x)
    False
    """
    xp, x = _namespace(x, "x")
    _float_dtype(xp, x, "x")
    x64 = xp.astype(x, xp.float64) if _has_float64(xp) else None
    if x64 is None or x64.dtype != xp.float64:
        xp, x64 = _compat.array_namespace(np.empty(0)), np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    dev = _compat.device(x64)
    shape = tuple(x64.shape)

    def rand() -> Array:
        return xp.asarray(rng.standard_normal(shape), dtype=xp.float64, device=dev)

    y = f(x64, axis=axis)
    for _ in range(n_directions):
        dy, v = rand(), rand()
        lhs = float(xp.sum(vjp(y, dy, axis=axis) * v))
        diff = f(x64 + eps * v, axis=axis) - f(x64 - eps * v, axis=axis)
        rhs = float(xp.sum(dy * diff)) / (2 * eps)
        if not math.isfinite(lhs) or not math.isfinite(rhs):
            return False
        if abs(lhs - rhs) > atol + rtol * max(abs(lhs), abs(rhs)):
            return False
    return True


def _has_float64(xp: Any) -> bool:
    if _compat.is_jax_array(xp.zeros(0)):
        import jax

        return bool(jax.config.jax_enable_x64)
    return hasattr(xp, "float64")
