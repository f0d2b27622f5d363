"""logsumexp and logsumexp_backward against scipy.special, torch autograd and jax.nn, on every
backend (Dask in both layouts: one chunk, and the reduced axes split across chunks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
from _helpers import Backend, to_numpy, xp_assert_close, xp_assert_equal

import xpsoftmax

# conftest.py: Dask runs in two layouts here, one chunk and the reduced axes split.
DASK_SPLIT = True

AXES = [-1, 0, 1, 2, -2, (0, 2), (2, 0), (0, 1, 2), None]
SHAPE = (3, 4, 5)


def _logits(rng, shape=SHAPE, dtype="float64"):
    return (3.0 * rng.standard_normal(shape)).astype(dtype)


def _arr(xp, a):
    return xp.asarray(a)


# --------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", AXES)
def test_matches_scipy(xp, axis, keepdims, rng):
    x = _logits(rng)
    ref = scipy.special.logsumexp(x, axis=axis, keepdims=keepdims)
    r = xpsoftmax.logsumexp(_arr(xp, x), axis, keepdims=keepdims)
    xp_assert_close(r, np.asarray(ref), xp=xp, dtype=xp.float64)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("axis", [-1, 1, (0, 2)])
def test_low_precision(xp, library, dtype, axis, rng):
    if dtype == "float16" and not library.has_float16:
        pytest.skip("array-api-strict has no float16")
    x = _logits(rng, dtype=dtype)
    ref = scipy.special.logsumexp(x.astype(np.float64), axis=axis)
    r = xpsoftmax.logsumexp(_arr(xp, x), axis)
    # (rounded once from float32 arithmetic: one unit in the last place of the result)
    rtol = 1e-6 if dtype == "float32" else 1e-3
    xp_assert_close(r, ref.astype(dtype), xp=xp, dtype=dtype, rtol=rtol, atol=0)


def test_large_rows_and_middle_axis_match_scipy(rng):
    # Long rows (several chunks of the kernels' sums, several threads' tasks) and a middle axis
    # wider than one tile, on the compiled NumPy path.
    for shape, axis in (((300, 3000), -1), ((3, 700, 600), 1), ((2, 3, 4000), (0, 2))):
        x = _logits(rng, shape)
        for dtype, rtol in (("float64", 1e-13), ("float32", 1e-6)):
            r = xpsoftmax.logsumexp(x.astype(dtype), axis)
            ref = scipy.special.logsumexp(x.astype(dtype).astype(np.float64), axis=axis)
            np.testing.assert_allclose(r, ref, rtol=rtol, atol=0)
            assert r.dtype == dtype


SPECIAL_ROWS = {
    "plus_inf": [1.0, math.inf, 2.0, -math.inf],
    "two_plus_inf": [math.inf, math.inf, 0.0, 0.0],
    "all_minus_inf": [-math.inf] * 4,
    "some_minus_inf": [-math.inf, 0.0, -math.inf, 0.0],
    "nan": [0.0, math.nan, 1.0, 2.0],
    "nan_and_inf": [math.inf, math.nan, 1.0, 2.0],
    "huge": [1e308, 1e308, -1e308, 0.0],
    "tiny": [-1e308, -1e308, -1e308, -1e308],
}


def test_special_rows_match_scipy_and_torch(xp):
    import torch

    x = np.array(list(SPECIAL_ROWS.values()))
    with np.errstate(all="ignore"):  # (scipy warns on -1e308 - 1e308)
        ref = scipy.special.logsumexp(x, axis=-1)
    assert np.array_equal(
        ref, torch.logsumexp(torch.from_numpy(x), -1).numpy(), equal_nan=True
    )  # (the peers agree: +inf rows +inf, -inf rows -inf, NaN poisons its row)
    r = xpsoftmax.logsumexp(_arr(xp, x))
    xp_assert_close(r, ref, xp=xp, dtype=xp.float64, rtol=1e-15, atol=0)


def test_where_matches_jax(xp, rng):
    import jax.nn

    x = _logits(rng, (6, 7))
    mask = rng.random((6, 7)) > 0.4
    mask[0] = False  # fully masked: -inf
    mask[1] = True
    x[2, ~mask[2]] = math.nan  # masked NaN and inf take no part
    x[3, ~mask[3]] = math.inf
    ref = np.asarray(jax.nn.logsumexp(x, axis=-1, where=mask))
    assert ref[0] == -math.inf
    r = xpsoftmax.logsumexp(_arr(xp, x), where=_arr(xp, mask))
    xp_assert_close(r, ref, xp=xp, dtype=xp.float64)


def test_broadcast_where_and_all_axes(xp, rng):
    x = _logits(rng)
    mask = np.array([True, False, True, True, False])  # broadcasts over the first two axes
    ref = scipy.special.logsumexp(x[..., mask], axis=(0, 2))
    r = xpsoftmax.logsumexp(_arr(xp, x), (0, 2), where=_arr(xp, mask))
    xp_assert_close(r, ref, xp=xp, dtype=xp.float64)


def test_float16_near_its_largest_value(xp, library):
    if not library.has_float16:
        pytest.skip("array-api-strict has no float16")
    x = np.full((2, 1000), 65504.0, dtype=np.float16)
    x[1, 1:] = -65504.0
    r = xpsoftmax.logsumexp(_arr(xp, x))
    # 65504 + log(1000) rounds back to 65504 in float16 (no overflow to inf).
    ref = scipy.special.logsumexp(x.astype(np.float64), axis=-1).astype(np.float16)
    xp_assert_equal(r, ref, xp=xp, dtype="float16")


def test_empty_inputs(xp):
    r = xpsoftmax.logsumexp(xp.zeros((3, 0), dtype=xp.float64))  # log of an empty sum
    xp_assert_equal(r, np.full(3, -math.inf), xp=xp, dtype=xp.float64)
    assert scipy.special.logsumexp(np.zeros((3, 0)), axis=-1).tolist() == [-math.inf] * 3
    r = xpsoftmax.logsumexp(xp.zeros((0, 4), dtype=xp.float64))  # no rows
    assert tuple(r.shape) == (0,)
    r = xpsoftmax.logsumexp(xp.zeros((2, 0), dtype=xp.float64), axis=None, keepdims=True)
    xp_assert_equal(r, np.full((1, 1), -math.inf), xp=xp, dtype=xp.float64)


@pytest.mark.parametrize("axis", [-1, 0, None])
def test_zero_d_input_is_itself(xp, axis):
    import torch

    for v in (2.5, -math.inf, math.inf, math.nan):
        ref = torch.logsumexp(torch.tensor(v, dtype=torch.float64), 0 if axis is None else axis)
        r = xpsoftmax.logsumexp(xp.asarray(v, dtype=xp.float64), axis)
        xp_assert_equal(r, ref.numpy(), xp=xp, dtype=xp.float64)


def test_integer_input_promotes(xp):
    r = xpsoftmax.logsumexp(xp.asarray([[0, 1, 2]]))
    default = xp.asarray(0.0).dtype  # (torch: float32)
    ref = scipy.special.logsumexp([[0.0, 1.0, 2.0]], axis=-1)
    xp_assert_close(r, ref, xp=xp, dtype=default, rtol=1e-6)


def test_out(xp, library, rng):
    if not library.writeable:
        pytest.skip(f"{library.id} arrays cannot be written")
    x = _logits(rng)
    out = xp.zeros((3, 5), dtype=xp.float64)
    r = xpsoftmax.logsumexp(_arr(xp, x), 1, out=out)
    assert r is out
    xp_assert_close(out, scipy.special.logsumexp(x, axis=1), xp=xp)
    with pytest.raises(ValueError, match="out has shape"):
        xpsoftmax.logsumexp(_arr(xp, x), 1, out=xp.zeros((3, 1, 5), dtype=xp.float64))
    out = xp.zeros((3, 1, 5), dtype=xp.float64)
    xpsoftmax.logsumexp(_arr(xp, x), 1, keepdims=True, out=out)
    xp_assert_close(out, scipy.special.logsumexp(x, axis=1, keepdims=True), xp=xp)


def test_bad_arguments():
    x = np.zeros((2, 3))
    with pytest.raises(TypeError, match="keepdims must be a bool"):
        xpsoftmax.logsumexp(x, keepdims=1)
    with pytest.raises(np.exceptions.AxisError):
        xpsoftmax.logsumexp(x, 2)
    with pytest.raises(TypeError, match="real"):
        xpsoftmax.logsumexp(np.zeros(3, dtype=complex))
    with pytest.raises(ValueError, match="where of shape"):
        xpsoftmax.logsumexp(x, where=np.ones(4, dtype=bool))


# --------------------------------------------------------------------------------------------
# backward


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", AXES)
def test_backward_matches_torch_autograd(xp, axis, keepdims, rng):
    import torch

    x = _logits(rng)
    t = torch.from_numpy(x).requires_grad_()
    dims = tuple(range(3)) if axis is None else axis
    lse_t = torch.logsumexp(t, dims, keepdim=keepdims)
    dl = rng.standard_normal(tuple(lse_t.shape))
    lse_t.backward(torch.from_numpy(dl))
    lse = xpsoftmax.logsumexp(_arr(xp, x), axis, keepdims=keepdims)
    dx = xpsoftmax.logsumexp_backward(_arr(xp, x), lse, _arr(xp, dl), axis)
    xp_assert_close(dx, t.grad.numpy(), xp=xp, dtype=xp.float64)


def test_backward_with_where_matches_jax(xp, rng):
    import jax

    x = _logits(rng, (5, 6))
    mask = rng.random((5, 6)) > 0.4
    mask[0] = False  # fully masked: gradient 0
    mask[1] = True
    x[2, ~mask[2]] = math.inf  # masked values take no part
    dl = rng.standard_normal(5)

    def loss(v):
        lse = jax.nn.logsumexp(v, axis=-1, where=mask)
        return (jax.numpy.where(mask.any(-1), lse, 0.0) * dl).sum()

    ref = np.array(jax.grad(loss)(x))
    ref[0] = 0.0  # (jax: NaN through the -inf row that the where above discards)
    X, M = _arr(xp, x), _arr(xp, mask)
    lse = xpsoftmax.logsumexp(X, where=M)
    dx = xpsoftmax.logsumexp_backward(X, lse, _arr(xp, dl), where=M)
    xp_assert_close(dx, ref, xp=xp, dtype=xp.float64)
    assert np.all(to_numpy(dx)[~mask] == 0.0)


def test_backward_special_rows(xp):
    import torch

    x = np.array(list(SPECIAL_ROWS.values()))
    dl = np.arange(1.0, len(x) + 1)
    # torch autograd of torch.logsumexp: exp(x - lse) * dl (so rows whose lse rounds, such as
    # "huge" and "tiny", give what the formula gives), except at +inf rows, where torch's
    # inf - inf is NaN and xpsoftmax gives the limit: dl split over the +inf entries.
    t = torch.from_numpy(x).requires_grad_()
    torch.logsumexp(t, -1).backward(torch.from_numpy(dl))
    ref = t.grad.numpy().copy()
    assert np.isnan(ref[0, 1]) and np.isnan(ref[1, :2]).all()
    ref[0] = [0.0, dl[0], 0.0, 0.0]
    ref[1] = [dl[1] / 2, dl[1] / 2, 0.0, 0.0]
    assert np.isnan(ref[2]).all() and np.isnan(ref[4]).all()  # -inf rows and NaN rows: NaN
    X = _arr(xp, x)
    dx = xpsoftmax.logsumexp_backward(X, xpsoftmax.logsumexp(X), _arr(xp, dl))
    xp_assert_close(dx, ref, xp=xp, dtype=xp.float64, rtol=1e-14, atol=0)


def test_backward_float16(xp, library, rng):
    if not library.has_float16:
        pytest.skip("array-api-strict has no float16")
    x = _logits(rng, (4, 50)).astype(np.float16)
    lse = scipy.special.logsumexp(x.astype(np.float64), axis=-1)
    ref = np.exp(x.astype(np.float64) - lse[:, None])
    X = _arr(xp, x)
    dx = xpsoftmax.logsumexp_backward(
        X, _arr(xp, lse.astype(np.float16)), _arr(xp, np.ones(4, np.float16))
    )
    # (lse rounded to float16 is off by up to 2**-6 at |lse| ~ 8: exp then by ~1.6 %)
    xp_assert_close(dx, ref.astype(np.float16), xp=xp, dtype="float16", rtol=2e-2, atol=1e-4)


def test_backward_shapes_and_errors(rng):
    x = _logits(rng)
    lse = xpsoftmax.logsumexp(x, (0, 2))
    with pytest.raises(ValueError, match="lse must have the shape"):
        xpsoftmax.logsumexp_backward(x, lse[:2], np.ones(4), (0, 2))
    with pytest.raises(ValueError, match="dl must have the shape"):
        xpsoftmax.logsumexp_backward(x, lse, np.ones(5), (0, 2))
    import torch

    with pytest.raises(TypeError, match="same array library"):
        xpsoftmax.logsumexp_backward(x, torch.from_numpy(lse), np.ones(4), (0, 2))
    out = np.empty(SHAPE)
    r = xpsoftmax.logsumexp_backward(x, lse, np.ones(4), (0, 2), out=out)
    assert r is out
    np.testing.assert_allclose(out, scipy.special.softmax(x, axis=(0, 2)), rtol=1e-13)
    # out= the input itself
    xc = x.copy()
    xpsoftmax.logsumexp_backward(xc, lse, np.ones(4), (0, 2), out=xc)
    np.testing.assert_allclose(xc, scipy.special.softmax(x, axis=(0, 2)), rtol=1e-13)


def test_backward_zero_d(xp):
    x = xp.asarray(3.0, dtype=xp.float64)
    dx = xpsoftmax.logsumexp_backward(x, xpsoftmax.logsumexp(x), xp.asarray(2.0, dtype=xp.float64))
    xp_assert_equal(dx, np.asarray(2.0), xp=xp, dtype=xp.float64)


def test_lazy_on_dask():
    da = pytest.importorskip("dask.array")
    x = da.from_array(np.arange(12.0).reshape(3, 4), chunks=(2, 2))
    r = xpsoftmax.logsumexp(x)
    assert isinstance(r, da.Array)
    dx = xpsoftmax.logsumexp_backward(x, r, da.ones(3, chunks=2))
    assert isinstance(dx, da.Array)
    np.testing.assert_allclose(
        dx.compute(), scipy.special.softmax(np.arange(12.0).reshape(3, 4), axis=-1)
    )


def test_numpy_runs_the_compiled_kernels():
    from xpsoftmax import _call, backends

    x = np.zeros((4, 8), dtype=np.float32)
    assert backends.select(_call.make_lse_call(x, -1, None, False, None))[0] == "numpy"
    call = _call.make_lse_vjp_call(
        x, np.zeros(4, np.float32), np.ones(4, np.float32), -1, None, None
    )
    assert backends.select(call)[0] == "numpy"


@pytest.mark.parametrize("path", ["numpy", "compiled"])
def test_both_cpu_paths_agree_with_scipy(path, monkeypatch, rng):
    monkeypatch.setenv("XPSOFTMAX_CPU", path)
    x = _logits(rng, (20, 30, 40))
    for axis in (-1, 1, (0, 2)):
        np.testing.assert_allclose(
            xpsoftmax.logsumexp(x, axis), scipy.special.logsumexp(x, axis=axis), rtol=1e-13
        )


@pytest.mark.skip_xp_backends(Backend.ARRAY_API_STRICT, reason="no float16 in the standard")
def test_backend_marker_is_used(xp):
    # (keeps the Backend import honest: float16 logsumexp on every other backend)
    r = xpsoftmax.logsumexp(_arr(xp, np.zeros(2, np.float16)))
    xp_assert_close(r, np.asarray(math.log(2.0), dtype=np.float16), xp=xp, dtype="float16")
