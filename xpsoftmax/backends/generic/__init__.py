"""The generic backend: pure array-API code for every operation, on every namespace.

It is the last entry of the registry and takes every call: the reference the other backends are
tested against, and the fallback for the inputs they leave (other dtypes, ``XPSOFTMAX_KERNELS=
never``, torch on the CPU, JAX, array-api-strict, cross-entropy and the Jacobian on Dask).
"""

from __future__ import annotations

from typing import Any

from ..._call import Call, XentCall
from . import cross_entropy, softmax

__all__ = ["run", "takes"]


def takes(call: Call | XentCall) -> bool:
    """Every call."""
    return True


def run(call: Call | XentCall) -> Any:
    """The operation of ``call`` in array-API code (``out`` is left to the registry)."""
    kind, xp = call.op.kind, call.xp
    if kind == "forward":
        return softmax.forward(xp, call.x, call.axes, call.mask, call.op.log)
    if kind == "vjp":
        return softmax.backward(xp, *call.arrays, call.axes, call.mask, call.op.log)
    if kind == "jvp":
        return softmax.jvp(xp, *call.arrays, call.axes, call.mask, call.op.log)
    if kind == "softmin":
        return softmax.forward(xp, -call.x, call.axes, call.mask, log=False)
    if kind == "lse":
        return softmax.logsumexp(xp, call.x, call.axes, call.mask, call.keepdims)
    if kind == "lse_vjp":
        return softmax.logsumexp_backward(xp, *call.arrays, call.axes, call.mask)
    if kind == "jacobian":
        return softmax.jacobian(xp, call.x)
    if kind == "xent":
        return cross_entropy.forward(call)
    if kind == "xent_vjp":
        return cross_entropy.backward(call)
    if kind == "xent_target_vjp":
        return cross_entropy.target_gradient(call)
    msg = f"the generic backend has no operation {call.op.name!r}"
    raise NotImplementedError(msg)
