"""Checks and inspection: the full softmax Jacobian, and a finite-difference check of a VJP."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _compat, _config, backends
from .._call import JACOBIAN, Axis, Call, float_dtype, is_empty, namespace, validate

Array = Any

__all__ = ["check_vjp", "softmax_jacobian"]


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
    xp, (y,), axes, _, dtype, _ = validate(((y, "y"),), axis, None, None)
    rest = [a for a in range(y.ndim) if a not in axes]
    y = xp.permute_dims(y, (*rest, *axes))
    n = math.prod(y.shape[len(rest) :])
    y = xp.reshape(y, (*y.shape[: len(rest)], n))
    if is_empty(tuple(y.shape)):
        return xp.empty((*y.shape, n), dtype=dtype, device=_compat.device(y))
    call = Call(JACOBIAN, xp, (y,), (y.ndim - 1,), None, None, dtype, _config.get_kernels())
    return backends.run(call)


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
    xp, x = namespace(x, "x")
    float_dtype(xp, x, "x")
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
