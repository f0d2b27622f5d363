"""The fast NumPy path, both CPU paths (compiled and blocked): the same results as the generic path
and as float64.

Every result of the fast path is checked twice: against the generic array-API path (the same
public call with ``XPSOFTMAX_NUMPY_FAST=0``) and against float64 math written here or in
``_helpers.ref_softmax`` (scipy where it applies). Block edges are reached with small arrays by
shrinking the block size (the ``block_elems`` fixture), and with the real, L2-sized blocks.
"""

from __future__ import annotations

import math
import os
import tracemalloc

import numpy as np
import pytest
import scipy.special
from _helpers import backend_of, ref_softmax, tolerance, xp_assert_close, xp_assert_equal

import xpsoftmax
from xpsoftmax import _config
from xpsoftmax.backends.numpy import blocked as _numpy

FAST_ENV = "XPSOFTMAX_NUMPY_FAST"
THREADS_ENV = "XPSOFTMAX_NUM_THREADS"
CPU_ENV = "XPSOFTMAX_CPU"

FORWARD = [
    pytest.param(xpsoftmax.softmax, False, id="softmax"),
    pytest.param(xpsoftmax.log_softmax, True, id="log_softmax"),
]
PRODUCTS = [
    pytest.param(xpsoftmax.softmax_backward, "softmax", id="softmax_backward"),
    pytest.param(xpsoftmax.log_softmax_backward, "log_vjp", id="log_softmax_backward"),
    pytest.param(xpsoftmax.softmax_jvp, "softmax", id="softmax_jvp"),
    pytest.param(xpsoftmax.log_softmax_jvp, "log_jvp", id="log_softmax_jvp"),
]
DTYPES = ["float16", "float32", "float64"]

# (shape, axis): last and non-last axes, adjacent and non-adjacent tuples, all axes.
LAYOUTS = [
    ((9, 13), -1),
    ((9, 13), 0),
    ((4, 11, 6), 1),
    ((4, 6, 11), (1, 2)),
    ((6, 4, 11), (0, 2)),
    ((5, 7), None),
]


@pytest.fixture(autouse=True, params=["compiled", "numpy"])
def cpu_path(request, monkeypatch):
    """Each test runs on both CPU paths (``XPSOFTMAX_CPU``: the numba kernels and the blocked
    NumPy code), with the fast path on and the default thread count."""
    monkeypatch.delenv(FAST_ENV, raising=False)
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.setenv(CPU_ENV, request.param)
    return request.param


@pytest.fixture(params=[None, 64, 1000], ids=["l2_blocks", "blocks64", "blocks1000"])
def block_elems(request, monkeypatch):
    """Block size in elements: the real L2-sized one (None), or small enough to cut small arrays."""
    if request.param is not None:
        monkeypatch.setattr(_numpy, "_block_elems", lambda itemsize: request.param)
    return request.param


def _generic(monkeypatch, func, *args, **kwargs):
    """``func`` on the generic array-API path (the fast path switched off)."""
    with monkeypatch.context() as m:
        m.setenv(FAST_ENV, "0")
        assert backend_of(args[0]) == "generic"
        return func(*args, **kwargs)


def _fast(func, *args, **kwargs):
    assert backend_of(args[0]) == "numpy"
    return func(*args, **kwargs)


