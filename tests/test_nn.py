"""Softmax and LogSoftmax layers against torch autograd, alone and composed with every loss."""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import to_numpy, xp_assert_close

import xpsoftmax
from xpsoftmax import LogSoftmax, Softmax
from xpsoftmax.losses import NLL, CrossEntropy, KLDivergence, SquaredError

LAYERS = [
    pytest.param(Softmax, torch.softmax, id="Softmax"),
    pytest.param(LogSoftmax, torch.log_softmax, id="LogSoftmax"),
]
SHAPE = (6, 5)


def _arr(xp, a):
    x = xp.asarray(a)
    return x.rechunk(2) if array_api_compat.is_dask_array(x) else x


def _torch_vjp(tfunc, x, dy, axis, mask=None):
    X = torch.tensor(x, requires_grad=True)
    Xm = X if mask is None else X.masked_fill(torch.from_numpy(~mask), -torch.inf)
    Y = tfunc(Xm, dim=axis)
    Y.backward(torch.tensor(dy))
    return Y.detach().numpy(), X.grad.numpy()


@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize(("layer", "tfunc"), LAYERS)
def test_layer_matches_torch_autograd(xp, layer, tfunc, axis, rng):
    x, dy = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    ref_y, ref_dx = _torch_vjp(tfunc, x, dy, axis)
    act = layer(axis=axis)
    y = act.forward(_arr(xp, x))
    assert act.output is y
    xp_assert_close(y, ref_y, xp=xp, dtype=xp.float64)
    xp_assert_close(act.backward(_arr(xp, dy)), ref_dx, xp=xp, dtype=xp.float64)


@pytest.mark.parametrize(("layer", "tfunc"), LAYERS)
def test_layer_where(xp, layer, tfunc, rng):
    x, dy = rng.standard_normal(SHAPE), rng.standard_normal(SHAPE)
    mask = rng.random(SHAPE) > 0.4
    mask[:, 0] = True
    # torch: masked logits set to -inf; a loss does not depend on masked outputs, so dy is 0
    # there for the reference, while the layer ignores whatever dy holds at masked entries.
    ref_y, ref_dx = _torch_vjp(tfunc, x, np.where(mask, dy, 0.0), -1, mask)
    act = layer()
    y = act.forward(_arr(xp, x), where=_arr(xp, mask))
    xp_assert_close(y, ref_y, xp=xp, dtype=xp.float64)
    dx = act.backward(_arr(xp, dy))
    xp_assert_close(dx, ref_dx, xp=xp, dtype=xp.float64)
    assert np.all(to_numpy(dx)[~mask] == 0.0)


@pytest.mark.parametrize(("layer", "tfunc"), LAYERS)
def test_backward_uses_the_last_forward(xp, layer, tfunc, rng):
    x1, x2, dy = (rng.standard_normal(SHAPE) for _ in range(3))
    act = layer()
    act.forward(_arr(xp, x1))
    act(_arr(xp, x2))  # __call__ is forward
    _, ref_dx = _torch_vjp(tfunc, x2, dy, -1)
    xp_assert_close(act.backward(_arr(xp, dy)), ref_dx, xp=xp, dtype=xp.float64)


@pytest.mark.parametrize("layer", [Softmax, LogSoftmax])
def test_backward_errors(layer):
    act = layer()
    assert act.output is None
    with pytest.raises(RuntimeError, match=r"backward\(\) called before forward\(\)"):
        act.backward(np.ones(SHAPE))
    act.forward(np.zeros(SHAPE))
    with pytest.raises(ValueError, match=r"dy has shape \(5, 6\).*output has shape \(6, 5\)"):
        act.backward(np.ones((5, 6)))
    with pytest.raises(TypeError, match="same array library"):
        act.backward(torch.ones(SHAPE, dtype=torch.float64))
    assert repr(act) == f"{layer.__name__}(axis=-1)"


def test_layer_check_vjp():
    # The layer's backward is a correct VJP (finite differences), through check_vjp's convention.
    x = np.random.default_rng(0).standard_normal(SHAPE)
    for layer in (Softmax(), LogSoftmax()):

        def f(z, axis=-1, layer=layer):
            return layer.forward(z)

        def vjp(y, dy, axis=-1, layer=layer):
            layer.forward(x)  # check_vjp's finite differences ran forward at other points since
            return layer.backward(dy)

        assert xpsoftmax.check_vjp(f, vjp, x)
        # and the elementwise shortcut y * (1 - y) * dy fails it for softmax
    shortcut = Softmax()

    def wrong(y, dy, axis=-1):
        return y * (1 - y) * dy

    assert not xpsoftmax.check_vjp(lambda z, axis=-1: shortcut.forward(z), wrong, x)


# --------------------------------------------------------------------------------------------
# any activation composes with any loss: act.backward(loss.backward())


def _targets(rng, kind):
    if kind == "index":
        return rng.integers(0, SHAPE[1], size=SHAPE[0])
    p = rng.random(SHAPE) + 0.05
    return p / p.sum(axis=-1, keepdims=True)


def _torch_kl(pred, t):
    return F.kl_div(pred, t, reduction="batchmean")


def _torch_soft_ce(log_pred, t):
    return -(t * log_pred).sum(-1).mean()


def _torch_ce_of_probs(y, t):
    log_y = torch.log(y)
    return F.nll_loss(log_y, t) if t.dtype == torch.int64 else _torch_soft_ce(log_y, t)


def _torch_nll_sum(y, t):
    return F.nll_loss(y, t, reduction="sum")


def _torch_mse_sum(y, t):
    return F.mse_loss(y, t, reduction="sum")


# (layer, loss class, its reduction, target kind, torch activation, torch loss of (y, target))
PAIRS = [
    (Softmax, SquaredError, "mean", "prob", torch.softmax, F.mse_loss),
    (Softmax, CrossEntropy, "mean", "index", torch.softmax, _torch_ce_of_probs),
    (Softmax, CrossEntropy, "mean", "prob", torch.softmax, _torch_ce_of_probs),
    (Softmax, NLL, "sum", "index", torch.softmax, _torch_nll_sum),
    (Softmax, KLDivergence, "batchmean", "prob", torch.softmax, _torch_kl),
    (LogSoftmax, SquaredError, "sum", "prob", torch.log_softmax, _torch_mse_sum),
    (LogSoftmax, NLL, "mean", "index", torch.log_softmax, F.nll_loss),
    (LogSoftmax, NLL, "mean", "prob", torch.log_softmax, _torch_soft_ce),
    (LogSoftmax, KLDivergence, "batchmean", "prob", torch.log_softmax, _torch_kl),
]


@pytest.mark.parametrize(
    ("layer", "loss_cls", "reduction", "kind", "tact", "tloss"),
    [pytest.param(*p, id=f"{p[0].__name__}-{p[1].__name__}-{p[3]}") for p in PAIRS],
)
def test_any_activation_with_any_loss(xp, layer, loss_cls, reduction, kind, tact, tloss, rng):
    x, t = rng.standard_normal(SHAPE), _targets(rng, kind)
    X = torch.tensor(x, requires_grad=True)
    ref = tloss(tact(X, dim=-1), torch.from_numpy(t))
    ref.backward()
    act, loss = layer(), loss_cls(reduction=reduction)
    value = loss.forward(act.forward(_arr(xp, x)), _arr(xp, t))
    xp_assert_close(value, ref.detach().numpy(), xp=xp, dtype=xp.float64)
    xp_assert_close(act.backward(loss.backward()), X.grad.numpy(), xp=xp, dtype=xp.float64)
