"""Every error path: the exception type and a message that names the argument and the problem."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from _helpers import Backend

import xpsoftmax

FORWARD = [
    pytest.param(xpsoftmax.softmax, id="softmax"),
    pytest.param(xpsoftmax.log_softmax, id="log_softmax"),
]
# (function, name of its first argument, name of its second argument)
TWO_ARG = [
    pytest.param(xpsoftmax.softmax_backward, "y", "dy", id="softmax_backward"),
    pytest.param(xpsoftmax.log_softmax_backward, "ly", "dy", id="log_softmax_backward"),
    pytest.param(xpsoftmax.softmax_jvp, "y", "dx", id="softmax_jvp"),
    pytest.param(xpsoftmax.log_softmax_jvp, "ly", "dx", id="log_softmax_jvp"),
]
WITH_OUT = [
    pytest.param(lambda a, **kw: xpsoftmax.softmax(a, **kw), id="softmax"),
    pytest.param(lambda a, **kw: xpsoftmax.log_softmax(a, **kw), id="log_softmax"),
    pytest.param(lambda a, **kw: xpsoftmax.softmax_backward(a, a, **kw), id="softmax_backward"),
    pytest.param(
        lambda a, **kw: xpsoftmax.log_softmax_backward(a, a, **kw), id="log_softmax_backward"
    ),
]


def _all_single(a, **kw):
    """Each public function applied to one array (the second argument, where any, is a copy)."""
    return [
        lambda: xpsoftmax.softmax(a, **kw),
        lambda: xpsoftmax.log_softmax(a, **kw),
        lambda: xpsoftmax.softmax_backward(a, a, **kw),
        lambda: xpsoftmax.log_softmax_backward(a, a, **kw),
        lambda: xpsoftmax.softmax_jvp(a, a, **kw),
        lambda: xpsoftmax.log_softmax_jvp(a, a, **kw),
    ]


def _qualname(a) -> str:
    return f"{type(a).__module__}.{type(a).__qualname__}"


def _foreign(library: Backend, shape=(2, 3)):
    """An array of the same shape from another library than ``library``."""
    if library is Backend.NUMPY:
        return torch.zeros(shape, dtype=torch.float64)
    return np.zeros(shape)


# ------------------------------------------------------------------------------------------
# mismatched inputs of backward and JVP


@pytest.mark.parametrize(("func", "a_name", "b_name"), TWO_ARG)
def test_mismatched_namespaces(xp, library, func, a_name, b_name):
    a, b = xp.zeros((2, 3), dtype=xp.float64), _foreign(library)
    for first, second in ((a, b), (b, a)):
        with pytest.raises(TypeError) as info:
            func(first, second)
        msg = str(info.value)
        assert f"{a_name} and {b_name} must come from the same array library" in msg
        assert _qualname(first) in msg and _qualname(second) in msg


@pytest.mark.skip_xp_backends(
    Backend.NUMPY, Backend.ARRAY_API_STRICT, reason="array-likes are converted for these"
)
@pytest.mark.parametrize(("func", "a_name", "b_name"), TWO_ARG)
def test_array_like_second_argument_rejected(xp, func, a_name, b_name):
    a = xp.zeros((2, 3), dtype=xp.float64)
    with pytest.raises(TypeError, match=rf"{b_name} must be an array of the same kind as {a_name}"):
        func(a, [[0.0] * 3] * 2)


@pytest.mark.parametrize(("func", "a_name", "b_name"), TWO_ARG)
@pytest.mark.parametrize(
    ("shape_a", "shape_b"), [((2, 3), (3, 2)), ((2, 3), (1, 3)), ((4,), (4, 1))]
)
def test_mismatched_shapes(xp, func, a_name, b_name, shape_a, shape_b):
    a, b = xp.zeros(shape_a, dtype=xp.float64), xp.zeros(shape_b, dtype=xp.float64)
    expected = f"{a_name} and {b_name} must have the same shape, got {shape_a} and {shape_b}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        func(a, b)


# ------------------------------------------------------------------------------------------
# dtypes and non-arrays


def _complex(xp, library):
    if library is Backend.TORCH:
        return torch.zeros((2, 3), dtype=torch.complex128)
    return xp.zeros((2, 3), dtype=xp.complex128)


def test_complex_input(xp, library):
    z = _complex(xp, library)
    for call in _all_single(z):
        with pytest.raises(TypeError, match=r"must be real, got complex dtype"):
            call()
    with pytest.raises(TypeError, match=r"y must be real, got complex dtype"):
        xpsoftmax.softmax_jacobian(z)
    with pytest.raises(TypeError, match=r"x must be real, got complex dtype"):
        xpsoftmax.check_vjp(xpsoftmax.softmax, xpsoftmax.softmax_backward, z)
    real = xp.zeros((2, 3), dtype=xp.float64)
    with pytest.raises(TypeError, match=r"dy must be real, got complex dtype"):
        xpsoftmax.softmax_backward(real, z)
    with pytest.raises(TypeError, match=r"dx must be real, got complex dtype"):
        xpsoftmax.log_softmax_jvp(real, z)


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ("abc", r"x must have a real numeric dtype, got <U3"),
        (np.zeros(3, dtype="datetime64[s]"), r"x must have a real numeric dtype, got datetime64"),
        (None, r"x must be a numeric array, got an object array from NoneType"),
        (object(), r"x must be a numeric array, got an object array from object"),
        ([[1.0, 2.0], [3.0]], r"x must be an array or array-like, got list"),
    ],
)
@pytest.mark.parametrize("func", FORWARD)
def test_not_a_numeric_array(func, value, pattern):
    with pytest.raises(TypeError, match=pattern):
        func(value)


# ------------------------------------------------------------------------------------------
# axis


@pytest.mark.parametrize("axis", [2, -3, (0, 2), (-3,), (1, 7)])
def test_axis_out_of_range(xp, axis):
    a = xp.zeros((2, 3), dtype=xp.float64)
    calls = [*_all_single(a, axis=axis), lambda: xpsoftmax.softmax_jacobian(a, axis=axis)]
    calls.append(
        lambda: xpsoftmax.check_vjp(xpsoftmax.softmax, xpsoftmax.softmax_backward, a, axis=axis)
    )
    bad = next(v for v in (axis if isinstance(axis, tuple) else (axis,)) if not -2 <= v < 2)
    for call in calls:
        with pytest.raises(
            ValueError, match=rf"axis {bad} is out of bounds for an array of dimension 2"
        ):
            call()
        with pytest.raises(np.exceptions.AxisError):
            call()


@pytest.mark.parametrize("axis", [(1, 1), (0, -2), (-1, 1, 0)])
def test_repeated_axis(xp, axis):
    a = xp.zeros((2, 3), dtype=xp.float64)
    for call in [*_all_single(a, axis=axis), lambda: xpsoftmax.softmax_jacobian(a, axis=axis)]:
        with pytest.raises(ValueError, match=re.escape(f"axis contains a repeated axis: {axis!r}")):
            call()


@pytest.mark.parametrize("axis", [1.0, "0", True, [0, 1], (0, 1.5), (None,), np.float64(1)])
def test_axis_not_int(xp, axis):
    a = xp.zeros((2, 3), dtype=xp.float64)
    for call in [*_all_single(a, axis=axis), lambda: xpsoftmax.softmax_jacobian(a, axis=axis)]:
        with pytest.raises(TypeError, match=r"axis must be an int, a tuple of ints or None, got "):
            call()


# ------------------------------------------------------------------------------------------
# where


@pytest.mark.parametrize("dtype", ["float64", "int64", "uint8"])
def test_where_not_bool(xp, dtype):
    a = xp.zeros((2, 3), dtype=xp.float64)
    where = xp.ones((2, 3), dtype=getattr(xp, dtype))
    for call in _all_single(a, where=where):
        with pytest.raises(TypeError, match=r"where must be a boolean array, got dtype .*" + dtype):
            call()


@pytest.mark.parametrize("shape", [(4,), (3, 3), (2, 2, 3), (3, 1)])
def test_where_does_not_broadcast(xp, shape):
    a = xp.zeros((2, 3), dtype=xp.float64)
    where = xp.ones(shape, dtype=xp.bool)
    expected = f"where of shape {shape} does not broadcast to x of shape (2, 3)"
    for call in _all_single(a, where=where):
        with pytest.raises(ValueError, match=re.escape(expected)):
            call()


def test_where_from_another_library(xp, library):
    a = xp.zeros((2, 3), dtype=xp.float64)
    if library is Backend.NUMPY:
        where = torch.ones((2, 3), dtype=torch.bool)
    else:
        where = np.ones((2, 3), dtype=bool)
    for call in _all_single(a, where=where):
        with pytest.raises(TypeError, match=r"x and where must come from the same array library"):
            call()


# ------------------------------------------------------------------------------------------
# out


@pytest.mark.skip_xp_backends(
    Backend.NUMPY, Backend.ARRAY_API_STRICT, Backend.TORCH, reason="these take out="
)
@pytest.mark.parametrize("func", WITH_OUT)
def test_out_immutable_or_lazy(xp, func):
    a = xp.zeros((2, 3), dtype=xp.float64)
    out = xp.zeros((2, 3), dtype=xp.float64)
    with pytest.raises(TypeError, match=r"out= needs a writeable array; .* immutable or lazy"):
        func(a, out=out)


@pytest.mark.skip_xp_backends(Backend.JAX, Backend.DASK, reason="immutable or lazy: no out=")
@pytest.mark.parametrize("func", WITH_OUT)
def test_out_wrong_shape_or_dtype(xp, func):
    a = xp.zeros((2, 3), dtype=xp.float64)
    with pytest.raises(ValueError, match=re.escape("out has shape (3, 2), expected (2, 3)")):
        func(a, out=xp.zeros((3, 2), dtype=xp.float64))
    with pytest.raises(ValueError, match=re.escape("out has shape (2, 3, 1), expected (2, 3)")):
        func(a, out=xp.zeros((2, 3, 1), dtype=xp.float64))
    with pytest.raises(ValueError, match=r"out has dtype .*float32, expected .*float64"):
        func(a, out=xp.zeros((2, 3), dtype=xp.float32))


@pytest.mark.parametrize("func", WITH_OUT)
def test_out_from_another_library(xp, library, func):
    a = xp.zeros((2, 3), dtype=xp.float64)
    kind = _qualname(a).replace(".", r"\.")
    for out in (_foreign(library), [[0.0] * 3] * 2):
        with pytest.raises(
            TypeError, match=rf"out must be an array of the same kind as the input \({kind}\)"
        ):
            func(a, out=out)


@pytest.mark.skip_xp_backends(
    Backend.ARRAY_API_STRICT, Backend.TORCH, Backend.JAX, Backend.DASK, reason="NumPy flags"
)
@pytest.mark.parametrize("func", WITH_OUT)
def test_out_read_only_numpy(xp, func):
    out = np.zeros((2, 3))
    out.flags.writeable = False
    with pytest.raises(TypeError, match=r"out is a read-only NumPy array"):
        func(np.zeros((2, 3)), out=out)


@pytest.mark.skip_xp_backends(Backend.JAX, Backend.DASK, reason="immutable or lazy: no out=")
def test_out_dtype_follows_promotion(xp, library):
    # Integer input promotes to the default float, so an out of another float dtype is refused.
    other = xp.float64 if library is Backend.TORCH else xp.float32
    with pytest.raises(ValueError, match=r"out has dtype"):
        xpsoftmax.softmax(xp.zeros((2, 3), dtype=xp.int64), out=xp.zeros((2, 3), dtype=other))
    # y float32 and dy float64 give float64, so a float32 out is refused.
    y, dy = xp.zeros((2, 3), dtype=xp.float32), xp.zeros((2, 3), dtype=xp.float64)
    with pytest.raises(ValueError, match=r"out has dtype .*float32, expected .*float64"):
        xpsoftmax.softmax_backward(y, dy, out=xp.zeros((2, 3), dtype=xp.float32))