def _axes(axis, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    return tuple(sorted(a % ndim for a in (axis if isinstance(axis, tuple) else (axis,))))


def _rows_to_array(rows: np.ndarray, shape: tuple[int, ...], axis) -> np.ndarray:
    """Rows ``(R, n)`` of the softmax axes, put back into an array of ``shape``."""
    axes = _axes(axis, len(shape))
    perm = [d for d in range(len(shape)) if d not in axes] + list(axes)
    moved = rows.reshape([shape[d] for d in perm])
    return np.ascontiguousarray(np.transpose(moved, np.argsort(perm)))


def _rows_shape(shape: tuple[int, ...], axis) -> tuple[int, int]:
    axes = _axes(axis, len(shape))
    n = math.prod(shape[d] for d in axes)
    return math.prod(shape) // n, n


def _logits(rng, shape, axis, dtype, *, special=True) -> np.ndarray:
    """Logits with, in their first rows: one +inf, two +inf, a NaN, all -inf, some -inf."""
    r, n = _rows_shape(shape, axis)
    rows = 3.0 * rng.standard_normal((r, n))
    if special and r >= 6 and n >= 3:
        rows[0, 1] = np.inf
        rows[1, [0, 2]] = np.inf
        rows[2, n // 2] = np.nan
        rows[3] = -np.inf
        rows[4, ::2] = -np.inf
        rows[5, 0], rows[5, 1] = np.inf, -np.inf
    return _rows_to_array(rows, shape, axis).astype(dtype)


def _mask(rng, shape, axis) -> np.ndarray:
    """A random mask with one fully masked row (the last) and one row keeping a single entry."""
    r, n = _rows_shape(shape, axis)
    rows = rng.random((r, n)) > 0.3
    rows[-1] = False
    if r >= 2:
        rows[-2] = False
        rows[-2, n - 1] = True
    return _rows_to_array(rows, shape, axis)


def _ref_product(y, g, axis, mask, kind: str) -> np.ndarray:
    """Float64 VJP/JVP from the forward output ``y``: the formulas of the specification."""
    axes = _axes(axis, y.ndim)
    y, g = y.astype(np.float64), g.astype(np.float64)
    keep = np.ones(y.shape, bool) if mask is None else np.broadcast_to(mask, y.shape)
    with np.errstate(all="ignore"):
        if kind == "softmax":
            dot = np.sum(np.where(keep, y * g, 0.0), axis=axes, keepdims=True)
            r = y * (g - dot)
        elif kind == "log_vjp":
            r = g - np.exp(y) * np.sum(np.where(keep, g, 0.0), axis=axes, keepdims=True)
        else:
            r = g - np.sum(np.where(keep, np.exp(y) * g, 0.0), axis=axes, keepdims=True)
    return np.where(keep, r, 0.0)


def _check_masked_exact(result, mask, log: bool) -> None:
    if mask is not None:
        masked = result[~np.broadcast_to(mask, result.shape)]
        assert np.all(masked == (-np.inf if log else 0.0))


# ------------------------------------------------------------------------------------------
# routing and switches


def test_routing_numpy_only():
    assert backend_of(np.ones(3, np.float32)) == "numpy"
    assert backend_of(np.ones(3, np.float16)) == "numpy"
    # Unusual dtypes, ndarray subclasses and 0-d arrays stay on the generic path.
    assert backend_of(np.ones(3, np.longdouble)) == "generic"
    assert backend_of(np.ma.masked_array(np.ones(3))) == "generic"
    assert backend_of(np.float64(1.0)) == "generic"
    torch = pytest.importorskip("torch")
    assert backend_of(torch.ones(3)) == "torch-cpu"  # the same kernels, as torch custom ops


def test_routing_ignores_kernel_switch():
    with xpsoftmax.kernels("never"):
        assert backend_of(np.ones(3)) == "numpy"


def test_fast_switch(monkeypatch):
    monkeypatch.setenv(FAST_ENV, "0")
    assert backend_of(np.ones(3)) == "generic"
    monkeypatch.setenv(FAST_ENV, "1")
    assert backend_of(np.ones(3)) == "numpy"
    monkeypatch.setenv(FAST_ENV, "yes")
    with pytest.raises(ValueError, match=f"{FAST_ENV} must be 0 or 1, got 'yes'"):
        xpsoftmax.softmax(np.ones(3))


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_thread_count_must_be_positive_int(monkeypatch, value):
    monkeypatch.setenv(THREADS_ENV, value)
    with pytest.raises(
        ValueError, match=f"{THREADS_ENV} must be a positive integer, got '{value}'"
    ):
        xpsoftmax.softmax(np.ones((1024, 512), np.float32))


def test_thread_count_default_and_override(monkeypatch):
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert _config.num_threads() == expected
    monkeypatch.setenv(THREADS_ENV, " 3 ")
    assert _config.num_threads() == 3


def test_longdouble_uses_generic_path(rng):
    x = rng.standard_normal((4, 5)).astype(np.longdouble)
    r = xpsoftmax.softmax(x)
    # (xp_assert_close looks up default tolerances, which longdouble does not have)
    assert type(r) is np.ndarray and r.dtype == np.longdouble and r.shape == x.shape
    ref = scipy.special.softmax(x.astype(np.float64), -1)
    np.testing.assert_allclose(r.astype(np.float64), ref, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("func", "log"), FORWARD)
def test_forward(monkeypatch, block_elems, func, log, dtype, shape, axis, masked, rng):
    x = _logits(rng, shape, axis, dtype)
    mask = _mask(rng, shape, axis) if masked else None
    r = _fast(func, x, axis=axis, where=mask)
    xp_assert_close(r, _generic(monkeypatch, func, x, axis=axis, where=mask))
    xp_assert_close(r, ref_softmax(x, axis, where=mask, log=log), dtype=dtype, **tolerance(dtype))
    _check_masked_exact(r, mask, log)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("func", "log"), FORWARD)
def test_forward_matches_scipy(func, log, dtype, rng):
    x = rng.standard_normal((37, 1000)).astype(dtype)
    ref = (scipy.special.log_softmax if log else scipy.special.softmax)(x.astype(np.float64), 1)
    xp_assert_close(_fast(func, x, axis=1), ref, dtype=dtype, **tolerance(dtype))


# (shape, axis, what it reaches with 64- or 1000-element blocks)
EDGES = [
    ((1, 50), -1),  # 1 row
    ((7, 10), -1),  # 7 rows, 6 per 64-element block: the last block is short
    ((23, 70), -1),  # 23 rows, 14 per 1000-element block
    ((3, 200), -1),  # rows longer than a block: chunked rows
    ((1, 333), -1),  # a single row longer than a block
    ((3, 5, 300), 1),  # non-last axis, the slab cut across the inner dimension
    ((2, 150, 40), 1),  # non-last axis, chunked along n (64: across the inner dim too)
    ((300, 7), 0),  # the first axis of a tall array: chunked along n, narrow inner
    ((5, 1), -1),  # rows of one element
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), EDGES)
@pytest.mark.parametrize(("func", "log"), FORWARD)
def test_forward_block_edges(monkeypatch, block_elems, func, log, shape, axis, dtype, rng):
    x = _logits(rng, shape, axis, dtype)
    mask = _mask(rng, shape, axis)
    for where in (None, mask):
        r = _fast(func, x, axis=axis, where=where)
        xp_assert_close(r, _generic(monkeypatch, func, x, axis=axis, where=where))
        ref = ref_softmax(x, axis, where=where, log=log)
        xp_assert_close(r, ref, dtype=dtype, **tolerance(dtype))
        _check_masked_exact(r, where, log)


