"""The NumPy backend: the softmax family on NumPy arrays, cache-blocked and multi-threaded.

``blocked.py`` holds the implementation (see its docstring for the geometry); this module is its
entry in the registry. Cross-entropy on NumPy takes the generic backend, whose log-softmax
sub-call comes back here.
"""

from __future__ import annotations

from typing import Any

from ..._call import ROW_KINDS, Call, XentCall
from . import blocked

__all__ = ["run", "takes"]


def takes(call: Call | XentCall) -> bool:
    """Row operations on arrays that ``blocked.takes`` accepts (float16/32/64 ndarrays...)."""
    return call.op.kind in ROW_KINDS and blocked.takes(call.arrays, call.axes, call.out)


def run(call: Call) -> Any:
    kind, log = call.op.kind, call.op.log
    if kind == "forward":
        return blocked.forward(call.x, call.axes, call.mask, log, call.out)
    product = "softmax" if not log else "log_vjp" if kind == "vjp" else "log_jvp"
    return blocked.product(*call.arrays, call.axes, call.mask, product, call.out)
