"""softmax_backward and log_softmax_backward (VJPs) against torch autograd and jax.vjp."""

from __future__ import annotations

import warnings

import array_api_compat
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _helpers import (
    Backend,
    cached_reference,
    jax_softmax,
    to_numpy,
    tolerance,
    torch_softmax,
    xp_assert_close,
    xp_assert_equal,
)

import xpsoftmax

# conftest.py: Dask runs in two layouts here, one chunk and the softmax axes split.
DASK_SPLIT = True

BACKWARD = [
    pytest.param(xpsoftmax.softmax_backward, False, id="softmax_backward"),
    pytest.param(xpsoftmax.log_softmax_backward, True, id="log_softmax_backward"),
]
AXES = [-1, 0, 1, -2, (0, 2), (2, 1), (0, 1, 2), None]
SHAPE = (3, 4, 5)
# Fixed data, so that the references are computed once and shared by the five backends.
_RNG = np.random.default_rng(20250101)
X = 3.0 * _RNG.standard_normal(SHAPE)
G = _RNG.standard_normal(SHAPE)
MASK = _RNG.random(SHAPE) < 0.6
MASK[0, 1, :] = False  # fully masked row along the last axis
MASK[2, :, 3] = False  # fully masked along axis 1
MASK[1] = False  # fully masked for the tuple axes and (partly) for None


def _torch_vjp(x: np.ndarray, g: np.ndarray, axis, log: bool) -> tuple[np.ndarray, np.ndarray]:
    """(forward output, input gradient) from torch.func.vjp, in float64."""
    y, vjp_fn = torch.func.vjp(
        lambda t: torch_softmax(t, axis, log=log), torch.asarray(x, dtype=torch.float64)
    )
    (dx,) = vjp_fn(torch.asarray(g, dtype=torch.float64))
    return y.numpy(), dx.numpy()


def _torch_masked_vjp(x: np.ndarray, g: np.ndarray, where: np.ndarray, log: bool):
    """(forward output, input gradient) of softmax over the unmasked entries of the last axis,
    by torch autograd: masked logits are replaced by -inf through torch.where (so they get no
    gradient) and fully masked rows, which have no softmax, are all 0 (log: -inf) with 0
    gradient, as in the specification."""
    keep = torch.asarray(np.broadcast_to(where, x.shape).copy())
    empty = ~keep.any(dim=-1, keepdim=True)
    t = torch.asarray(x, dtype=torch.float64).requires_grad_(True)
    z = torch.where(keep & ~empty, t, torch.where(empty, 0.0, -torch.inf))
    fill = -torch.inf if log else 0.0
    out = torch.where(keep, torch_softmax(z, -1, log=log), fill)
    out.backward(torch.where(keep, torch.asarray(g), 0.0))
    return out.detach().numpy(), torch.where(keep, t.grad, 0.0).numpy()


def _jax_vjp(x: np.ndarray, g: np.ndarray, axis, log: bool, where=None):
    """(forward output, input gradient) from jax.vjp, in float64."""
    w = None if where is None else jnp.asarray(np.broadcast_to(where, x.shape))
    y, vjp_fn = jax.vjp(lambda a: jax_softmax(a, axis, where=w, log=log), jnp.asarray(x))
    (dx,) = vjp_fn(jnp.asarray(g))
    return np.array(y), np.array(dx)  # writeable copies (torch warns on read-only arrays)


@cached_reference
def _torch_ref(dtype: str, axis, log: bool) -> tuple[np.ndarray, np.ndarray]:
    """(y, dx) in float64 for X and G rounded to ``dtype``."""
    return _torch_vjp(X.astype(dtype).astype(np.float64), G.astype(dtype), axis, log)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize(("func", "log"), BACKWARD)
def test_matches_torch_autograd(xp, func, log, axis, dtype):
    y, dx = _torch_ref(dtype, axis, log)
    result = func(xp.asarray(y.astype(dtype)), xp.asarray(G.astype(dtype)), axis=axis)
    xp_assert_close(result, dx, xp=xp, dtype=getattr(xp, dtype))


@cached_reference
def _jax_ref(axis, log: bool, masked: bool) -> tuple[np.ndarray, np.ndarray]:
    return _jax_vjp(X, G, axis, log, where=MASK if masked else None)


@pytest.mark.parametrize("axis", [-1, (0, 2), None])
@pytest.mark.parametrize(("func", "log"), BACKWARD)
def test_matches_jax_vjp(xp, func, log, axis):
    y, dx = _jax_ref(axis, log, False)
    result = func(xp.asarray(y), xp.asarray(G), axis=axis)
    xp_assert_close(result, dx, xp=xp, dtype=xp.float64)


@pytest.mark.parametrize(("func", "log"), BACKWARD)
def test_default_axis_is_last(xp, func, log):
    y, dx = _torch_ref("float64", -1, log)
    xp_assert_close(func(xp.asarray(y), xp.asarray(G)), dx, xp=xp, dtype=xp.float64)


