"""softmax and log_softmax against SciPy, JAX and float64 math: dtypes, limits, where, out."""

from __future__ import annotations

import math
import warnings

import array_api_compat
import numpy as np
import pytest
import scipy.special
from _helpers import (
    Backend,
    cached_reference,
    dtype_name,
    ref_softmax,
    to_numpy,
    tolerance,
    xp_assert_close,
    xp_assert_equal,
)

import xpsoftmax

# conftest.py: Dask runs in two layouts here, one chunk and the softmax axes split.
DASK_SPLIT = True

FORWARD = [
    pytest.param(xpsoftmax.softmax, scipy.special.softmax, False, id="softmax"),
    pytest.param(xpsoftmax.log_softmax, scipy.special.log_softmax, True, id="log_softmax"),
]
# Every axis of a 3-D array, negative axes, tuples in any order, all axes and None.
AXES = [-1, 0, 1, 2, -2, -3, (0, 2), (2, 0), (-1, 1), (0, 1, 2), None]
SHAPE = (3, 4, 5)


def _logits(rng: np.random.Generator, shape=SHAPE, dtype="float64") -> np.ndarray:
    return (3.0 * rng.standard_normal(shape)).astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_matches_scipy(xp, func, ref, log, axis, dtype, rng):
    x = _logits(rng, dtype=dtype)
    result = func(xp.asarray(x), axis=axis)
    xp_assert_close(result, ref(x.astype(np.float64), axis=axis), xp=xp, dtype=getattr(xp, dtype))


@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_default_axis_is_last(xp, func, ref, log, rng):
    x = _logits(rng)
    xp_assert_close(func(xp.asarray(x)), ref(x, axis=-1), xp=xp, dtype=xp.float64)


@pytest.mark.parametrize("axis", [np.int64(1), (np.int32(0), 2)])
def test_numpy_integer_axis(xp, axis, rng):
    x = _logits(rng)
    expected = scipy.special.softmax(x, axis=tuple(int(a) for a in np.atleast_1d(axis)))
    xp_assert_close(xpsoftmax.softmax(xp.asarray(x), axis=axis), expected, xp=xp, dtype=xp.float64)


@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
@pytest.mark.parametrize("axis", [None, ()])
def test_zero_dimensional(xp, func, ref, log, axis):
    # Normalizing over no axis (or all axes of a 0-d array) gives 1 (log: 0), as in SciPy.
    result = func(xp.asarray(2.5, dtype=xp.float64), axis=axis)
    xp_assert_close(result, ref(np.asarray(2.5), axis=axis), xp=xp, dtype=xp.float64)


@pytest.mark.skip_xp_backends(Backend.ARRAY_API_STRICT, reason="the standard has no float16")
@pytest.mark.parametrize("axis", [-1, (0, 2), None])
@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_float16_against_float64(xp, func, ref, log, axis, rng):
    x = _logits(rng, dtype="float16")
    result = func(xp.asarray(x), axis=axis)
    xp_assert_close(result, ref(x.astype(np.float64), axis=axis), xp=xp, dtype="float16")


@pytest.mark.skip_xp_backends(Backend.ARRAY_API_STRICT, reason="the standard has no float16")
@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_float16_accumulates_in_float32(xp, func, ref, log):
    # 70000 equal logits: a float16 sum of exp would overflow (max 65504) and give 0 (log -inf).
    n = 70_000
    result = func(xp.asarray(np.zeros((1, n), dtype=np.float16)))
    expected = np.full((1, n), -math.log(n) if log else 1.0 / n)
    xp_assert_close(result, expected, xp=xp, dtype="float16")
    assert np.all(np.isfinite(to_numpy(result)))
    if not log:
        assert to_numpy(result)[0, 0] > 0