@pytest.mark.parametrize("block", [64, 1000])
def test_block_plans_reach_every_case(monkeypatch, block):
    """The shapes of EDGES really cut rows into several blocks and chunks (guards the tests)."""
    monkeypatch.setattr(_numpy, "_block_elems", lambda itemsize: block)
    plans = {shape: _numpy._plan(shape, _axes(axis, len(shape)), 4) for shape, axis in EDGES}

    def short_last_block(shape):
        plan = plans[shape]
        return plan.counts[0] > 1 and shape[0] % plan.block[0] != 0

    assert plans[(2, 150, 40)].chunks > 1 and plans[(300, 7)].chunks > 1
    # a non-last axis whose slab is cut across the inner dimension, rows kept whole
    assert plans[(3, 5, 300)].chunks == 1 and plans[(3, 5, 300)].counts[2] > 1
    if block == 64:
        assert short_last_block((7, 10))
        assert plans[(3, 200)].chunks > 1 and plans[(1, 333)].chunks > 1
        # chunked along n and cut across the inner dimension
        assert plans[(2, 150, 40)].counts[2] > 1
    else:
        assert short_last_block((23, 70))


@pytest.mark.parametrize("dtype", ["float16", "float64"])
@pytest.mark.parametrize(("func", "log"), FORWARD)
def test_forward_real_block_edges(monkeypatch, func, log, dtype, rng):
    """With the L2-sized blocks: rows not dividing a block, and one row longer than a block."""
    e = _numpy._block_elems(4 if dtype == "float16" else 8)
    for shape in [(3 * (e // 300) + 5, 300), (2, e + 123)]:
        x = _logits(rng, shape, -1, dtype)
        plan = _numpy._plan(shape, (1,), 4 if dtype == "float16" else 8)
        assert plan.counts[0] > 1 or plan.chunks > 1
        r = _fast(func, x)
        xp_assert_close(r, _generic(monkeypatch, func, x))
        xp_assert_close(r, ref_softmax(x, -1, log=log), dtype=dtype, **tolerance(dtype))


@pytest.mark.parametrize(("func", "log"), FORWARD)
def test_empty_and_single_row(func, log):
    for shape in [(0, 5), (5, 0), (0,)]:
        r = func(np.empty(shape, np.float32))
        assert r.shape == shape and r.dtype == np.float32
        out = np.empty(shape, np.float32)
        assert func(np.empty(shape, np.float32), out=out) is out
    r = _fast(func, np.array([[0.0, math.log(3.0)]]))
    xp_assert_close(r, np.log([[0.25, 0.75]]) if log else np.array([[0.25, 0.75]]))


# ------------------------------------------------------------------------------------------
# backward and JVP


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS + EDGES[3:7])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("func", "kind"), PRODUCTS)
def test_products(monkeypatch, block_elems, func, kind, dtype, shape, axis, masked, rng):
    log = kind != "softmax"
    mask = _mask(rng, shape, axis) if masked else None
    y = (xpsoftmax.log_softmax if log else xpsoftmax.softmax)(
        _logits(rng, shape, axis, dtype), axis=axis, where=mask
    )
    g = rng.standard_normal(shape).astype(dtype)
    if mask is not None:
        g[~mask] = np.inf  # masked cotangents never reach the result
    r = _fast(func, y, g, axis=axis, where=mask)
    xp_assert_close(r, _generic(monkeypatch, func, y, g, axis=axis, where=mask))
    rtol, atol = tolerance(dtype).values()
    ref = _ref_product(y, g, axis, mask, kind)
    xp_assert_close(r, ref, dtype=dtype, rtol=rtol, atol=10 * atol)
    if mask is not None:
        assert np.all(r[~mask] == 0)


@pytest.mark.parametrize("shape", [(33, 700), (5, 9000)])  # (5, 9000): row dots in pieces
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("func", "kind"), PRODUCTS[:2])
def test_backward_matches_torch(func, kind, dtype, shape, rng):
    torch = pytest.importorskip("torch")
    x = torch.asarray(3.0 * rng.standard_normal(shape), dtype=torch.float64, requires_grad=True)
    g = rng.standard_normal(shape)
    y = torch.log_softmax(x, 1) if kind == "log_vjp" else torch.softmax(x, 1)
    (dx,) = torch.autograd.grad(y, x, torch.asarray(g))
    r = _fast(func, y.detach().numpy().astype(dtype), g.astype(dtype), axis=1)
    xp_assert_close(r, dx.numpy(), dtype=dtype, rtol=tolerance(dtype)["rtol"], atol=1e-5)


