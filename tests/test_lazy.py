"""Lazy and traced backends: Dask graphs stay lazy (the softmax axis may span chunks), JAX jits."""

from __future__ import annotations

import functools

import array_api_compat
import dask
import dask.array as da
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import torch
from _helpers import backend_of, jax_softmax, ref_softmax, torch_softmax, xp_assert_close

import xpsoftmax

SHAPE = (6, 4, 10)
CHUNKS = (2, 3, 4)  # every axis is split across chunks, unevenly on the last two


def _refuse_compute(dsk, keys, **kwargs):
    msg = "a Dask graph was computed inside an xpsoftmax call"
    raise AssertionError(msg)


def _torch_vjp(x, g, axis, log):
    y, vjp_fn = torch.func.vjp(lambda t: torch_softmax(t, axis, log=log), torch.asarray(x))
    return y.numpy(), vjp_fn(torch.asarray(g))[0].numpy()


def _calls(y, g, axis, mask):
    """The public array functions but the Jacobian, as zero-argument calls on Dask arrays."""
    return {
        "softmax": lambda: xpsoftmax.softmax(y, axis=axis, where=mask),
        "log_softmax": lambda: xpsoftmax.log_softmax(y, axis=axis, where=mask),
        "softmax_backward": lambda: xpsoftmax.softmax_backward(y, g, axis=axis, where=mask),
        "log_softmax_backward": lambda: xpsoftmax.log_softmax_backward(y, g, axis=axis, where=mask),
        "softmax_jvp": lambda: xpsoftmax.softmax_jvp(y, g, axis=axis, where=mask),
        "log_softmax_jvp": lambda: xpsoftmax.log_softmax_jvp(y, g, axis=axis, where=mask),
    }


# ------------------------------------------------------------------------------------------
# Dask


def _jax_references(x, g, axis, mask):
    """Float64 references by JAX: forward outputs, and the VJP and JVP (tangent ``g``) at ``x``
    of ``jax.nn.softmax`` / ``log_softmax`` with ``where`` (masked entries 0 / -inf, gradient 0)."""
    refs = {}
    for log, name in ((False, "softmax"), (True, "log_softmax")):

        def f(a, log=log):
            return jax_softmax(a, axis, where=mask, log=log)

        y, vjp_fn = jax.vjp(f, jnp.asarray(x))
        _, tangent = jax.jvp(f, (jnp.asarray(x),), (jnp.asarray(g),))
        refs[name] = np.asarray(y)
        refs[f"{name}_backward"] = np.asarray(vjp_fn(jnp.asarray(g))[0])
        refs[f"{name}_jvp"] = np.asarray(tangent)
    return refs


def _jacobian_reference(y, axis):
    """``dsoftmax_i / dx_j = y_i (delta_ij - y_j)`` over ``axis`` moved last, in float64."""
    yr = np.moveaxis(y, axis, -1)
    return yr[..., :, None] * (np.eye(yr.shape[-1]) - yr[..., None, :])


@pytest.mark.parametrize(
    ("axis", "masked"), [(-1, False), (1, True), ((0, 2), True), (None, False)]
)
def test_dask_stays_lazy(axis, masked, rng):
    x = rng.standard_normal(SHAPE)
    g = rng.standard_normal(SHAPE)
    mask = None
    if masked:
        mask = rng.random(SHAPE) < 0.7
        mask[0], mask[:, 0], mask[:, :, 0] = True, True, True  # no fully masked row
    refs = _jax_references(x, g, axis, mask)
    dg = da.from_array(g, chunks=(3, 2, 5))
    dmask = None if mask is None else da.from_array(mask, chunks=(6, 1, 10))
    # The backward and JVP take the forward outputs (as Dask arrays split like x).
    outputs = {
        name: da.from_array(refs[name], chunks=CHUNKS) for name in ("softmax", "log_softmax")
    }
    dx = da.from_array(x, chunks=CHUNKS)
    with dask.config.set(scheduler=_refuse_compute):
        results = {}
        for name, call in _calls(dx, dg, axis, dmask).items():
            if name not in ("softmax", "log_softmax"):
                forward = "log_softmax" if name.startswith("log") else "softmax"
                call = _calls(outputs[forward], dg, axis, dmask)[name]
            results[name] = call()
        if not isinstance(axis, tuple) and axis is not None:  # (several axes: see below)
            results["softmax_jacobian"] = xpsoftmax.softmax_jacobian(outputs["softmax"], axis=axis)
    for name, r in results.items():
        assert isinstance(r, da.Array), name
    # One compute of everything, with a scheduler that counts its calls.
    count = 0

    def counting_get(dsk, keys, **kwargs):
        nonlocal count
        count += 1
        return dask.get(dsk, keys, **kwargs)

    with dask.config.set(scheduler=counting_get):
        (computed,) = dask.compute(results)
    assert count == 1
    if "softmax_jacobian" in results:
        refs["softmax_jacobian"] = _jacobian_reference(refs["softmax"], axis)
    assert set(computed) == set(refs) & set(results)
    for name, value in computed.items():
        np.testing.assert_allclose(value, refs[name], rtol=1e-11, atol=1e-14, err_msg=name)


