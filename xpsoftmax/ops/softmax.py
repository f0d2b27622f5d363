"""The softmax family: forward, backward (VJP) and JVP of softmax and log-softmax.

Each function validates its arguments once (:func:`xpsoftmax._call.make_call`) and hands the call
to the backend registry (:func:`xpsoftmax.backends.run`), which picks the NumPy, Dask, CuPy,
torch-CUDA or generic backend and fills ``out``.
"""

from __future__ import annotations

from typing import Any

from .. import backends
from .._call import (
    LOG_SOFTMAX,
    LOG_SOFTMAX_JVP,
    LOG_SOFTMAX_VJP,
    SOFTMAX,
    SOFTMAX_JVP,
    SOFTMAX_VJP,
    SOFTMIN,
    Axis,
    make_call,
)
from ._docs import doc, jvp_sections, pair_inputs

Array = Any
Mask = Array | None  # a boolean array, broadcastable to the input
Out = Array | None  # a writeable array of the result's shape and dtype
DType = Any | None  # a real floating dtype of the input's library

__all__ = [
    "log_softmax",
    "log_softmax_backward",
    "log_softmax_jvp",
    "softmax",
    "softmax_backward",
    "softmax_jvp",
    "softmin",
]


@doc()
def softmax(
    x: Array, /, axis: Axis = -1, *, where: Mask = None, out: Out = None, dtype: DType = None
):
    r"""Softmax along ``axis``: ``exp(x - max) / sum(exp(x - max))``.

    Parameters
    ----------
    x : array
        Logits, from any array-API library (NumPy, CuPy, PyTorch, JAX, Dask,
        array-api-strict); lists are converted with NumPy. Integer and boolean inputs promote to
        the namespace's default floating dtype; complex input raises ``TypeError``.
    axis : int or tuple of ints or None, optional
        Axis or axes along which softmax normalizes (default ``-1``); negative values count from
        the end, ``None`` means all axes, as in :func:`scipy.special.softmax`. An axis out of range
        raises :class:`numpy.exceptions.AxisError` (a ``ValueError``). A 0-d input is its own
        row: ``-1`` and ``0`` are accepted there as in :func:`torch.softmax` (the result is 1).
    where : array of bool, optional
        Broadcastable to ``x``. Entries where it is False are left out of the normalization and
        come out as exactly 0; a fully masked row is all 0, never NaN (``jax.nn.softmax``
        semantics).
    out : array, optional
        A writeable array (NumPy, CuPy, torch, array-api-strict) of ``x``'s shape and the result
        dtype to write into; it is returned. JAX and Dask arrays raise ``TypeError``.
    dtype : dtype, optional
        The result dtype, as torch's ``dtype=``: the input is cast to it before the operation
        (so ``dtype=float32`` on float16 input computes from the float16 values and returns
        float32). A real floating dtype of the input's library (NumPy also takes the names,
        ``"float32"``). An upcast is fused where a backend can: the NumPy path reads the
        narrow input and writes the wide result in one pass, with no full-size cast.

    Returns
    -------
    array
        Same namespace, device and shape as ``x``; the dtype of ``x`` (or ``dtype``); float16
        is accumulated in float32 and returned as float16.

    Notes
    -----
    The row maximum is subtracted first, so large logits do not overflow. ``-inf`` entries give
    exactly 0. A NaN poisons only its own row. A row that contains ``+inf`` gives the limit: its
    mass is split evenly over the ``+inf`` entries. A row of all ``-inf`` (without ``where``)
    is NaN, as in torch and scipy. Empty arrays and size-0 axes give empty results.

    $examples
    >>> xpsoftmax.softmax(np.array([0.0, np.log(3.0)]))
    array([0.25, 0.75])
    """
    return backends.run(make_call(SOFTMAX, ((x, "x"),), axis, where, out, dtype))


@doc()
def log_softmax(
    x: Array, /, axis: Axis = -1, *, where: Mask = None, out: Out = None, dtype: DType = None
):
    r"""Log-softmax along ``axis``: ``x - max - log(sum(exp(x - max)))``.

    Computed directly, not as ``log(softmax(x))``, so it stays finite where softmax underflows.

    Parameters
    ----------
    x : array
        Logits; see :func:`softmax` for the accepted types and dtype rules.
    axis : int or tuple of ints or None, optional
        As in :func:`softmax`.
    where : array of bool, optional
        Broadcastable to ``x``; masked entries come out as ``-inf`` and a fully masked row is all
        ``-inf``, never NaN.
    $out
    $dtype

    Returns
    -------
    array
        Same namespace, device, shape and dtype rules as :func:`softmax`. ``-inf`` inputs give
        ``-inf``; a row containing ``+inf`` gives ``-log(k)`` at its ``k`` ``+inf`` entries and
        ``-inf`` elsewhere.

    $examples
    >>> xpsoftmax.log_softmax(np.array([0.0, 0.0]))
    array([-0.69314718, -0.69314718])
    """
    return backends.run(make_call(LOG_SOFTMAX, ((x, "x"),), axis, where, out, dtype))


