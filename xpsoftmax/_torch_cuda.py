"""PyTorch CUDA tensors on the fused kernels: zero-copy through DLPack, autograd kept.

``_dispatch`` imports this module only when a CUDA tensor arrives and CuPy is importable. Each
call views the tensors as CuPy arrays with ``cupy.from_dlpack`` (no copy), lets ``_cupy`` launch
the kernel on torch's current CUDA stream, and writes into a tensor that torch allocated, so the
result is an ordinary tensor owned by torch's caching allocator.

Autograd: when an input requires grad (and grad mode is on), the call goes through a
``torch.autograd.Function`` whose backward runs our kernels again:

* softmax / log-softmax: backward is the VJP kernel (``_Backward``);
* the VJP ``B(y, g) = J(y)^T g`` and the JVP ``T(y, t) = J(y) t`` are linear in ``g`` and ``t``,
  so the gradient of one with respect to its second argument is the other;
* their gradients with respect to ``y`` (needed for second derivatives through ``x``, such as a
  Hessian-vector product) are a few elementwise torch operations, written out in
  :func:`_vjp_grad_y` and :func:`_jvp_grad_y`.

``out=`` does not record autograd, as in torch: it raises ``RuntimeError`` when grad mode is on
and an input requires grad.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _compat

__all__ = ["backward", "forward", "jvp", "takes"]

Tensor = torch.Tensor
Axes = tuple[int, ...]

_DTYPES = (torch.float16, torch.float32, torch.float64)


def takes(x: Tensor, always: bool) -> bool:
    """Whether the kernels take the CUDA tensor ``x`` (float16, float32 or float64).

    ``_dispatch`` calls it only for CUDA tensors, after the result dtype has been worked out.
    With ``always=True`` (``XPSOFTMAX_KERNELS=always``) another dtype raises ``TypeError``
    instead of returning False.
    """
    if x.dtype in _DTYPES:
        return True
    if always:
        msg = (
            "XPSOFTMAX_KERNELS=always, but the CUDA kernels take float16, float32 and float64 "
            f"tensors, got dtype {x.dtype}; use kernels('auto') to send it to the generic path"
        )
        raise TypeError(msg)
    return False


# --------------------------------------------------------------------------------------------
# the launch: tensors -> CuPy views -> _cupy -> a torch-allocated result


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


def _to_cupy(t: Tensor) -> Any:
    import cupy

    return cupy.from_dlpack(t.detach())


def _mask_to_cupy(mask: Tensor | None) -> Any:
    if mask is None:
        return None
    import cupy

    # A bool tensor is viewed as uint8 and back (same item size, any strides, broadcast
    # strides of 0 included), which does not depend on DLPack's boolean support.
    return _to_cupy(mask.view(torch.uint8)).view(cupy.bool_)


def _launch(
    op: str,
    a: Tensor,
    b: Tensor | None,
    axes: Axes,
    mask: Tensor | None,
    log: bool,
    out: Tensor | None,
) -> Tensor:
    """Run ``_cupy.<op>`` (``forward``, ``backward`` or ``jvp``) on tensors; return the result.

    ``a`` is ``x`` for the forward pass and ``y`` otherwise; ``b`` is the cotangent or tangent.
    The result is written into ``out``, or into a new contiguous tensor.
    """
    import cupy

    from . import _cupy

    device = a.device
    if out is None:
        out = torch.empty(a.shape, dtype=a.dtype, device=device)
    stream = _StreamHandle(torch.cuda.current_stream(device))
    with cupy.cuda.Device(device.index), cupy.cuda.Stream.from_external(stream):
        ca = _to_cupy(a)
        co = _to_cupy(out)
        cm = _mask_to_cupy(mask)
        xp = _compat.array_namespace(ca)
        if op == "forward":
            r = _cupy.forward(xp, ca, axes, cm, log, co)
        else:
            cb = _to_cupy(b)  # type: ignore[arg-type]
            r = getattr(_cupy, op)(xp, ca, cb, axes, cm, log, co)
        if r is not co:
            co[...] = r
    return out


# --------------------------------------------------------------------------------------------
# gradients with respect to y of the VJP and the JVP (elementwise torch operations)


def _keep(mask: Tensor | None, v: Tensor) -> Tensor:
    """``v`` with masked entries set to exactly 0 (a ``where``, so ``inf * 0`` cannot appear)."""
    return (
        v if mask is None else torch.where(mask, v, torch.zeros((), dtype=v.dtype, device=v.device))
    )


def _rowsum(v: Tensor, axes: Axes) -> Tensor:
    return torch.sum(v, dim=axes, keepdim=True) if axes else v


def _upcast(*ts: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.float() if t.dtype == torch.float16 else t for t in ts)


def _vjp_grad_y(y: Tensor, g: Tensor, h: Tensor, axes: Axes, mask: Tensor | None, log: bool):
    """``h^T dB/dy`` for the VJP ``B(y, g)``.

    softmax: ``B = y (g - sum(y g))``, so the gradient is ``h (g - sum(y g)) - g sum(h y)``;
    log-softmax: ``B = g - exp(y) sum(g)``, so it is ``-h exp(y) sum(g)``. Masked entries are
    left out of the sums and get 0.
    """
    dtype = y.dtype
    y, g, h = _upcast(y, g, h)
    if log:
        r = -h * torch.exp(y) * _rowsum(_keep(mask, g), axes)
    else:
        s = _rowsum(_keep(mask, y * g), axes)
        r = h * (g - s) - g * _rowsum(_keep(mask, h * y), axes)
    return _keep(mask, r).to(dtype)


def _jvp_grad_y(y: Tensor, t: Tensor, h: Tensor, axes: Axes, mask: Tensor | None, log: bool):
    """``h^T dT/dy`` for the JVP ``T(y, t)``.

    softmax's JVP is its VJP; log-softmax: ``T = t - sum(exp(y) t)``, so the gradient is
    ``-exp(y) t sum(h)``.
    """
    if not log:
        return _vjp_grad_y(y, t, h, axes, mask, log)
    dtype = y.dtype
    y, t, h = _upcast(y, t, h)
    r = -torch.exp(y) * t * _rowsum(_keep(mask, h), axes)
    return _keep(mask, r).to(dtype)


# --------------------------------------------------------------------------------------------
# autograd Functions


class _Forward(torch.autograd.Function):
    """softmax or log-softmax; backward is the VJP kernel."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor | None, axes: Axes, log: bool) -> Tensor:
        y = _launch("forward", x, None, axes, mask, log, None)
        ctx.axes, ctx.log = axes, log
        ctx.save_for_backward(y, mask)
        return y

    @staticmethod
    def backward(ctx, h: Tensor):
        y, mask = ctx.saved_tensors
        return _Backward.apply(y, h, mask, ctx.axes, ctx.log), None, None, None