@pytest.mark.skip_xp_backends(Backend.ARRAY_API_STRICT, reason="the standard has no float16")
@pytest.mark.parametrize("axis", [-1, (0, 2)])
@pytest.mark.parametrize(("func", "log"), BACKWARD)
def test_float16_against_float64(xp, func, log, axis):
    y, dx = _torch_ref("float16", axis, log)
    g = G.astype(np.float16)
    result = func(xp.asarray(y.astype(np.float16)), xp.asarray(g), axis=axis)
    # y is rounded to float16 (relative 5e-4) before the row sums: allow that, scaled by |g| <= 4.
    xp_assert_close(result, dx, xp=xp, dtype="float16", rtol=2e-3, atol=4e-3)


@pytest.mark.parametrize(
    ("y_dtype", "g_dtype", "expected"),
    [
        ("float32", "float64", "float64"),
        ("float64", "float32", "float64"),
        ("float64", "int64", "float64"),
    ],
)
@pytest.mark.parametrize(("func", "log"), BACKWARD)
def test_mixed_dtypes_promote(xp, func, log, y_dtype, g_dtype, expected):
    g = np.round(3 * G).astype(g_dtype)
    y, dx = _torch_vjp(X.astype(y_dtype).astype(np.float64), g.astype(np.float64), -1, log)
    result = func(xp.asarray(y.astype(y_dtype)), xp.asarray(g))
    xp_assert_close(result, dx, xp=xp, dtype=getattr(xp, expected), **tolerance("float32"))


@pytest.mark.parametrize(("func", "log"), BACKWARD)
def test_neg_inf_logits(xp, func, log):
    x, g = X.reshape(6, 10)[:4, :6].copy(), G.reshape(6, 10)[:4, :6].copy()
    x[0, [1, 4]] = -np.inf
    x[2, :5] = -np.inf
    y, dx = _torch_vjp(x, g, -1, log)
    assert np.all(np.isfinite(dx))
    result = func(xp.asarray(y), xp.asarray(g))
    xp_assert_close(result, dx, xp=xp, dtype=xp.float64)


@pytest.mark.parametrize("axis", [-1, 1, (0, 2), None])
@pytest.mark.parametrize(("func", "log"), BACKWARD)
def test_where_matches_jax(xp, func, log, axis, rng):
    mask = MASK
    y, dx = _jax_ref(axis, log, True)
    # Masked cotangents must not matter: make them inf and NaN in what we pass.
    dirty = np.where(mask, G, np.where(rng.random(SHAPE) < 0.5, np.inf, np.nan))
    result = func(xp.asarray(y), xp.asarray(dirty), axis=axis, where=xp.asarray(mask))
    xp_assert_close(result, dx, xp=xp, dtype=xp.float64)
    r = to_numpy(result)
    assert np.all(np.isfinite(r))
    assert np.all(r[~mask] == 0.0)


@pytest.mark.parametrize(("func", "log"), BACKWARD)
def test_where_broadcasting_and_fully_masked(xp, func, log):
    x, g = X[0, :3, :], G[0, :3, :]
    mask = np.array([[True, False, True, True, False], [False] * 5, [True] * 5])
    for where in (mask, mask[:1]):  # full shape, and (1, 5) broadcast over the rows
        y, dx = _torch_masked_vjp(x, g, where, log)
        result = func(xp.asarray(y), xp.asarray(g), where=xp.asarray(where))
        xp_assert_close(result, dx, xp=xp, dtype=xp.float64)
    result = func(
        xp.asarray(np.full((2, 3), -np.inf if log else 0.0)), xp.asarray(g[:2, :3]), where=False
    )
    xp_assert_equal(result, np.zeros((2, 3)), xp=xp, dtype=xp.float64)


@pytest.mark.parametrize(("func", "log"), BACKWARD)
def test_end_to_end_from_our_forward(xp, func, log):
    fwd = xpsoftmax.log_softmax if log else xpsoftmax.softmax
    y = fwd(xp.asarray(X), axis=(1, 2))
    _, dx = _torch_ref("float64", (1, 2), log)
    xp_assert_close(func(y, xp.asarray(G), axis=(1, 2)), dx, xp=xp, dtype=xp.float64)


# ------------------------------------------------------------------------------------------
# out


@pytest.mark.skip_xp_backends(Backend.JAX, Backend.DASK, reason="immutable or lazy: no out=")
@pytest.mark.parametrize("alias", [None, "y", "dy"])
@pytest.mark.parametrize(("func", "log"), BACKWARD)
def test_out(xp, func, log, alias):
    y_np, dx = _torch_ref("float64", 0, log)
    y, dy = xp.asarray(y_np), xp.asarray(G.copy())
    out = {"y": y, "dy": dy, None: xp.full(SHAPE, 7.0, dtype=xp.float64)}[alias]
    result = func(y, dy, axis=0, out=out)
    assert result is out
    xp_assert_close(out, dx, xp=xp, dtype=xp.float64)


# ------------------------------------------------------------------------------------------
# empty inputs