@doc()
def softmin(
    x: Array, /, axis: Axis = -1, *, where: Mask = None, out: Out = None, dtype: DType = None
):
    r"""Softmin along ``axis``: ``softmax(-x)``, as :func:`torch.nn.functional.softmin`.

    The NumPy path negates each block as it reads it; no negated copy of ``x`` is made.

    Parameters
    ----------
    x : array
        See :func:`softmax`.
    axis : int or tuple of ints or None, optional
        As in :func:`softmax`.
    where : array of bool, optional
        As in :func:`softmax`: masked entries are exactly 0, a fully masked row all 0.
    $out
    $dtype

    Returns
    -------
    array
        ``softmax(-x, axis)``, with the dtype rules of :func:`softmax`. ``-inf`` entries take
        the mass (split evenly between them); ``+inf`` entries give 0.

    Notes
    -----
    Its vector-Jacobian product from the output ``y = softmin(x)`` is
    ``-softmax_backward(y, dy)`` (the chain rule through ``-x``), its JVP
    ``-softmax_jvp(y, dx)``.

    $examples
    >>> xpsoftmax.softmin(np.array([0.0, np.log(3.0)]))
    array([0.75, 0.25])
    """
    return backends.run(make_call(SOFTMIN, ((x, "x"),), axis, where, out, dtype))


@doc(inputs=pair_inputs("y", "softmax", "dy", "The upstream gradient"))
def softmax_backward(
    y: Array,
    dy: Array,
    /,
    axis: Axis = -1,
    *,
    where: Mask = None,
    out: Out = None,
    dtype: DType = None,
):
    r"""Vector-Jacobian product of softmax, from its output: ``dx = y * (dy - sum(y * dy))``.

    This is how softmax passes a gradient back for *any* loss: ``dy`` is d(loss)/d(y), the
    result is d(loss)/d(x), and no Jacobian is formed.

    Parameters
    ----------
    $inputs
    where : array of bool, optional
        The forward pass's mask; masked entries get exactly 0 gradient and are left out of the
        sum, so a fully masked row gives 0 (finite even where ``dy`` is not).
    $out
    $dtype

    Returns
    -------
    array
        ``dx`` in the namespace, device and shape of ``y``, dtype ``result_type(y, dy)`` (or
        ``dtype``).

    Raises
    ------
    TypeError
        If ``y`` and ``dy`` come from different array libraries.
    ValueError
        If their shapes differ.

    $examples
    >>> y = xpsoftmax.softmax(np.array([1.0, 2.0, 3.0]))
    >>> dx = xpsoftmax.softmax_backward(y, np.array([1.0, 0.0, 0.0]))
    >>> bool(abs(dx.sum()) < 1e-15)
    True
    """
    call = make_call(SOFTMAX_VJP, ((y, "y"), (dy, "dy")), axis, where, out, dtype)
    return backends.run(call)


@doc(inputs=pair_inputs("ly", "log_softmax", "dy", "The upstream gradient"))
def log_softmax_backward(
    ly: Array,
    dy: Array,
    /,
    axis: Axis = -1,
    *,
    where: Mask = None,
    out: Out = None,
    dtype: DType = None,
):
    r"""Vector-Jacobian product of log-softmax, from its output: ``dx = dy - exp(ly) * sum(dy)``.

    Parameters
    ----------
    $inputs
    where : array of bool, optional
        The forward pass's mask; masked entries get exactly 0 gradient and are left out of the sum.
    $out
    $dtype

    Returns
    -------
    array
        ``dx`` in the namespace, device and shape of ``ly``.

    $examples
    >>> ly = xpsoftmax.log_softmax(np.array([0.0, 0.0]))
    >>> xpsoftmax.log_softmax_backward(ly, np.array([1.0, 0.0]))
    array([ 0.5, -0.5])
    """
    call = make_call(LOG_SOFTMAX_VJP, ((ly, "ly"), (dy, "dy")), axis, where, out, dtype)
    return backends.run(call)


@doc(sections=jvp_sections("y", "softmax"))
def softmax_jvp(y: Array, dx: Array, /, axis: Axis = -1, *, where: Mask = None):
    r"""Jacobian-vector product of softmax: the tangent of ``y`` for a tangent ``dx`` of ``x``.

    ``dy = y * (dx - sum(y * dx))``; the softmax Jacobian is symmetric, so this is the VJP formula.

    $sections

    $examples
    >>> y = xpsoftmax.softmax(np.zeros(4))
    >>> xpsoftmax.softmax_jvp(y, np.ones(4))  # shifting every logit changes nothing
    array([0., 0., 0., 0.])
    """
    return backends.run(make_call(SOFTMAX_JVP, ((y, "y"), (dx, "dx")), axis, where, None))


@doc(sections=jvp_sections("ly", "log_softmax"))
def log_softmax_jvp(ly: Array, dx: Array, /, axis: Axis = -1, *, where: Mask = None):
    r"""Jacobian-vector product of log-softmax: ``dly = dx - sum(exp(ly) * dx)``.

    $sections

    $examples
    >>> ly = xpsoftmax.log_softmax(np.zeros(2))
    >>> xpsoftmax.log_softmax_jvp(ly, np.array([1.0, 0.0]))
    array([ 0.5, -0.5])
    """
    return backends.run(make_call(LOG_SOFTMAX_JVP, ((ly, "ly"), (dx, "dx")), axis, where, None))