@pytest.mark.skip_xp_backends(Backend.ARRAY_API_STRICT, reason="the standard has no float16")
@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_float16_near_max(xp, library, func, ref, log):
    x = np.array([[65504.0, 65504.0, -65504.0, 0.0], [65504.0, 65000.0, 60000.0, -1.0]], "float16")
    expected = ref(x.astype(np.float64), axis=-1)
    with np.errstate(over="ignore"):
        expected16 = expected.astype(np.float16)  # -131008.7 rounds to -inf in float16
    result = func(xp.asarray(x))
    xp_assert_close(result, expected16, xp=xp, dtype="float16")
    assert not np.any(np.isnan(to_numpy(result)))


@pytest.mark.skip_xp_backends(
    Backend.NUMPY,
    Backend.ARRAY_API_STRICT,
    Backend.JAX,
    Backend.DASK,
    reason="bfloat16 is tested on torch only",
)
@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_bfloat16_torch(xp, func, ref, log, rng):
    import torch

    x = _logits(rng, shape=(4, 6))
    t = torch.asarray(x, dtype=torch.bfloat16)
    result = func(t)
    expected = ref(t.to(torch.float64).numpy(), axis=-1)
    xp_assert_close(result, expected, xp=xp, dtype=torch.bfloat16)


def _default_float_name(library: Backend) -> str:
    if library is Backend.TORCH:
        import torch

        return dtype_name(torch.get_default_dtype())
    return "float64"  # NumPy, array-api-strict, Dask, and JAX with jax_enable_x64


@pytest.mark.parametrize("int_dtype", ["int8", "int32", "int64", "uint8", "bool"])
@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_int_and_bool_promote_to_default_float(xp, library, func, ref, log, int_dtype, rng):
    x = rng.integers(0, 2 if int_dtype == "bool" else 5, size=(3, 4)).astype(int_dtype)
    result = func(xp.asarray(x))
    expected_dtype = _default_float_name(library)
    xp_assert_close(
        result,
        ref(x.astype(np.float64), axis=-1),
        xp=xp,
        dtype=expected_dtype,
        **tolerance(expected_dtype),
    )


@pytest.mark.skip_xp_backends(
    Backend.NUMPY,
    Backend.ARRAY_API_STRICT,
    Backend.JAX,
    Backend.DASK,
    reason="only torch has a settable default dtype",
)
def test_int_follows_torch_default_dtype(xp):
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        result = xpsoftmax.softmax(torch.arange(4))
    finally:
        torch.set_default_dtype(previous)
    xp_assert_close(result, scipy.special.softmax(np.arange(4.0)), xp=xp, dtype=torch.float64)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_neg_inf_entries_exact(xp, func, ref, log, dtype, rng):
    x = _logits(rng, shape=(4, 6), dtype=dtype)
    x[0, [1, 4]] = -np.inf
    x[2, :5] = -np.inf
    x[3, 0] = -np.inf
    result = func(xp.asarray(x))
    xp_assert_close(result, ref(x.astype(np.float64), axis=-1), xp=xp, dtype=getattr(xp, dtype))
    r = to_numpy(result)
    hit = np.isneginf(x)
    if log:
        assert np.all(np.isneginf(r[hit]))
    else:
        assert np.all(r[hit] == 0.0)
    assert r[2, 5] == (0.0 if log else 1.0)  # a single finite entry takes all the mass, exactly