# ------------------------------------------------------------------------------------------
# out= and memory layout


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("func", "log"), FORWARD)
def test_forward_out_aliasing_input(block_elems, func, log, dtype, rng):
    for shape, axis in [((9, 130), -1), ((4, 80, 30), 1), ((6, 4, 11), (0, 2))]:
        x = _logits(rng, shape, axis, dtype)
        mask = _mask(rng, shape, axis)
        for where in (None, mask):
            expected = ref_softmax(x, axis, where=where, log=log)
            buf = x.copy()
            assert _fast(func, buf, axis=axis, where=where, out=buf) is buf
            xp_assert_close(buf, expected, dtype=dtype, **tolerance(dtype))


@pytest.mark.parametrize(
    ("shape", "axis"), [((1, 5, 1, 7), -1), ((3, 1, 8), 2), ((6,), 0), ((2, 9, 1), 1)]
)
def test_contiguous_inputs_are_viewed_not_copied(shape, axis, rng):
    # C-contiguous arrays (size-1 dimensions included) take the reshape view, never a copy, and
    # an output that is the input itself is still recognised as the same memory.
    x = rng.standard_normal(shape)
    plan = _numpy._plan(shape, (axis % len(shape),), x.itemsize)
    v = _numpy._view(x, plan)
    assert v is not None and v.shape == plan.shape and np.shares_memory(v, x)
    expected = scipy.special.softmax(x, axis=axis)
    assert xpsoftmax.softmax(x, axis=axis, out=x) is x
    xp_assert_close(x, expected, dtype="float64", **tolerance("float64"))


