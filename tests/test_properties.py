"""Property tests (hypothesis): random shapes, axes, masks and extreme values on every backend.

Forward values are compared with float64 NumPy reference math written here and in
``_helpers.ref_softmax`` (the max-shift formula on finite rows, the limits on rows with ``+inf``,
NaN rows, fully masked rows); backward and JVP with the explicit Jacobian
``J = diag(y) - y y^T`` (log-softmax: ``J = I - 1 p^T``) applied row by row in float64.
"""

from __future__ import annotations

import math

import array_api_compat
import numpy as np
import pytest
from _helpers import Backend, move_axes_last, ref_softmax, to_numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import xpsoftmax

# NumPy (its own fast path) and torch/array-api-strict (the generic path) get the most examples;
# JAX compiles every operation for every new shape and Dask builds a graph per call, so they get
# fewer. Dask runs twice (conftest.py): one chunk (the NumPy path block by block) and, as
# dask-split, every axis in two chunks (the Dask backend's two-pass split path).
DASK_SPLIT = True
_EXAMPLES = {
    Backend.NUMPY: 60,
    Backend.TORCH: 40,
    Backend.ARRAY_API_STRICT: 40,
    Backend.DASK: 15,
    Backend.JAX: 10,
}


def _settings(library: Backend) -> settings:
    return settings(
        max_examples=_EXAMPLES[library],
        deadline=None,
        # The xp fixture is a constant namespace per test, so sharing it across examples is safe.
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        derandomize=True,
    )


_SPECIAL = {
    "float64": [1e30, -1e30, 1.7e308, -1.7e308, 5e-324, -5e-324, 2.2e-308, 0.0, -0.0],
    "float32": [1e30, -1e30, 3.4e38, -3.4e38, 1e-45, -1e-45, 1.2e-38, 0.0, -0.0],
    # float16: around its largest finite value 65504 and its smallest subnormal 6e-8.
    "float16": [65504.0, -65504.0, 65472.0, 65000.0, -60000.0, 6e-8, -6e-8, 6.1e-5, 0.0],
}
_NONFINITE = [np.inf, -np.inf, np.nan]
_WIDTH = {"float16": 16, "float32": 32, "float64": 64}


def _dtypes(library: Backend) -> list[str]:
    return ["float16", "float32", "float64"] if library.has_float16 else ["float32", "float64"]


@st.composite
def _cases(draw, library: Backend, *, finite: bool):
    """(x, axis, mask or None) with x a NumPy array of one of the backend's float dtypes."""
    dtype = draw(st.sampled_from(_dtypes(library) if not finite else ["float32", "float64"]))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5))
    width = _WIDTH[dtype]
    if finite:
        elements = st.floats(-30, 30, width=width)
    else:
        elements = st.one_of(
            st.floats(-40, 40, width=width),
            st.sampled_from(_SPECIAL[dtype] + _NONFINITE).map(lambda v: np.asarray(v, dtype)[()]),
        )
    x = draw(hnp.arrays(dtype, shape, elements=elements))
    ndim = len(shape)
    kind = draw(st.sampled_from(["int", "tuple", "none"]))
    if kind == "none":
        axis = None
    elif kind == "int":
        axis = draw(st.integers(-ndim, ndim - 1))
    else:
        picked = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
        axis = tuple(a - ndim if draw(st.booleans()) else a for a in picked)
    mask = None
    if draw(st.booleans()):
        # A full mask or one broadcast from a shape with some sizes 1 (and fewer dimensions).
        drop = draw(st.integers(0, ndim - 1))
        mshape = tuple(1 if draw(st.booleans()) else s for s in shape[drop:])
        mask = draw(hnp.arrays(np.bool_, mshape))
    return x, axis, mask


