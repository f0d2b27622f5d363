"""``logsumexp`` and its backward: the row statistic of softmax as a reduction of its own.

The same validation boundary and backend registry as the softmax family: one pass over the
input on the NumPy path (the compiled kernels' row maximum and sum, without the output array
softmax writes), the split-axis statistics on Dask, the generic array-API code elsewhere.
"""

from __future__ import annotations

from typing import Any

from .. import backends
from .._call import Axis, make_lse_call, make_lse_vjp_call
from ._docs import doc

Array = Any

__all__ = ["logsumexp", "logsumexp_backward"]


@doc()
def logsumexp(
    x: Array,
    /,
    axis: Axis = -1,
    *,
    where: Array | None = None,
    keepdims: bool = False,
    out: Array | None = None,
):
    r"""``log(sum(exp(x)))`` along ``axis``, without overflow: ``max + log(sum(exp(x - max)))``.

    As :func:`scipy.special.logsumexp`, :func:`torch.logsumexp` and
    :func:`jax.nn.logsumexp` (with ``where``). It is the normalizer of
    :func:`~xpsoftmax.log_softmax`: ``log_softmax(x) == x - logsumexp(x, keepdims=True)``.

    Parameters
    ----------
    x : array
        Any array-API array (see :func:`~xpsoftmax.softmax` for the dtype rules: integers
        promote to the default floating dtype, float16 is accumulated in float32).
    axis : int or tuple of ints or None, optional
        The axis or axes to reduce (default ``-1``, the last, as :func:`~xpsoftmax.softmax`;
        scipy's default is ``None``, every axis). A 0-d input accepts ``-1``, ``0`` and
        ``None`` and gives itself.
    where : array of bool, optional
        Broadcastable to ``x``; entries where it is False are left out. A fully masked row
        gives ``-inf`` (the log of an empty sum), as in JAX.
    keepdims : bool, optional
        Keep the reduced axes as size 1, so the result broadcasts against ``x``.
    out : array, optional
        A writeable array of the result's shape and dtype (see :func:`~xpsoftmax.softmax`).

    Returns
    -------
    array
        The input's namespace, device and dtype; ``x``'s shape without the reduced axes (or
        with them as size 1). A row containing ``+inf`` gives ``+inf``; a row of ``-inf``
        gives ``-inf``; a NaN poisons its row only. A size-0 axis gives ``-inf``.

    $examples
    >>> float(xpsoftmax.logsumexp(np.array([1000.0, 1000.0])))  # no overflow
    1000.6931471805599
    >>> xpsoftmax.logsumexp(np.array([[0.0, -np.inf], [-np.inf, -np.inf]]))
    array([  0., -inf])
    """
    return backends.run(make_lse_call(x, axis, where, keepdims, out))


@doc()
def logsumexp_backward(
    x: Array,
    lse: Array,
    dl: Array,
    /,
    axis: Axis = -1,
    *,
    where: Array | None = None,
    out: Array | None = None,
):
    r"""Vector-Jacobian product of :func:`logsumexp`: ``dx = exp(x - lse) * dl``.

    The gradient of ``logsumexp`` is the softmax of ``x``; from the forward result ``lse`` it
    takes one pass over ``x`` with no reduction. ``dl`` (the upstream gradient d(loss)/d(lse))
    is broadcast along the reduced axes.

    Parameters
    ----------
    x : array
        The forward input.
    lse : array
        The forward result ``logsumexp(x, axis, where=where)``, with or without
        ``keepdims``; same namespace as ``x``.
    dl : array
        The upstream gradient, of the shape of ``lse``.
    axis : int or tuple of ints or None, optional
        The axis the forward pass reduced.
    where : array of bool, optional
        The forward pass's mask: masked entries get exactly 0, a fully masked row all 0.
    out : array, optional
        A writeable array of ``x``'s shape and the result dtype.

    Returns
    -------
    array
        ``d(loss)/d(x)``: the namespace, device and shape of ``x``, dtype
        ``result_type(x, lse, dl)``.

    Notes
    -----
    A row whose ``lse`` is ``+inf`` gets the limit of the gradient, as
    :func:`~xpsoftmax.softmax` gives the limit of its value: ``dl`` split evenly over the
    row's ``+inf`` entries and 0 elsewhere, where torch and JAX give NaN at those entries.
    A row of ``-inf`` (``lse`` is ``-inf``) is NaN, as its softmax is.

    $examples
    >>> x = np.array([0.0, np.log(3.0)])
    >>> lse = xpsoftmax.logsumexp(x)
    >>> xpsoftmax.logsumexp_backward(x, lse, np.asarray(1.0))  # the softmax of x
    array([0.25, 0.75])
    """
    return backends.run(make_lse_vjp_call(x, lse, dl, axis, where, out))