@pytest.mark.parametrize("alias", ["y", "g"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("func", "kind"), PRODUCTS[:2])  # the JVPs take no out=
def test_backward_out_aliasing_input(block_elems, func, kind, dtype, alias, rng):
    log = kind != "softmax"
    for shape, axis in [((9, 130), -1), ((4, 80, 30), 1)]:
        mask = _mask(rng, shape, axis)
        for where in (None, mask):
            y = (xpsoftmax.log_softmax if log else xpsoftmax.softmax)(
                rng.standard_normal(shape).astype(dtype), axis=axis, where=where
            )
            g = rng.standard_normal(shape).astype(dtype)
            expected = _ref_product(y, g, axis, where, kind)
            out = y if alias == "y" else g
            assert _fast(func, y, g, axis=axis, where=where, out=out) is out
            xp_assert_close(out, expected, dtype=dtype, rtol=tolerance(dtype)["rtol"], atol=1e-4)


def test_out_partly_overlapping_input(block_elems, rng):
    """``out`` shifted by one column over the input: computed through a temporary."""
    base = rng.standard_normal((40, 65)).astype(np.float32)
    x = base[:, :64]
    expected = ref_softmax(x.copy(), -1)
    out = base[:, 1:]
    assert _fast(xpsoftmax.softmax, x, out=out) is out
    xp_assert_close(out, expected, dtype="float32")


@pytest.mark.parametrize(("func", "log"), FORWARD)
def test_non_contiguous_inputs_and_out(monkeypatch, block_elems, func, log, rng):
    big = _logits(rng, (30, 80, 6), 1, "float64")
    cases = [
        (big[::2, ::3, 1], -1),  # strided rows
        (big[::-1, :, ::2], 1),  # negative strides, non-last axis
        (np.asfortranarray(big[:, :, 0]), -1),  # Fortran order
        (np.asfortranarray(big[:, :, 0]), 0),
        (big.transpose(2, 0, 1), (0, 2)),  # a transposed 3-D view: copied into rows
        (np.broadcast_to(big[:1, :, 0], (7, 80)), -1),  # zero strides, read-only
    ]
    for x, axis in cases:
        out = np.full((2 * x.shape[0], *x.shape[1:]), 5.0)[::2]
        r = _fast(func, x, axis=axis, out=out)
        assert r is out
        xp_assert_close(r, _generic(monkeypatch, func, x, axis=axis))
        xp_assert_close(r, ref_softmax(x, axis, log=log), dtype="float64")
        y = _fast(func, x, axis=axis)
        assert y.flags.c_contiguous


@pytest.mark.parametrize(("func", "kind"), PRODUCTS[:2])
def test_broadcast_masks(monkeypatch, block_elems, func, kind, rng):
    """Masks broadcast from fewer dims (zero strides), incl. one that cannot be viewed as rows."""
    log = kind != "softmax"
    shape = (3, 4, 50)
    for mask_shape in [(1, 1, 50), (3, 1, 50), (3, 4, 1), (1, 4, 50)]:
        mask = rng.random(mask_shape) > 0.4
        x = _logits(rng, shape, -1, "float32")
        fwd = xpsoftmax.log_softmax if log else xpsoftmax.softmax
        y = _fast(fwd, x, where=mask)
        xp_assert_close(y, _generic(monkeypatch, fwd, x, where=mask))
        xp_assert_close(y, ref_softmax(x, -1, where=mask, log=log), dtype="float32")
        g = rng.standard_normal(shape).astype(np.float32)
        r = _fast(func, y, g, where=mask)
        xp_assert_close(r, _generic(monkeypatch, func, y, g, where=mask))
        ref = _ref_product(y, g, -1, mask, kind)
        xp_assert_close(r, ref, dtype="float32", atol=1e-5)


# ------------------------------------------------------------------------------------------
# threads and memory


def _spy_executor(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = _numpy._executor

    def spy(workers):
        calls.append(workers)
        return real(workers)

    monkeypatch.setattr(_numpy, "_executor", spy)
    return calls


@pytest.mark.parametrize("block", [None, 1000])
def test_threads_give_identical_results(monkeypatch, block, rng):
    """1 and 2 threads: bitwise the same results, including chunked rows and special rows."""
    if block is not None:
        monkeypatch.setattr(_numpy, "_block_elems", lambda itemsize: block)
    calls = _spy_executor(monkeypatch)
    cases = [((600, 512), -1), ((4, 70000), -1), ((50, 100, 60), 1)]
    for shape, axis in cases:
        x = _logits(rng, shape, axis, "float32")
        mask = _mask(rng, shape, axis)
        g = rng.standard_normal(shape).astype(np.float32)
        g[~mask] = np.inf
        results = {}
        for threads in ("1", "2"):
            monkeypatch.setenv(THREADS_ENV, threads)
            y = xpsoftmax.softmax(x, axis=axis, where=mask)
            ly = xpsoftmax.log_softmax(x, axis=axis)
            results[threads] = (
                y,
                ly,
                xpsoftmax.softmax_backward(y, g, axis=axis, where=mask),
                xpsoftmax.log_softmax_backward(ly, g, axis=axis),
                xpsoftmax.log_softmax_jvp(ly, g, axis=axis, where=mask),
            )
        for a, b in zip(results["1"], results["2"], strict=True):
            xp_assert_equal(a, b)
        xp_assert_close(results["2"][0], ref_softmax(x, axis, where=mask), dtype="float32")
    assert calls and all(w == 1 for w in calls)  # the 2-thread calls did use the pool


def test_small_inputs_stay_on_the_calling_thread(monkeypatch, rng):
    calls = _spy_executor(monkeypatch)
    monkeypatch.setenv(THREADS_ENV, "4")
    xpsoftmax.softmax(rng.standard_normal((64, 64)))
    assert calls == []


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_no_full_size_temporaries(monkeypatch, dtype, rng):
    """Peak memory of a call, output included, stays within 1.15x the output's size."""
    monkeypatch.setenv(THREADS_ENV, "1")  # the scratch of one thread only, allocated below
    x = rng.standard_normal((4096, 1024)).astype(dtype)
    y = xpsoftmax.softmax(x)
    g = rng.standard_normal(x.shape).astype(dtype)
    calls = [
        lambda: xpsoftmax.softmax(x),
        lambda: xpsoftmax.log_softmax(x),
        lambda: xpsoftmax.softmax_backward(y, g),
        lambda: xpsoftmax.log_softmax_backward(y, g),
    ]
    for call in calls:
        call()  # the per-thread block scratch is allocated once, then reused
        tracemalloc.start()
        try:
            r = call()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert r.nbytes == x.nbytes
        assert peak <= 1.15 * r.nbytes, (peak, r.nbytes)