@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_nan_poisons_only_its_row(xp, func, ref, log, axis, rng):
    x = _logits(rng, shape=(4, 5))
    x[1, 2] = np.nan
    result = to_numpy(func(xp.asarray(x), axis=axis))
    poisoned = np.zeros(x.shape, bool)
    if axis == -1:
        poisoned[1, :] = True
    else:
        poisoned[:, 2] = True
    assert np.all(np.isnan(result[poisoned]))
    assert np.all(np.isfinite(result[~poisoned]))
    clean = x.copy()
    clean[1, 2] = 0.0
    np.testing.assert_allclose(
        result[~poisoned], ref(clean, axis=axis)[~poisoned], **tolerance("float64")
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("axis", [-1, 0, (0, 1), None])
@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_posinf_row_gives_even_split(xp, func, ref, log, axis, dtype):
    x = np.array(
        [
            [np.inf, 1.0, np.inf, -np.inf, 0.0],
            [1.0, 2.0, 3.0, 4.0, 5.0],
            [np.inf, -np.inf, 0.0, 1e30, -1e30],
            [-2.0, np.inf, np.inf, np.inf, 7.0],
        ],
        dtype=dtype,
    )
    result = func(xp.asarray(x), axis=axis)
    assert not np.any(np.isnan(to_numpy(result)))
    if not log:
        # The limit as the +inf entries grow together: replace them by a huge finite value.
        huge = np.where(np.isposinf(x), 1e300, x.astype(np.float64))
        expected = scipy.special.softmax(huge, axis=axis)
        xp_assert_close(result, expected, xp=xp, dtype=getattr(xp, dtype))
    xp_assert_close(result, ref_softmax(x, axis, log=log), xp=xp, dtype=getattr(xp, dtype))


@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_all_neg_inf_row_is_nan(xp, func, ref, log):
    x = np.array([[-np.inf, -np.inf, -np.inf], [0.0, 1.0, 2.0]])
    result = to_numpy(func(xp.asarray(x)))
    assert np.all(np.isnan(result[0]))
    np.testing.assert_allclose(result[1], ref(x[1]), **tolerance("float64"))
    # torch agrees that such a row is NaN (SciPy too, with a warning).
    import torch

    fn = torch.log_softmax if log else torch.softmax
    assert torch.isnan(fn(torch.asarray(x), dim=-1)[0]).all()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_extreme_finite_values(xp, func, ref, log, dtype):
    big = float(np.finfo(dtype).max)
    tiny = float(np.finfo(dtype).smallest_subnormal)
    x = np.array(
        [
            [1e30, 0.0, -1e30, 1e30],
            [-1e30, -1e30, -1e30, -1e30],
            [big, -big, 0.0, big],
            [tiny, -tiny, 0.0, 2 * tiny],
        ],
        dtype=dtype,
    )
    expected = ref_softmax(x, -1, log=log)
    with np.errstate(over="ignore"):
        expected = expected.astype(dtype)  # log-softmax of -big - big overflows to -inf
    result = func(xp.asarray(x))
    xp_assert_close(result, expected, xp=xp, dtype=getattr(xp, dtype))
    assert not np.any(np.isnan(to_numpy(result)))


# ------------------------------------------------------------------------------------------
# where


@cached_reference
def _jax_case_reference(case: str, axis, log: bool) -> np.ndarray:
    return _jax_reference(_logits(np.random.default_rng(7)), axis, _mask_case(case), log)


def _jax_reference(x, axis, where, log):
    import jax
    import jax.numpy as jnp

    fn = jax.nn.log_softmax if log else jax.nn.softmax
    where = None if where is None else jnp.asarray(np.broadcast_to(where, x.shape))
    return np.asarray(fn(jnp.asarray(x, dtype=jnp.float64), axis=axis, where=where))


def _mask_case(case: str) -> np.ndarray:
    if case == "full":
        mask = np.random.default_rng(8).random(SHAPE) < 0.6
        mask[0, 1, :] = False  # a fully masked row along the last axis
        mask[2, :, 3] = False  # a fully masked column along axis 1
        mask[1] = False  # fully masked for any tuple axis that includes 1 and 2
        return mask
    if case == "row":
        return np.array([True, False, True, True, False])  # broadcasts from the last axis
    if case == "column":
        return np.array([[True], [False], [True], [False]])  # shape (4, 1)
    if case == "batch":
        return np.array([True, False, True]).reshape(3, 1, 1)  # whole rows masked
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["full", "row", "column", "batch"])
@pytest.mark.parametrize("axis", [-1, 1, (0, 2), None])
@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_where_matches_jax(xp, func, ref, log, axis, case):
    x = _logits(np.random.default_rng(7))
    mask = _mask_case(case)
    result = func(xp.asarray(x), axis=axis, where=xp.asarray(mask))
    xp_assert_close(result, _jax_case_reference(case, axis, log), xp=xp, dtype=xp.float64)
    r = to_numpy(result)
    off = ~np.broadcast_to(mask, x.shape)
    assert np.all(np.isneginf(r[off])) if log else np.all(r[off] == 0.0)
    assert not np.any(np.isnan(r))
    xp_assert_close(result, ref_softmax(x, axis, where=mask, log=log), xp=xp, dtype=xp.float64)


