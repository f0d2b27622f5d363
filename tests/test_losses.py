"""xpsoftmax.losses against torch.nn.functional and torch autograd, for every reduction."""

from __future__ import annotations

import math
import warnings

import array_api_compat
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import to_numpy, xp_assert_close

from xpsoftmax.losses import NLL, CrossEntropy, KLDivergence, SquaredError

REDUCTIONS = ["mean", "sum", "none"]
SHAPE = (6, 5)


def _arr(xp, a):
    x = xp.asarray(a)
    return x.rechunk(2) if array_api_compat.is_dask_array(x) else x


def _probs(rng, shape=SHAPE, axis=-1):
    p = rng.random(shape) + 0.05
    return p / p.sum(axis=axis, keepdims=True)


def _torch(fn, pred, target, dloss=None):
    """torch's value and autograd gradient of ``fn(pred, target)`` for upstream ``dloss``."""
    P = torch.tensor(pred, requires_grad=True)
    T = torch.from_numpy(np.asarray(target))
    value = fn(P, T)
    value.backward(torch.ones_like(value) if dloss is None else torch.from_numpy(dloss))
    return value.detach().numpy(), P.grad.numpy()


def _check(xp, loss, pred, target, ref_fn, *, dloss=None):
    ref_value, ref_grad = _torch(ref_fn, pred, target, dloss)
    value = loss.forward(_arr(xp, pred), _arr(xp, target))
    xp_assert_close(value, ref_value, xp=xp, dtype=xp.float64, err_msg="value")
    grad = loss.backward(None if dloss is None else _arr(xp, dloss))
    xp_assert_close(grad, ref_grad, xp=xp, dtype=xp.float64, err_msg="gradient")


def _dloss(rng, reduction, shape):
    return rng.standard_normal(shape) if reduction == "none" else None


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_squared_error_is_mse_loss(xp, reduction, rng):
    pred, target = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    _check(
        xp,
        SquaredError(reduction),
        pred,
        target,
        lambda p, t: F.mse_loss(p, t, reduction=reduction),  # "mean": over all elements
        dloss=_dloss(rng, reduction, SHAPE),
    )


@pytest.mark.parametrize("ignore_index", [None, -100])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_index_targets_is_nll_loss(xp, reduction, ignore_index, rng):
    logp = np.log(_probs(rng))
    t = rng.integers(0, SHAPE[1], size=SHAPE[0])
    kw = {}
    if ignore_index is not None:
        t[[1, 4]] = ignore_index  # "mean" divides by the 4 targets left
        kw["ignore_index"] = ignore_index
    _check(
        xp,
        NLL(reduction, **kw),
        logp,
        t,
        lambda p, t: F.nll_loss(p, t, reduction=reduction, **kw),
        dloss=_dloss(rng, reduction, SHAPE[0]),
    )


def test_nll_class_axis_1_is_torchs(xp, rng):
    logp = np.log(_probs(rng, (4, 5, 3), axis=1))
    t = rng.integers(0, 5, size=(4, 3))
    _check(xp, NLL(axis=1), logp, t, F.nll_loss)


