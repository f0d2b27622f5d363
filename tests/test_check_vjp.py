"""check_vjp: accepts the true VJPs on every backend and rejects wrong derivatives.

The wrong derivatives are the ones people actually write: the elementwise shortcut
``y * (1 - y) * dy``, which drops the off-diagonal Jacobian terms, and the formula
``1 / (2 + e/o + o/e)`` from the question this project answers. For two classes with
``e = exp(x_i)`` and ``o = exp(x_other)`` (the sum of the other exponentials),
``y_i = e / (e + o)``, so ``y_i (1 - y_i) = e o / (e + o)**2 = 1 / (2 + e/o + o/e)``: the formula is
the diagonal entry ``d y_i / d x_i`` of the 2-class softmax Jacobian. Used as the derivative in
the chain rule, ``dx_i = dy_i / (2 + e/o + o/e)``, it misses ``- y_i y_j dy_j``; the true 2-class
VJP is ``dx_i = (dy_i - dy_j) / (2 + e/o + o/e)``.
"""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest
import torch
from _helpers import Backend, to_numpy, torch_softmax

import xpsoftmax

# conftest.py: Dask runs in two layouts here, one chunk and the softmax axes split.
DASK_SPLIT = True


def _question_derivative(y):
    """``1 / (2 + e/o + o/e)`` from the 2-class softmax output ``y``: ``e/o = y / (1 - y)``."""
    ratio = y / (1 - y)
    return 1 / (2 + ratio + 1 / ratio)


def question_vjp(y, dy, axis=-1):
    """The question's formula used as the softmax derivative, elementwise: wrong."""
    return _question_derivative(y) * dy


def two_class_vjp(y, dy, axis=-1):
    """The same formula used correctly for 2 classes: ``dx_i = (dy_i - dy_j) * y_i y_j``."""
    xp = array_api_compat.array_namespace(dy)
    return _question_derivative(y) * (dy - xp.flip(dy, axis=-1))


def elementwise_vjp(y, dy, axis=-1):
    """The diagonal-only shortcut ``y * (1 - y) * dy``: wrong for more than one class."""
    return y * (1 - y) * dy


def scaled_vjp(y, dy, axis=-1):
    """The true VJP off by 1 %."""
    return 1.01 * xpsoftmax.softmax_backward(y, dy, axis=axis)


def _x(xp, rng, shape=(4, 6)):
    return xp.asarray(rng.standard_normal(shape))


@pytest.mark.parametrize("axis", [-1, 0, (0, 2), None])
@pytest.mark.parametrize(
    ("f", "vjp"),
    [
        (xpsoftmax.softmax, xpsoftmax.softmax_backward),
        (xpsoftmax.log_softmax, xpsoftmax.log_softmax_backward),
    ],
)
def test_true_vjps_pass(xp, f, vjp, axis, rng):
    assert xpsoftmax.check_vjp(f, vjp, _x(xp, rng, (3, 4, 5)), axis=axis) is True


@pytest.mark.parametrize("dtype", ["float32", "int64"])
def test_low_precision_input_is_checked_in_float64(xp, dtype, rng):
    x = xp.asarray((3 * rng.standard_normal((3, 5))).astype(dtype))
    assert xpsoftmax.check_vjp(xpsoftmax.softmax, xpsoftmax.softmax_backward, x) is True
    assert xpsoftmax.check_vjp(xpsoftmax.log_softmax, xpsoftmax.log_softmax_backward, x) is True
    assert xpsoftmax.check_vjp(xpsoftmax.softmax, elementwise_vjp, x) is False


@pytest.mark.parametrize(
    "wrong",
    [
        elementwise_vjp,
        scaled_vjp,
        lambda y, dy, axis=-1: 0.99 * xpsoftmax.softmax_backward(y, dy, axis=axis),
        lambda y, dy, axis=-1: xpsoftmax.log_softmax_backward(y, dy, axis=axis),  # wrong pair
        lambda y, dy, axis=-1: xpsoftmax.softmax_backward(y, dy, axis=0),  # wrong axis
        lambda y, dy, axis=-1: dy * np.nan,
    ],
    ids=["elementwise", "plus_1pct", "minus_1pct", "log_backward", "wrong_axis", "nan"],
)
def test_wrong_vjps_fail(xp, wrong, rng):
    assert xpsoftmax.check_vjp(xpsoftmax.softmax, wrong, _x(xp, rng)) is False


