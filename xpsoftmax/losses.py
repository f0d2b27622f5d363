"""Losses with ``forward(pred, target)`` and ``backward()``: d(loss)/d(pred) for any activation.

Each loss keeps what its gradient needs in ``forward`` and returns d(loss)/d(pred) from
``backward``, so any activation composes with any loss through the activation's VJP::

    act, loss = xpsoftmax.Softmax(), xpsoftmax.losses.SquaredError()
    value = loss.forward(act.forward(x), target)
    dx = act.backward(loss.backward())

Every loss matches a function of :mod:`torch.nn.functional`, values and autograd gradients, for
each ``reduction``; the class docstrings say which, and what ``"mean"`` divides by.

========================  ==========================================================
loss                      torch equivalent
========================  ==========================================================
``SquaredError``          ``mse_loss(pred, target, reduction=r)``
``NLL``                   ``nll_loss(pred, target, reduction=r, ignore_index=i)``
``CrossEntropy``          ``nll_loss(torch.log(pred), target, ...)``
``KLDivergence``          ``kl_div(pred, target, reduction=r, log_target=b)``
========================  ==========================================================

``backward(dloss=None)`` takes the upstream gradient of the loss: a scalar for ``"mean"``,
``"sum"`` and ``"batchmean"``; for ``"none"`` a scalar or an array of the loss's shape (the
default 1 gives the gradient of the sum of the per-sample losses). Inputs keep their namespace,
device and dtype; float16 is computed in float32 and rounded once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._call import XentCall, validate
from ._dtypes import compute_dtype
from .backends.generic import cross_entropy as xent
from .ops.cross_entropy import (
    REDUCTIONS,
    check_dloss,
    check_reduction,
    prepare,
    restore,
    validate_dloss,
)

Array = Any

__all__ = ["NLL", "CrossEntropy", "KLDivergence", "SquaredError"]


class _Loss:
    _reductions: tuple[str, ...] = REDUCTIONS

    def __init__(self, reduction: str = "mean") -> None:
        self.reduction = check_reduction(reduction, self._reductions)
        self._state: tuple[Any, ...] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r})"

    def _saved(self) -> tuple[Any, ...]:
        if self._state is None:
            msg = f"{type(self).__name__}.backward() called before forward(): nothing to use"
            raise RuntimeError(msg)
        return self._state

    def forward(self, pred: Array, target: Array, /) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, pred: Array, target: Array, /) -> Array:
        return self.forward(pred, target)


def _pair(pred: Any, target: Any) -> tuple[Any, Array, Array, Any]:
    """``pred`` and ``target`` validated, of one shape, in the compute dtype; the result dtype."""
    xp, (pred, target), _, _, dtype, _ = validate(
        ((pred, "pred"), (target, "target")), None, None, None
    )
    ctype = compute_dtype(xp, dtype)
    if pred.dtype != ctype:
        pred, target = xp.astype(pred, ctype), xp.astype(target, ctype)
    return xp, pred, target, dtype


def _elementwise_reduce(xp: Any, loss: Array, reduction: str, dtype: Any) -> Array:
    if reduction == "sum":
        loss = xp.sum(loss)
    elif reduction == "mean":
        loss = xp.mean(loss)
    elif reduction == "batchmean":
        loss = xp.sum(loss) / (loss.shape[0] if loss.ndim else 1)
    return loss if loss.dtype == dtype else xp.astype(loss, dtype)


def _elementwise_weight(xp: Any, ref: Array, reduction: str, dloss: Any) -> Array | float:
    """d(loss)/d(elementwise loss): ``dloss`` divided by what the reduction divides by."""
    w = validate_dloss(xp, ref, ref.dtype, tuple(ref.shape), dloss, reduction)
    size = 1
    for d in ref.shape:
        size *= d
    if reduction == "mean":
        w = w / size
    elif reduction == "batchmean" and ref.ndim:
        w = w / ref.shape[0]
    return w


def _safe_log(xp: Any, p: Array) -> Array:
    """``log(p)`` with ``log(0) = -inf`` and NaN for negative ``p``, without floating warnings."""
    pos = p > 0
    logp = xp.log(xp.where(pos, p, xp.ones_like(p)))
    other = xp.where(p == 0, xp.full_like(p, -np.inf), xp.full_like(p, np.nan))
    return xp.where(pos, logp, other)


def _finish(xp: Any, g: Array, dtype: Any) -> Array:
    return g if g.dtype == dtype else xp.astype(g, dtype)


class SquaredError(_Loss):
    """Squared error ``(pred - target)**2``, as :func:`torch.nn.functional.mse_loss`.

    Parameters
    ----------
    reduction : {"mean", "sum", "none"}, optional
        ``"none"``: the elementwise squares; ``"sum"``: their sum; ``"mean"`` (default): their mean
        over *all* elements, as ``mse_loss(pred, target, reduction="mean")``.

    Notes
    -----
    ``forward(pred, target)``: arrays of one namespace and shape. ``backward(dloss=None)``
    returns ``2 * (pred - target) * dloss``, divided by the number of elements for ``"mean"``.

    Examples
    --------
    >>> import numpy as np
    >>> from xpsoftmax.losses import SquaredError
    >>> loss = SquaredError()
    >>> float(loss.forward(np.array([1.0, 2.0]), np.array([0.0, 0.0])))
    2.5
    >>> loss.backward()
    array([1., 2.])
    """

    def forward(self, pred: Array, target: Array, /) -> Array:
        """The squared error of ``pred`` against ``target``, reduced."""
        xp, pred, target, dtype = _pair(pred, target)
        with np.errstate(all="ignore"):
            d = pred - target
            loss = _elementwise_reduce(xp, d * d, self.reduction, dtype)
        self._state = (xp, d, dtype)
        return loss

    def backward(self, dloss: Array | float | None = None) -> Array:
        """d(loss)/d(pred) for the last :meth:`forward`, times the upstream ``dloss``."""
        xp, d, dtype = self._saved()
        w = _elementwise_weight(xp, d, self.reduction, dloss)
        with np.errstate(all="ignore"):
            return _finish(xp, 2.0 * d * w, dtype)


class _LogLikelihood(_Loss):
    def __init__(
        self,
        reduction: str = "mean",
        *,
        axis: int | tuple[int, ...] = -1,
        ignore_index: int | None = None,
        weight: Array | None = None,
    ) -> None:
        super().__init__(reduction)
        self.axis = axis
        self.ignore_index = ignore_index
        self.weight = weight  # validated against each input in forward()

    def __repr__(self) -> str:
        extra = "" if self.weight is None else ", weight=..."
        return (
            f"{type(self).__name__}(reduction={self.reduction!r}, axis={self.axis!r}, "
            f"ignore_index={self.ignore_index!r}{extra})"
        )

    _log_input = True  # NLL takes log-probabilities, CrossEntropy probabilities

    def forward(self, pred: Array, target: Array, /) -> Array:
        """The negative log-likelihood of ``target`` under (log-)probabilities ``pred``."""
        p = prepare(pred, "pred", target, self.axis, self.ignore_index, None, weight=self.weight)
        with np.errstate(all="ignore"):
            ly = p.x if self._log_input else _safe_log(p.xp, p.x)
            loss = xent.reduce(p, xent.sample_losses(p, ly, 0.0), self.reduction)
        self._state = (p,)
        return loss

    def _logp_gradient(self, dloss: Any) -> tuple[XentCall, Array]:
        (p,) = self._saved()
        w = xent.sample_weights(p, self.reduction, check_dloss(p, dloss, self.reduction))
        return p, xent.logp_gradient(p, w, 0.0)


class NLL(_LogLikelihood):
    """Negative log-likelihood of log-probabilities, as :func:`torch.nn.functional.nll_loss`.

    ``pred`` holds log-probabilities (the output of :class:`~xpsoftmax.LogSoftmax`), classes
    along ``axis``. The loss of a sample is ``-pred[target]`` for a class index and
    ``-sum(target * pred, axis)`` for probability targets (a zero target probability contributes
    0, even against ``-inf``). Class indices have ``pred``'s shape without ``axis``; probability
    targets have ``pred``'s shape or broadcast to it (one distribution for all samples, say).

    Parameters
    ----------
    reduction : {"mean", "sum", "none"}, optional
        ``"none"``: one loss per sample (``pred``'s shape without ``axis``); ``"sum"``: their
        sum; ``"mean"`` (default): the sum divided by the number of non-ignored samples for
        index targets (NaN if all are ignored), by the number of samples for probability targets.
    axis : int or tuple of ints, optional
        The class axis (default ``-1``; torch's is 1), or several, as in
        :func:`~xpsoftmax.cross_entropy`: their flattened product (C order) is the classes.
    ignore_index : int, optional
        Samples with this class index contribute 0 and are left out of the mean. ``None``
        (default) ignores nothing; torch's default is ``-100``. Index targets only.
    weight : array, optional
        Class weights as torch's ``weight=``: 1-D, one real floating entry per class, of the
        inputs' namespace. Each class term is multiplied by its weight, and ``"mean"`` divides
        by the sum of ``weight[target]`` over the non-ignored samples for index targets (by the
        number of samples for probability targets).

    Notes
    -----
    With index targets, ``NLL(r, axis=1, ignore_index=i)`` equals
    ``torch.nn.functional.nll_loss(pred, target, reduction=r, ignore_index=i)``. With probability
    targets it equals the autograd of ``-(target * pred).sum(1)`` reduced as above, which is what
    ``torch.nn.functional.cross_entropy(pred, target)`` computes when ``pred`` is normalized.
    ``backward(dloss=None)`` returns ``-target_distribution * weight``: at the target class only
    for class indices.

    Examples
    --------
    >>> import numpy as np
    >>> from xpsoftmax.losses import NLL
    >>> loss = NLL()
    >>> float(loss.forward(np.log(np.array([[0.5, 0.5], [0.25, 0.75]])), np.array([0, 1])))
    0.4904146265058631
    >>> loss.backward()
    array([[-0.5,  0. ],
           [ 0. , -0.5]])
    """

    def backward(self, dloss: Array | float | None = None) -> Array:
        """d(loss)/d(pred) for the last :meth:`forward`, times the upstream ``dloss``."""
        p, g = self._logp_gradient(dloss)
        return _finish(p.xp, restore(p, g), p.dtype)


class CrossEntropy(_LogLikelihood):
    """Cross-entropy of probabilities: :class:`NLL` of ``log(pred)``.

    ``pred`` holds probabilities (the output of :class:`~xpsoftmax.Softmax`), classes along
    ``axis``; the loss of a sample is ``-log(pred[target])`` for a class index and
    ``-sum(target * log(pred), axis)`` for probability targets (a zero target probability
    contributes 0, also where ``pred`` is 0). For logits, prefer :func:`~xpsoftmax.cross_entropy`,
    which never forms ``log(softmax)``.

    Parameters
    ----------
    reduction, axis, ignore_index, weight
        As in :class:`NLL`.

    Notes
    -----
    With index targets, ``CrossEntropy(r, axis=1, ignore_index=i)`` equals
    ``torch.nn.functional.nll_loss(torch.log(pred), target, reduction=r, ignore_index=i)``, values
    and autograd gradients; with probability targets, the autograd of
    ``-(target * torch.log(pred)).sum(1)`` reduced as in :class:`NLL`. ``backward(dloss=None)``
    returns ``-target_distribution * weight / pred`` (0 where the target probability is 0).

    Examples
    --------
    >>> import numpy as np
    >>> from xpsoftmax.losses import CrossEntropy
    >>> loss = CrossEntropy(reduction="sum")
    >>> float(loss.forward(np.array([[0.5, 0.5], [0.2, 0.8]]), np.array([0, 1])))
    0.916290731874155
    >>> loss.backward()
    array([[-2.  ,  0.  ],
           [ 0.  , -1.25]])
    """

    _log_input = False

    def backward(self, dloss: Array | float | None = None) -> Array:
        """d(loss)/d(pred) for the last :meth:`forward`, times the upstream ``dloss``."""
        p, g = self._logp_gradient(dloss)
        xp, prob = p.xp, p.x
        with np.errstate(all="ignore"):
            zero = prob == 0
            r = g / xp.where(zero, xp.ones_like(prob), prob)
            # d/dp of -q log(p) at p == 0: 0 where q == 0, else -inf (g * inf keeps the sign).
            at_zero = g * xp.where(g == 0, xp.zeros_like(g), xp.full_like(g, np.inf))
            return _finish(xp, restore(p, xp.where(zero, at_zero, r)), p.dtype)


class KLDivergence(_Loss):
    """Kullback-Leibler divergence ``KL(target || exp(pred))``, as ``torch.nn.functional.kl_div``.

    ``pred`` holds log-probabilities (the output of :class:`~xpsoftmax.LogSoftmax`), as torch's
    ``input``; ``target`` holds probabilities, or log-probabilities with ``log_target=True``.
    The elementwise loss is ``target * (log(target) - pred)``, and 0 where the target
    probability is 0 (torch gives NaN there when ``pred`` is ``-inf``).

    Parameters
    ----------
    reduction : {"batchmean", "mean", "sum", "none"}, optional
        ``"none"``: the elementwise terms; ``"sum"``: their sum; ``"batchmean"`` (default): the
        sum divided by ``pred.shape[0]`` (the batch size; 1 for a 0-d input), which is the true
        mean KL divergence per sample; ``"mean"``: the sum divided by the number of *elements*,
        as torch's ``reduction="mean"`` (not a divergence per sample).
    log_target : bool, optional
        Whether ``target`` holds log-probabilities (default False), as in torch.

    Notes
    -----
    ``KLDivergence(r, log_target=b)`` equals
    ``torch.nn.functional.kl_div(pred, target, reduction=r, log_target=b)`` for every ``r``,
    values and autograd gradients. ``backward(dloss=None)`` returns
    ``-target_probability * dloss`` divided as the reduction divides.

    Examples
    --------
    >>> import numpy as np
    >>> from xpsoftmax.losses import KLDivergence
    >>> loss = KLDivergence()
    >>> float(loss.forward(np.log(np.array([[0.5, 0.5]])), np.array([[0.5, 0.5]])))
    0.0
    >>> loss.backward()
    array([[-0.5, -0.5]])
    """

    _reductions = ("batchmean", "mean", "sum", "none")

    def __init__(self, reduction: str = "batchmean", *, log_target: bool = False) -> None:
        super().__init__(reduction)
        if not isinstance(log_target, bool):
            msg = f"log_target must be a bool, got {log_target!r}"
            raise TypeError(msg)
        self.log_target = log_target

    def __repr__(self) -> str:
        return f"KLDivergence(reduction={self.reduction!r}, log_target={self.log_target!r})"

    def forward(self, pred: Array, target: Array, /) -> Array:
        """``KL(target || exp(pred))``, elementwise and reduced."""
        xp, pred, target, dtype = _pair(pred, target)
        with np.errstate(all="ignore"):
            if self.log_target:
                prob, log_t = xp.exp(target), target
            else:
                prob, log_t = target, _safe_log(xp, target)
            dead = prob == 0  # no mass: the term is 0 whatever pred is
            zeros = xp.zeros_like(pred)
            diff = xp.where(dead, zeros, log_t) - xp.where(dead, zeros, pred)
            loss = _elementwise_reduce(xp, prob * diff, self.reduction, dtype)
        self._state = (xp, prob, dtype)
        return loss

    def backward(self, dloss: Array | float | None = None) -> Array:
        """d(loss)/d(pred) for the last :meth:`forward`, times the upstream ``dloss``."""
        xp, prob, dtype = self._saved()
        w = _elementwise_weight(xp, prob, self.reduction, dloss)
        with np.errstate(all="ignore"):
            return _finish(xp, 0.0 - prob * w, dtype)  # +0, not -0, where prob is 0