@pytest.mark.parametrize("cls", [NLL, CrossEntropy])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_tuple_class_axes(xp, cls, kind, rng):
    # axis=(1, 2): the flattened classes, as torch's nll_loss on the reshaped input
    p = _probs(rng, (3, 4 * 2, 5), axis=1).reshape(3, 4, 2, 5)
    w = rng.uniform(0.1, 3.0, size=8)
    if kind == "index":
        t = rng.integers(0, 8, size=(3, 5))
        t[0, 1] = -100
        kw = {"ignore_index": -100}
    else:
        t, kw = _probs(rng, (3, 8, 5), axis=1).reshape(3, 4, 2, 5), {}

    def ref(pred, t):
        lp = (pred if cls is NLL else torch.log(pred)).reshape(3, 8, 5)
        if kind == "index":
            return F.nll_loss(lp, t, weight=torch.from_numpy(w), ignore_index=-100)
        return -(torch.from_numpy(w)[:, None] * t.reshape(3, 8, 5) * lp).sum(1).mean()

    pred = np.log(p) if cls is NLL else p
    _check(xp, cls(axis=(1, 2), weight=_arr(xp, w), **kw), pred, t, ref)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_probability_targets(xp, reduction, rng):
    logp, t = np.log(_probs(rng)), _probs(rng)

    def ref(p, t):
        per_sample = -(t * p).sum(-1)
        return {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}[reduction]

    _check(xp, NLL(reduction), logp, t, ref, dloss=_dloss(rng, reduction, SHAPE[0]))
    # for normalized log-probabilities the value is torch's cross_entropy with soft targets
    if reduction != "none":
        value = NLL(reduction).forward(_arr(xp, logp), _arr(xp, t))
        expected = F.cross_entropy(torch.from_numpy(logp), torch.from_numpy(t), reduction=reduction)
        xp_assert_close(value, expected.numpy(), xp=xp, dtype=xp.float64)


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_of_probabilities(xp, reduction, kind, rng):
    p = _probs(rng)
    if kind == "index":
        t = rng.integers(0, SHAPE[1], size=SHAPE[0])
        t[2] = -1

        def ref(p, t):
            return F.nll_loss(torch.log(p), t, reduction=reduction, ignore_index=-1)

        loss = CrossEntropy(reduction, ignore_index=-1)
    else:
        t = _probs(rng)

        def ref(p, t):
            per_sample = -(t * torch.log(p)).sum(-1)
            return {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}[
                reduction
            ]

        loss = CrossEntropy(reduction)
    _check(xp, loss, p, t, ref, dloss=_dloss(rng, reduction, SHAPE[0]))


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_and_cross_entropy_class_weights_are_torchs(xp, reduction, kind, rng):
    # torch's weight=: index targets weighted by weight[t], "mean" over the sum of weight[t] of
    # the non-ignored targets; probability targets: each class term weighted, "mean" over samples.
    w = rng.uniform(0.1, 3.0, size=SHAPE[1])
    W = torch.from_numpy(w)
    p = _probs(rng)
    if kind == "index":
        t = rng.integers(0, SHAPE[1], size=SHAPE[0])
        t[2] = -100
        kw = {"ignore_index": -100}

        def ref_nll(lp, t):
            return F.nll_loss(lp, t, weight=W, reduction=reduction, ignore_index=-100)
    else:
        t, kw = _probs(rng), {}

        def ref_nll(lp, t):
            # torch's cross_entropy(weight=) with soft targets, on log-probabilities directly
            per_sample = -(W * t * lp).sum(-1)
            return {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}[
                reduction
            ]

    dloss = _dloss(rng, reduction, SHAPE[0])
    _check(xp, NLL(reduction, weight=_arr(xp, w), **kw), np.log(p), t, ref_nll, dloss=dloss)

    def ref_ce(p, t):
        return ref_nll(torch.log(p), t)

    loss = CrossEntropy(reduction, weight=_arr(xp, w), **kw)
    _check(xp, loss, p, t, ref_ce, dloss=dloss)


@pytest.mark.parametrize("cls", [NLL, CrossEntropy])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_probability_targets_broadcast(xp, cls, reduction, rng):
    # one distribution (5,) for every sample, as torch's elementwise broadcasting would apply it
    p, t = _probs(rng), _probs(rng, (SHAPE[1],))

    def ref(pred, t):
        lp = pred if cls is NLL else torch.log(pred)
        per_sample = -(t * lp).sum(-1)
        return {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}[reduction]

    pred = np.log(p) if cls is NLL else p
    _check(xp, cls(reduction), pred, t, ref, dloss=_dloss(rng, reduction, SHAPE[0]))


def test_loss_weight_validation():
    p, t = _probs(np.random.default_rng(0)), np.zeros(SHAPE[0], dtype=np.int64)
    with pytest.raises(ValueError, match="weight must be 1-D"):
        NLL(weight=np.ones(3)).forward(np.log(p), t)
    with pytest.raises(TypeError, match="weight must have a real floating dtype"):
        CrossEntropy(weight=np.ones(SHAPE[1], dtype=np.int32)).forward(p, t)
    assert "weight=" in repr(NLL(weight=np.ones(SHAPE[1])))