@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_where_ignores_masked_nan_and_inf(xp, func, ref, log, rng):
    x = _logits(rng, shape=(3, 5))
    mask = np.ones(x.shape, bool)
    x[0, 1], x[1, 3], x[2, 0] = np.nan, np.inf, -np.inf
    mask[0, 1] = mask[1, 3] = mask[2, 0] = False
    result = func(xp.asarray(x), where=xp.asarray(mask))
    clean = np.where(mask, x, 0.0)
    xp_assert_close(result, _jax_reference(clean, -1, mask, log), xp=xp, dtype=xp.float64)


@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_where_unmasked_nan_keeps_masked_entries(xp, func, ref, log):
    # A NaN in an unmasked entry poisons the unmasked entries of its row; masked entries stay
    # exactly 0 (log: -inf), as in jax.nn.softmax(where=...).
    x = np.array([[1.0, np.nan, 3.0], [1.0, -np.inf, -np.inf], [0.0, 1.0, 2.0]])
    mask = np.array([[True, True, False], [False, True, True], [True, True, True]])
    result = func(xp.asarray(x), where=xp.asarray(mask))
    xp_assert_close(result, _jax_reference(x, -1, mask, log), xp=xp, dtype=xp.float64)
    xp_assert_close(result, ref_softmax(x, where=mask, log=log), xp=xp, dtype=xp.float64)


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_where_scalar(xp, func, ref, log, value, rng):
    x = _logits(rng, shape=(2, 3))
    expected = ref(x, axis=-1) if value else np.full(x.shape, -np.inf if log else 0.0)
    for where in (value, xp.asarray(value)):
        result = func(xp.asarray(x), where=where)
        xp_assert_close(result, expected, xp=xp, dtype=xp.float64)


@pytest.mark.skip_xp_backends(
    Backend.ARRAY_API_STRICT,
    Backend.TORCH,
    Backend.JAX,
    Backend.DASK,
    reason="array-likes are converted with NumPy, so they go with NumPy inputs",
)
def test_array_likes_are_converted(xp):
    result = xpsoftmax.softmax([[0.0, math.log(3.0)]], where=[True, True])
    xp_assert_close(result, np.array([[0.25, 0.75]]))
    result = xpsoftmax.log_softmax([1, 1], where=[True, False])
    xp_assert_equal(result, np.array([0.0, -np.inf]), xp=xp, dtype=xp.float64)


# ------------------------------------------------------------------------------------------
# out


@pytest.mark.skip_xp_backends(Backend.JAX, Backend.DASK, reason="immutable or lazy: no out=")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_out_is_written_and_returned(xp, func, ref, log, dtype, rng):
    x = _logits(rng, dtype=dtype)
    out = xp.full(SHAPE, 7.0, dtype=getattr(xp, dtype))
    result = func(xp.asarray(x), axis=(0, 2), out=out)
    assert result is out
    xp_assert_close(out, ref(x.astype(np.float64), axis=(0, 2)), xp=xp, dtype=getattr(xp, dtype))


