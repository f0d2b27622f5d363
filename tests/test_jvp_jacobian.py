"""softmax_jvp, log_softmax_jvp and softmax_jacobian against torch.func, torch autograd and JAX."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _helpers import (
    Backend,
    cached_reference,
    jax_softmax,
    move_axes_last,
    normalize_axes,
    to_numpy,
    torch_softmax,
    xp_assert_close,
    xp_assert_equal,
)

import xpsoftmax

# conftest.py: Dask runs in two layouts here, one chunk and the softmax axes split.
DASK_SPLIT = True

JVP = [
    pytest.param(xpsoftmax.softmax_jvp, False, id="softmax_jvp"),
    pytest.param(xpsoftmax.log_softmax_jvp, True, id="log_softmax_jvp"),
]
AXES = [-1, 0, 1, -2, (0, 2), (2, 1), None]
SHAPE = (3, 4, 5)
# Fixed data, so that the references are computed once and shared by the five backends.
_RNG = np.random.default_rng(20250102)
X = 3.0 * _RNG.standard_normal(SHAPE)
T = _RNG.standard_normal(SHAPE)
MASK = _RNG.random(SHAPE) < 0.6
MASK[0, 1, :] = False
MASK[1] = False


def _torch_jvp(x: np.ndarray, t: np.ndarray, axis, log: bool) -> tuple[np.ndarray, np.ndarray]:
    """(forward output, output tangent) from torch.func.jvp, in float64."""
    with warnings.catch_warnings():
        # torch 2.13 loads its forward-mode decompositions with torch.jit.script the first time.
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        y, dy = torch.func.jvp(
            lambda a: torch_softmax(a, axis, log=log),
            (torch.asarray(x, dtype=torch.float64),),
            (torch.asarray(t, dtype=torch.float64),),
        )
    return y.numpy(), dy.numpy()


@cached_reference
def _torch_ref(dtype: str, axis, log: bool) -> tuple[np.ndarray, np.ndarray]:
    """(y, dy) in float64 for X and T rounded to ``dtype``."""
    return _torch_jvp(X.astype(dtype).astype(np.float64), T.astype(dtype), axis, log)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize(("func", "log"), JVP)
def test_jvp_matches_torch_func(xp, func, log, axis, dtype):
    y, dy = _torch_ref(dtype, axis, log)
    result = func(xp.asarray(y.astype(dtype)), xp.asarray(T.astype(dtype)), axis=axis)
    xp_assert_close(result, dy, xp=xp, dtype=getattr(xp, dtype))


@pytest.mark.parametrize(("func", "log"), JVP)
def test_jvp_default_axis_and_float16(xp, library, func, log):
    y, dy = _torch_ref("float64", -1, log)
    xp_assert_close(func(xp.asarray(y), xp.asarray(T)), dy, xp=xp, dtype=xp.float64)
    if library.has_float16:
        result = func(xp.asarray(y.astype(np.float16)), xp.asarray(T.astype(np.float16)))
        xp_assert_close(result, dy, xp=xp, dtype="float16", rtol=2e-3, atol=4e-3)


@pytest.mark.parametrize("axis", [-1, (0, 2), None])
@pytest.mark.parametrize(("func", "log"), JVP)
@cached_reference
def _jax_masked_ref(axis, log: bool) -> tuple[np.ndarray, np.ndarray]:
    w = jnp.asarray(MASK)
    y, dy = jax.jvp(
        lambda a: jax_softmax(a, axis, where=w, log=log), (jnp.asarray(X),), (jnp.asarray(T),)
    )
    return np.array(y), np.array(dy)


@pytest.mark.parametrize("axis", [-1, (0, 2), None])
@pytest.mark.parametrize(("func", "log"), JVP)
def test_jvp_where_matches_jax(xp, func, log, axis, rng):
    mask = MASK
    y, dy = _jax_masked_ref(axis, log)
    # Masked tangents must not matter: make them inf and NaN in what we pass.
    dirty = np.where(mask, T, np.where(rng.random(SHAPE) < 0.5, -np.inf, np.nan))
    result = func(xp.asarray(y), xp.asarray(dirty), axis=axis, where=xp.asarray(mask))
    xp_assert_close(result, dy, xp=xp, dtype=xp.float64)
    r = to_numpy(result)
    assert np.all(np.isfinite(r))
    assert np.all(r[~mask] == 0.0)


@pytest.mark.parametrize(("func", "log"), JVP)
def test_jvp_uniform_shift_is_zero(xp, func, log):
    # Adding the same constant to every logit of a row leaves (log-)softmax unchanged.
    y, _ = _torch_ref("float64", -1, log)
    result = func(xp.asarray(y), xp.ones(SHAPE, dtype=xp.float64))
    xp_assert_close(result, np.zeros(SHAPE), xp=xp, dtype=xp.float64, atol=1e-15)


@pytest.mark.parametrize(("func", "log"), JVP)
def test_jvp_empty(xp, func, log):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = func(xp.zeros((3, 0)), xp.zeros((3, 0)), axis=0)
        xp_assert_equal(result, np.empty((3, 0)), xp=xp, dtype=xp.zeros((3, 0)).dtype)


# ------------------------------------------------------------------------------------------
# softmax_jacobian


def _block_diagonal(full: np.ndarray, shape: tuple[int, ...], axis) -> np.ndarray:
    """From the full Jacobian d y[a] / d x[b] (shape ``shape + shape``), keep the blocks of
    each row: J[r, i, j] = d y[r, i] / d x[r, j] with the softmax axes moved last, in order."""
    nd = len(shape)
    axes = normalize_axes(axis, nd)
    rest = [d for d in range(nd) if d not in axes]
    r_shape = tuple(shape[d] for d in rest)
    n = math.prod(shape[d] for d in axes)
    perm = (*rest, *axes, *(nd + d for d in rest), *(nd + d for d in axes))
    grid = np.transpose(full, perm).reshape(math.prod(r_shape), n, math.prod(r_shape), n)
    blocks = np.einsum("rirj->rij", grid)
    return blocks.reshape((*r_shape, n, n))


@cached_reference
def _torch_jacobian(axis) -> tuple[np.ndarray, np.ndarray]:
    """(y, block-diagonal Jacobian) of softmax over ``axis`` at X, by torch autograd."""
    tx = torch.asarray(X)
    y = torch_softmax(tx, axis).numpy()
    full = torch.autograd.functional.jacobian(
        lambda a: torch_softmax(a, axis), tx, vectorize=True
    ).numpy()
    return y, _block_diagonal(full, SHAPE, axis)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    ("axis", "expected_shape"),
    [
        (-1, (3, 4, 5, 5)),
        (0, (4, 5, 3, 3)),
        (1, (3, 5, 4, 4)),
        (-2, (3, 5, 4, 4)),
        ((0, 2), (4, 15, 15)),
        ((2, 0), (4, 15, 15)),
        ((1, 2), (3, 20, 20)),
        (None, (60, 60)),
    ],
)
def test_jacobian_matches_torch_autograd(xp, axis, expected_shape, dtype):
    y, expected = _torch_jacobian(axis)
    assert expected.shape == expected_shape
    result = xpsoftmax.softmax_jacobian(xp.asarray(y.astype(dtype)), axis=axis)
    xp_assert_close(result, expected, xp=xp, dtype=getattr(xp, dtype))


@cached_reference
def _jax_jacobian(axis) -> tuple[np.ndarray, np.ndarray]:
    x = jnp.asarray(X[0])
    y = np.array(jax.nn.softmax(x, axis=axis))
    full = np.array(jax.jacobian(lambda a: jax.nn.softmax(a, axis=axis))(x))
    return y, _block_diagonal(full, (4, 5), axis)


@pytest.mark.parametrize("axis", [-1, (0, 1)])
def test_jacobian_matches_jax(xp, axis):
    y, expected = _jax_jacobian(axis)
    result = xpsoftmax.softmax_jacobian(xp.asarray(y), axis=axis)
    xp_assert_close(result, expected, xp=xp, dtype=xp.float64)


def test_jacobian_default_axis_rows_and_symmetry(xp, rng):
    x = rng.standard_normal((2, 6))
    y = torch_softmax(torch.asarray(x), -1).numpy()
    result = xpsoftmax.softmax_jacobian(xp.asarray(y))
    j = to_numpy(result)
    assert j.shape == (2, 6, 6)
    np.testing.assert_allclose(j, np.swapaxes(j, -1, -2), rtol=0, atol=0)  # symmetric
    np.testing.assert_allclose(j.sum(axis=-1), 0.0, atol=1e-15)  # shifting x changes nothing
    # J applied to a tangent is the JVP: compare with torch.func.jvp.
    t = rng.standard_normal((2, 6))
    _, dy = _torch_jvp(x, t, -1, False)
    np.testing.assert_allclose(np.einsum("rij,rj->ri", j, t), dy, rtol=1e-12, atol=1e-14)


@pytest.mark.skip_xp_backends(Backend.ARRAY_API_STRICT, reason="the standard has no float16")
def test_jacobian_float16(xp):
    y, expected = _torch_jacobian(-1)
    result = xpsoftmax.softmax_jacobian(xp.asarray(y.astype(np.float16)))
    xp_assert_close(result, expected, xp=xp, dtype="float16", atol=1e-3)


@pytest.mark.parametrize(
    ("shape", "axis", "expected_shape"),
    [
        ((0,), -1, (0, 0)),
        ((3, 0), -1, (3, 0, 0)),
        ((0, 4), -1, (0, 4, 4)),
        ((0, 4), 0, (4, 0, 0)),
        ((2, 0, 4), (0, 2), (0, 8, 8)),
    ],
)
def test_jacobian_empty(xp, shape, axis, expected_shape):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = xpsoftmax.softmax_jacobian(xp.zeros(shape, dtype=xp.float32), axis=axis)
        xp_assert_equal(result, np.empty(expected_shape), xp=xp, dtype=xp.float32)


def test_move_axes_helper_agrees_with_shape_rule(rng):
    # The reference's own bookkeeping: axes moved last, in order, and flattened.
    a = rng.standard_normal(SHAPE)
    moved, axes = move_axes_last(a, (2, 0))
    assert axes == (0, 2)
    assert moved.shape == (4, 15)
    np.testing.assert_array_equal(moved[1], a[:, 1, :].reshape(-1))
