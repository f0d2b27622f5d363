"""One validated call: what every public function builds at the boundary, and backends read.

The public functions (``ops/``) turn their arguments into one immutable :class:`Call` (softmax
family) or :class:`XentCall` (cross-entropy): the namespace, the arrays already in the result
dtype, normalized axes, the mask broadcast to the input's shape, the checked ``out``, the
operation (:class:`Op`) and the kernel mode in effect. Nothing below the boundary validates again;
a backend that needs a sub-operation (cross-entropy needs log-softmax, a Dask block needs the
operation on a block) derives a new :class:`Call` with :meth:`Call.derive`.

The checks raise the errors the public API documents: ``TypeError`` for a wrong kind of
argument, ``ValueError`` (``AxisError`` for axes) for a wrong value, with a message naming the
argument.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _compat, _config
from ._dtypes import TABLE

Array = Any
Axis = int | tuple[int, ...] | None

__all__ = ["Call", "Op", "XentCall", "finish", "make_call"]


# --------------------------------------------------------------------------------------------
# operations


@dataclass(frozen=True)
class Op:
    """An operation: its public name, its kind, and whether it is the log-softmax variant.

    ``kind`` is ``"forward"`` (one input ``x``), ``"vjp"`` or ``"jvp"`` (the forward output and a
    cotangent or tangent), ``"softmin"`` (one input ``x``: the softmax of ``-x``),
    ``"jacobian"`` (the forward output), ``"lse"`` (one input ``x``, reduced along the axes),
    ``"lse_vjp"`` (``x``, the logsumexp and its cotangent, both with the reduced axes kept as
    size 1), ``"xent"``, ``"xent_vjp"`` or ``"xent_target_vjp"`` (logits and targets, in an
    :class:`XentCall`; the last is the gradient with respect to probability targets).
    A backend takes only the kinds it names; the generic backend takes them all.
    """

    name: str
    kind: str
    log: bool = False


SOFTMAX = Op("softmax", "forward")
LOG_SOFTMAX = Op("log_softmax", "forward", log=True)
SOFTMAX_VJP = Op("softmax_backward", "vjp")
LOG_SOFTMAX_VJP = Op("log_softmax_backward", "vjp", log=True)
SOFTMAX_JVP = Op("softmax_jvp", "jvp")
LOG_SOFTMAX_JVP = Op("log_softmax_jvp", "jvp", log=True)
SOFTMIN = Op("softmin", "softmin")
JACOBIAN = Op("softmax_jacobian", "jacobian")
LOGSUMEXP = Op("logsumexp", "lse")
LOGSUMEXP_VJP = Op("logsumexp_backward", "lse_vjp")
CROSS_ENTROPY = Op("cross_entropy", "xent", log=True)
CROSS_ENTROPY_VJP = Op("cross_entropy_backward", "xent_vjp", log=True)
CROSS_ENTROPY_TARGET_VJP = Op("cross_entropy_backward", "xent_target_vjp", log=True)

#: The kinds whose result has the input's shape and whose rows normalize along ``axes``.
ROW_KINDS = frozenset(("forward", "vjp", "jvp"))


# --------------------------------------------------------------------------------------------
# the call objects


@dataclass(frozen=True, slots=True)
class Call:
    """A validated softmax-family call.

    Attributes
    ----------
    op : Op
    xp : namespace
        The array-API namespace of the inputs (array-api-compat's wrapper where there is one).
    arrays : tuple of arrays
        ``(x,)`` for a forward pass, ``(y, g)`` for a VJP or JVP: one shape, the result dtype.
    axes : tuple of int
        The softmax axes, sorted, distinct, non-negative (possibly empty).
    mask : array or None
        ``where``, broadcast to the inputs' shape.
    out : array or None
        A checked, writeable ``out`` of the inputs' namespace, shape and result dtype.
    dtype : dtype
        The result dtype.
    mode : str
        The kernel mode in effect when the call was made (``xpsoftmax.get_kernels()``).
    empty : bool
        Whether the inputs have no elements (the result is then an empty array, or for
        ``logsumexp`` over a size-0 axis ``-inf``).
    keepdims : bool
        ``logsumexp``: whether the result keeps the reduced axes as size 1.
    cast : bool
        Whether ``arrays`` are still in their input dtype, narrower than ``dtype`` (``dtype=``
        asked for an exact upcast). Only a backend with ``CASTS = True`` sees such a call
        (reading the narrow input and writing the wide result in one pass);
        :func:`xpsoftmax.backends.run` casts the arrays first for the others.
    """

    op: Op
    xp: Any
    arrays: tuple[Array, ...]
    axes: tuple[int, ...]
    mask: Array | None
    out: Array | None
    dtype: Any
    mode: str
    empty: bool = False
    keepdims: bool = False
    cast: bool = False

    @property
    def shape(self) -> tuple[Any, ...]:
        """The result's shape: the input's, or for ``logsumexp`` the reduced one."""
        shape = tuple(self.x.shape)
        return shape if self.op.kind != "lse" else reduced(shape, self.axes, self.keepdims)

    @property
    def x(self) -> Array:
        """The first array: the input of a forward pass, the forward output otherwise."""
        return self.arrays[0]

    lead = x  # the array whose type picks the backend (``XentCall.lead`` is its input)

    def derive(self, **changes: Any) -> Call:
        """This call with some fields replaced (a sub-operation, or one block of a Dask array).

        The caller vouches for the new fields: nothing is validated again.
        """
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class XentCall:
    """A validated cross-entropy call (also the input of the losses' shared code).

    Attributes
    ----------
    op : Op
        :data:`CROSS_ENTROPY`, :data:`CROSS_ENTROPY_VJP` or :data:`CROSS_ENTROPY_TARGET_VJP`.
    xp : namespace
    x_in : array
        The input (logits, or log-probabilities for the losses) in the result dtype: what the
        kernels read; :attr:`x` is it in the compute dtype, made on first use.
    dtype : dtype
        The dtype of the results.
    ctype : dtype
        The compute dtype: float32 for half precision, else ``dtype``.
    axis : int
        The class axis, non-negative.
    kind : {"index", "prob"}
    targets : array
        Class indices (int64; ignored entries replaced by 0) or probabilities (compute dtype,
        broadcast to the input's shape).
    index : array or None
        Class indices as int64 with ignored entries kept (what the kernels read).
    ignore : int or None
    valid : array of bool or None
        The counted samples: not ignored, and with an unmasked class where there is a mask;
        None when every sample counts.
    mask : array of bool or None
        ``where`` broadcast to the input's shape (a per-sample mask expanded along ``axis``).
    mode : str
        The kernel mode in effect.
    reduction : str
    eps : float
        The label smoothing.
    dloss : array or float or None
        The upstream gradient of the two VJPs (checked), else None.
    weight : array or None
        Class weights (1-D, one per class, compute dtype), or None.
    layout : tuple or None
        ``(shape, axes)`` when the input as given had several class axes ``axes`` (sorted):
        the arrays here have them moved to the end and flattened into ``axis``, the last
        (C order), and ``ops.cross_entropy.restore`` puts a gradient back into ``shape``.
        None for one class axis.
    """

    op: Op
    xp: Any
    x_in: Array
    dtype: Any
    ctype: Any
    axis: int
    kind: str
    targets: Array
    index: Array | None
    ignore: int | None
    valid: Array | None
    mask: Array | None
    mode: str = "auto"
    reduction: str = "mean"
    eps: float = 0.0
    dloss: Array | float | None = None
    weight: Array | None = None
    layout: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    empty = False  # the backends handle empty inputs themselves
    out = None  # cross-entropy has no out=
    cast = False  # nor dtype=

    @functools.cached_property
    def x(self) -> Array:
        """The input in the compute dtype (the generic path's; the kernels read ``x_in``)."""
        x = self.x_in
        return x if x.dtype == self.ctype else self.xp.astype(x, self.ctype)

    @property
    def lead(self) -> Array:
        """The array whose type picks the backend: the input as given."""
        return self.x_in

    @property
    def n_classes(self) -> int:
        return self.x_in.shape[self.axis]

    @property
    def loss_shape(self) -> tuple[int, ...]:
        return tuple(d for i, d in enumerate(self.x_in.shape) if i != self.axis)

    def derive(self, **changes: Any) -> XentCall:
        """This call with some fields replaced; nothing is validated again."""
        return dataclasses.replace(self, **changes)


def finish(result: Array, out: Array | None) -> Array:
    """``result``, written into ``out`` when one was given and the backend did not write there.

    The one place (with the torch bridge's own tensors) where ``out=`` is filled by a copy.
    """
    if out is None or result is out:
        return result
    out[...] = result
    return out


# --------------------------------------------------------------------------------------------
# validation helpers (also used by the cross-entropy and loss validation in ops/ and losses)


def namespace(x: Any, name: str) -> tuple[Any, Array]:
    """The array-API namespace of ``x``; array-likes (lists, scalars) become NumPy arrays."""
    if not _compat.is_array_api_obj(x):
        kind = type(x).__name__
        try:
            x = np.asarray(x)
        except Exception as exc:
            msg = f"{name} must be an array or array-like, got {kind}"
            raise TypeError(msg) from exc
        if x.dtype == object:
            msg = f"{name} must be a numeric array, got an object array from {kind}"
            raise TypeError(msg)
    return _compat.array_namespace(x), x


def same_namespace(xp: Any, a: Array, a_name: str, b: Array, b_name: str) -> Array:
    """Check that ``b`` lives in the namespace of ``a`` (array-likes are converted)."""
    if not _compat.is_array_api_obj(b):
        _, b = namespace(b, b_name)
        if _compat.is_numpy_array(a) or _compat.is_array_api_strict_namespace(xp):
            return xp.asarray(b)
        msg = (
            f"{b_name} must be an array of the same kind as {a_name} "
            f"({type(a).__module__}.{type(a).__qualname__}), got {type(b).__name__}"
        )
        raise TypeError(msg)
    if _compat.array_namespace(b) is not xp:
        msg = (
            f"{a_name} and {b_name} must come from the same array library, got "
            f"{type(a).__module__}.{type(a).__qualname__} and "
            f"{type(b).__module__}.{type(b).__qualname__}"
        )
        raise TypeError(msg)
    return b


# The table's NumPy/CuPy dtypes, checked first: xp.isdtype is slow and this runs on every call.
_NP_FLOATS = frozenset(np.dtype(name) for name in TABLE)


def float_dtype(xp: Any, x: Array, name: str) -> Any:
    """The floating dtype the result has for input ``x``."""
    dtype = x.dtype
    if isinstance(dtype, np.dtype) and dtype in _NP_FLOATS:
        # (array-api-strict dtypes hash like NumPy's and warn when compared with them)
        return dtype
    if isinstance(dtype, np.dtype) and dtype.name == "bfloat16":
        # ml_dtypes.bfloat16 (np.asarray of a JAX bfloat16 array): numpy.isdtype rejects it
        return dtype
    if xp.isdtype(dtype, "complex floating"):
        msg = f"{name} must be real, got complex dtype {dtype}"
        raise TypeError(msg)
    if xp.isdtype(dtype, "real floating"):
        return dtype
    if xp.isdtype(dtype, ("integral", "bool")):
        info = xp.__array_namespace_info__()
        return info.default_dtypes(device=_compat.device(x))["real floating"]
    msg = f"{name} must have a real numeric dtype, got {dtype}"
    raise TypeError(msg)


def _is_int(a: Any) -> bool:
    return not isinstance(a, bool) and isinstance(a, (int, np.integer))


def normalize_axes(axis: Axis, ndim: int) -> tuple[int, ...]:
    """Normalize ``axis`` to a sorted tuple of distinct non-negative ints."""
    if axis is None:
        return tuple(range(ndim))
    items = axis if isinstance(axis, tuple) else (axis,)
    if ndim == 0 and len(items) == 1 and _is_int(items[0]) and operator.index(items[0]) in (-1, 0):
        # A 0-d input has one element, its own row: axis -1 or 0 is accepted as torch accepts it
        # (torch.softmax(t, -1) of a 0-d t is 1), and means what axis=None means.
        return ()
    out = []
    for a in items:
        if not _is_int(a):
            msg = f"axis must be an int, a tuple of ints or None, got {axis!r}"
            raise TypeError(msg)
        a = operator.index(a)
        if not -ndim <= a < ndim:
            msg = f"axis {a} is out of bounds for an array of dimension {ndim}"
            raise np.exceptions.AxisError(msg)
        out.append(a % ndim)
    if len(set(out)) != len(out):
        msg = f"axis contains a repeated axis: {axis!r}"
        raise ValueError(msg)
    return tuple(sorted(out))


def _known(d: Any) -> bool:
    # Dask arrays of unknown chunk sizes have NaN (or None) entries in their shape.
    return d is not None and not (isinstance(d, float) and d != d)


def is_empty(shape: tuple[Any, ...]) -> bool:
    """Whether an array of ``shape`` has no elements (an unknown Dask size is not 0)."""
    return any(d == 0 for d in shape if _known(d))


def _same_shape(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Equal shapes; an unknown (Dask) size matches any size."""
    pairs = zip(a, b, strict=False)
    return len(a) == len(b) and all(p == q or not (_known(p) and _known(q)) for p, q in pairs)


def _broadcasts_to(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether shape ``a`` broadcasts to shape ``b``; an unknown (Dask) size matches any size."""
    pairs = zip(a[::-1], b[::-1], strict=False)
    return len(a) <= len(b) and all(p in (1, q) or not (_known(p) and _known(q)) for p, q in pairs)


def expand_axes(xp: Any, a: Array, axes: tuple[int, ...]) -> Array:
    """``a`` with a size-1 axis inserted at each of ``axes`` (sorted: each lands where it is in
    the full shape); ``expand_dims``, not ``reshape``, so unknown Dask sizes are fine."""
    for ax in axes:
        a = xp.expand_dims(a, axis=ax)
    return a


def mask(xp: Any, x: Array, where: Any) -> Array | None:
    """``where`` checked (boolean, broadcastable to ``x``) and broadcast to ``x``'s shape."""
    if where is None:
        return None
    if isinstance(where, bool):
        where = xp.asarray(where, device=_compat.device(x))
    where = same_namespace(xp, x, "x", where, "where")
    if not xp.isdtype(where.dtype, "bool"):
        msg = f"where must be a boolean array, got dtype {where.dtype}"
        raise TypeError(msg)
    w_shape, x_shape = tuple(where.shape), tuple(x.shape)
    if not _broadcasts_to(w_shape, x_shape):
        msg = f"where of shape {w_shape} does not broadcast to x of shape {x_shape}"
        raise ValueError(msg)
    if _same_shape(w_shape, x_shape):
        return where  # nothing to broadcast (Dask cannot broadcast to unknown sizes)
    return xp.broadcast_to(where, x.shape)


def _check_out(xp: Any, out: Any, shape: tuple[Any, ...], dtype: Any, ref: Array) -> None:
    if out is None:
        return
    if not _compat.is_array_api_obj(out) or _compat.array_namespace(out) is not xp:
        msg = (
            f"out must be an array of the same kind as the input "
            f"({type(ref).__module__}.{type(ref).__qualname__}), got {type(out).__name__}"
        )
        raise TypeError(msg)
    if _compat.is_numpy_array(out) and not out.flags.writeable:
        msg = "out is a read-only NumPy array; pass a writeable one"
        raise TypeError(msg)
    if not _compat.is_writeable_array(out):
        msg = (
            f"out= needs a writeable array; {type(out).__module__}.{type(out).__qualname__} "
            "arrays are immutable or lazy, use the returned array instead"
        )
        raise TypeError(msg)
    if tuple(out.shape) != tuple(shape):
        msg = f"out has shape {tuple(out.shape)}, expected {tuple(shape)}"
        raise ValueError(msg)
    if out.dtype != dtype:
        msg = f"out has dtype {out.dtype}, expected {dtype}"
        raise ValueError(msg)


def result_dtype(xp: Any, x: Array, dtype: Any) -> Any:
    """``dtype=`` checked: a real floating dtype of ``x``'s namespace (NumPy, and the libraries
    whose dtypes are NumPy's, also take what :class:`numpy.dtype` takes: ``"float32"``)."""
    if isinstance(x.dtype, np.dtype) and not isinstance(dtype, np.dtype):
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            pass  # (not a NumPy dtype: the check below says so)
    if isinstance(dtype, np.dtype) and dtype.name == "bfloat16":
        return dtype
    try:
        ok = xp.isdtype(dtype, "real floating")
    except Exception:  # (each library raises its own error for a non-dtype)
        ok = False
    if not ok:
        msg = f"dtype must be a real floating dtype of the input's library, got {dtype!r}"
        raise TypeError(msg)
    return dtype


def _widens(xp: Any, src: Any, dst: Any) -> bool:
    """Whether casting real floating ``src`` to real floating ``dst`` is an exact upcast."""
    if src == dst:
        return False
    try:
        return xp.finfo(src).bits < xp.finfo(dst).bits and xp.isdtype(src, "real floating")
    except Exception:  # (bfloat16 in a namespace that does not know it)
        return False


def validate(
    arrays: tuple[tuple[Any, str], ...],
    axis: Axis,
    where: Any,
    out: Any,
    dtype: Any = None,
    out_shape: Any = None,
):
    """Check the arguments: returns (xp, arrays, axes, mask, result dtype, cast).

    ``arrays`` pairs each array argument with its name (for the messages); all must come from
    one library and have one shape. The arrays come back in the result dtype, except when
    ``dtype=`` asks for an exact upcast of inputs of one dtype: then they keep their dtype and
    ``cast`` is True (see :attr:`Call.cast`). ``out_shape(shape, axes)`` gives the result's
    shape from the input's where they differ.
    """
    (x, x_name), *rest = arrays
    xp, x = namespace(x, x_name)
    items = [x]
    for b, b_name in rest:
        b = same_namespace(xp, x, x_name, b, b_name)
        if not _same_shape(tuple(b.shape), tuple(x.shape)):
            msg = (
                f"{x_name} and {b_name} must have the same shape, got "
                f"{tuple(x.shape)} and {tuple(b.shape)}"
            )
            raise ValueError(msg)
        items.append(b)
    dtypes = [float_dtype(xp, a, n) for a, (_, n) in zip(items, arrays, strict=True)]
    rtype = dtypes[0] if len(dtypes) == 1 else xp.result_type(*dtypes)
    cast = False
    if dtype is not None:
        rtype = result_dtype(xp, x, dtype)
        first = items[0].dtype
        cast = all(a.dtype == first for a in items) and _widens(xp, first, rtype)
    if not cast:
        items = [a if a.dtype == rtype else xp.astype(a, rtype) for a in items]
    axes = normalize_axes(axis, x.ndim)
    m = mask(xp, x, where)
    shape = tuple(x.shape) if out_shape is None else out_shape(tuple(x.shape), axes)
    _check_out(xp, out, shape, rtype, x)
    return xp, tuple(items), axes, m, rtype, cast


_np_namespace: list[Any] = []  # array-api-compat's NumPy namespace, found on first use


def _plain_numpy(op: Op, arrays: tuple[tuple[Any, str], ...], axis: Axis) -> Call | None:
    """The :class:`Call` of plain float ndarrays of one dtype and shape along one int axis, with
    neither ``where`` nor ``out``; None for anything else (which :func:`validate` then checks).

    The common NumPy call, validated in about a microsecond instead of four: tiny arrays feel
    every microsecond of the boundary.
    """
    x = arrays[0][0]
    if type(x) is not np.ndarray or x.dtype not in _NP_FLOATS or not _is_int(axis) or not x.ndim:
        return None
    for b, _ in arrays[1:]:
        if type(b) is not np.ndarray or b.dtype != x.dtype or b.shape != x.shape:
            return None
    ndim = x.ndim
    if not -ndim <= axis < ndim:  # type: ignore[operator]
        return None  # (normalize_axes raises the error)
    if not _np_namespace:
        _np_namespace.append(_compat.array_namespace(x))
    items = tuple(a for a, _ in arrays)
    empty = x.size == 0
    axes = (operator.index(axis) % ndim,)  # type: ignore[arg-type]
    return Call(
        op, _np_namespace[0], items, axes, None, None, x.dtype, _config.get_kernels(), empty
    )


def make_call(
    op: Op,
    arrays: tuple[tuple[Any, str], ...],
    axis: Axis,
    where: Any,
    out: Any,
    dtype: Any = None,
) -> Call:
    """Validate a softmax-family call once: the :class:`Call` that the backends run."""
    if where is None and out is None and dtype is None:
        call = _plain_numpy(op, arrays, axis)
        if call is not None:
            return call
    xp, items, axes, m, rtype, cast = validate(arrays, axis, where, out, dtype)
    empty = is_empty(tuple(items[0].shape))
    return Call(op, xp, items, axes, m, out, rtype, _config.get_kernels(), empty, cast=cast)


def reduced(shape: tuple[Any, ...], axes: tuple[int, ...], keepdims: bool) -> tuple[Any, ...]:
    """``shape`` reduced along ``axes``: those axes dropped, or kept as size 1."""
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def make_lse_call(x: Any, axis: Axis, where: Any, keepdims: Any, out: Any) -> Call:
    """Validate a ``logsumexp`` call: the :class:`Call` of :data:`LOGSUMEXP`."""
    if not isinstance(keepdims, (bool, np.bool_)):
        msg = f"keepdims must be a bool, got {keepdims!r}"
        raise TypeError(msg)
    keep = bool(keepdims)
    xp, items, axes, m, rtype, _ = validate(
        ((x, "x"),), axis, where, out, out_shape=lambda shape, axes: reduced(shape, axes, keep)
    )
    empty = is_empty(tuple(items[0].shape))
    mode = _config.get_kernels()
    return Call(LOGSUMEXP, xp, items, axes, m, out, rtype, mode, empty, keepdims=keep)


def make_lse_vjp_call(x: Any, lse: Any, dl: Any, axis: Axis, where: Any, out: Any) -> Call:
    """Validate a ``logsumexp_backward`` call: ``lse`` and ``dl`` of the reduced shape (with or
    without the reduced axes kept), come back with the reduced axes kept as size 1."""
    xp, x = namespace(x, "x")
    axes = normalize_axes(axis, x.ndim)
    shape = tuple(x.shape)
    kept, dropped = reduced(shape, axes, True), reduced(shape, axes, False)
    pair = []
    for a, name in ((lse, "lse"), (dl, "dl")):
        a = same_namespace(xp, x, "x", a, name)
        a_shape = tuple(a.shape)
        if _same_shape(a_shape, dropped) and not _same_shape(a_shape, kept):
            a = expand_axes(xp, a, axes)
        elif not _same_shape(a_shape, kept):
            msg = (
                f"{name} must have the shape of logsumexp(x, axis), {dropped} (or {kept} with "
                f"keepdims), got {a_shape}"
            )
            raise ValueError(msg)
        pair.append(a)
    dtypes = [float_dtype(xp, a, n) for a, n in ((x, "x"), (pair[0], "lse"), (pair[1], "dl"))]
    rtype = xp.result_type(*dtypes)
    items = tuple(a if a.dtype == rtype else xp.astype(a, rtype) for a in (x, *pair))
    m = mask(xp, x, where)
    _check_out(xp, out, shape, rtype, x)
    empty = is_empty(shape)
    return Call(LOGSUMEXP_VJP, xp, items, axes, m, out, rtype, _config.get_kernels(), empty)
