"""Dask arrays whose softmax axes span several chunks: the two-pass split path of
``xpsoftmax/backends/dask.py`` (partial row statistics per block, a tree reduction of fixed
shape, one output task per block).

References are float64: scipy.special, torch autograd, or the formulas written out here; every
NumPy floating-point warning is an error (pyproject's ``filterwarnings``), at compute time too.
"""

from __future__ import annotations

import functools

import dask
import dask.array as da
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import torch
from _helpers import backend_of, jax_softmax, ref_softmax, torch_softmax

import xpsoftmax
from xpsoftmax.backends.dask import split as dask_split

FORWARD = [
    pytest.param(xpsoftmax.softmax, False, id="softmax"),
    pytest.param(xpsoftmax.log_softmax, True, id="log_softmax"),
]
GRADS = {
    "softmax_backward": xpsoftmax.softmax_backward,
    "log_softmax_backward": xpsoftmax.log_softmax_backward,
    "softmax_jvp": xpsoftmax.softmax_jvp,
    "log_softmax_jvp": xpsoftmax.log_softmax_jvp,
}
# (shape, chunks, axis): one axis in chunks of 1, uneven chunks, more chunks than one combine
# task takes (a tree of two levels), tuple axes split on both, every axis.
LAYOUTS = [
    pytest.param((3, 7), (2, 1), -1, id="chunks-of-1"),
    pytest.param((4, 10), (3, 4), 1, id="uneven"),
    pytest.param((2, 150), (1, 7), -1, id="two-level-tree"),
    pytest.param((4, 6, 5), (2, 4, 2), (0, 2), id="tuple-axes"),
    pytest.param((4, 6, 5), (3, 2, 4), None, id="all-axes"),
    pytest.param((6, 4, 10), (2, 3, 4), 1, id="middle-axis"),
]


def _refuse_compute(dsk, keys, **kwargs):
    msg = "a Dask graph was computed while it was being built"
    raise AssertionError(msg)


def _edge_rows() -> tuple[np.ndarray, np.ndarray]:
    """Rows of 8 over chunks of 3: +inf in two chunks, -inf chunks, NaN, fully masked, masked
    entries that hold NaN and +inf (never read), float64's extremes."""
    inf, nan, big = np.inf, np.nan, np.finfo(np.float64).max
    x = np.array(
        [
            [1.0, inf, 2.0, -inf, 3.0, 0.0, inf, 1.0],  # +inf in chunks 0 and 2
            [-inf, -inf, -inf, 1.0, 2.0, -inf, -inf, -inf],  # -inf partials around a finite one
            [-inf] * 8,  # all -inf: NaN
            [1.0, 2.0, 3.0, 4.0, nan, 6.0, 7.0, 8.0],  # NaN poisons its row
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],  # fully masked
            [nan, inf, 0.5, 0.25, -1.0, nan, inf, 2.0],  # NaN and +inf only where masked
            [big, -big, 0.0, big, -big, big, 0.0, -big],  # overflow of x - max if unshifted
            [-inf, -inf, -inf, -inf, -inf, -inf, -inf, 5.0],  # one kept entry, last chunk
        ]
    )
    mask = np.ones(x.shape, bool)
    mask[4] = False
    mask[5] = [False, False, True, True, True, False, False, True]
    mask[7, :3] = False  # a fully masked chunk in a row
    return x, mask


def test_split_axes_take_the_dask_backend():
    x = da.from_array(np.zeros((4, 6)), chunks=(2, 3))
    assert backend_of(x, axis=1) == "dask"
    assert backend_of(x, axis=0) == "dask"
    assert backend_of(x, x, axis=(0, 1)) == "dask"
    # More dimensions than blockwise has letters: the generic code.
    many = da.from_array(np.zeros((1,) * 24 + (2, 2)), chunks=1)
    assert backend_of(many) == "generic"
    assert backend_of(many.rechunk({25: 2})) == "dask"  # whole rows: one task per block