def _expected_in_dtype(ref: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        return ref.astype(dtype)  # values beyond the dtype's range round to +-inf, as they must


def _tolerances(dtype: str) -> dict[str, float]:
    # rtol covers one rounding of the output plus float32/float64 error in x - max and exp of
    # arguments up to about 100 (float32) or 745 (float64); atol covers subnormal outputs.
    return {
        "float16": {"rtol": 1e-3, "atol": 6e-8},
        "float32": {"rtol": 2e-5, "atol": 4e-45},
        "float64": {"rtol": 1e-12, "atol": 1e-320},
    }[dtype]


def _assert_matches(actual: np.ndarray, expected64: np.ndarray, dtype: str, log_n: int) -> None:
    """``log_n``: the row length for log-softmax (0 for softmax). log(sum) has an absolute
    error of about n ulps of the compute dtype, which bounds log-softmax's error near 0."""
    tol = _tolerances(dtype)
    if log_n:
        eps = float(np.finfo(np.float32 if dtype == "float16" else dtype).eps)
        tol["atol"] = max(tol["atol"], eps * max(log_n, 4))
    expected = _expected_in_dtype(expected64, dtype).astype(np.float64)
    actual = actual.astype(np.float64)
    if dtype == "float16":
        # Within rounding of float16's overflow threshold 65520, either neighbour is right.
        edge = np.abs(np.abs(expected64) - 65520.0) < 16.0
        ok = edge & (np.abs(actual) >= 65504.0) & (np.sign(actual) == np.sign(expected64))
        actual, expected = actual[~ok], expected[~ok]
    np.testing.assert_allclose(actual, expected, equal_nan=True, **tol)


def _call_checked(library: Backend, fn, *args, **kwargs) -> np.ndarray:
    result = fn(*args, **kwargs)
    assert array_api_compat.array_namespace(result) is array_api_compat.array_namespace(args[0])
    assert tuple(result.shape) == tuple(args[0].shape)
    return to_numpy(result)  # (on Dask, computed with warnings as errors: none escape)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_forward_property(xp, library, log):
    fn = xpsoftmax.log_softmax if log else xpsoftmax.softmax

    @_settings(library)
    @given(case=_cases(library, finite=False))
    def check(case):
        x, axis, mask = case
        where = None if mask is None else xp.asarray(mask)
        xin = xp.asarray(x)
        r = _call_checked(library, fn, xin, axis=axis, where=where)
        assert r.dtype == np.dtype(x.dtype)
        n = move_axes_last(x, axis)[0].shape[-1] if log else 0
        _assert_matches(r, ref_softmax(x, axis, where=mask, log=log), str(x.dtype), n)

    check()


def _jacobian_rows(y: np.ndarray, keep: np.ndarray, log: bool) -> np.ndarray:
    """Row Jacobians d out_i / d x_j (shape (R, n, n)) from the float64 forward output."""
    p = np.exp(y) if log else y
    p = np.where(keep, p, 0.0)
    n = y.shape[-1]
    eye = np.broadcast_to(np.eye(n), (*y.shape, n))
    if log:
        jac = eye - p[:, None, :]  # d ly_i / d x_j = delta_ij - p_j
    else:
        jac = p[:, :, None] * eye - p[:, :, None] * p[:, None, :]
    both = keep[:, :, None] & keep[:, None, :]
    return np.where(both, jac, 0.0)


@pytest.mark.parametrize(
    "mode", ["softmax_backward", "log_softmax_backward", "softmax_jvp", "log_softmax_jvp"]
)
def test_backward_and_jvp_property(xp, library, mode):
    fn = getattr(xpsoftmax, mode)
    log = mode.startswith("log")

    @_settings(library)
    @given(case=_cases(library, finite=True), seed=st.integers(0, 2**16))
    def check(case, seed):
        x, axis, mask = case
        dtype = str(x.dtype)
        g = np.random.default_rng(seed).standard_normal(x.shape).astype(dtype)
        full_mask = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
        y64 = ref_softmax(x, axis, where=full_mask, log=log)
        y = y64.astype(dtype)
        where = None if mask is None else xp.asarray(mask)
        r = _call_checked(library, fn, xp.asarray(y), xp.asarray(g), axis=axis, where=where)
        assert r.dtype == np.dtype(dtype)
        # Reference: the explicit Jacobian, transposed for the VJP, applied in float64.
        yr, axes = move_axes_last(y.astype(np.float64), axis)
        gr, _ = move_axes_last(g.astype(np.float64), axis)
        kr, _ = move_axes_last(full_mask, axis)
        rows, n = math.prod(yr.shape[:-1]), yr.shape[-1]
        jac = _jacobian_rows(yr.reshape(rows, n), kr.reshape(rows, n), log)
        spec = "rij,rj->ri" if mode.endswith("jvp") else "rji,rj->ri"
        expected_rows = np.einsum(spec, jac, gr.reshape(rows, n)).reshape(yr.shape)
        rest = [d for d in range(x.ndim) if d not in axes]
        moved_shape = tuple(x.shape[d] for d in (*rest, *axes))
        expected = np.transpose(expected_rows.reshape(moved_shape), np.argsort((*rest, *axes)))
        assert np.all(np.isfinite(r))
        assert np.all(r[~full_mask] == 0.0)
        scale = {"float32": 2e-5, "float64": 1e-12}[dtype]
        np.testing.assert_allclose(
            r, expected, rtol=scale, atol=scale * (1 + np.abs(g).max(initial=0))
        )

    check()
