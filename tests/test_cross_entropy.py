"""cross_entropy and cross_entropy_backward against torch.nn.functional.cross_entropy and autograd.

Every option on every backend: index and probability targets, reductions, label smoothing,
ignore_index, ``where`` (against torch on the rows restricted to their unmasked classes), the
upstream gradient ``dloss``, any class axis (torch's is 1, so the reference moves it there);
limits (+inf, -inf, NaN) against float64 math; validation. The GPU tests at the end compare the
fused CuPy kernels with the generic path.
"""

from __future__ import annotations

import math

import array_api_compat
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import (
    Backend,
    ref_softmax,
    spy_kernels,
    to_numpy,
    xp_assert_close,
    xp_assert_equal,
)

import xpsoftmax

# conftest.py: Dask runs in two layouts here, one chunk and the softmax axes split.
DASK_SPLIT = True

REDUCTIONS = ["mean", "sum", "none"]


def _arr(xp, a):
    """``a`` in namespace ``xp``; Dask arrays get several chunks along every axis."""
    x = xp.asarray(a)
    if array_api_compat.is_dask_array(x):
        x = x.rechunk(2)
    return x


def _logits(rng, shape):
    return 2.0 * rng.standard_normal(shape)


def _indices(rng, shape, n, ignore=None, n_ignored=0):
    t = rng.integers(0, n, size=shape)
    if ignore is not None and n_ignored:
        flat = t.reshape(-1)
        flat[rng.choice(flat.size, n_ignored, replace=False)] = ignore
    return t


def _probs(rng, shape, axis):
    p = rng.random(shape) + 0.05
    return p / p.sum(axis=axis, keepdims=True)


def torch_ce(x, t, axis=-1, *, dloss=None, **kwargs):
    """torch's loss and autograd gradient, with the class axis moved to torch's 1 and back."""
    unbatched = x.ndim == 1
    xt = x if unbatched else np.moveaxis(x, axis, 1)
    X = torch.tensor(xt, dtype=torch.float64, requires_grad=True)
    if np.issubdtype(t.dtype, np.integer):
        T = torch.tensor(t, dtype=torch.int64)
    else:
        T = torch.tensor(t if unbatched else np.moveaxis(t, axis, 1), dtype=torch.float64)
    loss = F.cross_entropy(X, T, **kwargs)
    if dloss is None:
        dloss = np.ones(tuple(loss.shape))
    loss.backward(torch.tensor(np.asarray(dloss, dtype=np.float64)))
    grad = X.grad.numpy()
    return loss.detach().numpy(), grad if unbatched else np.moveaxis(grad, 1, axis)


def _check(xp, x, t, axis=-1, *, dtype=None, dloss=None, ours=None, **kwargs):
    """Compare loss and gradient on backend ``xp`` with torch, in float64 unless ``dtype``."""
    dtype = xp.float64 if dtype is None else dtype
    ref_loss, ref_grad = torch_ce(x, t, axis, dloss=dloss, **kwargs)
    X, T = _arr(xp, x), _arr(xp, t)
    if X.dtype != dtype:
        X = xp.astype(X, dtype)
    loss = xpsoftmax.cross_entropy(X, T, axis, **kwargs)
    dl = dloss if dloss is None or np.ndim(dloss) == 0 else _arr(xp, dloss)
    grad = xpsoftmax.cross_entropy_backward(X, T, axis, dloss=dl, **kwargs)
    xp_assert_close(loss, ref_loss, xp=xp, dtype=dtype, err_msg="loss")
    xp_assert_close(grad, ref_grad, xp=xp, dtype=dtype, err_msg="gradient")


# --------------------------------------------------------------------------------------------
# index targets


