"""The NumPy backend: the softmax family on NumPy arrays, cache-blocked and multi-threaded.

``blocked.py`` holds the implementation (see its docstring for the geometry); this module is its
entry in the registry, and :func:`forward` and :func:`product` are the two entry points that
other backends (the torch CPU bridge) call on NumPy views. Cross-entropy on NumPy takes the
generic backend, whose log-softmax sub-call comes back here.
"""

from __future__ import annotations

from typing import Any

from ..._call import ROW_KINDS, Call, XentCall
from . import blocked

__all__ = ["forward", "product", "run", "takes"]

Array = Any


def takes(call: Call | XentCall) -> bool:
    """Row operations on arrays that ``blocked.takes`` accepts (float16/32/64 ndarrays...)."""
    return call.op.kind in ROW_KINDS and blocked.takes(call.arrays, call.axes, call.out)


def forward(
    x: Array, axes: tuple[int, ...], mask: Array | None, log: bool, out: Array | None
) -> Array:
    """softmax (``log=False``) or log-softmax of the ndarray ``x`` along ``axes`` (normalized,
    non-empty), ``mask`` broadcast to ``x``'s shape or None, into ``out`` when given."""
    return blocked.forward(x, axes, mask, log, out)


def product(
    y: Array, g: Array, axes: tuple[int, ...], mask: Array | None, kind: str, out: Array | None
) -> Array:
    """The VJP/JVP product ``kind`` (``"softmax"``, ``"log_vjp"``, ``"log_jvp"``) of the forward
    output ``y`` and the cotangent or tangent ``g``; arguments as in :func:`forward`."""
    return blocked.product(y, g, axes, mask, kind, out)


def run(call: Call) -> Any:
    kind, log = call.op.kind, call.op.log
    if kind == "forward":
        return forward(call.x, call.axes, call.mask, log, call.out)
    product_kind = "softmax" if not log else "log_vjp" if kind == "vjp" else "log_jvp"
    return product(*call.arrays, call.axes, call.mask, product_kind, call.out)