@pytest.mark.parametrize("chunks", [CHUNKS, (1, 4, 3)])
@pytest.mark.parametrize("axis", [-1, 0, (0, 2), None])
def test_dask_axis_split_across_chunks(axis, chunks, rng):
    x = 3.0 * rng.standard_normal(SHAPE)
    g = rng.standard_normal(SHAPE)
    dx = da.from_array(x, chunks=chunks)
    for log, ref in ((False, scipy.special.softmax), (True, scipy.special.log_softmax)):
        fwd = xpsoftmax.log_softmax if log else xpsoftmax.softmax
        bwd = xpsoftmax.log_softmax_backward if log else xpsoftmax.softmax_backward
        y = fwd(dx, axis=axis)
        assert y.chunks == dx.chunks  # no rechunking of the caller's layout
        xp_assert_close(
            y, ref(x, axis=axis), xp=array_api_compat.array_namespace(dx), dtype="float64"
        )
        _, grad = _torch_vjp(x, g, axis, log)
        xp_assert_close(bwd(y, da.from_array(g, chunks=chunks), axis=axis), da.from_array(grad))


def test_dask_unknown_chunk_sizes_along_the_batch(rng):
    x = rng.standard_normal((8, 5))
    d = da.from_array(x, chunks=(3, 2))
    keep = x[:, 0] > -10.0  # all rows, but Dask cannot know how many
    u = d[da.from_array(keep, chunks=3)]
    assert np.isnan(u.shape[0])
    y = xpsoftmax.softmax(u)
    np.testing.assert_allclose(y.compute(), scipy.special.softmax(x, axis=-1), rtol=1e-12)
    dx = xpsoftmax.softmax_backward(y, u)
    _, expected = _torch_vjp(x, x, -1, False)
    np.testing.assert_allclose(dx.compute(), expected, rtol=1e-12, atol=1e-15)


def test_dask_unknown_chunk_sizes_with_where(rng):
    x = rng.standard_normal((8, 5))
    d = da.from_array(x, chunks=(3, 2))
    u = d[d[:, 0] > -10.0]
    y = xpsoftmax.log_softmax(u, where=u > 0)
    dx = xpsoftmax.log_softmax_backward(y, u, where=u > 0)
    np.testing.assert_allclose(y.compute(), ref_softmax(x, where=x > 0, log=True), rtol=1e-12)
    _, vjp_fn = jax.vjp(lambda a: jax_softmax(a, -1, where=x > 0, log=True), jnp.asarray(x))
    expected = np.asarray(vjp_fn(jnp.asarray(x))[0])  # the cotangent is u itself
    np.testing.assert_allclose(dx.compute(), expected, rtol=1e-12, atol=1e-15)
    assert np.all(dx.compute()[x <= 0] == 0.0)


@pytest.mark.xfail(
    reason="Dask cannot broadcast a where= mask to unknown chunk sizes (reported)",
    strict=True,
    raises=(TypeError, ValueError),
)
def test_dask_unknown_chunk_sizes_with_broadcast_where(rng):
    x = rng.standard_normal((8, 5))
    d = da.from_array(x, chunks=(3, 2))
    u = d[d[:, 0] > -10.0]
    mask = np.array([True, False, True, True, False])
    y = xpsoftmax.softmax(u, where=da.from_array(mask))
    np.testing.assert_allclose(y.compute(), ref_softmax(x, where=mask), rtol=1e-12)