def _kl_div(p, t, **kwargs):
    with warnings.catch_warnings():
        # torch 2.x warns that its "mean" (over elements) may change; it is what we match.
        warnings.filterwarnings("ignore", "reduction: 'mean' divides", UserWarning)
        return F.kl_div(p, t, **kwargs)


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_kl_divergence_is_kl_div(xp, reduction, log_target, rng):
    pred, t = np.log(_probs(rng)), _probs(rng)
    if log_target:
        t = np.log(t)
    # "batchmean" divides by the batch size (6), "mean" by the number of elements (30).
    _check(
        xp,
        KLDivergence(reduction, log_target=log_target),
        pred,
        t,
        lambda p, t: _kl_div(p, t, reduction=reduction, log_target=log_target),
        dloss=_dloss(rng, reduction, SHAPE),
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean"])
def test_scalar_dloss_scales_the_gradient(xp, reduction, rng):
    pred, t = np.log(_probs(rng)), _probs(rng)
    ref_value, ref_grad = _torch(lambda p, t: _kl_div(p, t, reduction=reduction), pred, t)
    loss = KLDivergence(reduction)
    loss.forward(_arr(xp, pred), _arr(xp, t))
    xp_assert_close(loss.backward(-2.0), -2.0 * ref_grad, xp=xp, dtype=xp.float64)
    xp_assert_close(loss.backward(xp.asarray(3.0)), 3.0 * ref_grad, xp=xp, dtype=xp.float64)


def test_zero_target_probability_contributes_nothing(xp):
    # Masked classes (pred 0 after Softmax(where=...), -inf after LogSoftmax) with target 0.
    p = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    t = np.array([[0.25, 0.75, 0.0], [0.0, 1.0, 0.0]])
    ce = CrossEntropy(reduction="sum")
    value = ce.forward(_arr(xp, p), _arr(xp, t))
    expected = -(0.25 * math.log(0.5) + 0.75 * math.log(0.5) + math.log(0.3))
    xp_assert_close(value, np.asarray(expected), xp=xp, dtype=xp.float64)
    grad = to_numpy(ce.backward())
    assert grad[0, 2] == 0.0 and grad[1, 0] == 0.0
    np.testing.assert_allclose(grad[0, :2], [-0.5, -1.5])

    kl = KLDivergence(reduction="sum")
    with np.errstate(divide="ignore"):
        log_p = np.log(p)  # -inf where t is 0
    value = kl.forward(_arr(xp, log_p), _arr(xp, t))
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5) + math.log(1.0 / 0.3)
    xp_assert_close(value, np.asarray(expected), xp=xp, dtype=xp.float64)
    assert np.all(np.isfinite(to_numpy(kl.backward())))


def test_zero_probability_on_the_target_is_infinite():
    ce = CrossEntropy(reduction="sum")
    assert ce.forward(np.array([[0.0, 1.0]]), np.array([0])) == math.inf
    assert ce.backward()[0, 0] == -math.inf


@pytest.mark.parametrize("cls", [SquaredError, KLDivergence])
def test_float16_is_computed_in_float32(cls, rng):
    pred, t = np.log(_probs(rng)).astype(np.float16), _probs(rng).astype(np.float16)
    p64, t64 = torch.from_numpy(pred.astype(np.float64)), torch.from_numpy(t.astype(np.float64))
    if cls is SquaredError:  # torch in float64 on the float16 values: the reference
        ref = F.mse_loss(p64, t64)
    else:
        ref = F.kl_div(p64, t64, reduction="batchmean")
    loss = cls()
    value = loss.forward(pred, t)
    assert value.dtype == np.float16 and loss.backward().dtype == np.float16
    np.testing.assert_allclose(float(value), float(ref), rtol=2e-3)


def test_errors():
    p, t = np.full(SHAPE, 0.2), np.zeros(SHAPE[0], dtype=np.int64)
    for cls in (SquaredError, NLL, CrossEntropy, KLDivergence):
        with pytest.raises(ValueError, match="reduction must be one of"):
            cls(reduction="avg")
        with pytest.raises(RuntimeError, match=r"backward\(\) called before forward\(\)"):
            cls().backward()
    with pytest.raises(ValueError, match="reduction must be one of"):
        SquaredError(reduction="batchmean")  # only KLDivergence has it
    with pytest.raises(ValueError, match=r"pred and target must have the same shape"):
        SquaredError().forward(p, p[:3])
    with pytest.raises(TypeError, match="same array library"):
        KLDivergence().forward(p, torch.from_numpy(p))
    with pytest.raises(TypeError, match="log_target must be a bool"):
        KLDivergence(log_target=1)
    with pytest.raises(ValueError, match="class index 5, out of range for 5 classes"):
        NLL().forward(np.log(p), np.array([0, 1, 5, 0, 0, 0]))
    with pytest.raises(ValueError, match="only to class-index targets"):
        CrossEntropy(ignore_index=-100).forward(p, p)
    loss = SquaredError(reduction="none")
    loss.forward(p, p)
    with pytest.raises(ValueError, match=r"dloss must be a scalar or of shape \(6, 5\)"):
        loss.backward(np.ones(5))
    nll = NLL()
    nll.forward(np.log(p), t)
    with pytest.raises(ValueError, match=r"dloss must be a scalar for reduction='mean'"):
        nll.backward(np.ones(6))
    assert repr(nll) == "NLL(reduction='mean', axis=-1, ignore_index=None)"
    assert repr(KLDivergence()) == "KLDivergence(reduction='batchmean', log_target=False)"
