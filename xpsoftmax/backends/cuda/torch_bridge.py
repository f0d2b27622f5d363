"""The torch-cuda backend: CUDA tensors on the fused kernels, zero-copy (DLPack), autograd kept.

The registry imports this module only when a CUDA tensor arrives. Each call views the tensors as
CuPy arrays with ``cupy.from_dlpack`` (no copy), runs the CuPy backend (``launch.py``) on torch's
current CUDA stream and on the tensor's device, and writes into a tensor that torch allocated, so
the result is an ordinary tensor owned by torch's caching allocator.

Autograd: when an input requires grad (and grad mode is on), the call goes through a
``torch.autograd.Function`` whose backward runs our kernels again:

* softmax / log-softmax: backward is the VJP kernel (``_Linear``);
* the VJP ``B(y, g) = J(y)^T g`` and the JVP ``T(y, t) = J(y) t`` are linear in ``g`` and ``t``,
  so the gradient of one with respect to its second argument is the other;
* their gradients with respect to ``y`` (needed for second derivatives through ``x``, such as a
  Hessian-vector product) are a few elementwise torch operations, written out in
  :func:`_vjp_grad_y` and :func:`_jvp_grad_y`;
* cross-entropy: backward is the fused gradient kernel with ``dloss`` the incoming gradient
  (``_CrossEntropy``; once differentiable: a second derivative of the loss takes the generic
  path, ``kernels("never")``).

``out=`` does not record autograd, as in torch: it raises ``RuntimeError`` when grad mode is on
and an input requires grad.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ... import _compat, _config, _dtypes
from ..._call import (
    CROSS_ENTROPY_VJP,
    LOG_SOFTMAX,
    LOG_SOFTMAX_JVP,
    LOG_SOFTMAX_VJP,
    SOFTMAX,
    SOFTMAX_JVP,
    SOFTMAX_VJP,
    Call,
    Op,
    XentCall,
    finish,
)
from ..._compat import cupy_installed as _cupy_importable
from ..torch_grads import jvp_grad_y as _jvp_grad_y
from ..torch_grads import vjp_grad_y as _vjp_grad_y
from . import launch

__all__ = ["run", "takes"]

Tensor = torch.Tensor
Axes = tuple[int, ...]


def takes(call: Call | XentCall) -> bool:
    """Whether the kernels take the call on CUDA tensors: CuPy installed, and what the CuPy
    backend takes (a kernel dtype, a form the kernels cover; never under ``"never"``).

    Under ``"always"`` a missing CuPy raises ``RuntimeError`` and another dtype ``TypeError``.
    """
    if call.mode != "never" and not _cupy_importable():
        if call.mode == "always":
            msg = (
                f"{_config.KERNELS_ENV}=always but CuPy is not installed, so the kernels cannot "
                "run on torch CUDA tensors; install the cuda12 or cuda13 extra"
            )
            raise RuntimeError(msg)
        return False
    return launch.takes(call)


# --------------------------------------------------------------------------------------------
# the launch: tensors -> CuPy views -> launch.run -> a torch-allocated result


class _StreamHandle:
    """A CUDA stream protocol object (``__cuda_stream__``) for a torch stream.

    ``cupy.cuda.Stream.from_external`` takes any object with this method; torch added the
    method to its own streams only recently, so we do not rely on it.
    """

    __slots__ = ("_stream",)

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self._stream = stream  # keeps the torch stream object alive while CuPy uses it

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self._stream.cuda_stream)


def _to_cupy(t: Tensor | None) -> Any:
    if t is None:
        return None
    import cupy

    if t.dtype == torch.bool:
        # A bool tensor is viewed as uint8 and back (same item size, any strides, broadcast
        # strides of 0 included), which does not depend on DLPack's boolean support.
        return cupy.from_dlpack(t.detach().view(torch.uint8)).view(cupy.bool_)
    return cupy.from_dlpack(t.detach())


@contextlib.contextmanager
def _on_stream(device: torch.device) -> Iterator[None]:
    """CuPy on ``device`` and on torch's current stream there."""
    import cupy

    stream = _StreamHandle(torch.cuda.current_stream(device))
    with cupy.cuda.Device(device.index), cupy.cuda.Stream.from_external(stream):
        yield


def _launch(
    op: Op, arrays: tuple[Tensor, ...], axes: Axes, mask: Tensor | None, out: Tensor | None
) -> Tensor:
    """Run ``op`` on the CuPy backend over tensors; return the result (``out``, or a new tensor).

    ``arrays`` is ``(x,)`` for the forward pass and ``(y, g)`` otherwise.
    """
    a = arrays[0]
    if out is None:
        out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    with _on_stream(a.device):
        cas = tuple(_to_cupy(t) for t in arrays)
        co = _to_cupy(out)
        xp = _compat.array_namespace(co)
        call = Call(op, xp, cas, axes, _to_cupy(mask), co, co.dtype, "auto")
        finish(launch.run(call), co)
    return out


