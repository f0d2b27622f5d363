"""Softmax and log-softmax as layers: ``forward`` keeps its output, ``backward`` applies the VJP.

A layer's ``backward(dy)`` takes d(loss)/d(output) from *any* loss and returns d(loss)/d(input)
through the vector-Jacobian product, so activations and losses compose as
``act.backward(loss.backward())``, the way a hand-written network chains its layers::

    y = act.forward(x)
    loss_value = loss.forward(y, target)
    dx = act.backward(loss.backward())

The work is done by :func:`~xpsoftmax.softmax`, :func:`~xpsoftmax.softmax_backward`,
:func:`~xpsoftmax.log_softmax` and :func:`~xpsoftmax.log_softmax_backward`, so the layers run on
every backend those functions take.
"""

from __future__ import annotations

from typing import Any

from ._call import Axis
from .ops.softmax import log_softmax, log_softmax_backward, softmax, softmax_backward

Array = Any

__all__ = ["LogSoftmax", "Softmax"]


class _Activation:
    _name = ""

    def __init__(self, axis: Axis = -1) -> None:
        self.axis = axis
        self._output: Array | None = None
        self._where: Array | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(axis={self.axis!r})"

    @property
    def output(self) -> Array | None:
        """The output of the last :meth:`forward`, or None before the first."""
        return self._output

    def _forward(self, x: Array, where: Array | None) -> Array:
        raise NotImplementedError

    def _vjp(self, y: Array, dy: Array, where: Array | None) -> Array:
        raise NotImplementedError

    def forward(self, x: Array, /, *, where: Array | None = None) -> Array:
        """Apply the activation along ``self.axis`` and keep the output (and ``where``)."""
        y = self._forward(x, where)
        self._output, self._where = y, where
        return y

    __call__ = forward

    def backward(self, dy: Array, /) -> Array:
        """d(loss)/d(x) from ``dy`` = d(loss)/d(output), for the input of the last forward.

        Raises
        ------
        RuntimeError
            If :meth:`forward` has not been called yet.
        ValueError
            If ``dy`` does not have the shape of the forward output.
        """
        y = self._output
        if y is None:
            msg = f"{type(self).__name__}.backward() called before forward(): no output to use"
            raise RuntimeError(msg)
        shape = getattr(dy, "shape", None)
        if shape is not None and tuple(shape) != tuple(y.shape):
            msg = (
                f"{type(self).__name__}.backward(): dy has shape {tuple(shape)}, but the forward "
                f"output has shape {tuple(y.shape)}"
            )
            raise ValueError(msg)
        return self._vjp(y, dy, self._where)


class Softmax(_Activation):
    """Softmax layer: ``forward`` is :func:`~xpsoftmax.softmax`, ``backward`` its VJP.

    Parameters
    ----------
    axis : int or tuple of ints or None, optional
        The axis or axes to normalize over, as in :func:`~xpsoftmax.softmax` (default ``-1``).

    Notes
    -----
    ``forward(x, *, where=None)`` returns ``y = softmax(x, axis, where=where)`` and keeps ``y``
    and ``where``. ``backward(dy)`` returns ``y * (dy - sum(y * dy, axis))``
    (:func:`~xpsoftmax.softmax_backward`): the upstream gradient passed *through* the softmax
    Jacobian, never the elementwise ``y * (1 - y) * dy``, which is wrong for softmax. Calling
    ``backward`` before ``forward`` raises ``RuntimeError``; a ``dy`` of another shape than the
    output raises ``ValueError``.

    Examples
    --------
    >>> import numpy as np
    >>> from xpsoftmax import Softmax
    >>> act = Softmax()
    >>> act.forward(np.array([0.0, np.log(3.0)]))
    array([0.25, 0.75])
    >>> act.backward(np.array([1.0, 0.0]))  # gradient of y[0]
    array([ 0.1875, -0.1875])
    """

    def _forward(self, x: Array, where: Array | None) -> Array:
        return softmax(x, self.axis, where=where)

    def _vjp(self, y: Array, dy: Array, where: Array | None) -> Array:
        return softmax_backward(y, dy, self.axis, where=where)


class LogSoftmax(_Activation):
    """Log-softmax layer: ``forward`` is :func:`~xpsoftmax.log_softmax`, ``backward`` its VJP.

    Parameters
    ----------
    axis : int or tuple of ints or None, optional
        The axis or axes to normalize over (default ``-1``).

    Notes
    -----
    ``forward(x, *, where=None)`` returns ``ly = log_softmax(x, axis, where=where)`` and keeps
    ``ly`` and ``where``; ``backward(dy)`` returns ``dy - exp(ly) * sum(dy, axis)``
    (:func:`~xpsoftmax.log_softmax_backward`). Errors as for :class:`Softmax`.

    Examples
    --------
    >>> import numpy as np
    >>> from xpsoftmax import LogSoftmax
    >>> act = LogSoftmax()
    >>> act.forward(np.zeros(2))
    array([-0.69314718, -0.69314718])
    >>> act.backward(np.array([1.0, 0.0]))
    array([ 0.5, -0.5])
    """

    def _forward(self, x: Array, where: Array | None) -> Array:
        return log_softmax(x, self.axis, where=where)

    def _vjp(self, y: Array, dy: Array, where: Array | None) -> Array:
        return log_softmax_backward(y, dy, self.axis, where=where)