def test_log_softmax_with_softmax_vjp_fails(xp, rng):
    x = _x(xp, rng)
    assert xpsoftmax.check_vjp(xpsoftmax.log_softmax, xpsoftmax.softmax_backward, x) is False


def test_question_formula_is_the_2_class_diagonal(rng):
    # Work the algebra through numerically: the formula equals y (1 - y) and the diagonal of the
    # 2-class softmax Jacobian from torch autograd; the off-diagonal entries are its negative.
    x = torch.asarray(rng.standard_normal((5, 2)))
    y = torch.softmax(x, dim=-1)
    e, o = torch.exp(x), torch.exp(x.flip(-1))
    formula = 1 / (2 + e / o + o / e)
    torch.testing.assert_close(formula, y * (1 - y), rtol=1e-12, atol=0)
    torch.testing.assert_close(_question_derivative(y), formula, rtol=1e-12, atol=0)
    for row in range(5):
        jac = torch.autograd.functional.jacobian(lambda a: torch.softmax(a, dim=-1), x[row])
        torch.testing.assert_close(torch.diagonal(jac), formula[row], rtol=1e-12, atol=0)
        torch.testing.assert_close(jac[0, 1], -formula[row, 0], rtol=1e-12, atol=0)


def test_question_formula_fails_and_its_correct_use_passes(xp, rng):
    x = _x(xp, rng, (8, 2))
    assert xpsoftmax.check_vjp(xpsoftmax.softmax, question_vjp, x) is False
    # Positive control: check_vjp is not simply rejecting the formula; used as the full 2-class
    # Jacobian it passes.
    assert xpsoftmax.check_vjp(xpsoftmax.softmax, two_class_vjp, x) is True


def test_question_formula_error_size(rng):
    # How far off the formula is, measured against torch autograd on random cotangents.
    x = rng.standard_normal((64, 2))
    dy = rng.standard_normal((64, 2))
    t = torch.asarray(x, requires_grad=True)
    (torch_softmax(t, -1) * torch.asarray(dy)).sum().backward()
    y = torch.softmax(torch.asarray(x), dim=-1).numpy()
    err = np.abs(question_vjp(y, dy) - t.grad.numpy()).max()
    assert err > 1e-2  # far beyond check_vjp's rtol of 1e-6


def test_seed_and_directions_are_used(xp, rng):
    x = _x(xp, rng)
    for seed in range(3):
        assert xpsoftmax.check_vjp(
            xpsoftmax.softmax, xpsoftmax.softmax_backward, x, seed=seed, n_directions=2
        )
        assert not xpsoftmax.check_vjp(xpsoftmax.softmax, scaled_vjp, x, seed=seed, n_directions=1)


def test_vjp_called_with_forward_output_convention(xp, library, rng):
    # check_vjp calls vjp(f(x, axis=axis), dy, axis=axis), with float64 arrays of x's namespace.
    calls = []

    def spy(y, dy, axis=-1):
        calls.append((y, dy, axis))
        return xpsoftmax.softmax_backward(y, dy, axis=axis)

    x = _x(xp, rng, (3, 4))
    assert xpsoftmax.check_vjp(xpsoftmax.softmax, spy, x, axis=0, n_directions=2) is True
    assert len(calls) == 2
    y, dy, axis = calls[0]
    assert axis == 0
    np.testing.assert_allclose(
        to_numpy(y), torch.softmax(torch.asarray(to_numpy(x)), dim=0).numpy(), rtol=1e-12
    )
    assert tuple(dy.shape) == (3, 4)
    for a in (y, dy):
        assert type(a) is type(x)
        assert str(a.dtype).endswith("float64")
    if library is Backend.DASK:
        assert hasattr(y, "dask")  # stayed a lazy Dask array