@pytest.mark.parametrize(
    ("label_smoothing", "ignore_index"), [(0.0, None), (0.25, -100), (0.0, 2), (1.0, None)]
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_index_targets_match_torch(xp, reduction, label_smoothing, ignore_index, rng):
    x = _logits(rng, (6, 5))
    t = _indices(rng, (6,), 5, ignore_index, n_ignored=2)
    kw = {"reduction": reduction, "label_smoothing": label_smoothing}
    if ignore_index is not None:
        kw["ignore_index"] = ignore_index
    _check(xp, x, t, **kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignore_index_is_inactive_by_default(xp, reduction, rng):
    # torch ignores -100 by default; here None ignores nothing, and -100 is then out of range.
    x, t = _logits(rng, (6, 5)), np.array([0, 2, 1, 1, 4, 3])
    _check(xp, x, t, reduction=reduction)
    t[1] = -100
    with pytest.raises(ValueError, match="class index -100"):
        # to_numpy: on Dask the check runs when the graph is computed
        to_numpy(xpsoftmax.cross_entropy(_arr(xp, x), _arr(xp, t), reduction=reduction))


def test_every_target_ignored_gives_nan_mean_and_zero_gradient(xp, rng):
    x, t = _logits(rng, (6, 5)), np.full(6, -100)
    _check(xp, x, t, ignore_index=-100)  # torch: NaN loss (0 / 0), zero gradient
    loss = xpsoftmax.cross_entropy(_arr(xp, x), _arr(xp, t), ignore_index=-100, reduction="sum")
    xp_assert_equal(loss, np.asarray(0.0), xp=xp, dtype=xp.float64)


@pytest.mark.parametrize("axis", [0, -2])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_class_axis(xp, axis, kind, rng):
    shape = (4, 3, 5)
    x = _logits(rng, shape)
    rest = tuple(d for i, d in enumerate(shape) if i != axis % 3)
    if kind == "index":
        t = _indices(rng, rest, shape[axis], -100, n_ignored=2)
        kw = {"ignore_index": -100}
    else:
        t, kw = _probs(rng, shape, axis), {}
    _check(xp, x, t, axis, reduction="none", label_smoothing=0.1, **kw)
    _check(xp, x, t, axis, reduction="mean", label_smoothing=0.1, **kw)


def torch_ce_axes(x, t, axes, *, dloss=None, where=None, **kwargs):
    """torch's loss and autograd gradient with class axes ``axes`` (sorted): the logits (and
    probability targets, ``where``) permuted and reshaped in the torch graph, classes at 1."""
    rest = [i for i in range(x.ndim) if i not in axes]
    lead, n = [x.shape[i] for i in rest], math.prod(x.shape[i] for i in axes)

    def flat(a):
        a = a.permute(*rest, *axes).reshape(*lead, n)
        return torch.movedim(a, -1, 1) if a.ndim > 1 else a

    X = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    logits = X
    if where is not None:  # the masked classes: -inf logits, as in torch's own masking
        logits = torch.where(torch.from_numpy(np.broadcast_to(where, x.shape).copy()), X, -math.inf)
    if np.issubdtype(t.dtype, np.integer):
        T = torch.tensor(t, dtype=torch.int64)
    else:
        T = flat(torch.tensor(np.broadcast_to(t, x.shape).copy(), dtype=torch.float64))
    loss = F.cross_entropy(flat(logits), T, **kwargs)
    dloss = np.ones(tuple(loss.shape)) if dloss is None else dloss
    loss.backward(torch.tensor(np.asarray(dloss, dtype=np.float64)))
    return loss.detach().numpy(), X.grad.numpy()


@pytest.mark.parametrize(
    ("shape", "axes"),
    [
        ((3, 4, 2, 5), (1, 2)),
        ((4, 3, 5), (0, 2)),
        ((3, 2, 4), (-1, -2)),
        ((2, 3), (0, 1)),
        ((4, 3, 5), (1,)),
    ],
)
@pytest.mark.parametrize("kind", ["index", "prob", "weighted"])
def test_tuple_class_axes_match_torch_on_the_flattened_classes(xp, kind, shape, axes, rng):
    # optax's axis=(1, 2): the classes are the flattened product of the axes (C order).
    norm = tuple(sorted(a % len(shape) for a in axes))
    loss_shape = tuple(d for i, d in enumerate(shape) if i not in norm)
    n = math.prod(shape[i] for i in norm)
    x = _logits(rng, shape)
    kw = {"label_smoothing": 0.1}
    if kind == "prob":
        t = rng.random(shape) + 0.05
        t /= t.sum(axis=norm, keepdims=True)
    else:
        t = _indices(rng, loss_shape, n, -100, n_ignored=1 if loss_shape else 0)
        kw["ignore_index"] = -100
    tkw = dict(kw)
    if kind == "weighted":
        w = rng.uniform(0.1, 3.0, size=n)
        kw["weight"], tkw["weight"] = xp.asarray(w), torch.tensor(w)
    for reduction in REDUCTIONS:
        dloss = rng.standard_normal(loss_shape) if reduction == "none" else 0.6
        ref_loss, ref_grad = torch_ce_axes(x, t, norm, dloss=dloss, reduction=reduction, **tkw)
        X, T = _arr(xp, x), _arr(xp, t)
        loss = xpsoftmax.cross_entropy(X, T, axes, reduction=reduction, **kw)
        xp_assert_close(loss, ref_loss, xp=xp, dtype=xp.float64, err_msg=reduction)
        dl = _arr(xp, dloss) if reduction == "none" else dloss
        grad = xpsoftmax.cross_entropy_backward(X, T, axes, reduction=reduction, dloss=dl, **kw)
        xp_assert_close(grad, ref_grad, xp=xp, dtype=xp.float64, err_msg=reduction)


def test_tuple_class_axes_with_masks_and_broadcast_targets(xp, rng):
    x = _logits(rng, (3, 4, 2, 5))
    axes = (1, 2)
    mask = rng.random((1, 4, 2, 5)) > 0.3  # per class, broadcast over the first axis
    mask[..., 0] = True
    t = _probs(rng, (4, 2, 1), None) * np.ones((1, 1, 5))  # one distribution per column, shared
    keep = np.array([[True, False, True, True, True]] * 3)  # per sample: the loss shape (3, 5)
    for reduction in REDUCTIONS:
        kw = {"reduction": reduction, "label_smoothing": 0.2}
        ref_loss, ref_grad = _restricted_axes_reference(x, t, axes, mask, reduction, 0.2)
        X, T, M = _arr(xp, x), _arr(xp, t[:, :, 0][..., None]), _arr(xp, mask)
        loss = xpsoftmax.cross_entropy(X, T, axes, where=M, **kw)
        xp_assert_close(loss, ref_loss, xp=xp, dtype=xp.float64)
        grad = xpsoftmax.cross_entropy_backward(X, T, axes, where=M, **kw)
        xp_assert_close(grad, ref_grad, xp=xp, dtype=xp.float64)
        # per sample: a dropped sample (3, 5)[:, 1] is as if absent
        ti = _indices(rng, (3, 5), 8)
        ref_loss, ref_grad = torch_ce_axes(
            x[..., keep[0]], ti[:, keep[0]], axes, reduction=reduction, label_smoothing=0.2
        )
        if reduction == "none":
            ref_loss = np.zeros((3, 5))
            ref_loss[:, keep[0]] = torch_ce_axes(
                x[..., keep[0]], ti[:, keep[0]], axes, reduction="none", label_smoothing=0.2
            )[0]
        full = np.zeros_like(x)
        full[..., keep[0]] = ref_grad
        K, TI = _arr(xp, keep), _arr(xp, ti)
        loss = xpsoftmax.cross_entropy(X, TI, axes, where=K, **kw)
        xp_assert_close(loss, ref_loss, xp=xp, dtype=xp.float64)
        grad = xpsoftmax.cross_entropy_backward(X, TI, axes, where=K, **kw)
        xp_assert_close(grad, full, xp=xp, dtype=xp.float64)


def _restricted_axes_reference(x, t, axes, mask, reduction, eps):
    """_restricted_reference on the flattened classes of ``axes`` (of a 4-D ``x``, axes (1, 2)),
    the gradient put back in the input's layout."""
    assert axes == (1, 2) and x.ndim == 4
    b, c1, c2, s = x.shape

    def flat(a):
        return np.broadcast_to(a, x.shape).reshape(b, c1 * c2, s)

    loss, grad = _restricted_reference(flat(x), flat(t), flat(mask).copy(), 1, reduction, eps)
    return loss, grad.reshape(x.shape)


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_unbatched_1d(xp, kind, rng):
    x = _logits(rng, (6,))
    t = np.asarray(4) if kind == "index" else _probs(rng, (6,), 0)
    for reduction in REDUCTIONS:
        _check(xp, x, t, 0, reduction=reduction, label_smoothing=0.2)


@pytest.mark.parametrize("target_dtype", ["uint8", "int32"])
def test_any_integer_target_dtype(xp, target_dtype, rng):
    x = _logits(rng, (6, 5))
    t = _indices(rng, (6,), 5).astype(target_dtype)
    _check(xp, x, t, label_smoothing=0.1)


# --------------------------------------------------------------------------------------------
# probability targets


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_probability_targets_match_torch(xp, reduction, label_smoothing, rng):
    x = _logits(rng, (6, 5))
    _check(xp, x, _probs(rng, (6, 5), -1), reduction=reduction, label_smoothing=label_smoothing)


def test_unnormalized_probability_targets_match_torch(xp, rng):
    # The gradient is softmax * sum(q) - q: torch's autograd, also when q does not sum to 1.
    x, t = _logits(rng, (6, 5)), rng.random((6, 5)) * 2.0
    _check(xp, x, t, reduction="sum", label_smoothing=0.2)


def test_probability_targets_promote_dtype(xp, rng):
    x = _logits(rng, (6, 5)).astype(np.float32)
    t = _probs(rng, (6, 5), -1)
    ref_loss, _ = torch_ce(x.astype(np.float64), t)
    loss = xpsoftmax.cross_entropy(_arr(xp, x), _arr(xp, t))
    xp_assert_close(loss, ref_loss, xp=xp, dtype=xp.float64, rtol=1e-6)


@pytest.mark.parametrize(
    ("shape", "t_shape", "axis"),
    [((6, 5), (1, 5), -1), ((6, 5), (5,), -1), ((4, 3, 5), (3, 1), 1), ((4, 3, 5), (4, 1, 5), 0)],
)
def test_probability_targets_broadcast(xp, shape, t_shape, axis, rng):
    # As TensorFlow's softmax_cross_entropy_with_logits: against torch on the expanded targets.
    x = _logits(rng, shape)
    t = _probs(rng, t_shape, axis if len(t_shape) == len(shape) else -1)
    full = np.broadcast_to(t, shape).copy()
    w = rng.uniform(0.1, 3.0, size=shape[axis])
    for reduction in REDUCTIONS:
        kw = {"reduction": reduction, "label_smoothing": 0.2}
        ref_loss, ref_grad = torch_ce(x, full, axis, weight=torch.tensor(w), **kw)
        X, T, W = _arr(xp, x), _arr(xp, t), xp.asarray(w)
        loss = xpsoftmax.cross_entropy(X, T, axis, weight=W, **kw)
        xp_assert_close(loss, ref_loss, xp=xp, dtype=xp.float64)
        grad = xpsoftmax.cross_entropy_backward(X, T, axis, weight=W, **kw)
        xp_assert_close(grad, ref_grad, xp=xp, dtype=xp.float64)


def test_index_targets_do_not_broadcast():
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"without axis -1, \(3,\), got \(1,\)"):
        xpsoftmax.cross_entropy(x, np.array([1]))
    with pytest.raises(ValueError, match=r"or broadcast to it, got \(2, 4\)"):
        xpsoftmax.cross_entropy(x, np.full((2, 4), 0.25))


# --------------------------------------------------------------------------------------------
# the gradient with respect to probability targets


def torch_target_grad(x, t, axis=-1, *, dloss=None, **kwargs):
    """torch autograd's d(loss)/d(target) of F.cross_entropy, ``t`` broadcast in the torch graph
    to ``x``'s shape (so the gradient is summed back to ``t``'s shape), class axis moved to 1."""
    X = torch.tensor(x, dtype=torch.float64)
    T = torch.tensor(t, dtype=torch.float64, requires_grad=True)
    full = T.expand(x.shape)
    if x.ndim > 1:
        X, full = torch.movedim(X, axis, 1), torch.movedim(full, axis, 1)
    loss = F.cross_entropy(X, full, **kwargs)
    dloss = np.ones(tuple(loss.shape)) if dloss is None else dloss
    loss.backward(torch.tensor(np.asarray(dloss, dtype=np.float64)))
    return T.grad.numpy()


def _target_grad(xp, x, t, axis=-1, **kwargs):
    X, T = _arr(xp, x), _arr(xp, t)
    kwargs = {k: xp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    return xpsoftmax.cross_entropy_backward(X, T, axis, wrt="targets", **kwargs)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_target_gradient_matches_torch(xp, reduction, label_smoothing, weighted, rng):
    x, t = _logits(rng, (6, 5)), _probs(rng, (6, 5), -1)
    kw = {"reduction": reduction, "label_smoothing": label_smoothing}
    tkw = dict(kw)
    if weighted:
        w = rng.uniform(0.1, 3.0, size=5)
        kw["weight"], tkw["weight"] = w, torch.tensor(w)
    dloss = rng.standard_normal(6) if reduction == "none" else -1.3
    ref = torch_target_grad(x, t, dloss=dloss, **tkw)
    dl = _arr(xp, dloss) if reduction == "none" else dloss
    xp_assert_close(_target_grad(xp, x, t, dloss=dl, **kw), ref, xp=xp, dtype=xp.float64)
    ref = torch_target_grad(x, t, **tkw)  # dloss None: 1
    xp_assert_close(_target_grad(xp, x, t, **kw), ref, xp=xp, dtype=xp.float64)


@pytest.mark.parametrize(
    ("shape", "t_shape", "axis"),
    [((6, 5), (1, 5), -1), ((6, 5), (5,), -1), ((4, 3, 5), (3, 1), 1), ((4, 3, 5), (4, 3, 5), 0)],
)
def test_target_gradient_other_axes_and_broadcast_targets(xp, shape, t_shape, axis, rng):
    # broadcast targets: the gradient is summed back to their shape, as autograd does
    x = _logits(rng, shape)
    t = _probs(rng, t_shape, axis if len(t_shape) == len(shape) else -1)
    for reduction in REDUCTIONS:
        kw = {"reduction": reduction, "label_smoothing": 0.1}
        got = _target_grad(xp, x, t, axis, **kw)
        xp_assert_close(got, torch_target_grad(x, t, axis, **kw), xp=xp, dtype=xp.float64)


def test_target_gradient_tuple_axes(xp, rng):
    x = _logits(rng, (3, 4, 2, 5))
    t = rng.random((3, 4, 2, 5))
    X = torch.tensor(x)
    T = torch.tensor(t, requires_grad=True)

    def flat(a):
        return a.permute(0, 3, 1, 2).reshape(3, 5, 8).movedim(-1, 1)

    for reduction in REDUCTIONS:
        T.grad = None
        F.cross_entropy(flat(X), flat(T), reduction=reduction, label_smoothing=0.2).sum().backward()
        got = _target_grad(xp, x, t, (1, 2), reduction=reduction, label_smoothing=0.2)
        xp_assert_close(got, T.grad.numpy(), xp=xp, dtype=xp.float64)


def _restricted_target_grad(x, t, mask, reduction, eps):
    """torch's target gradient on each row's unmasked classes (2-D, classes last): 0 at masked
    classes and for fully masked rows, which "mean" does not count."""
    X, T = torch.tensor(x), torch.tensor(t, requires_grad=True)
    losses = []
    for i in range(x.shape[0]):
        keep = torch.from_numpy(mask[i].copy())
        if keep.any():
            losses.append(F.cross_entropy(X[i][keep], T[i][keep], label_smoothing=eps))
    total = torch.stack(losses).sum()
    if reduction == "mean":
        total = total / len(losses)
    total.backward()
    return T.grad.numpy()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_target_gradient_with_masks(xp, reduction, rng):
    x, t = _logits(rng, (6, 5)), _probs(rng, (6, 5), -1)
    x[0, 1] = -math.inf  # a masked -inf: 0, not NaN
    mask = rng.random((6, 5)) > 0.3
    mask[:, 0] = True
    mask[0, 1] = False
    mask[4] = False  # a fully masked sample: 0, not counted in "mean"
    kw = {"reduction": reduction, "label_smoothing": 0.2}
    ref = _restricted_target_grad(x, t, mask, reduction, 0.2)
    got = _target_grad(xp, x, t, where=_arr(xp, mask), **kw)
    xp_assert_close(got, ref, xp=xp, dtype=xp.float64)
    assert np.all(to_numpy(got)[~mask] == 0.0)
    # per sample
    keep = np.array([True, True, False, True, False, True])
    ref = _restricted_target_grad(x, t, np.repeat(keep[:, None], 5, axis=1), reduction, 0.2)
    ref[0, 1] = math.inf  # the unmasked -inf logit: d/dt of -t * (-inf), as torch
    got = _target_grad(xp, x, t, where=_arr(xp, keep), **kw)
    xp_assert_close(got, ref, xp=xp, dtype=xp.float64)


def test_target_gradient_edge_values(xp):
    # float64 math: -(1 - eps) * log_softmax * scale; +inf, -inf and NaN follow log_softmax
    inf, nan = math.inf, math.nan
    x = np.array([[1.0, inf, 0.0, inf], [-inf, 1.0, 2.0, 0.0], [0.0, nan, 1.0, 1.0]])
    t = np.full((3, 4), 0.25)
    for eps in (0.0, 0.2):
        ly = ref_softmax(x, -1, log=True)
        kw = {"label_smoothing": eps}
        got = _target_grad(xp, x, t, reduction="sum", **kw)
        xp_assert_close(got, -(1 - eps) * ly, xp=xp, dtype=xp.float64)
        got = _target_grad(xp, x, t, reduction="mean", **kw)
        xp_assert_close(got, -(1 - eps) * ly / 3, xp=xp, dtype=xp.float64)


def test_target_gradient_empty_and_dtype(xp, rng):
    for reduction in REDUCTIONS:
        got = _target_grad(xp, np.zeros((0, 4)), np.zeros((0, 4)), reduction=reduction)
        xp_assert_equal(got, np.zeros((0, 4)), xp=xp, dtype=xp.float64)
    # float32 logits, float64 targets: the loss's dtype, float64
    x, t = _logits(rng, (3, 4)).astype(np.float32), _probs(rng, (3, 4), -1)
    got = _target_grad(xp, x, t)
    ref = torch_target_grad(x.astype(np.float64), t)
    xp_assert_close(got, ref, xp=xp, dtype=xp.float64, rtol=1e-6)


def test_wrt_validation():
    x, t, q = np.zeros((3, 4)), np.array([0, 1, 2]), np.full((3, 4), 0.25)
    f = xpsoftmax.cross_entropy_backward
    with pytest.raises(ValueError, match="class indices are not differentiable"):
        f(x, t, wrt="targets")
    for bad in ("target", "input", None, 1):
        with pytest.raises(ValueError, match="wrt must be one of 'logits', 'targets', got"):
            f(x, q, wrt=bad)
    with pytest.raises(ValueError, match="dloss must be a scalar"):
        f(x, q, wrt="targets", dloss=np.ones(3))


# --------------------------------------------------------------------------------------------
# dloss, dtypes


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_dloss_is_the_upstream_gradient(xp, reduction, kind, rng):
    x = _logits(rng, (6, 5))
    t = _indices(rng, (6,), 5, -100, 1) if kind == "index" else _probs(rng, (6, 5), -1)
    kw = {"ignore_index": -100} if kind == "index" else {}
    dloss = rng.standard_normal(6) if reduction == "none" else 2.5
    _check(xp, x, t, reduction=reduction, dloss=dloss, label_smoothing=0.1, **kw)
    # A 0-d array of the namespace works too, and for "none" a scalar applies to every sample.
    got = xpsoftmax.cross_entropy_backward(
        _arr(xp, x), _arr(xp, t), reduction=reduction, dloss=xp.asarray(-1.5), **kw
    )
    upstream = np.full(6, -1.5) if reduction == "none" else -1.5
    _, ref_grad = torch_ce(x, t, reduction=reduction, dloss=upstream, **kw)
    xp_assert_close(got, ref_grad, xp=xp, dtype=xp.float64)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_low_precision(xp, library, dtype, kind, rng):
    if dtype == "float16" and not library.has_float16:
        pytest.skip("array-api-strict has no float16")
    x = _logits(rng, (6, 5)).astype(dtype)
    t = _indices(rng, (6,), 5) if kind == "index" else _probs(rng, (6, 5), -1).astype(dtype)
    xd = x.astype(np.float64)
    td = t if kind == "index" else t.astype(np.float64)
    for reduction in REDUCTIONS:
        ref_loss, ref_grad = torch_ce(xd, td, reduction=reduction, label_smoothing=0.1)
        X, T = _arr(xp, x), _arr(xp, t)
        loss = xpsoftmax.cross_entropy(X, T, reduction=reduction, label_smoothing=0.1)
        grad = xpsoftmax.cross_entropy_backward(X, T, reduction=reduction, label_smoothing=0.1)
        # Computed in float32 and rounded once: within float32 / float16 rounding of float64.
        xp_assert_close(loss, ref_loss, xp=xp, dtype=dtype)
        xp_assert_close(grad, ref_grad, xp=xp, dtype=dtype)


def test_integer_logits_promote(xp, rng):
    x = rng.integers(-3, 4, size=(6, 5))
    t = _indices(rng, (6,), 5)
    ref_loss, ref_grad = torch_ce(x.astype(np.float64), t)
    X = xp.asarray(x)
    default = xp.__array_namespace_info__().default_dtypes()["real floating"]
    xp_assert_close(xpsoftmax.cross_entropy(X, xp.asarray(t)), ref_loss, xp=xp, dtype=default)
    grad = xpsoftmax.cross_entropy_backward(X, xp.asarray(t))
    xp_assert_close(grad, ref_grad, xp=xp, dtype=default)


def test_empty_batch(xp):
    x, t = np.zeros((0, 4)), np.zeros((0,), dtype=np.int64)
    for reduction in REDUCTIONS:
        _check(xp, x, t, reduction=reduction)  # torch: mean of nothing is NaN, sum is 0


# --------------------------------------------------------------------------------------------
# class weights


def _check_weighted(xp, x, t, w, axis=-1, **kwargs):
    """Loss and gradient with class weights ``w`` against torch's ``weight=``, in float64."""
    ref_loss, ref_grad = torch_ce(x, t, axis, weight=torch.tensor(w), **kwargs)
    X, T, W = _arr(xp, x), _arr(xp, t), xp.asarray(w)
    loss = xpsoftmax.cross_entropy(X, T, axis, weight=W, **kwargs)
    grad = xpsoftmax.cross_entropy_backward(X, T, axis, weight=W, **kwargs)
    xp_assert_close(loss, ref_loss, xp=xp, dtype=xp.float64, err_msg="loss")
    xp_assert_close(grad, ref_grad, xp=xp, dtype=xp.float64, err_msg="gradient")


@pytest.mark.parametrize(
    ("label_smoothing", "ignore_index"), [(0.0, None), (0.3, -100), (0.0, 2), (1.0, None)]
)
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weight_index_targets_match_torch(xp, reduction, axis, label_smoothing, ignore_index, rng):
    # torch: each sample weighted by weight[t]; "mean" divides by the sum of those weights (over
    # the non-ignored samples), also with label smoothing.
    shape = (6, 5) if axis == -1 else (5, 6)
    x = _logits(rng, shape)
    t = _indices(rng, (6,), 5, ignore_index, n_ignored=2)
    w = rng.uniform(0.1, 3.0, size=5)
    kw = {"reduction": reduction, "label_smoothing": label_smoothing}
    if ignore_index is not None:
        kw["ignore_index"] = ignore_index
    _check_weighted(xp, x, t, w, axis, **kw)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weight_probability_targets_match_torch(xp, reduction, label_smoothing, rng):
    # torch: weight multiplies each class term; "mean" divides by the number of samples.
    x, q = _logits(rng, (6, 5)), _probs(rng, (6, 5), -1)
    w = rng.uniform(0.1, 3.0, size=5)
    _check_weighted(xp, x, q, w, reduction=reduction, label_smoothing=label_smoothing)


def test_weight_edge_values_match_torch(xp, rng):
    x = _logits(rng, (5, 4))
    x[0, 1] = -math.inf  # a -inf logit off the target: finite loss, zero gradient there
    x[1, :] = 0.0
    t = np.array([0, 2, -100, 3, 1])
    w = np.array([0.0, 2.0, 0.5, 1.5])  # a zero weight: that class contributes nothing
    for reduction in REDUCTIONS:
        _check_weighted(xp, x, t, w, reduction=reduction, ignore_index=-100)
        _check_weighted(xp, x, t, w, reduction=reduction, ignore_index=-100, label_smoothing=0.2)
    # every target ignored, or every target of weight 0: "mean" is 0 / 0 = NaN, as torch
    _check_weighted(xp, x, np.full(5, -100), w, ignore_index=-100)
    _check_weighted(xp, x, np.zeros(5, dtype=np.int64), w)
    # NaN in a row poisons that row's loss only ("none")
    y = x.copy()
    y[3, 0] = math.nan
    _check_weighted(xp, y, t, w, reduction="none", ignore_index=-100)


def test_weight_empty_batch(xp):
    x, w = np.zeros((0, 4)), np.ones(4)
    for reduction in REDUCTIONS:
        _check_weighted(xp, x, np.zeros((0,), dtype=np.int64), w, reduction=reduction)
        _check_weighted(xp, x, np.zeros((0, 4)), w, reduction=reduction)


def test_weight_with_where_is_the_restricted_weighted_loss(xp, rng):
    # where= drops classes; the weights of the kept classes apply as torch's on the restricted row
    x, w = _logits(rng, (4, 5)), rng.uniform(0.1, 3.0, size=5)
    keep = np.array([True, False, True, True, False])
    t = np.array([0, 2, 3, 0])
    tr = np.searchsorted(np.flatnonzero(keep), t)
    for reduction in REDUCTIONS:
        ref_loss, ref_grad = torch_ce(
            x[:, keep], tr, weight=torch.tensor(w[keep]), reduction=reduction
        )
        X, W, M = _arr(xp, x), xp.asarray(w), xp.asarray(keep)
        loss = xpsoftmax.cross_entropy(X, _arr(xp, t), weight=W, where=M, reduction=reduction)
        grad = xpsoftmax.cross_entropy_backward(
            X, _arr(xp, t), weight=W, where=M, reduction=reduction
        )
        xp_assert_close(loss, ref_loss, xp=xp, dtype=xp.float64)
        full = np.zeros_like(x)
        full[:, keep] = ref_grad
        xp_assert_close(grad, full, xp=xp, dtype=xp.float64)


@pytest.mark.parametrize("func", [xpsoftmax.cross_entropy, xpsoftmax.cross_entropy_backward])
def test_weight_validation(func):
    x, t = np.zeros((3, 4)), np.array([0, 1, 2])
    cases = [
        (np.ones(3), ValueError, r"weight must be 1-D with one entry per class, shape \(4,\)"),
        (np.ones((1, 4)), ValueError, "weight must be 1-D"),
        (np.ones(4, dtype=np.int64), TypeError, "weight must have a real floating dtype"),
        (np.ones(4, dtype=bool), TypeError, "weight must have a real floating dtype"),
        (torch.ones(4, dtype=torch.float64), TypeError, "same array library"),
    ]
    for weight, exc, match in cases:
        with pytest.raises(exc, match=match):
            func(x, t, weight=weight)


# --------------------------------------------------------------------------------------------
# where


def _restricted_reference(x, t, mask, axis, reduction, eps):
    """torch's cross_entropy on each sample's unmasked classes; gradient 0 at masked classes."""
    xm, tm, mm = np.moveaxis(x, axis, -1), t, np.moveaxis(mask, axis, -1)
    index = np.issubdtype(t.dtype, np.integer)
    if not index:
        tm = np.moveaxis(t, axis, -1)
    rows = xm.reshape(-1, xm.shape[-1])
    masks = mm.reshape(rows.shape)
    targets = tm.reshape(-1) if index else tm.reshape(rows.shape)
    X = torch.tensor(rows, requires_grad=True)
    losses = []
    for i in range(rows.shape[0]):
        keep = torch.from_numpy(masks[i])
        if not keep.any():
            losses.append(X[i].sum() * 0.0)  # no classes: no loss
            continue
        if index:
            target = torch.tensor(int(masks[i][: targets[i]].sum()))
        else:
            target = torch.from_numpy(targets[i][masks[i]])
        losses.append(F.cross_entropy(X[i][keep], target, label_smoothing=eps, reduction="sum"))
    per_sample = torch.stack(losses)
    counted = int(masks.any(axis=-1).sum())  # "mean" leaves fully masked samples out
    mean = per_sample.sum() / counted if counted else per_sample.sum() * math.nan
    total = {"none": per_sample, "sum": per_sample.sum(), "mean": mean}[reduction]
    total.backward(torch.ones_like(total))
    loss = total.detach().numpy()
    if reduction == "none":
        loss = loss.reshape(xm.shape[:-1])
    grad = np.moveaxis(X.grad.numpy().reshape(xm.shape), -1, axis)
    return loss, grad


@pytest.mark.parametrize(
    ("reduction", "label_smoothing", "axis"),
    [("mean", 0.2, -1), ("sum", 0.0, 0), ("none", 0.2, 0)],
)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_where_restricts_to_unmasked_classes(xp, kind, reduction, label_smoothing, axis, rng):
    shape = (6, 5)
    x = _logits(rng, shape)
    mask = rng.random(shape) > 0.35
    if kind == "index":
        mm = np.moveaxis(mask, axis, -1)
        mm[:, 0] = True  # every sample keeps a class
        t = np.array([rng.choice(np.flatnonzero(row)) for row in mm])
    else:
        # one fully masked sample: loss 0, gradient 0, not counted in "mean"
        np.moveaxis(mask, axis, -1)[-1] = False
        t = _probs(rng, shape, axis)  # mass on masked classes is dropped
    ref_loss, ref_grad = _restricted_reference(x, t, mask, axis, reduction, label_smoothing)
    X, T, M = _arr(xp, x), _arr(xp, t), _arr(xp, mask)
    kw = {"reduction": reduction, "label_smoothing": label_smoothing, "where": M}
    loss = xpsoftmax.cross_entropy(X, T, axis, **kw)
    grad = xpsoftmax.cross_entropy_backward(X, T, axis, **kw)
    xp_assert_close(loss, ref_loss, xp=xp, dtype=xp.float64)
    xp_assert_close(grad, ref_grad, xp=xp, dtype=xp.float64)
    assert np.all(to_numpy(grad)[~mask] == 0.0)


def test_where_with_ignore_index_and_broadcast_mask(xp, rng):
    x = _logits(rng, (6, 5))
    mask = np.array([True, False, True, True, True])  # broadcasts over the samples
    t = np.array([0, 2, -1, 3, 2, 4])
    kw = {"where": _arr(xp, mask), "ignore_index": -1, "label_smoothing": 0.3}
    loss = xpsoftmax.cross_entropy(_arr(xp, x), _arr(xp, t), **kw)
    # Reference: drop class 1 and the ignored sample, then torch on what is left.
    keep = t != -1
    t_kept = np.array([[0, -1, 1, 2, 3][c] for c in t[keep]])
    ref_loss, _ = torch_ce(x[keep][:, mask], t_kept, label_smoothing=0.3)
    xp_assert_close(loss, ref_loss, xp=xp, dtype=xp.float64)


@pytest.mark.skip_xp_backends(Backend.DASK, reason="lazy: the mask check would compute")
def test_target_on_masked_class_is_an_error(xp, rng):
    x, mask = _logits(rng, (2, 3)), np.array([[True, False, True], [True, True, True]])
    with pytest.raises(ValueError, match="masks out"):
        xpsoftmax.cross_entropy(_arr(xp, x), _arr(xp, np.array([1, 1])), where=_arr(xp, mask))


def _kept_reference(x, t, keep, axis=-1, *, dloss=None, **kwargs):
    """torch on the samples where ``keep`` (the loss shape) is True, the others dropped: their
    loss and gradient 0 (for ``"none"``; ``dloss`` per sample is then cut to the kept ones)."""
    xm = np.moveaxis(x, axis, -1)
    rows, n = xm.reshape(-1, xm.shape[-1]), xm.shape[-1]
    flat_keep = keep.reshape(-1)
    if np.issubdtype(t.dtype, np.integer):
        kept_t = t.reshape(-1)[flat_keep]
    else:
        kept_t = np.moveaxis(t, axis, -1).reshape(-1, n)[flat_keep]
    if dloss is not None and np.ndim(dloss):
        dloss = np.asarray(dloss).reshape(-1)[flat_keep]
    loss, grad = torch_ce(rows[flat_keep], kept_t, dloss=dloss, **kwargs)
    full = np.zeros_like(rows)
    full[flat_keep] = grad
    if kwargs.get("reduction") == "none":
        per_sample = np.zeros(flat_keep.shape)
        per_sample[flat_keep] = loss
        loss = per_sample.reshape(keep.shape)
    return loss, np.moveaxis(full.reshape(xm.shape), -1, axis)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob", "weighted"])
def test_per_sample_where_drops_samples(xp, kind, reduction, rng):
    # where of the loss shape (6,), which does not broadcast to (6, 5): one flag per sample; a
    # False sample is dropped (0 loss, 0 gradient, not counted in "mean", also in its weights).
    x = _logits(rng, (6, 5))
    keep = np.array([True, False, True, True, False, True])
    if kind == "prob":
        t, kw = _probs(rng, (6, 5), -1), {}
    else:
        t, kw = _indices(rng, (6,), 5, -100, n_ignored=1), {"ignore_index": -100}
    if kind == "weighted":
        kw["weight"] = rng.uniform(0.1, 3.0, size=5)
    dloss = rng.standard_normal(6) if reduction == "none" else 1.7
    tkw = {**kw, "weight": torch.tensor(kw["weight"])} if "weight" in kw else kw
    ref_loss, ref_grad = _kept_reference(
        x, t, keep, dloss=dloss, reduction=reduction, label_smoothing=0.2, **tkw
    )
    X, T = _arr(xp, x), _arr(xp, t)
    kw = {k: xp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    kw.update(reduction=reduction, label_smoothing=0.2, where=_arr(xp, keep))
    dl = _arr(xp, dloss) if reduction == "none" else dloss
    xp_assert_close(xpsoftmax.cross_entropy(X, T, **kw), ref_loss, xp=xp, dtype=xp.float64)
    grad = xpsoftmax.cross_entropy_backward(X, T, dloss=dl, **kw)
    xp_assert_close(grad, ref_grad, xp=xp, dtype=xp.float64)
    assert np.all(to_numpy(grad)[~keep] == 0.0)


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_per_sample_where_other_class_axis(xp, kind, rng):
    x, axis = _logits(rng, (3, 5, 4)), 1
    keep = rng.random((3, 4)) > 0.4
    t = _indices(rng, (3, 4), 5) if kind == "index" else _probs(rng, x.shape, axis)
    for reduction in REDUCTIONS:
        kw = {"reduction": reduction, "label_smoothing": 0.1}
        ref_loss, ref_grad = _kept_reference(x, t, keep, axis, **kw)
        X, T, W = _arr(xp, x), _arr(xp, t), _arr(xp, keep)
        loss = xpsoftmax.cross_entropy(X, T, axis, where=W, **kw)
        xp_assert_close(loss, ref_loss, xp=xp, dtype=xp.float64)
        grad = xpsoftmax.cross_entropy_backward(X, T, axis, where=W, **kw)
        xp_assert_close(grad, ref_grad, xp=xp, dtype=xp.float64)


def test_where_of_both_shapes_is_per_class(xp, rng):
    # logits (4, 4), where (4,): it broadcasts, so it masks classes (as before); expanded along
    # the class axis it masks samples.
    x, t = _logits(rng, (4, 4)), np.array([0, 2, 3, 0])
    flags = np.array([True, False, True, True])
    ref_loss, ref_grad = _restricted_reference(x, t, np.tile(flags, (4, 1)), -1, "sum", 0)
    X, T = _arr(xp, x), _arr(xp, t)
    xp_assert_close(
        xpsoftmax.cross_entropy(X, T, where=_arr(xp, flags), reduction="sum"),
        ref_loss,
        xp=xp,
        dtype=xp.float64,
    )
    per_sample = xp.expand_dims(_arr(xp, flags), axis=-1)
    ref_loss, ref_grad = _kept_reference(x, t, flags, reduction="sum")
    xp_assert_close(
        xpsoftmax.cross_entropy(X, T, where=per_sample, reduction="sum"),
        ref_loss,
        xp=xp,
        dtype=xp.float64,
    )
    grad = xpsoftmax.cross_entropy_backward(X, T, where=per_sample, reduction="sum")
    xp_assert_close(grad, ref_grad, xp=xp, dtype=xp.float64)


@pytest.mark.parametrize("kind", ["index", "prob"])
def test_every_sample_masked(xp, kind, rng):
    # "mean" of no counted sample: NaN (0 / 0, as torch with every target ignored); "sum" 0;
    # the gradient 0. An index target needs no unmasked class when its sample is fully masked.
    x = _logits(rng, (3, 4))
    x[0, 1], x[1] = math.inf, math.nan  # dropped samples: their values do not matter
    t = np.array([1, 2, 0]) if kind == "index" else _probs(rng, (3, 4), -1)
    X, T = _arr(xp, x), _arr(xp, t)
    for where in (np.zeros(3, dtype=bool), np.zeros((3, 4), dtype=bool)):
        W = _arr(xp, where)
        loss = xpsoftmax.cross_entropy(X, T, where=W)
        xp_assert_equal(loss, np.asarray(math.nan), xp=xp, dtype=xp.float64)
        for reduction in ("sum", "none"):
            loss = xpsoftmax.cross_entropy(X, T, where=W, reduction=reduction)
            xp_assert_equal(
                loss, np.zeros(() if reduction == "sum" else 3), xp=xp, dtype=xp.float64
            )
        for reduction in REDUCTIONS:
            grad = xpsoftmax.cross_entropy_backward(X, T, where=W, reduction=reduction)
            xp_assert_equal(grad, np.zeros((3, 4)), xp=xp, dtype=xp.float64)


def test_fully_masked_sample_of_a_class_mask_is_dropped(xp, rng):
    # A per-class mask with a row of False: that sample is dropped (its index target on a masked
    # class is then no error), with edge values in the kept rows.
    x = _logits(rng, (5, 4))
    x[0, 3], x[2, 0] = -math.inf, math.nan
    mask = np.ones((5, 4), dtype=bool)
    mask[1] = False
    mask[2, 0] = False  # the NaN is masked out
    mask[3, 2] = False
    t = np.array([1, 2, 3, 0, 2])
    keep = mask.any(axis=-1)
    for reduction in REDUCTIONS:
        kw = {"reduction": reduction, "label_smoothing": 0.1}
        ref_loss, ref_grad = _restricted_reference(x, t, mask, -1, reduction, 0.1)
        X, T, M = _arr(xp, x), _arr(xp, t), _arr(xp, mask)
        xp_assert_close(
            xpsoftmax.cross_entropy(X, T, where=M, **kw), ref_loss, xp=xp, dtype=xp.float64
        )
        grad = xpsoftmax.cross_entropy_backward(X, T, where=M, **kw)
        xp_assert_close(grad, ref_grad, xp=xp, dtype=xp.float64)
        assert np.all(to_numpy(grad)[~keep] == 0.0)


def test_per_sample_where_empty(xp):
    x, keep = np.zeros((0, 4)), np.zeros((0,), dtype=bool)
    for t in (np.zeros((0,), dtype=np.int64), np.zeros((0, 4))):
        for reduction in REDUCTIONS:
            ref_loss, ref_grad = torch_ce(x, t, reduction=reduction)
            X, T, W = _arr(xp, x), _arr(xp, t), _arr(xp, keep)
            loss = xpsoftmax.cross_entropy(X, T, where=W, reduction=reduction)
            xp_assert_close(loss, ref_loss, xp=xp, dtype=xp.float64)
            grad = xpsoftmax.cross_entropy_backward(X, T, where=W, reduction=reduction)
            xp_assert_close(grad, ref_grad, xp=xp, dtype=xp.float64)


# --------------------------------------------------------------------------------------------
# limits: +inf, -inf, NaN follow log_softmax (torch gives NaN for rows with +inf)


def _ref_limits(x, t, eps):
    """Float64 math from the log_softmax reference: loss and gradient of reduction "sum"."""
    ly = ref_softmax(x, -1, log=True)
    n = x.shape[-1]
    q = np.full(x.shape, eps / n)
    q[np.arange(x.shape[0]), t] += 1.0 - eps
    with np.errstate(invalid="ignore"):
        terms = np.where(q == 0, 0.0, q * ly)
    loss = -terms.sum(axis=-1)
    grad = ref_softmax(x, -1) - q
    return loss, grad


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_limits_follow_log_softmax(xp, label_smoothing):
    inf, nan = math.inf, math.nan
    x = np.array(
        [
            [1.0, inf, 0.0, inf],  # target on +inf: log 2 (with smoothing: inf)
            [1.0, inf, 0.0, 2.0],  # target off +inf: inf
            [inf, inf, inf, inf],  # all +inf: log 4 with or without smoothing
            [-inf, 1.0, 2.0, 0.0],  # -inf entry: finite loss unless smoothing
            [0.0, nan, 1.0, 1.0],  # NaN row
            [-inf, -inf, -inf, -inf],  # all -inf: NaN, as torch
        ]
    )
    t = np.array([1, 0, 2, 1, 0, 0])
    ref_loss, ref_grad = _ref_limits(x, t, label_smoothing)
    X, T = _arr(xp, x), _arr(xp, t)
    kw = {"reduction": "none", "label_smoothing": label_smoothing}
    xp_assert_close(xpsoftmax.cross_entropy(X, T, **kw), ref_loss, xp=xp, dtype=xp.float64)
    xp_assert_close(xpsoftmax.cross_entropy_backward(X, T, **kw), ref_grad, xp=xp, dtype=xp.float64)


# --------------------------------------------------------------------------------------------
# lazy and traced backends


def test_dask_stays_lazy(rng):
    import dask

    xp = Backend.DASK.namespace()
    x = _arr(xp, _logits(rng, (6, 5)))
    t = _arr(xp, np.array([0, 1, 2, 3, -100, 1]))

    def refuse(*args, **kwargs):
        raise AssertionError("computed a Dask graph")

    with dask.config.set(scheduler=refuse):
        loss = xpsoftmax.cross_entropy(x, t, ignore_index=-100, label_smoothing=0.1)
        grad = xpsoftmax.cross_entropy_backward(x, t, ignore_index=-100, where=x > -10)
    ref_loss, ref_grad = torch_ce(
        np.asarray(x.compute()), np.asarray(t.compute()), ignore_index=-100, label_smoothing=0.1
    )
    xp_assert_close(loss, ref_loss, xp=xp, dtype="float64")
    _, ref_grad = torch_ce(np.asarray(x.compute()), np.asarray(t.compute()), ignore_index=-100)
    xp_assert_close(grad, ref_grad, xp=xp, dtype="float64")
    # tuple class axes, a per-sample mask, the gradient with respect to broadcast targets
    x3 = _arr(xp, _logits(rng, (3, 4, 2, 5)))
    t3 = _arr(xp, _indices(rng, (3, 5), 8))
    keep = _arr(xp, np.array([True, False, True]))
    q = _arr(xp, _probs(rng, (5,), 0))
    with dask.config.set(scheduler=refuse):
        loss3 = xpsoftmax.cross_entropy(x3, t3, (1, 2))
        grad3 = xpsoftmax.cross_entropy_backward(x3, t3, (1, 2))
        per_sample = xpsoftmax.cross_entropy(x[:3], t[:3], where=keep, reduction="none")
        dq = xpsoftmax.cross_entropy_backward(x, q, wrt="targets")
    x3n, t3n = np.asarray(x3.compute()), np.asarray(t3.compute())
    ref3 = torch_ce_axes(x3n, t3n, (1, 2))
    xp_assert_close(loss3, ref3[0], xp=xp, dtype="float64")
    xp_assert_close(grad3, ref3[1], xp=xp, dtype="float64")
    xn, tn = np.asarray(x.compute()), np.asarray(t.compute())
    ref_ps, _ = torch_ce(xn[:3], tn[:3], reduction="none", ignore_index=-100)
    xp_assert_close(per_sample, ref_ps * [1.0, 0.0, 1.0], xp=xp, dtype="float64")
    ref_dq = torch_target_grad(xn, np.asarray(q.compute()))
    xp_assert_close(dq, ref_dq, xp=xp, dtype="float64")


def test_jax_jit(rng):
    import jax

    xp = Backend.JAX.namespace()  # float64: conftest enables jax_enable_x64
    x, t = _logits(rng, (6, 5)), np.array([0, 2, -100, 1, 1, 4])
    kw = {"ignore_index": -100, "label_smoothing": 0.2, "reduction": "mean"}
    loss = jax.jit(lambda a, b: xpsoftmax.cross_entropy(a, b, **kw))(xp.asarray(x), xp.asarray(t))
    grad = jax.jit(lambda a, b: xpsoftmax.cross_entropy_backward(a, b, **kw))(
        xp.asarray(x), xp.asarray(t)
    )
    ref_loss, ref_grad = torch_ce(x, t, **kw)
    xp_assert_close(loss, ref_loss, xp=xp, dtype=xp.float64)
    xp_assert_close(grad, ref_grad, xp=xp, dtype=xp.float64)
    # and jax's own autodiff of our loss agrees with our backward
    auto = jax.grad(lambda a: xpsoftmax.cross_entropy(a, xp.asarray(t), **kw))(xp.asarray(x))
    xp_assert_close(auto, ref_grad, xp=xp, dtype=xp.float64)
    # the gradient with respect to (broadcast) probability targets, traced
    q, kw = _probs(rng, (5,), 0), {"label_smoothing": 0.2}
    got = jax.jit(lambda a, b: xpsoftmax.cross_entropy_backward(a, b, wrt="targets", **kw))(
        xp.asarray(x), xp.asarray(q)
    )
    xp_assert_close(got, torch_target_grad(x, q, **kw), xp=xp, dtype=xp.float64)


# --------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("func", [xpsoftmax.cross_entropy, xpsoftmax.cross_entropy_backward])
def test_validation_errors(func):
    x = np.zeros((3, 4))
    t = np.array([0, 1, 2])
    cases = [
        ((x, torch.tensor([0, 1, 2])), {}, TypeError, "same array library"),
        ((x, np.array([0, 1])), {}, ValueError, r"without axis -1, \(3,\), got \(2,\)"),
        ((x, np.zeros((3, 5))), {}, ValueError, r"probability targets must have the shape"),
        ((x, np.array([True, False, True])), {}, TypeError, "dtype bool"),
        ((x, np.array([0, 4, 1])), {}, ValueError, "class index 4, out of range for 4 classes"),
        ((x, np.array([0, -1, 1])), {}, ValueError, "class index -1"),
        ((x, t), {"label_smoothing": -0.1}, ValueError, r"label_smoothing must be in \[0, 1\]"),
        ((x, t), {"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ((x, t), {"label_smoothing": math.nan}, ValueError, "label_smoothing"),
        ((x, t), {"label_smoothing": "0.1"}, TypeError, "label_smoothing"),
        ((x, t), {"reduction": "avg"}, ValueError, "reduction must be one of"),
        ((x, t), {"ignore_index": 1.0}, TypeError, "ignore_index must be an int"),
        ((x, np.full((3, 4), 0.25)), {"ignore_index": -100}, ValueError, "only to class-index"),
        ((x, np.array(0), (0, 1, 0)), {}, ValueError, "repeated axis"),
        ((x, t, ()), {}, TypeError, "non-empty tuple of ints"),
        ((x, t, (0, 1.0)), {}, TypeError, "axis must be an int or a non-empty tuple"),
        ((x, t, None), {}, TypeError, "axis must be an int or a non-empty tuple"),
        ((x, t, (0, 1)), {}, ValueError, r"without axes \(0, 1\), \(\), got \(3,\)"),
        ((x, np.array(12), (0, 1)), {}, ValueError, "index 12, out of range for 12 classes "),
        ((x, t), {"weight": np.ones(4), "axis": None}, TypeError, "axis must be an int"),
        ((x, t, 2), {}, ValueError, "out of bounds"),
        ((np.float64(1.0), np.int64(0)), {}, ValueError, "at least one dimension"),
        ((x + 1j, t), {}, TypeError, "complex"),
        ((x, t), {"where": np.ones(2, dtype=bool)}, ValueError, "where of shape"),
        ((x, t), {"where": np.ones((3, 1, 1), dtype=bool)}, ValueError, "per-sample loss shape"),
        ((x, t), {"where": np.ones(3)}, TypeError, "where must be a boolean array"),
    ]
    for args, kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            func(*args, **kwargs)


def test_dloss_validation():
    x, t = np.zeros((3, 4)), np.array([0, 1, 2])
    f = xpsoftmax.cross_entropy_backward
    with pytest.raises(ValueError, match=r"dloss must be a scalar for reduction='mean'"):
        f(x, t, dloss=np.ones(3))
    with pytest.raises(ValueError, match=r"a scalar or of shape \(3,\)"):
        f(x, t, reduction="none", dloss=np.ones(4))
    with pytest.raises(TypeError, match="same array library"):
        f(x, t, reduction="none", dloss=torch.ones(3))


# --------------------------------------------------------------------------------------------
# GPU: the fused kernels against torch (finite rows) and against the limits written out here


def _cupy():
    try:
        import cupy
    except ImportError:
        pytest.skip("CuPy is not installed")
    if not cupy.is_available():
        pytest.skip("no CUDA device")
    return cupy


@pytest.fixture
def kernel_calls(monkeypatch):
    """Names of the cross-entropy kernels fetched through the loader during the test."""
    return spy_kernels(monkeypatch, "cross_entropy.cu")


_GPU_TOL = {"float64": (1e-12, 1e-14), "float32": (2e-5, 1e-6), "float16": (2e-3, 1e-4)}


def _gpu_close(cupy, a, want, dtype, err_msg=""):
    """A CuPy result of ``dtype`` against a float64 NumPy reference."""
    assert isinstance(a, cupy.ndarray), type(a)
    assert a.dtype == np.dtype(dtype), a.dtype
    assert a.shape == np.shape(want), (a.shape, np.shape(want))
    rtol, atol = _GPU_TOL[dtype]
    if dtype == "float16":  # the result is rounded to float16 once: one half-ulp more
        atol = max(atol, 1e-3 * float(np.max(np.abs(want), initial=0.0)))
    np.testing.assert_allclose(
        cupy.asnumpy(a).astype(np.float64),
        want,
        rtol=rtol,
        atol=atol,
        equal_nan=True,
        err_msg=err_msg,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("n", [1, 2, 33, 1000, 4097, 50257])
def test_gpu_kernel_matches_torch(n, dtype, kernel_calls):
    """The fused kernels on finite logits against torch's float64 loss and autograd gradient
    (of the same dtype-rounded logits)."""
    cupy = _cupy()
    rng = np.random.default_rng(n)
    rows = 37
    x_np = _logits(rng, (rows, n)).astype(dtype)
    x = cupy.asarray(x_np)
    x64 = x_np.astype(np.float64)
    t_np = rng.integers(0, n, size=rows)
    t_np[::5] = -100
    for reduction in REDUCTIONS:
        for eps in (0.0, 0.1):
            for ignore in (None, -100):
                tt = t_np if ignore is not None else np.where(t_np < 0, 0, t_np)
                kw = {"reduction": reduction, "label_smoothing": eps, "ignore_index": ignore}
                dloss = rng.standard_normal(rows) if reduction == "none" else 0.7
                tkw = {**kw, "ignore_index": -100 if ignore is None else ignore}
                loss_ref, grad_ref = torch_ce(x64, tt, dloss=dloss, **tkw)
                loss = xpsoftmax.cross_entropy(x, cupy.asarray(tt), **kw)
                _gpu_close(cupy, loss, loss_ref, dtype, f"loss {kw}")
                d = cupy.asarray(dloss) if reduction == "none" else dloss
                grad = xpsoftmax.cross_entropy_backward(x, cupy.asarray(tt), dloss=d, **kw)
                _gpu_close(cupy, grad, grad_ref, dtype, f"grad {kw}")
    ctype = {"float16": "__half", "float32": "float", "float64": "double"}[dtype]
    assert f"xps_xent_fwd<{ctype}>" in kernel_calls
    assert f"xps_xent_bwd<{ctype}>" in kernel_calls


_LIMIT_X = np.array(
    [
        [1.0, math.inf, 0.0, math.inf],  # two +inf: p = 1/2 there, the target one of them
        [1.0, math.inf, 0.0, 2.0],  # the target is not the +inf entry: loss +inf
        [math.inf, math.inf, math.inf, math.inf],
        [-math.inf, 1.0, 2.0, 0.0],  # a -inf entry: p = 0 there
        [0.0, math.nan, 1.0, 1.0],  # NaN: the row is NaN
        [-math.inf, -math.inf, -math.inf, -math.inf],  # all -inf: NaN
        [math.nan, 0.0, 0.0, 0.0],  # ignored: loss 0, gradient 0
    ]
)
_LIMIT_T = np.array([1, 0, 2, 1, 0, 0, -1])


def _limit_reference(x, t, eps, ignore):
    """Per-row loss and gradient (dloss = 1) by the documented limits, in float64."""
    n = x.shape[1]
    loss, grad = np.zeros(len(x)), np.zeros(x.shape)
    for r, (row, target) in enumerate(zip(x, t, strict=True)):
        if target == ignore:
            continue
        if np.isnan(row).any() or (row == -math.inf).all():
            loss[r], grad[r] = math.nan, math.nan
            continue
        k = np.count_nonzero(row == math.inf)
        with np.errstate(divide="ignore"):
            if k:
                logp = np.where(row == math.inf, -math.log(k), -math.inf)
            else:
                z = row - row.max()
                logp = z - math.log(np.exp(z).sum())
        q = np.full(n, eps / n)
        q[target] += 1 - eps
        nll, smooth = -logp[target], -logp.mean()
        loss[r] = nll if eps == 0 else (1 - eps) * nll + eps * smooth
        grad[r] = np.exp(logp) - q
    return loss, grad


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_kernel_limits(device, dtype, monkeypatch):
    """+inf, -inf, NaN and ignored rows against the limits written out in the test; on the CPU
    the same reference checks the NumPy path (so the reference itself is tested in CI)."""
    if device == "gpu":
        cupy = _cupy()
        calls = spy_kernels(monkeypatch, "cross_entropy.cu")
        to, back = cupy.asarray, cupy.asnumpy
    else:
        to, back = np.asarray, np.asarray
    X, T = to(_LIMIT_X.astype(dtype)), to(_LIMIT_T)
    for eps in (0.0, 0.1):
        kw = {"reduction": "none", "label_smoothing": eps, "ignore_index": -1}
        want_loss, want_grad = _limit_reference(_LIMIT_X, _LIMIT_T, eps, -1)
        loss = back(xpsoftmax.cross_entropy(X, T, **kw))
        grad = back(xpsoftmax.cross_entropy_backward(X, T, **kw))
        rtol = 1e-6 if dtype == "float32" else 1e-12
        np.testing.assert_allclose(loss, want_loss, rtol=rtol, atol=1e-7, equal_nan=True)
        np.testing.assert_allclose(grad, want_grad, rtol=rtol, atol=1e-7, equal_nan=True)
        assert np.all(grad[-1] == 0)
    if device == "gpu":
        assert calls


@pytest.mark.gpu
def test_gpu_kernel_layouts_and_reproducible(kernel_calls):
    cupy = _cupy()
    rng = np.random.default_rng(3)
    base = cupy.asarray(_logits(rng, (5, 6, 301)))
    views = {
        "3-D": base,
        "offset": base[:, :, 1:],
        "strided rows": base[::2],
        "transposed": cupy.swapaxes(cupy.asarray(_logits(rng, (301, 40))), 0, 1),
    }
    for name, x in views.items():
        t_np = rng.integers(0, x.shape[-1], size=x.shape[:-1])
        t = cupy.asarray(t_np)
        x64 = cupy.asnumpy(x).astype(np.float64)
        for reduction in REDUCTIONS:
            kw = {"reduction": reduction, "label_smoothing": 0.05}
            loss_ref, grad_ref = torch_ce(x64, t_np, **kw)
            _gpu_close(cupy, xpsoftmax.cross_entropy(x, t, **kw), loss_ref, "float64", name)
            grad = xpsoftmax.cross_entropy_backward(x, t, **kw)
            _gpu_close(cupy, grad, grad_ref, "float64", f"grad {name}")
            again = xpsoftmax.cross_entropy_backward(x, t, **kw)
            assert cupy.array_equal(again, grad), f"not reproducible: {name}"
    assert kernel_calls


@pytest.mark.gpu
def test_gpu_generic_options_on_cupy(kernel_calls):
    # axis != -1, where and probability targets run the generic path on CuPy arrays.
    cupy = _cupy()
    rng = np.random.default_rng(5)
    x = _logits(rng, (4, 6, 3))
    t = _indices(rng, (4, 3), 6)
    p = _probs(rng, (4, 6, 3), 1)
    mask = np.ones((4, 6, 3), dtype=bool)
    mask[:, 5] = False
    t[t == 5] = 0
    for args, kw in [
        ((x, t, 1), {"label_smoothing": 0.1}),
        ((x, p, 1), {"label_smoothing": 0.1}),
        ((x, t, 1), {"where": mask}),
    ]:
        if "where" in kw:  # masked classes: as -inf logits in torch
            ref_loss, ref_grad = torch_ce(np.where(kw["where"], x, -math.inf), t, axis=1)
        else:
            ref_loss, ref_grad = torch_ce(args[0], args[1], axis=1, **kw)
        gargs = (cupy.asarray(args[0]), cupy.asarray(args[1]), args[2])
        gkw = {k: cupy.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
        loss = xpsoftmax.cross_entropy(*gargs, **gkw)
        grad = xpsoftmax.cross_entropy_backward(*gargs, **gkw)
        assert isinstance(grad, cupy.ndarray)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-12)
        np.testing.assert_allclose(cupy.asnumpy(grad), ref_grad, rtol=1e-10, atol=1e-15)
    assert not kernel_calls


@pytest.mark.parametrize("lazy", [False, True], ids=["numpy", "dask"])
@pytest.mark.parametrize("ignore_index", [None, -100])
def test_uint64_indices_beyond_int64_are_out_of_range(lazy, ignore_index):
    """2**64 - 100 must not wrap to -100 (and be ignored): an error naming the value given."""
    x = np.zeros((3, 4))
    t = np.array([0, 1, 2**64 - 100], dtype=np.uint64)
    if lazy:
        import dask.array as da

        x, t = da.from_array(x, chunks=2), da.from_array(t, chunks=2)
    with pytest.raises(ValueError, match=r"class index 18446744073709551516, out of range for 4"):
        loss = xpsoftmax.cross_entropy(x, t, ignore_index=ignore_index)
        if lazy:
            loss.compute()
    ok = xpsoftmax.cross_entropy(np.zeros((3, 4)), np.array([0, 1, 3], dtype=np.uint64))
    assert float(ok) == pytest.approx(math.log(4), rel=1e-15)  # log(4) for uniform logits


class _WithoutTakeAlongAxis:
    """A namespace without ``take_along_axis`` (as Dask's): ``pick`` compares class ids."""

    def __init__(self, xp):
        self._xp = xp

    def __getattr__(self, name):
        if name == "take_along_axis":
            raise AttributeError(name)
        return getattr(self._xp, name)


@pytest.mark.parametrize("dtype", ["float64", "bool"])
@pytest.mark.parametrize("ax", [0, 1, 2])
def test_pick_by_class_ids_without_take_along_axis(dtype, ax, rng):
    from xpsoftmax.backends.generic.cross_entropy import pick

    a = rng.standard_normal((3, 4, 5)) > 0 if dtype == "bool" else rng.standard_normal((3, 4, 5))
    shape = tuple(d for i, d in enumerate(a.shape) if i != ax)
    t = rng.integers(0, a.shape[ax], size=shape)
    want = np.squeeze(np.take_along_axis(a, np.expand_dims(t, ax), axis=ax), axis=ax)
    xp = _WithoutTakeAlongAxis(array_api_compat.array_namespace(a))
    got = pick(xp, a, t, ax)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