@pytest.mark.skip_xp_backends(Backend.JAX, Backend.DASK, reason="immutable or lazy: no out=")
@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_out_with_where_and_int_input(xp, library, func, ref, log):
    x = np.array([[1, 2, 3], [4, 5, 6]])
    mask = np.array([True, False, True])
    dtype = getattr(xp, _default_float_name(library))
    out = xp.full(x.shape, 7.0, dtype=dtype)
    result = func(xp.asarray(x), where=xp.asarray(mask), out=out)
    assert result is out
    expected = ref_softmax(x, where=mask, log=log)
    xp_assert_close(out, expected, xp=xp, dtype=dtype, **tolerance(dtype))


@pytest.mark.skip_xp_backends(Backend.JAX, Backend.DASK, reason="immutable or lazy: no out=")
@pytest.mark.parametrize("axis", [-1, 0, None])
@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_out_aliasing_input(xp, func, ref, log, axis, rng):
    x_np = _logits(rng)
    x = xp.asarray(x_np.copy())
    result = func(x, axis=axis, out=x)
    assert result is x
    xp_assert_close(x, ref(x_np, axis=axis), xp=xp, dtype=xp.float64)


# ------------------------------------------------------------------------------------------
# empty inputs, namespace and device


@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((0,), -1),
        ((0,), None),
        ((0, 5), -1),
        ((0, 5), 0),
        ((3, 0), -1),
        ((3, 0), 0),
        ((2, 0, 4), (0, 2)),
        ((2, 0, 4), 1),
        ((2, 3, 0), None),
    ],
)
@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_empty(xp, func, ref, log, shape, axis):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = func(xp.zeros(shape, dtype=xp.float32), axis=axis)
        xp_assert_equal(result, np.empty(shape), xp=xp, dtype=xp.float32)
        mask = xp.zeros(shape, dtype=xp.bool)
        result = func(xp.zeros(shape, dtype=xp.int64), axis=axis, where=mask)
        assert tuple(result.shape) == shape
        assert array_api_compat.array_namespace(result) is xp
        assert xp.isdtype(result.dtype, "real floating")


@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_result_on_input_device(xp, func, ref, log, rng):
    x = xp.asarray(_logits(rng))
    result = func(x, axis=1, where=xp.asarray(np.array([True, False, True, True]))[:, None])
    assert array_api_compat.array_namespace(result) is xp
    assert array_api_compat.device(result) == array_api_compat.device(x)