@pytest.mark.parametrize(("func", "log"), FORWARD)
@pytest.mark.parametrize(("shape", "chunks", "axis"), LAYOUTS)
def test_forward_on_split_layouts_matches_scipy(func, log, shape, chunks, axis, rng):
    x = 4.0 * rng.standard_normal(shape)
    ref = (scipy.special.log_softmax if log else scipy.special.softmax)(x, axis=axis)
    r = func(da.from_array(x, chunks=chunks), axis=axis)
    np.testing.assert_allclose(r.compute(), ref, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(("func", "log"), FORWARD)
@pytest.mark.parametrize(("shape", "chunks", "axis"), LAYOUTS)
def test_masked_forward_on_split_layouts(func, log, shape, chunks, axis, rng):
    x = 4.0 * rng.standard_normal(shape)
    mask = rng.random(shape) < 0.6
    x[~mask & (rng.random(shape) < 0.5)] = np.nan  # masked values are never read
    r = func(da.from_array(x, chunks=chunks), axis=axis, where=da.from_array(mask, chunks=chunks))
    ref = ref_softmax(x, axis, where=mask, log=log)
    np.testing.assert_allclose(r.compute(), ref, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(("func", "log"), FORWARD)
def test_edge_rows_follow_the_generic_rules(func, log):
    x, mask = _edge_rows()
    r = func(da.from_array(x, chunks=(3, 3)), where=da.from_array(mask, chunks=(2, 3)))
    got = r.compute()
    inf = np.inf
    lg2 = np.log(2.0)
    big = np.finfo(np.float64).max
    lse1 = 2.0 + np.log1p(np.exp(-1.0))
    sm = {  # written out in float64
        0: [0, 0.5, 0, 0, 0, 0, 0.5, 0],
        1: [0, 0, 0, np.exp(1.0 - lse1), np.exp(2.0 - lse1), 0, 0, 0],
        4: [0.0] * 8,
        6: [1 / 3, 0, 0, 1 / 3, 0, 1 / 3, 0, 0],
        7: [0, 0, 0, 0, 0, 0, 0, 1.0],
    }
    logs = {
        0: [-inf, -lg2, -inf, -inf, -inf, -inf, -lg2, -inf],
        1: [-inf, -inf, -inf, 1.0 - lse1, 2.0 - lse1, -inf, -inf, -inf],
        4: [-inf] * 8,
        6: [-np.log(3.0), -inf, -big, -np.log(3.0), -inf, -np.log(3.0), -big, -inf],
        7: [-inf] * 7 + [0.0],
    }
    want = logs if log else sm
    for i, row in want.items():
        np.testing.assert_allclose(got[i], row, rtol=1e-15, atol=0, err_msg=f"row {i}")
    assert np.isnan(got[2]).all() and np.isnan(got[3]).all()
    # Row 5: the masked NaN and +inf take no part; masked entries are exactly 0 / -inf.
    kept = x[5][mask[5]]
    ref = (scipy.special.log_softmax if log else scipy.special.softmax)(kept)
    np.testing.assert_allclose(got[5][mask[5]], ref, rtol=1e-15)
    assert np.all(got[5][~mask[5]] == (-inf if log else 0.0))
    np.testing.assert_allclose(got, ref_softmax(x, where=mask, log=log), rtol=1e-15, atol=0)


@pytest.mark.parametrize(("func", "log"), FORWARD)
def test_float16_near_its_largest_value(func, log):
    # float16 is computed in float32 per block; x - max is -131008 for float16's extremes, far
    # below float16's range: -inf after the final cast (log), without an overflow warning.
    x = np.array([[65504.0, -65504.0, 0.0, 65504.0, 100.0, -65504.0]] * 3, dtype=np.float16)
    r = func(da.from_array(x, chunks=(2, 2)))
    assert r.dtype == np.float16
    ref = ref_softmax(x.astype(np.float64), log=log)
    with np.errstate(over="ignore"):
        want = ref.astype(np.float16)
    np.testing.assert_array_equal(r.compute(), want)


@pytest.mark.parametrize(("func", "log"), FORWARD)
def test_float32_matches_scipy_in_float64(func, log, rng):
    x = (30.0 * rng.standard_normal((5, 64))).astype(np.float32)
    ref = (scipy.special.log_softmax if log else scipy.special.softmax)(x.astype(float), axis=-1)
    r = func(da.from_array(x, chunks=(2, 9))).compute()
    assert r.dtype == np.float32
    np.testing.assert_allclose(r, ref, rtol=2e-6, atol=1e-6 if log else 1e-7)


def _torch_grads(x, g, axis, log):
    """Forward outputs and VJPs (cotangent g) by torch autograd, JVPs (tangent g) by JAX."""
    y, vjp_fn = torch.func.vjp(lambda t: torch_softmax(t, axis, log=log), torch.asarray(x))
    f = functools.partial(jax_softmax, axis=axis, log=log)
    _, tangent = jax.jvp(f, (jnp.asarray(x),), (jnp.asarray(g),))
    return y.numpy(), vjp_fn(torch.asarray(g))[0].numpy(), np.asarray(tangent)


@pytest.mark.parametrize("name", list(GRADS))
@pytest.mark.parametrize(("shape", "chunks", "axis"), LAYOUTS)
def test_backward_and_jvp_on_split_layouts_match_torch(name, shape, chunks, axis, rng):
    log = name.startswith("log")
    x, g = 3.0 * rng.standard_normal(shape), rng.standard_normal(shape)
    y, vjp, tangent = _torch_grads(x, g, axis, log)
    want = vjp if name.endswith("backward") else tangent
    r = GRADS[name](da.from_array(y, chunks=chunks), da.from_array(g, chunks=chunks), axis=axis)
    np.testing.assert_allclose(r.compute(), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(GRADS))
def test_masked_backward_and_jvp_with_inf_at_masked_entries(name, rng):
    """Masked entries of y and of the cotangent hold NaN and +-inf: they never reach a sum or a
    product (no 0 * inf warning); a fully masked row gives 0. The formulas in float64."""
    log = name.startswith("log")
    x = rng.standard_normal((4, 9))
    mask = rng.random((4, 9)) < 0.7
    mask[:, 0] = True
    mask[3] = False
    y = ref_softmax(x, where=mask, log=log)
    g = rng.standard_normal((4, 9))
    yb, gb = y.copy(), g.copy()
    yb[~mask] = np.where(rng.random((4, 9)) < 0.5, np.inf, np.nan)[~mask]
    gb[~mask] = np.where(rng.random((4, 9)) < 0.5, -np.inf, np.inf)[~mask]
    yk, gk = np.where(mask, y, 0.0), np.where(mask, g, 0.0)
    p = np.where(mask, np.exp(y) if log else y, 0.0)
    if name == "log_softmax_backward":
        want = gk - p * gk.sum(-1, keepdims=True)
    elif name == "log_softmax_jvp":
        want = gk - (p * gk).sum(-1, keepdims=True)
    else:
        want = yk * (gk - (yk * gk).sum(-1, keepdims=True))
    want = np.where(mask, want, 0.0)
    r = GRADS[name](
        da.from_array(yb, chunks=(2, 4)),
        da.from_array(gb, chunks=(3, 2)),  # other chunks than y: aligned by the call
        where=da.from_array(mask, chunks=(2, 4)),
    )
    np.testing.assert_allclose(r.compute(), want, rtol=1e-13, atol=1e-15)
    assert np.all(r.compute()[3] == 0.0)


def test_half_precision_backward(rng):
    y = scipy.special.softmax(rng.standard_normal((3, 20)), axis=-1).astype(np.float16)
    g = rng.standard_normal((3, 20)).astype(np.float16)
    r = xpsoftmax.softmax_backward(da.from_array(y, chunks=(2, 6)), da.from_array(g, chunks=6))
    assert r.dtype == np.float16
    y64, g64 = y.astype(np.float64), g.astype(np.float64)
    want = y64 * (g64 - (y64 * g64).sum(-1, keepdims=True))
    np.testing.assert_allclose(r.compute().astype(np.float64), want, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("op", ["softmax", "log_softmax", "softmax_backward", "softmax_jvp"])
def test_same_chunking_gives_the_same_bits(op, rng):
    x = 5.0 * rng.standard_normal((7, 333))
    g = rng.standard_normal((7, 333))
    func = {"softmax": xpsoftmax.softmax, "log_softmax": xpsoftmax.log_softmax, **GRADS}[op]

    def build():
        args = [da.from_array(x, chunks=(3, 11))]
        if op not in ("softmax", "log_softmax"):
            args.append(da.from_array(g, chunks=(3, 11)))
        return func(*args)

    r = build()
    first = r.compute(scheduler="threads")
    np.testing.assert_array_equal(r.compute(scheduler="sync"), first)
    np.testing.assert_array_equal(build().compute(scheduler="threads", num_workers=2), first)
    # The tree's shape is fixed by the module, not by dask.config.
    with dask.config.set(split_every=2):
        np.testing.assert_array_equal(build().compute(), first)


def _readers(result: da.Array, source: da.Array) -> list[int]:
    """For each chunk of ``source``: how many tasks of ``result``'s graph read it."""
    graph = dict(result.__dask_graph__())
    deps = {k: dask.core.get_dependencies(graph, k) for k in graph}
    return [
        sum(key in d for d in deps.values()) for key in dask.core.flatten(source.__dask_keys__())
    ]


@pytest.mark.parametrize(("func", "log"), FORWARD)
@pytest.mark.parametrize("axis", [-1, (0, 1)])
def test_forward_reads_each_input_chunk_twice(func, log, axis, rng):
    x = da.from_array(rng.standard_normal((6, 40)), chunks=(2, 5))
    mask = da.from_array(rng.random((6, 40)) < 0.8, chunks=(2, 5))
    with dask.config.set(scheduler=_refuse_compute):  # lazy: building computes nothing
        r = func(x, axis=axis, where=mask)
    assert isinstance(r, da.Array)
    assert r.chunks == x.chunks
    assert _readers(r, x) == [2] * x.npartitions  # the statistics pass and the output pass
    assert _readers(r, mask) == [2] * x.npartitions
    layers = r.__dask_graph__().layers
    names = [name.rsplit("-", 1)[0] for name in layers]
    assert not any(n.startswith(("max", "exp", "sum", "where")) for n in names), names


@pytest.mark.parametrize("name", list(GRADS))
def test_backward_and_jvp_read_each_input_chunk_twice(name, rng):
    y = da.from_array(rng.random((6, 40)), chunks=(3, 8))
    g = da.from_array(rng.standard_normal((6, 40)), chunks=(3, 8))
    with dask.config.set(scheduler=_refuse_compute):
        r = GRADS[name](y, g)
    assert _readers(r, y) == [2] * y.npartitions
    assert _readers(r, g) == [2] * g.npartitions


def test_row_stats_gives_max_and_sum_of_exp(rng):
    """The combined statistics (what a split logsumexp reads): float64 references."""
    x = 3.0 * rng.standard_normal((3, 4, 17))
    x[0, 1] = -np.inf
    x[1, 2, 5] = np.inf
    x[2, 0, 3] = np.nan
    mask = rng.random(x.shape) < 0.8
    mask[2, 3] = False
    stats = dask_split.row_stats(
        da.from_array(x, chunks=(2, 3, 4)), da.from_array(mask, chunks=(2, 3, 4)), (2,)
    ).compute()
    assert stats.shape == (3, 4, 1, 4)
    assert stats.dtype == np.float64
    xm = np.where(mask, x, -np.inf)
    for i in range(3):
        for j in range(4):
            m, s, n_inf, n_kept = stats[i, j, 0]
            row = xm[i, j]
            assert n_kept == mask[i, j].sum()
            assert n_inf == np.count_nonzero(row == np.inf)
            if np.isnan(row).any():
                assert np.isnan(m)
            elif np.isfinite(row.max()):
                assert m == row.max()
                np.testing.assert_allclose(s, np.exp(row - row.max()).sum(), rtol=1e-14)
                lse = scipy.special.logsumexp(x[i, j], b=mask[i, j].astype(float))
                np.testing.assert_allclose(m + np.log(s), lse, rtol=1e-14)
            else:
                assert m == row.max() and s == 0.0


def test_unknown_and_empty_chunks_along_the_split_axis(rng):
    x = rng.standard_normal((4, 12))
    keep = np.arange(12) % 3 != 1
    d = da.from_array(x, chunks=(2, 3))[:, da.from_array(keep, chunks=3)]  # unknown sizes
    assert np.isnan(d.shape[1])
    r = xpsoftmax.log_softmax(d)
    np.testing.assert_allclose(r.compute(), scipy.special.log_softmax(x[:, keep], -1), rtol=1e-13)
    e = da.from_array(x, chunks=(2, 3)).rechunk(((2, 2), (5, 0, 7)))  # a chunk of size 0
    np.testing.assert_allclose(
        xpsoftmax.softmax(e).compute(), scipy.special.softmax(x, -1), rtol=1e-13
    )
    g = rng.standard_normal((4, 12))
    dx = xpsoftmax.softmax_backward(xpsoftmax.softmax(e), da.from_array(g, chunks=(2, 3)))
    _, vjp, _ = _torch_grads(x, g, -1, False)
    np.testing.assert_allclose(dx.compute(), vjp, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_block_functions_are_array_api_code(log, rng):
    """What CuPy chunks run, checked on array-api-strict blocks (no GPU here): two partials of
    one row set, combined by hand, then the output blocks; float64 references."""
    xs = pytest.importorskip("array_api_strict")
    from xpsoftmax._call import LOG_SOFTMAX_VJP, SOFTMAX_VJP
    from xpsoftmax.backends.dask import blocks

    x, mask = _edge_rows()
    cuts = (slice(0, 4), slice(4, 8))
    halves = [(xs.asarray(x[:, c]), xs.asarray(mask[:, c])) for c in cuts]
    parts = [blocks.stats_block(a, m, axes=(1,)) for a, m in halves]
    stats = blocks.combine_stats(xs.concat(parts, axis=1), axis=(1,))
    out = [blocks.forward_block(a, m, stats, log=log) for a, m in halves]
    assert all(isinstance(o, type(halves[0][0])) for o in out)
    got = np.concatenate([np.asarray(o) for o in out], axis=1)
    np.testing.assert_allclose(got, ref_softmax(x, where=mask, log=log), rtol=1e-15, atol=0)
    # The VJP: partial dots, their sum, the output blocks.
    op = LOG_SOFTMAX_VJP if log else SOFTMAX_VJP
    y = ref_softmax(rng.standard_normal((8, 8)), where=mask, log=log)
    g = rng.standard_normal((8, 8))
    blocks_yg = [(xs.asarray(y[:, c]), xs.asarray(g[:, c]), xs.asarray(mask[:, c])) for c in cuts]
    dots = [blocks.dot_block(a, b, m, op=op, axes=(1,)) for a, b, m in blocks_yg]
    dot = blocks.combine_dots(xs.concat(dots, axis=1), axis=(1,))
    got = np.concatenate([np.asarray(blocks.grad_block(*t, dot, op=op)) for t in blocks_yg], 1)
    gk = np.where(mask, g, 0.0)
    if log:
        want = gk - np.exp(y) * gk.sum(-1, keepdims=True)
    else:
        want = y * (gk - (y * gk).sum(-1, keepdims=True))
    np.testing.assert_allclose(got, np.where(mask, want, 0.0), rtol=1e-13, atol=1e-15)
