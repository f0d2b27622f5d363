"""The torch-cpu backend: CPU tensors on the NumPy backend's kernels, as torch custom operators.

The registry imports this module only when a CPU tensor arrives (torch is then imported
already). Two operators run the NumPy entry points (``backends/numpy``: :func:`forward` and
:func:`product`) on zero-copy NumPy views of the tensors (``t.detach().numpy()``, strides kept:
the NumPy backend handles strided and broadcast views itself) and write into a tensor that torch
allocated:

* ``torch.ops.xpsoftmax.forward(x, axes, mask, log)``: softmax or log-softmax;
* ``torch.ops.xpsoftmax.product(y, g, axes, mask, kind)``: the VJP/JVP products, ``kind`` one of
  ``"softmax"`` (its VJP and JVP are one product: the Jacobian is symmetric), ``"log_vjp"``,
  ``"log_jvp"``.

They are ``torch.library.custom_op`` operators (functional: ``mutates_args=()``) with

* a fake implementation (shape and dtype only), so ``torch.compile(fullgraph=True)`` puts them in
  its graph as single nodes (they are opaque to inductor, which calls them);
* autograd (``register_autograd``): the backward of ``forward`` is ``product`` (``"softmax"`` or
  ``"log_vjp"``); the gradient of a product with respect to ``g`` is the other product of the
  pair (products are linear in ``g``), and with respect to ``y`` the few elementwise torch
  operations of ``torch_grads.py``, so second derivatives (double backward, Hessian-vector
  products) work through the operators;
* a vmap rule (``register_vmap``): the batch dimension moved first and the axes shifted.

``torch.func`` (``grad``, ``vjp``, ``vmap``, ``jacrev``) works through the public functions: under
its transforms the calls go through ``autograd.Function`` wrappers of the operators (torch 2.13
refuses the Function it generates for a custom operator there). Forward-mode AD
(``torch.func.jvp``, ``jacfwd``, ``hessian``) has no rule and raises. ``torch.compile(fullgraph=
True)`` traces the operators; the public functions themselves break the graph (their kernel-mode
read, a ``ContextVar``, is not traceable by Dynamo).

``out=`` (no autograd, not under ``torch.compile``): the kernels write into the NumPy view of a
CPU ``out`` tensor directly, no copy; elsewhere ``out`` is filled by the registry's copy, as on
the generic path. Under the ``"never"`` kernel mode, for bfloat16 (NumPy has no bfloat16, and a
float32 copy would be a full-size cast) and for VJP/JVP calls of few elements (see
``_MIN_PRODUCT_ELEMS``), CPU tensors take the generic backend (torch operations).

Examples
--------
>>> import torch, xpsoftmax
>>> xpsoftmax.softmax(torch.tensor([0.0, 0.0]))  # registers the operators on first use
tensor([0.5000, 0.5000])
>>> y, g = torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])
>>> torch.ops.xpsoftmax.product(y, g, [0], None, "softmax")
tensor([ 0.2500, -0.2500])
"""

from typing import Any

import numpy as np
import torch

from .._call import ROW_KINDS, Call
from . import numpy as _np
from .torch_grads import jvp_grad_y, vjp_grad_y

__all__ = ["forward_op", "product_op", "run", "takes"]

Tensor = torch.Tensor

_DTYPES = frozenset((torch.float16, torch.float32, torch.float64))

# The products: (kind of the call, log) -> the NumPy backend's product kind, and the product
# that is the gradient of each with respect to its second argument.
_PRODUCT = {("vjp", False): "softmax", ("jvp", False): "softmax"}
_PRODUCT.update({("vjp", True): "log_vjp", ("jvp", True): "log_jvp"})
_TRANSPOSE = {"softmax": "softmax", "log_vjp": "log_jvp", "log_jvp": "log_vjp"}

