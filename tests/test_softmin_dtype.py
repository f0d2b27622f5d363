"""softmin against torch.nn.functional.softmin, and ``dtype=`` on softmax, log_softmax and their
backward against torch's ``dtype=`` (the input cast first), on every backend."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import scipy.special
from _helpers import to_numpy, xp_assert_close, xp_assert_equal

import xpsoftmax

# conftest.py: Dask runs in two layouts here, one chunk and the softmax axes split.
DASK_SPLIT = True

AXES = [-1, 0, 1, (0, 2), None]


def _logits(rng, shape=(3, 4, 5), dtype="float64"):
    return (3.0 * rng.standard_normal(shape)).astype(dtype)


def _torch_dims(axis, ndim):
    return tuple(range(ndim)) if axis is None else axis


def _torch_softmin(x, axis):
    import torch

    t = torch.from_numpy(x)
    dims = _torch_dims(axis, x.ndim)
    if isinstance(dims, tuple):  # (torch takes one dim: softmin over several is softmax(-x))
        return scipy.special.softmax(-x, axis=axis)
    return torch.nn.functional.softmin(t, dims).numpy()


# --------------------------------------------------------------------------------------------
# softmin


@pytest.mark.parametrize("axis", AXES)
def test_softmin_matches_torch(xp, axis, rng):
    x = _logits(rng)
    r = xpsoftmax.softmin(xp.asarray(x), axis)
    xp_assert_close(r, _torch_softmin(x, axis), xp=xp, dtype=xp.float64)


def test_softmin_special_rows(xp):
    import torch

    x = np.array(
        [
            [-math.inf, 0.0, -math.inf, 1.0],  # the -inf entries take the mass
            [math.inf, 0.0, 1.0, 2.0],  # +inf gives 0
            [math.inf] * 4,  # softmax of all -inf: NaN, as torch
            [0.0, math.nan, 1.0, 2.0],
        ]
    )
    ref = torch.nn.functional.softmin(torch.from_numpy(x), -1).numpy().copy()
    ref[0] = [0.5, 0.0, 0.5, 0.0]  # torch: NaN (inf - inf); xpsoftmax: the limit, as softmax
    r = xpsoftmax.softmin(xp.asarray(x))
    xp_assert_close(r, ref, xp=xp, dtype=xp.float64, rtol=1e-15, atol=0)


def test_softmin_where(xp, rng):
    x = _logits(rng, (4, 6))
    mask = rng.random((4, 6)) > 0.4
    mask[0] = False
    import jax.nn

    ref = np.asarray(jax.nn.softmax(-x, axis=-1, where=mask))
    ref = np.where(mask, ref, 0.0)
    ref[0] = 0.0  # fully masked: all 0
    r = xpsoftmax.softmin(xp.asarray(x), where=xp.asarray(mask))
    xp_assert_close(r, ref, xp=xp, dtype=xp.float64)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_softmin_low_precision(xp, library, dtype, rng):
    if dtype == "float16" and not library.has_float16:
        pytest.skip("array-api-strict has no float16")
    x = _logits(rng, dtype=dtype)
    ref = scipy.special.softmax(-x.astype(np.float64), axis=1).astype(dtype)
    r = xpsoftmax.softmin(xp.asarray(x), 1)
    xp_assert_close(r, ref, xp=xp, dtype=dtype)


def test_softmin_backward_is_minus_softmax_backward(rng):
    import torch

    x = _logits(rng, (4, 7))
    dy = rng.standard_normal((4, 7))
    t = torch.from_numpy(x).requires_grad_()
    torch.nn.functional.softmin(t, -1).backward(torch.from_numpy(dy))
    y = xpsoftmax.softmin(x)
    np.testing.assert_allclose(-xpsoftmax.softmax_backward(y, dy), t.grad.numpy(), rtol=1e-12)


def test_softmin_makes_no_negated_copy(rng):
    x = _logits(rng, (2048, 2048), "float32")  # 16 MiB
    xpsoftmax.softmin(x[:4])  # (compile and warm up outside the measurement)
    tracemalloc.start()
    try:
        r = xpsoftmax.softmin(x)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the result (16 MiB) and per-thread scratch (a few cache-sized blocks); a negated copy
    # would add 16 MiB more
    assert peak < r.nbytes + x.nbytes // 2, peak
    np.testing.assert_allclose(r, scipy.special.softmax(-x.astype(np.float64), axis=-1), rtol=2e-6)


def test_softmin_out_and_lazy(xp, library, rng):
    x = _logits(rng, (3, 5))
    if library.writeable:
        out = xp.zeros((3, 5), dtype=xp.float64)
        assert xpsoftmax.softmin(xp.asarray(x), out=out) is out
        xp_assert_close(out, scipy.special.softmax(-x, axis=-1), xp=xp)
    else:
        r = xpsoftmax.softmin(xp.asarray(x))
        assert type(r) is type(xp.asarray(x))


# --------------------------------------------------------------------------------------------
# dtype=


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("axis", [-1, 1, (0, 2)])
def test_dtype_upcast_matches_torch(xp, library, log, axis, rng):
    import torch

    if not library.has_float16:
        pytest.skip("array-api-strict has no float16")
    x = _logits(rng, dtype="float16")
    fn = torch.log_softmax if log else torch.softmax
    if isinstance(axis, tuple):  # (torch takes one dim)
        ref = (scipy.special.log_softmax if log else scipy.special.softmax)(
            x.astype(np.float32), axis=axis
        )
    else:
        ref = fn(torch.from_numpy(x), axis, dtype=torch.float32).numpy()
    f = xpsoftmax.log_softmax if log else xpsoftmax.softmax
    X = xp.asarray(x)
    target = xp.asarray(np.zeros(1, np.float32)).dtype
    r = f(X, axis, dtype=target)
    xp_assert_close(r, ref, xp=xp, dtype="float32", rtol=1e-6, atol=1e-7)


def test_dtype_downcast_casts_the_input_first(xp, rng):
    # torch: the input is cast to dtype before the operation
    x = _logits(rng)
    r = xpsoftmax.softmax(xp.asarray(x), dtype=xp.float32)
    ref = scipy.special.softmax(x.astype(np.float32).astype(np.float64), axis=-1)
    xp_assert_close(r, ref.astype(np.float32), xp=xp, dtype="float32")


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_dtype_on_backward_matches_torch_autograd(xp, library, log, rng):
    import torch

    if not library.has_float16:
        pytest.skip("array-api-strict has no float16")
    x = _logits(rng, (4, 9), "float16")
    dy = rng.standard_normal((4, 9)).astype(np.float16)
    # torch: y = f(x, dtype=float32); autograd of y in float32 from the float16 forward output
    fwd = torch.log_softmax if log else torch.softmax
    y = fwd(torch.from_numpy(x), -1, dtype=torch.float32).half()  # what a float16 model keeps
    yt = y.float().requires_grad_()
    z = torch.from_numpy(x.astype(np.float32)).requires_grad_()
    out = fwd(z, -1)
    out.backward(torch.from_numpy(dy.astype(np.float32)))
    bwd = xpsoftmax.log_softmax_backward if log else xpsoftmax.softmax_backward
    target = xp.asarray(np.zeros(1, np.float32)).dtype
    dx = bwd(xp.asarray(y.numpy()), xp.asarray(dy), dtype=target)
    # reference: the float32 formula from the float16 inputs cast up (float64 math)
    y64, g64 = y.numpy().astype(np.float64), dy.astype(np.float64)
    if log:
        ref = g64 - np.exp(y64) * g64.sum(-1, keepdims=True)
    else:
        ref = y64 * (g64 - (y64 * g64).sum(-1, keepdims=True))
    xp_assert_close(dx, ref, xp=xp, dtype="float32", rtol=1e-5, atol=1e-6)
    # and the torch gradient of the unrounded forward agrees to float16 precision
    np.testing.assert_allclose(to_numpy(dx), z.grad.numpy(), rtol=2e-2, atol=5e-3)
    assert yt.dtype == torch.float32


def test_dtype_fused_on_numpy_makes_no_full_size_cast(rng):
    from xpsoftmax import _call, backends

    x = _logits(rng, (2048, 4096), "float16")  # 16 MiB; a float32 cast would be 32 MiB
    call = _call.make_call(_call.SOFTMAX, ((x, "x"),), -1, None, None, np.float32)
    assert call.cast and backends.select(call)[0] == "numpy"
    xpsoftmax.softmax(x[:4], dtype=np.float32)  # (compile outside the measurement)
    tracemalloc.start()
    try:
        r = xpsoftmax.softmax(x, dtype=np.float32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.dtype == np.float32
    assert peak < r.nbytes + x.nbytes // 2, peak  # the result and per-task scratch only
    ref = scipy.special.softmax(x.astype(np.float64), axis=-1)
    np.testing.assert_allclose(r, ref, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("shape", "axis"), [((64, 3000), -1), ((5, 600, 300), 1), ((7, 9), -1), ((40, 30, 20), (0, 2))]
)
@pytest.mark.parametrize(
    "pair", [("float16", "float32"), ("float16", "float64"), ("float32", "float64")]
)
def test_dtype_upcasts_on_numpy_equal_the_cast_input(shape, axis, pair, rng):
    # The fused upcast reads the narrow input; its result is the op on the cast input (bit for
    # bit: the same kernels on the same float values), with masks and out= too.
    src, dst = pair
    x = _logits(rng, shape, src)
    mask = rng.random(shape) > 0.2
    for f in (xpsoftmax.softmax, xpsoftmax.log_softmax, xpsoftmax.softmin):
        for where in (None, mask):
            r = f(x, axis, where=where, dtype=dst)
            xp_assert_equal(r, f(x.astype(dst), axis, where=where))
    y = xpsoftmax.softmax(x, axis)
    g = rng.standard_normal(shape).astype(src)
    for f in (xpsoftmax.softmax_backward, xpsoftmax.log_softmax_backward):
        out = np.empty(shape, dtype=dst)
        r = f(y, g, axis, where=mask, dtype=dst, out=out)
        assert r is out
        xp_assert_equal(r, f(y.astype(dst), g.astype(dst), axis, where=mask))


def test_dtype_names_and_errors():
    x = np.zeros((2, 3), dtype=np.float16)
    assert xpsoftmax.softmax(x, dtype="float32").dtype == np.float32
    assert xpsoftmax.softmax(x, dtype=np.float64).dtype == np.float64
    with pytest.raises(TypeError, match="dtype must be a real floating dtype"):
        xpsoftmax.softmax(x, dtype=np.int32)
    with pytest.raises(TypeError, match="dtype must be a real floating dtype"):
        xpsoftmax.softmax(x, dtype="nonsense")
    with pytest.raises(TypeError, match="dtype must be a real floating dtype"):
        xpsoftmax.softmax(x, dtype=np.complex64)
    with pytest.raises(ValueError, match="out has dtype"):
        xpsoftmax.softmax(x, dtype=np.float32, out=np.empty((2, 3), np.float16))
    import torch

    with pytest.raises(TypeError, match="dtype must be a real floating dtype"):
        xpsoftmax.softmax(torch.zeros(2, 3), dtype=np.float64)
    r = xpsoftmax.softmax(torch.zeros(2, 3, dtype=torch.float16), dtype=torch.float64)
    assert r.dtype == torch.float64
    assert xpsoftmax.softmax(np.arange(3), dtype=np.float32).dtype == np.float32


def _edge_rows() -> tuple[np.ndarray, np.ndarray]:
    x = np.array(
        [
            [65504.0, 65504.0, -65504.0, 0.0],  # float16's largest values: no overflow
            [-65504.0, -65504.0, 65504.0, 0.0],
            [math.inf, 1.0, math.inf, 0.0],
            [-math.inf] * 4,
            [0.0, math.nan, 1.0, 2.0],
            [1.0, 2.0, 3.0, 4.0],  # fully masked below
        ],
        dtype=np.float16,
    )
    mask = np.ones(x.shape, dtype=bool)
    mask[5] = False
    mask[0, 3] = False
    return x, mask


@pytest.mark.parametrize("fn", [xpsoftmax.softmax, xpsoftmax.log_softmax, xpsoftmax.softmin])
def test_dtype_and_softmin_edge_values(xp, library, fn):
    if not library.has_float16:
        pytest.skip("array-api-strict has no float16")
    import torch

    x, mask = _edge_rows()
    X, M = xp.asarray(x), xp.asarray(mask)
    r = fn(X, where=M, dtype=xp.float32)
    # torch's dtype= on the rows torch and xpsoftmax define alike (finite rows, NaN rows); the
    # rest by the rules of the softmax docstring, written out in float64
    name = {"softmax": "softmax", "log_softmax": "log_softmax", "softmin": "softmin"}[fn.__name__]
    tf = getattr(torch.nn.functional, name)
    ref = tf(torch.from_numpy(x), -1, dtype=torch.float32).numpy().astype(np.float64)
    log = name == "log_softmax"
    neg_inf_or_0 = -math.inf if log else 0.0
    sign = -1.0 if name == "softmin" else 1.0
    kept = x[0, :3].astype(np.float64) * sign
    row0 = (scipy.special.log_softmax if log else scipy.special.softmax)(kept)
    ref[0] = [*row0, neg_inf_or_0]
    plus = [
        math.log(0.5) if log else 0.5,
        neg_inf_or_0,
        math.log(0.5) if log else 0.5,
        neg_inf_or_0,
    ]
    if name == "softmin":
        ref[2] = scipy.special.softmax(-x[2].astype(np.float64))  # +inf entries give 0
        ref[3] = [0.25] * 4  # -(-inf) = +inf everywhere: the mass split evenly
    else:
        ref[2] = plus
        ref[3] = math.nan  # a row of -inf: NaN, as torch
    ref[5] = neg_inf_or_0  # fully masked
    xp_assert_close(r, ref, xp=xp, dtype="float32", rtol=1e-6, atol=0)
    # and the result is the operation on the cast input
    xp_assert_equal(r, fn(xp.asarray(x.astype(np.float32)), where=M))
    empty = fn(xp.asarray(np.zeros((0, 4), np.float16)), dtype=xp.float32)
    assert tuple(empty.shape) == (0, 4) and to_numpy(empty).dtype == np.float32