@pytest.mark.xfail(
    reason="softmax_jacobian over several split Dask axes reshapes with a PerformanceWarning "
    "(reported)",
    strict=True,
)
def test_dask_jacobian_several_axes_without_warning(rng):
    y = da.from_array(rng.random(SHAPE), chunks=CHUNKS)
    xpsoftmax.softmax_jacobian(y, axis=(0, 2))


# ------------------------------------------------------------------------------------------
# JAX


@pytest.mark.parametrize("axis", [-1, (0, 2)])
def test_jax_jit(axis, rng):
    x = 3.0 * rng.standard_normal(SHAPE)
    g = rng.standard_normal(SHAPE)
    mask = rng.random(SHAPE) < 0.7
    for log in (False, True):
        fwd = jax.jit(
            functools.partial(xpsoftmax.log_softmax if log else xpsoftmax.softmax, axis=axis)
        )
        bwd = jax.jit(
            functools.partial(
                xpsoftmax.log_softmax_backward if log else xpsoftmax.softmax_backward, axis=axis
            )
        )
        y = fwd(jnp.asarray(x))
        assert isinstance(y, jax.Array)
        y_ref, dx_ref = _torch_vjp(x, g, axis, log)
        xp_assert_close(y, jnp.asarray(y_ref))
        xp_assert_close(bwd(y, jnp.asarray(g)), jnp.asarray(dx_ref))
        # where, traced, and the JVP
        masked = jax.jit(
            lambda a, w, log=log: (xpsoftmax.log_softmax if log else xpsoftmax.softmax)(
                a, axis=axis, where=w
            )
        )
        xp_assert_close(
            masked(jnp.asarray(x), jnp.asarray(mask)),
            jnp.asarray(ref_softmax(x, axis, where=mask, log=log)),
        )
        jvp = jax.jit(
            functools.partial(
                xpsoftmax.log_softmax_jvp if log else xpsoftmax.softmax_jvp, axis=axis
            )
        )
        tangent = jax.jvp(
            lambda a, log=log: (jax.nn.log_softmax if log else jax.nn.softmax)(a, axis=axis),
            (jnp.asarray(x),),
            (jnp.asarray(g),),
        )[1]
        xp_assert_close(jvp(y, jnp.asarray(g)), tangent)


def test_jax_jit_jacobian_and_scalar_where(rng):
    x = rng.standard_normal((3, 4))
    y = jax.nn.softmax(jnp.asarray(x), axis=0)
    jac = jax.jit(functools.partial(xpsoftmax.softmax_jacobian, axis=0))(y)
    full = jax.jacobian(lambda a: jax.nn.softmax(a, axis=0))(jnp.asarray(x))
    expected = jnp.stack([full[:, k, :, k] for k in range(4)])  # (4, 3, 3): axis moved last
    xp_assert_close(jac, expected)
    # A Python bool where= (converted on the traced array's device) and an int input.
    f = jax.jit(lambda a: xpsoftmax.softmax(a, where=True))
    xp_assert_close(f(jnp.asarray(x)), jnp.asarray(scipy.special.softmax(x, axis=-1)))
    f = jax.jit(lambda a: xpsoftmax.log_softmax(a.astype(jnp.int32)))
    xi = np.trunc(3 * x)
    xp_assert_close(f(jnp.asarray(3 * x)), jnp.asarray(scipy.special.log_softmax(xi, axis=-1)))


def test_jax_grad_through_jitted_forward_matches_torch(rng):
    # jax.grad through our jitted generic forward, and our backward, against torch autograd.
    x0, g0 = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    x, g = jnp.asarray(x0), jnp.asarray(g0)
    auto = jax.grad(lambda a: jnp.sum(jax.jit(xpsoftmax.softmax)(a) * g))(x)
    _, expected = _torch_vjp(x0, g0, -1, False)
    xp_assert_close(auto, jnp.asarray(expected))
    xp_assert_close(xpsoftmax.softmax_backward(xpsoftmax.softmax(x), g), jnp.asarray(expected))


