"""The NumPy backend: the softmax family on NumPy arrays, compiled or cache-blocked, threaded.

Two implementations of one contract (same results within rounding, the special values bit for
bit): ``compiled.py``, the numba kernels of ``kernels.py`` (the default), and ``blocked.py``,
NumPy calls over cache-sized blocks (where numba is missing or cannot compile, or with
``XPSOFTMAX_CPU=numpy``). ``blocked.py`` also holds what both share: the views, the ``out=``
aliasing rules and the thread pool. :func:`forward` and :func:`product` are the entry points
that other backends (the torch CPU bridge) call on NumPy views. Cross-entropy on NumPy takes the
generic backend, whose log-softmax sub-call comes back here, except on the compiled path the
common case (class indices along the last axis, no mask: ``xent.py``, fused kernels).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from ... import _config
from ..._call import ROW_KINDS, Call, XentCall
from . import blocked

__all__ = ["active_path", "forward", "product", "run", "takes"]

Array = Any

# The compiled module once imported, or the reason it is not used ("" until first asked).
_compiled: ModuleType | None = None
_unavailable = ""


def _implementation() -> ModuleType:
    """``compiled`` or ``blocked``, as ``XPSOFTMAX_CPU`` asks and numba allows."""
    global _compiled, _unavailable
    if _compiled is not None and _config.cpu_path() == "compiled":
        return _compiled
    if _unavailable or _config.cpu_path() != "compiled":
        return blocked
    try:
        from . import compiled
    except Exception as exc:  # numba missing, or a numba/llvmlite that fails to load
        _unavailable = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return blocked
    _compiled = compiled
    return compiled


def _fallback(exc: Exception) -> ModuleType:
    """Give up on the compiled path for this process after a numba error (not a user error)."""
    global _compiled, _unavailable
    _compiled, _unavailable = None, f"{type(exc).__name__}: {exc}".splitlines()[0]
    return blocked


def active_path() -> tuple[str, str]:
    """The CPU path NumPy arrays take now, ``("compiled" | "numpy", why)``; imports numba."""
    impl = _implementation()
    if impl is blocked:
        asked = _config.cpu_path()
        why = "XPSOFTMAX_CPU=numpy" if asked == "numpy" else f"numba unavailable ({_unavailable})"
        return "numpy", why
    import numba

    return "compiled", f"numba {numba.__version__}"


_XENT_KINDS = frozenset(("xent", "xent_vjp"))


#: It takes ``dtype=`` upcasts (:attr:`~xpsoftmax._call.Call.cast`) on the compiled path: each
#: block is converted in scratch as float16 is, and the result written in the wide dtype.
CASTS = True

# The kinds only the compiled path runs (the blocked path leaves them to the generic backend).
_COMPILED_KINDS = frozenset(("softmin", "lse", "lse_vjp"))


def _is_bfloat16(x: Any) -> bool:
    """A NumPy array of ``ml_dtypes.bfloat16`` (what ``np.asarray`` of a JAX bfloat16 array
    gives): only the compiled path takes it, computed in float32 per block as float16 is."""
    dtype = getattr(x, "dtype", None)
    return isinstance(dtype, np.dtype) and dtype.kind == "V" and dtype.name == "bfloat16"


def takes(call: Call | XentCall) -> bool:
    """Row operations on arrays that ``blocked.takes`` accepts (float16/32/64 ndarrays...);
    on the compiled path also softmin, logsumexp and its backward, ``dtype=`` upcasts, bfloat16
    arrays, and the cross-entropy calls that ``xent.takes`` accepts."""
    kind = call.op.kind
    if kind in _XENT_KINDS:
        if not _config.numpy_fast() or _implementation() is blocked:
            return False
        from . import xent

        return xent.takes(call)  # type: ignore[arg-type]
    if kind in ROW_KINDS and not call.cast:  # type: ignore[union-attr]
        if blocked.takes(call.arrays, call.axes, call.out):
            return True  # (the common call: nothing more is asked of it)
        if not _is_bfloat16(call.x):
            return False
    elif kind not in _COMPILED_KINDS and not call.cast:  # type: ignore[union-attr]
        return False
    if _implementation() is blocked:
        return False
    x = call.x
    dtypes = blocked._DTYPES | {x.dtype} if _is_bfloat16(x) else blocked._DTYPES
    if kind == "lse_vjp":
        return blocked.takes((x,), call.axes, call.out, dtypes) and all(
            type(a) is np.ndarray and a.dtype == x.dtype for a in call.arrays[1:]
        )
    return blocked.takes(call.arrays, call.axes, call.out, dtypes)


def _for_blocked(a: Array, dtype: np.dtype | None, neg: bool = False) -> Array:
    """``a`` as the blocked code takes it: cast to ``dtype`` (``dtype=``), negated (softmin)."""
    a = a if dtype is None else a.astype(dtype)
    return -a if neg else a


def forward(
    x: Array,
    axes: tuple[int, ...],
    mask: Array | None,
    log: bool,
    out: Array | None,
    dtype: np.dtype | None = None,
    neg: bool = False,
) -> Array:
    """softmax (``log=False``) or log-softmax of the ndarray ``x`` along ``axes`` (normalized,
    non-empty), ``mask`` broadcast to ``x``'s shape or None, into ``out`` when given; of
    ``-x`` with ``neg`` (softmin), in the wider ``dtype`` when given (``dtype=``)."""
    impl = _implementation()
    if impl is not blocked:
        try:
            return impl.forward(x, axes, mask, log, out, dtype, neg)
        except _numba_errors() as exc:  # pragma: no cover (a numba that cannot compile)
            impl = _fallback(exc)
    return blocked.forward(_for_blocked(x, dtype, neg), axes, mask, log, out)


def product(
    y: Array,
    g: Array,
    axes: tuple[int, ...],
    mask: Array | None,
    kind: str,
    out: Array | None,
    dtype: np.dtype | None = None,
) -> Array:
    """The VJP/JVP product ``kind`` (``"softmax"``, ``"log_vjp"``, ``"log_jvp"``) of the forward
    output ``y`` and the cotangent or tangent ``g``; arguments as in :func:`forward`."""
    impl = _implementation()
    if impl is not blocked:
        try:
            return impl.product(y, g, axes, mask, kind, out, dtype)
        except _numba_errors() as exc:  # pragma: no cover (a numba that cannot compile)
            impl = _fallback(exc)
    y, g = _for_blocked(y, dtype), _for_blocked(g, dtype)
    return blocked.product(y, g, axes, mask, kind, out)


def _numba_errors() -> type[Exception]:
    from numba.core.errors import NumbaError

    return NumbaError


def run(call: Call | XentCall) -> Any:
    kind, log = call.op.kind, call.op.log
    if kind in _XENT_KINDS:
        from . import xent

        return xent.run(call)  # type: ignore[arg-type]
    if kind == "lse":  # (logsumexp and its backward: the compiled path only, see takes)
        r = _implementation().logsumexp(call.x, call.axes, call.mask)
        return np.reshape(r, call.shape) if call.keepdims else r  # type: ignore[union-attr]
    if kind == "lse_vjp":
        return _implementation().logsumexp_backward(*call.arrays, call.axes, call.mask, call.out)
    dtype = call.dtype if call.cast else None  # type: ignore[union-attr]
    if kind in ("forward", "softmin"):
        return forward(call.x, call.axes, call.mask, log, call.out, dtype, kind == "softmin")
    product_kind = "softmax" if not log else "log_vjp" if kind == "vjp" else "log_jvp"
    return product(*call.arrays, call.axes, call.mask, product_kind, call.out, dtype)
