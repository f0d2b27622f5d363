"""The torch-cpu backend: CPU tensors on the NumPy backend's compiled kernels, as torch custom ops.

The registry imports this module only when a CPU tensor arrives (and torch is then already
imported). The softmax family of float16/float32/float64 CPU tensors runs the NumPy backend's
:func:`~xpsoftmax.backends.numpy.forward` and :func:`~xpsoftmax.backends.numpy.product` on
zero-copy NumPy views of the tensors, through two operators registered with
``torch.library.custom_op``:

* ``torch.ops.xpsoftmax.forward(x, axes, mask, log)``: softmax or log-softmax;
* ``torch.ops.xpsoftmax.product(y, g, axes, mask, kind)``: the VJP/JVP products (``kind`` as in
  the NumPy backend: ``"softmax"``, ``"log_vjp"``, ``"log_jvp"``).

Each has a fake implementation (shapes and dtypes only, for ``torch.compile`` and meta tensors)
and an autograd formula: the backward of ``forward`` is ``product``; ``product`` is linear in
``g``, and its gradient with respect to ``g`` is ``product`` again (softmax: itself; the
log-softmax VJP and JVP are each other's transpose), so second derivatives run the kernels too;
the gradient with respect to ``y`` is a few torch operations (``torch_grads.py``). Autograd
(``backward``, ``autograd.grad``, double backward, ``gradcheck``) and
``torch.compile(fullgraph=True)`` of code that calls the operators work through them.

Taken: the row kinds on CPU tensors of those dtypes, on the compiled CPU path, outside
``XPSOFTMAX_NUMPY_FAST=0``. Left to the generic torch operations (which support them): calls
inside ``torch.func`` transforms (the ``autograd.Function`` that ``custom_op`` generates does not
support functorch in torch 2.13) and forward-mode AD (dual tensors: custom ops have no
forward-mode rule). ``out=`` receives a copy of the result (``backends.run``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .. import _config
from .._call import ROW_KINDS, Call, XentCall
from . import numpy as np_backend
from .torch_grads import _jvp_grad_y, _vjp_grad_y

__all__ = ["ops", "run", "takes"]

Tensor = torch.Tensor

_TAKEN = frozenset((torch.float16, torch.float32, torch.float64))
# Products of fewer elements take torch's own operations: on 16x8 float32 the custom op cost 33
# us a call against 17 us (forward: 25 against 40, so forward is always taken; 2026-12-02).
_SMALL_PRODUCT = 4096
_PRODUCT = {"vjp": ("softmax", "log_vjp"), "jvp": ("softmax", "log_jvp")}
# The transpose of each product with respect to its second argument.
_TRANSPOSE = {"softmax": "softmax", "log_vjp": "log_jvp", "log_jvp": "log_vjp"}


def takes(call: Call | XentCall) -> bool:
    if call.op.kind not in ROW_KINDS or not call.axes or not _config.numpy_fast():
        return False
    if np_backend.active_path()[0] != "compiled":
        return False  # the blocked NumPy code is no faster than torch's own operations
    if torch._C._functorch.maybe_current_level() is not None:
        # Inside torch.func transforms (grad, vjp, vmap, jacrev...): the autograd.Function that
        # custom_op generates does not support them (torch 2.13: "must override the
        # setup_context staticmethod"), so the generic torch operations run there.
        return False
    for a in call.arrays:
        if a.device.type != "cpu" or a.dtype not in _TAKEN or type(a) is not torch.Tensor:
            return False
        if _forward_ad(a):
            return False
    if call.op.kind != "forward" and call.x.numel() < _SMALL_PRODUCT:
        return False
    mask = call.mask
    return mask is None or (type(mask) is torch.Tensor and mask.device.type == "cpu")


def _forward_ad(t: Tensor) -> bool:
    """Whether ``t`` carries a forward-mode tangent (``torch.func.jvp``, dual tensors)."""
    try:
        return torch.autograd.forward_ad.unpack_dual(t).tangent is not None
    except RuntimeError:  # no forward-AD level active
        return False


def _np(t: Tensor | None) -> Any:
    return None if t is None else t.detach().numpy()


@functools.cache
def ops() -> tuple[Any, Any]:
    """The two custom operators, registered on first use."""

    @torch.library.custom_op("xpsoftmax::forward", mutates_args=(), device_types="cpu")
    def forward(x: Tensor, axes: list[int], mask: Tensor | None, log: bool) -> Tensor:
        return torch.from_numpy(np_backend.forward(_np(x), tuple(axes), _np(mask), log, None))

    @forward.register_fake
    def _(x, axes, mask, log):
        return x.new_empty(x.shape)

    @torch.library.custom_op("xpsoftmax::product", mutates_args=(), device_types="cpu")
    def product(y: Tensor, g: Tensor, axes: list[int], mask: Tensor | None, kind: str) -> Tensor:
        r = np_backend.product(_np(y), _np(g), tuple(axes), _np(mask), kind, None)
        return torch.from_numpy(r)

    @product.register_fake
    def _(y, g, axes, mask, kind):
        return y.new_empty(y.shape)

    def forward_context(ctx, inputs, output):
        _, axes, mask, log = inputs
        ctx.axes, ctx.log = axes, log
        ctx.save_for_backward(output, mask)

    def forward_backward(ctx, h):
        y, mask = ctx.saved_tensors
        kind = "log_vjp" if ctx.log else "softmax"
        return product(y, h.contiguous(), ctx.axes, mask, kind), None, None, None

    forward.register_autograd(forward_backward, setup_context=forward_context)

    def product_context(ctx, inputs, output):
        y, g, axes, mask, kind = inputs
        ctx.axes, ctx.kind = axes, kind
        ctx.save_for_backward(y, g, mask)

    def product_backward(ctx, h):
        y, g, mask = ctx.saved_tensors
        axes, kind = tuple(ctx.axes), ctx.kind
        dg = dy = None
        if ctx.needs_input_grad[1]:
            dg = product(y, h.contiguous(), ctx.axes, mask, _TRANSPOSE[kind])
        if ctx.needs_input_grad[0]:
            log = kind != "softmax"
            grad_y = _jvp_grad_y if kind == "log_jvp" else _vjp_grad_y
            dy = grad_y(y, g, h, axes, mask, log)
        return dy, dg, None, None, None

    product.register_autograd(product_backward, setup_context=product_context)
    return forward, product


def run(call: Call) -> Any:
    forward, product = ops()
    kind, log = call.op.kind, call.op.log
    axes = list(call.axes)
    if kind == "forward":
        return forward(call.x, axes, call.mask, log)
    return product(*call.arrays, axes, call.mask, _PRODUCT[kind][log])