def test_dask_split_axis_extreme_values_without_warnings():
    """float32's extremes, with the softmax axis split in two chunks (the two-pass split path):
    no NumPy warning at compute, values against float64 math."""
    da = pytest.importorskip("dask.array")
    big = float(np.finfo(np.float32).max)
    x = np.array([[big, -big, 0.0, big]] * 2, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = xpsoftmax.softmax(da.from_array(x, chunks=(2, 2))).compute()  # axis -1 split
        logs = xpsoftmax.log_softmax(da.from_array(x, chunks=(1, 2))).compute()
    np.testing.assert_allclose(result, [[0.5, 0.0, 0.0, 0.5]] * 2)
    x64 = x.astype(np.float64)
    want = (x64 - big) - np.log(2.0)  # log_softmax in float64: the two maxima share the mass
    with np.errstate(over="ignore"):
        want = want.astype(np.float32)  # -2 * big rounds to -inf
    np.testing.assert_allclose(logs, want, rtol=1e-6)


@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_dask_split_axis_fully_masked_rows_raise_no_warning(func, ref, log):
    """A fully masked row's sum is set to 1 before the division, so the split path on Dask
    (computed outside any floating-point error state) never computes 0 / 0."""
    da = pytest.importorskip("dask.array")
    x = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    mask = np.array([[True, False, True, True], [False, False, False, False]])
    result = func(da.from_array(x, chunks=(1, 2)), where=da.from_array(mask, chunks=(1, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = result.compute()
    np.testing.assert_allclose(got, ref_softmax(x, -1, where=mask, log=log), rtol=1e-12)


@pytest.mark.parametrize("axis", [-1, 0, None], ids=["axis-1", "axis0", "axisNone"])
def test_zero_d_inputs_as_torch_takes_them(xp, axis):
    """A 0-d input is one element in its own row: torch.softmax(t, -1) of a 0-d t is 1 (log: 0),
    the VJP and JVP are 0, for axis -1, 0 and None; the Jacobian is the 1 x 1 zero."""
    import torch

    x0 = torch.tensor(1000.0, dtype=torch.float64, requires_grad=True)
    for log, func, bwd, jvp in [
        (False, xpsoftmax.softmax, xpsoftmax.softmax_backward, xpsoftmax.softmax_jvp),
        (True, xpsoftmax.log_softmax, xpsoftmax.log_softmax_backward, xpsoftmax.log_softmax_jvp),
    ]:
        ref = (torch.log_softmax if log else torch.softmax)(x0, -1)
        (grad,) = torch.autograd.grad(ref * 3.0, x0)
        x = xp.asarray(1000.0, dtype=xp.float64)
        y = func(x, axis=axis)
        assert tuple(y.shape) == ()
        xp_assert_close(y, ref.detach().numpy(), xp=xp, dtype=xp.float64)
        g = xp.asarray(3.0, dtype=xp.float64)
        xp_assert_close(bwd(y, g, axis=axis), grad.numpy(), xp=xp, dtype=xp.float64)
        xp_assert_close(jvp(y, g, axis=axis), grad.numpy(), xp=xp, dtype=xp.float64)
    jac = xpsoftmax.softmax_jacobian(xp.asarray(1.0, dtype=xp.float64), axis=axis)
    xp_assert_close(jac, np.zeros((1, 1)), xp=xp, dtype=xp.float64)


@pytest.mark.parametrize("axis", [1, -2, (0, -1)])
def test_zero_d_inputs_refuse_other_axes(axis):
    with pytest.raises(np.exceptions.AxisError, match="out of bounds"):
        xpsoftmax.softmax(np.asarray(1.0), axis=axis)


@pytest.mark.parametrize("axis", [-1, 0, None])
@pytest.mark.parametrize("log", [False, True])
def test_check_vjp_on_a_zero_d_input(axis, log):
    f, vjp = (
        (xpsoftmax.log_softmax, xpsoftmax.log_softmax_backward)
        if log
        else (xpsoftmax.softmax, xpsoftmax.softmax_backward)
    )
    assert xpsoftmax.check_vjp(f, vjp, np.asarray(0.5), axis=axis)


@pytest.mark.parametrize(("func", "ref", "log"), FORWARD)
def test_bfloat16_numpy_arrays_as_scipy_returns_them(func, ref, log):
    """ml_dtypes.bfloat16 NumPy arrays (np.asarray of a JAX bfloat16 array): bfloat16 out, each
    value within one bfloat16 rounding of the float64 result (the arithmetic runs in float32)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.asarray(
        [[1.0, 2.0, 3.0], [-60.0, 0.5, 80.0], [-np.inf, 0.0, 1.0]], dtype=ml_dtypes.bfloat16
    )
    y = func(x)
    assert y.dtype == x.dtype
    expected = ref(x.astype(np.float64), axis=-1)
    np.testing.assert_allclose(
        y.astype(np.float64), expected, rtol=2.0**-7, atol=2.0**-126
    )  # below: underflows
    dy = xpsoftmax.softmax_backward(xpsoftmax.softmax(x), x)
    assert dy.dtype == x.dtype


def test_bfloat16_numpy_cross_entropy_does_not_crash():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.asarray([[1.0, 2.0, 3.0]], dtype=ml_dtypes.bfloat16)
    loss = xpsoftmax.cross_entropy(x, np.asarray([2]))
    expected = -scipy.special.log_softmax(np.asarray([1.0, 2.0, 3.0]))[2]
    np.testing.assert_allclose(float(loss), expected, rtol=2.0**-7)