# --------------------------------------------------------------------------------------------
# autograd Functions


class _Forward(torch.autograd.Function):
    """softmax or log-softmax; backward is the VJP kernel."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor | None, axes: Axes, log: bool) -> Tensor:
        y = _launch(LOG_SOFTMAX if log else SOFTMAX, (x,), axes, mask, None)
        ctx.axes, ctx.log = axes, log
        ctx.save_for_backward(y, mask)
        return y

    @staticmethod
    def backward(ctx, h: Tensor):
        y, mask = ctx.saved_tensors
        return _Linear.apply(y, h, mask, ctx.axes, ctx.log, "vjp"), None, None, None


class _Linear(torch.autograd.Function):
    """The VJP ``B(y, g)`` (``kind="vjp"``) or the JVP ``T(y, t)`` (``kind="jvp"``).

    Both are linear in their second argument, so its gradient is the other one (the JVP of the
    VJP, the VJP of the JVP); the gradients in ``y`` are :func:`_vjp_grad_y` and
    :func:`_jvp_grad_y`.
    """

    @staticmethod
    def forward(ctx, y: Tensor, g: Tensor, mask: Tensor | None, axes: Axes, log: bool, kind: str):
        r = _launch(_LINEAR_OPS[kind, log], (y, g), axes, mask, None)
        ctx.axes, ctx.log, ctx.kind = axes, log, kind
        ctx.save_for_backward(y, g, mask)
        return r

    @staticmethod
    def backward(ctx, h: Tensor):
        y, g, mask = ctx.saved_tensors
        gy = gg = None
        if ctx.needs_input_grad[1]:
            other = "jvp" if ctx.kind == "vjp" else "vjp"
            gg = _Linear.apply(y, h, mask, ctx.axes, ctx.log, other)
        if ctx.needs_input_grad[0]:
            grad_y = _vjp_grad_y if ctx.kind == "vjp" else _jvp_grad_y
            gy = grad_y(y, g, h, ctx.axes, mask, ctx.log)
        return gy, gg, None, None, None, None


_LINEAR_OPS = {
    ("vjp", False): SOFTMAX_VJP,
    ("vjp", True): LOG_SOFTMAX_VJP,
    ("jvp", False): SOFTMAX_JVP,
    ("jvp", True): LOG_SOFTMAX_JVP,
}


# --------------------------------------------------------------------------------------------
# the softmax family


def _needs_grad(*ts: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _rows(call: Call) -> Tensor:
    """A softmax-family call on CUDA tensors, through autograd when an input requires grad."""
    if _needs_grad(*call.arrays):
        if call.out is not None:
            msg = (
                "out= does not support automatic differentiation (as in torch), but an input "
                "requires grad; drop out= or call inside torch.no_grad()"
            )
            raise RuntimeError(msg)
        if call.op.kind == "forward":
            return _Forward.apply(call.x, call.mask, call.axes, call.op.log)
        return _Linear.apply(*call.arrays, call.mask, call.axes, call.op.log, call.op.kind)
    return _launch(call.op, call.arrays, call.axes, call.mask, call.out)


# --------------------------------------------------------------------------------------------
# cross-entropy


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(_dtypes.kernel_dtype(dtype).name)  # only kernel dtypes get here


def _xent_launch(p: XentCall, dloss: Tensor | float | None) -> Tensor:
    """The fused cross-entropy kernel (``p.op``) over CuPy views of ``p``'s tensors."""
    with _on_stream(p.x_in.device):
        x = _to_cupy(p.x_in)
        index = _to_cupy(p.index)
        q = p.derive(
            xp=_compat.array_namespace(x),
            x_in=x,
            dtype=_np_dtype(p.dtype),
            ctype=_np_dtype(p.ctype),
            targets=index,
            index=index,
            valid=_to_cupy(p.valid),
            dloss=_to_cupy(dloss) if isinstance(dloss, Tensor) else dloss,
        )
        r = launch.run(q)
        return torch.from_dlpack(r)


class _CrossEntropy(torch.autograd.Function):
    """The fused cross-entropy; backward is the fused gradient kernel, with ``dloss = h``."""

    @staticmethod
    def forward(ctx, logits: Tensor, call: XentCall) -> Tensor:
        ctx.call = call
        return _xent_launch(call, None)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, h: Tensor):
        call = ctx.call.derive(op=CROSS_ENTROPY_VJP)
        return _xent_launch(call, h.to(call.ctype).contiguous()), None


def _xent(call: XentCall) -> Tensor:
    if call.op.kind == "xent" and _needs_grad(call.x_in):
        return _CrossEntropy.apply(call.x_in, call)
    return _xent_launch(call, call.dloss)


def run(call: Call | XentCall) -> Tensor:
    """The call on the kernels, autograd recorded where an input requires grad."""
    return _xent(call) if isinstance(call, XentCall) else _rows(call)