# Products (VJP/JVP calls) of fewer elements take the generic torch ops, which are faster there:
# measured 2026-12-02 (2 cores, torch 2.13, float32) per call, operator / generic: (16, 8)
# 48 / 18 us, (64, 256) 49 / 21 us, (128, 512) 64 / 37 us; (4096, 1024) 2.3 / 17.6 ms. The
# forward operator is at least as fast from (16, 8) on (39 / 40 us).
_MIN_PRODUCT_ELEMS = 1 << 17


def _cpu(t: Any) -> bool:
    return isinstance(t, Tensor) and t.device.type == "cpu"


def takes(call: Call) -> bool:
    """Row operations on CPU tensors of one dtype of float16/32/64, at least one dimension and
    one softmax axis, a CPU mask; not under the ``"never"`` kernel mode."""
    if call.mode == "never" or call.op.kind not in ROW_KINDS or not call.axes:
        return False
    a = call.arrays[0]
    if a.dtype not in _DTYPES or a.ndim == 0:
        return False
    for b in call.arrays:
        if not _cpu(b) or b.dtype != a.dtype:
            return False
    if call.op.kind != "forward" and a.numel() < _MIN_PRODUCT_ELEMS:
        return False
    return call.mask is None or _cpu(call.mask)


# --------------------------------------------------------------------------------------------
# the operators


def _view(t: Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().numpy()


@torch.library.custom_op("xpsoftmax::forward", mutates_args=(), device_types="cpu")
def forward_op(x: Tensor, axes: list[int], mask: Tensor | None, log: bool) -> Tensor:
    """softmax (``log=False``) or log-softmax of ``x`` along ``axes`` (normalized, non-empty).

    Examples
    --------
    >>> import torch, xpsoftmax.backends.torch_cpu as tc
    >>> tc.forward_op(torch.tensor([0.0, 0.0]), [0], None, False)
    tensor([0.5000, 0.5000])
    """
    out = torch.empty(x.shape, dtype=x.dtype)
    if out.numel():
        with np.errstate(all="ignore"):
            _np.forward(_view(x), tuple(axes), _view(mask), log, out.numpy())
    return out


@torch.library.custom_op("xpsoftmax::product", mutates_args=(), device_types="cpu")
def product_op(y: Tensor, g: Tensor, axes: list[int], mask: Tensor | None, kind: str) -> Tensor:
    """The product ``kind`` (``"softmax"``, ``"log_vjp"``, ``"log_jvp"``) of the forward output
    ``y`` and the cotangent or tangent ``g``.

    Examples
    --------
    >>> import torch, xpsoftmax.backends.torch_cpu as tc
    >>> tc.product_op(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]), [0], None, "softmax")
    tensor([ 0.2500, -0.2500])
    """
    out = torch.empty(y.shape, dtype=y.dtype)
    if out.numel():
        with np.errstate(all="ignore"):
            _np.product(_view(y), _view(g), tuple(axes), _view(mask), kind, out.numpy())
    return out


@forward_op.register_fake
def _(x: Tensor, axes: list[int], mask: Tensor | None, log: bool) -> Tensor:
    return x.new_empty(x.shape)


@product_op.register_fake
def _(y: Tensor, g: Tensor, axes: list[int], mask: Tensor | None, kind: str) -> Tensor:
    return y.new_empty(y.shape)


# autograd


def _forward_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    _, axes, mask, log = inputs
    ctx.axes, ctx.log = axes, log
    ctx.save_for_backward(output, mask)


def _forward_backward(ctx: Any, h: Tensor):
    y, mask = ctx.saved_tensors
    kind = "log_vjp" if ctx.log else "softmax"
    return _product(y, h, ctx.axes, mask, kind), None, None, None


def _product_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    y, g, axes, mask, kind = inputs
    ctx.axes, ctx.kind = axes, kind
    ctx.save_for_backward(y, g, mask)


def _product_backward(ctx: Any, h: Tensor):
    y, g, mask = ctx.saved_tensors
    gy = gg = None
    if ctx.needs_input_grad[1]:
        gg = _product(y, h, ctx.axes, mask, _TRANSPOSE[ctx.kind])
    if ctx.needs_input_grad[0]:
        grad_y = jvp_grad_y if ctx.kind == "log_jvp" else vjp_grad_y
        gy = grad_y(y, g, h, tuple(ctx.axes), mask, ctx.kind != "softmax")
    return gy, gg, None, None, None


forward_op.register_autograd(_forward_backward, setup_context=_forward_setup)
product_op.register_autograd(_product_backward, setup_context=_product_setup)


# Under torch.func transforms (grad, vjp, jacrev) torch (2.13) refuses the autograd Function it
# generates for a custom operator (it has no setup_context); these Functions, with the same
# formulas, wrap the operators there (vmap: generated from the operators' vmap rules).


class _Forward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, axes, mask, log):
        return forward_op(x, axes, mask, log)

    setup_context = staticmethod(_forward_setup)
    backward = staticmethod(_forward_backward)