class _Backward(torch.autograd.Function):
    """The VJP ``B(y, g)``; its gradient in ``g`` is the JVP, in ``y`` see :func:`_vjp_grad_y`."""

    @staticmethod
    def forward(ctx, y: Tensor, g: Tensor, mask: Tensor | None, axes: Axes, log: bool) -> Tensor:
        r = _launch("backward", y, g, axes, mask, log, None)
        ctx.axes, ctx.log = axes, log
        ctx.save_for_backward(y, g, mask)
        return r

    @staticmethod
    def backward(ctx, h: Tensor):
        y, g, mask = ctx.saved_tensors
        gy = gg = None
        if ctx.needs_input_grad[1]:
            gg = _Jvp.apply(y, h, mask, ctx.axes, ctx.log)
        if ctx.needs_input_grad[0]:
            gy = _vjp_grad_y(y, g, h, ctx.axes, mask, ctx.log)
        return gy, gg, None, None, None


class _Jvp(torch.autograd.Function):
    """The JVP ``T(y, t)``; its gradient in ``t`` is the VJP, in ``y`` see :func:`_jvp_grad_y`."""

    @staticmethod
    def forward(ctx, y: Tensor, t: Tensor, mask: Tensor | None, axes: Axes, log: bool) -> Tensor:
        r = _launch("jvp", y, t, axes, mask, log, None)
        ctx.axes, ctx.log = axes, log
        ctx.save_for_backward(y, t, mask)
        return r

    @staticmethod
    def backward(ctx, h: Tensor):
        y, t, mask = ctx.saved_tensors
        gy = gt = None
        if ctx.needs_input_grad[1]:
            gt = _Backward.apply(y, h, mask, ctx.axes, ctx.log)
        if ctx.needs_input_grad[0]:
            gy = _jvp_grad_y(y, t, h, ctx.axes, mask, ctx.log)
        return gy, gt, None, None, None


# --------------------------------------------------------------------------------------------
# the entry points _dispatch hands out (signatures of _generic's functions plus ``out``)


def _needs_grad(*ts: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _check_out_grad(out: Tensor | None, *ts: Tensor) -> None:
    if out is not None and _needs_grad(*ts):
        msg = (
            "out= does not support automatic differentiation (as in torch), but an input "
            "requires grad; drop out= or call inside torch.no_grad()"
        )
        raise RuntimeError(msg)


def forward(
    xp: Any, x: Tensor, axes: Axes, mask: Tensor | None, log: bool, out: Tensor | None
) -> Tensor:
    """softmax (``log=False``) or log-softmax of the CUDA tensor ``x`` along ``axes``."""
    _check_out_grad(out, x)
    if _needs_grad(x):
        return _Forward.apply(x, mask, axes, log)
    return _launch("forward", x, None, axes, mask, log, out)


def backward(
    xp: Any, y: Tensor, g: Tensor, axes: Axes, mask: Tensor | None, log: bool, out: Tensor | None
) -> Tensor:
    """The VJP from the forward output ``y`` and the cotangent ``g``."""
    _check_out_grad(out, y, g)
    if _needs_grad(y, g):
        return _Backward.apply(y, g, mask, axes, log)
    return _launch("backward", y, g, axes, mask, log, out)


def jvp(
    xp: Any, y: Tensor, t: Tensor, axes: Axes, mask: Tensor | None, log: bool, out: Tensor | None
) -> Tensor:
    """The JVP from the forward output ``y`` and the input tangent ``t``."""
    _check_out_grad(out, y, t)
    if _needs_grad(y, t):
        return _Jvp.apply(y, t, mask, axes, log)
    return _launch("jvp", y, t, axes, mask, log, out)