@pytest.mark.parametrize("op", ["softmax", "log_softmax", "softmax_backward", "softmax_jvp"])
def test_dask_unsplit_axis_runs_one_task_per_block(op):
    # Softmax axis (1) in one chunk: one map_blocks layer, block results equal to NumPy's.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 9, 5))
    g = rng.standard_normal((6, 9, 5))
    mask = rng.random((1, 9, 5)) > 0.3
    dx = da.from_array(x, chunks=(2, 9, 3))
    dg = da.from_array(g, chunks=(3, 9, 5))  # other chunks than x: aligned by the call
    dmask = da.from_array(mask, chunks=(1, 9, 5))
    with dask.config.set(scheduler=_refuse_compute):
        r = _calls(dx, dg, 1, dmask)[op]()
    assert isinstance(r, da.Array)
    assert r.npartitions == dx.npartitions
    names = [name.rsplit("-", 1)[0] for name in r.__dask_graph__().layers]
    assert sum("_block" in name for name in names) == 1, names  # one task layer for the op
    assert not any(op in name for name in names for op in ("max", "exp", "sum")), names
    expected = _calls(x, g, 1, mask)[op]()
    np.testing.assert_array_equal(r.compute(), expected)


def test_dask_split_axis_takes_the_two_pass_split_path():
    # (tests/test_dask_split.py tests that path; here, only the routing.)
    x = da.from_array(np.zeros((4, 6)), chunks=(2, 3))
    assert backend_of(x, axis=1) == "dask"
    assert backend_of(x, axis=0) == "dask"
    assert backend_of(x.rechunk((2, 6)), axis=1) == "dask"
    np.testing.assert_allclose(xpsoftmax.softmax(x, axis=1).compute(), np.full((4, 6), 1 / 6))


@pytest.mark.parametrize("axis", [-1, 1, (0, 2), None])
def test_new_ops_stay_lazy_on_dask_and_jit_on_jax(axis, rng):
    """logsumexp and its backward, softmin and dtype=: lazy on Dask (every axis split across
    chunks, nothing computed until .compute()), traced under jax.jit; values as jax.nn's."""
    x = 3.0 * rng.standard_normal(SHAPE)
    mask = rng.random(SHAPE) < 0.7
    mask[0], mask[:, 0], mask[:, :, 0] = True, True, True
    xj = jnp.asarray(x)
    lse_ref = jax.nn.logsumexp(xj, axis=axis, where=mask, keepdims=True)
    grad_ref = jax.grad(lambda a: jax.nn.logsumexp(a, axis=axis, where=mask).sum())(xj)
    softmin_ref = jax.nn.softmax(-xj, axis=axis, where=mask)
    softmin_ref = jnp.where(mask, softmin_ref, 0.0)
    dx, dmask = da.from_array(x, chunks=CHUNKS), da.from_array(mask, chunks=(6, 1, 10))
    with dask.config.set(scheduler=_refuse_compute):
        lse = xpsoftmax.logsumexp(dx, axis, where=dmask, keepdims=True)
        dl = da.ones(lse.shape, chunks=1)
        results = {
            "lse": lse,
            "grad": xpsoftmax.logsumexp_backward(dx, lse, dl, axis, where=dmask),
            "softmin": xpsoftmax.softmin(dx, axis, where=dmask),
            "f32": xpsoftmax.softmax(dx.astype(np.float32), axis, dtype=np.float64),
        }
    assert all(isinstance(r, da.Array) for r in results.values())
    (got,) = dask.compute(results)
    np.testing.assert_allclose(got["lse"], lse_ref, rtol=1e-12)
    np.testing.assert_allclose(got["grad"], grad_ref, rtol=1e-11, atol=1e-15)
    np.testing.assert_allclose(got["softmin"], softmin_ref, rtol=1e-11, atol=1e-15)
    f32_ref = scipy.special.softmax(x.astype(np.float32).astype(np.float64), axis=axis)
    np.testing.assert_allclose(got["f32"], f32_ref, rtol=1e-12)
    # JAX: traced, the same values
    lse_j = jax.jit(lambda a, w: xpsoftmax.logsumexp(a, axis, where=w, keepdims=True))
    xp_assert_close(lse_j(xj, jnp.asarray(mask)), lse_ref)
    back_j = jax.jit(
        lambda a, w: xpsoftmax.logsumexp_backward(
            a,
            xpsoftmax.logsumexp(a, axis, where=w),
            jnp.ones(lse_ref.shape).squeeze(),
            axis,
            where=w,
        )
    )
    if axis is not None:
        xp_assert_close(back_j(xj, jnp.asarray(mask)), grad_ref)
    softmin_j = jax.jit(lambda a, w: xpsoftmax.softmin(a, axis, where=w, dtype=jnp.float64))
    xp_assert_close(
        softmin_j(xj.astype(jnp.float32), jnp.asarray(mask)), softmin_ref, rtol=1e-6, atol=1e-7
    )