class _Product(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(y, g, axes, mask, kind):
        return product_op(y, g, axes, mask, kind)

    setup_context = staticmethod(_product_setup)
    backward = staticmethod(_product_backward)


def _transforms() -> bool:
    return torch._C._are_functorch_transforms_active()


def _forward(x: Tensor, axes: list[int], mask: Tensor | None, log: bool) -> Tensor:
    """The forward operator, through :class:`_Forward` under ``torch.func`` transforms."""
    return _Forward.apply(x, axes, mask, log) if _transforms() else forward_op(x, axes, mask, log)


def _product(y: Tensor, g: Tensor, axes: list[int], mask: Tensor | None, kind: str) -> Tensor:
    """The product operator, through :class:`_Product` under ``torch.func`` transforms."""
    if _transforms():
        return _Product.apply(y, g, axes, mask, kind)
    return product_op(y, g, axes, mask, kind)


# vmap: the batch dimension first, the axes shifted by one


def _batched(t: Tensor | None, dim: int | None, size: int) -> Tensor | None:
    if t is None:
        return None
    return t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)


def _forward_vmap(info: Any, in_dims: tuple[Any, ...], x, axes, mask, log):
    n = info.batch_size
    x, mask = _batched(x, in_dims[0], n), _batched(mask, in_dims[2], n)
    return forward_op(x, [a + 1 for a in axes], mask, log), 0


def _product_vmap(info: Any, in_dims: tuple[Any, ...], y, g, axes, mask, kind):
    n = info.batch_size
    y, g, mask = (
        _batched(y, in_dims[0], n),
        _batched(g, in_dims[1], n),
        _batched(mask, in_dims[3], n),
    )
    return product_op(y, g, [a + 1 for a in axes], mask, kind), 0


torch.library.register_vmap(forward_op, _forward_vmap)
torch.library.register_vmap(product_op, _product_vmap)


# --------------------------------------------------------------------------------------------
# the backend


def _direct_out(call: Call) -> bool:
    """Whether the kernels can write into ``call.out``'s NumPy view: a CPU tensor, no autograd
    to record, not being traced by ``torch.compile``."""
    out = call.out
    if out is None or not _cpu(out) or out.requires_grad:
        return False
    if torch.is_grad_enabled() and any(a.requires_grad for a in call.arrays):
        return False
    return not torch.compiler.is_compiling()


def run(call: Call) -> Tensor:
    """The call on the operators (autograd recorded by them where an input requires grad)."""
    kind, log, axes, mask = call.op.kind, call.op.log, list(call.axes), call.mask
    if _direct_out(call):
        view = call.out.numpy()
        with np.errstate(all="ignore"):
            if kind == "forward":
                _np.forward(_view(call.x), call.axes, _view(mask), log, view)
            else:
                y, g = (_view(a) for a in call.arrays)
                _np.product(y, g, call.axes, _view(mask), _PRODUCT[kind, log], view)
        return call.out
    if kind == "forward":
        return _forward(call.x, axes, mask, log)
    return _product(*call.arrays, axes, mask, _PRODUCT[kind, log])