@pytest.mark.parametrize(
    ("shape", "axis"), [((0,), -1), ((0, 5), -1), ((3, 0), 0), ((2, 0, 4), (0, 2))]
)
@pytest.mark.parametrize(("func", "log"), BACKWARD)
def test_empty(xp, func, log, shape, axis):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = xp.zeros(shape, dtype=xp.float32)
        result = func(
            y, xp.zeros(shape, dtype=xp.float32), axis=axis, where=xp.zeros(shape, dtype=xp.bool)
        )
        xp_assert_equal(result, np.empty(shape), xp=xp, dtype=xp.float32)
    assert array_api_compat.device(result) == array_api_compat.device(y)


# ------------------------------------------------------------------------------------------
# the split path on Dask computes outside any floating-point error state


def _on_split_dask(func, y, g, mask):
    """``func(y, g, where=mask)`` with the softmax axis over two Dask chunks (the split path),
    computed with every floating-point warning an error."""
    da = pytest.importorskip("dask.array")
    chunks = (1, 2)
    result = func(
        da.from_array(y, chunks=chunks),
        da.from_array(g, chunks=chunks),
        where=da.from_array(mask, chunks=chunks),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return result.compute()


@pytest.mark.parametrize(("func", "log"), BACKWARD)
def test_dask_split_axis_masked_entries_and_fully_masked_rows_raise_no_warning(func, log):
    """Masked cotangents of +-inf never meet a 0 (no ``0 * inf``) and a fully masked row never
    divides 0 by 0: on Dask the generic path's NumPy warnings would escape at compute, so these
    hold only if the masking comes before the products. Values against float64 math."""
    y = np.array([[0.2, 0.5, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25]])
    if log:
        y = np.log(np.where(y > 0, y, 1.0))
    dy = np.array([[1.0, np.inf, -2.0, -np.inf], [np.inf, -np.inf, np.inf, 3.0]])
    mask = np.array([[True, False, True, False], [False, False, False, False]])
    keep_dy = np.where(mask, dy, 0.0)
    if log:
        want = keep_dy - np.exp(y) * keep_dy.sum(-1, keepdims=True)
    else:
        want = y * (keep_dy - (y * keep_dy).sum(-1, keepdims=True))
    want = np.where(mask, want, 0.0)
    np.testing.assert_allclose(_on_split_dask(func, y, dy, mask), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("log", [False, True], ids=["softmax_jvp", "log_softmax_jvp"])
def test_dask_split_axis_jvp_masked_inf_tangents_raise_no_warning(log):
    """As for the VJP: masked tangents of +-inf are zeroed before any product."""
    func = xpsoftmax.log_softmax_jvp if log else xpsoftmax.softmax_jvp
    y = np.array([[0.2, 0.0, 0.8, 0.0], [0.5, 0.5, 0.0, 0.0]])
    with np.errstate(divide="ignore"):
        y = np.log(y) if log else y  # -inf at the masked entries, as log_softmax gives
    t = np.array([[1.0, np.inf, -2.0, -np.inf], [3.0, 1.0, np.inf, np.nan]])
    mask = np.array([[True, False, True, False], [True, True, False, False]])
    keep_t = np.where(mask, t, 0.0)
    keep_y = np.where(mask, y, 0.0)
    if log:
        want = keep_t - (np.exp(keep_y) * keep_t * mask).sum(-1, keepdims=True)
    else:
        want = keep_y * (keep_t - (keep_y * keep_t).sum(-1, keepdims=True))
    want = np.where(mask, want, 0.0)
    np.testing.assert_allclose(_on_split_dask(func, y, t, mask), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("func", "log"),
    [
        (xpsoftmax.softmax_backward, False),
        (xpsoftmax.log_softmax_backward, True),
        (xpsoftmax.softmax_jvp, False),
        (xpsoftmax.log_softmax_jvp, True),
    ],
    ids=["softmax_backward", "log_softmax_backward", "softmax_jvp", "log_softmax_jvp"],
)
def test_masked_entries_of_the_output_take_no_part_whatever_they_hold(xp, func, log):
    """The forward output's masked entries (NaN, +inf here) never reach a sum or a result."""
    y = np.array([[0.2, np.nan, 0.8, np.inf], [0.5, 0.5, np.inf, np.nan]])
    if log:
        y = np.where(np.isfinite(y), np.log(np.where(np.isfinite(y), y, 1.0)), y)
    g = np.array([[1.0, 2.0, -2.0, 0.5], [3.0, 1.0, 4.0, -1.0]])
    mask = np.array([[True, False, True, False], [True, True, False, False]])
    ky, kg = np.where(mask, y, 0.0), np.where(mask, g, 0.0)
    name = func.__name__
    if name == "softmax_backward" or name == "softmax_jvp":
        want = ky * (kg - (ky * kg).sum(-1, keepdims=True))
    elif name == "log_softmax_backward":
        want = kg - np.exp(ky) * kg.sum(-1, keepdims=True)
    else:
        want = kg - (np.where(mask, np.exp(ky), 0.0) * kg).sum(-1, keepdims=True)
    want = np.where(mask, want, 0.0)
    result = func(xp.asarray(y), xp.asarray(g), where=xp.asarray(mask))
    xp_assert_close(result, want, xp=xp, dtype=xp.float64)
