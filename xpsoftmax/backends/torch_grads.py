"""Gradients with respect to ``y`` of the VJP and the JVP, in elementwise torch operations.

Shared by the torch backends (``cuda/torch_bridge.py``, ``torch_cpu.py``): their products
``B(y, g)`` and ``T(y, t)`` are kernels, linear in ``g``/``t``; the derivative in ``y`` (needed for
second derivatives through ``x``, such as a Hessian-vector product) is written out here.
"""

from __future__ import annotations

import torch

from .. import _dtypes

__all__ = ["jvp_grad_y", "vjp_grad_y"]

Tensor = torch.Tensor
Axes = tuple[int, ...]


def _keep(mask: Tensor | None, v: Tensor) -> Tensor:
    """``v`` with masked entries set to exactly 0 (a ``where``, so ``inf * 0`` cannot appear)."""
    return (
        v if mask is None else torch.where(mask, v, torch.zeros((), dtype=v.dtype, device=v.device))
    )


def _rowsum(v: Tensor, axes: Axes) -> Tensor:
    return torch.sum(v, dim=axes, keepdim=True) if axes else v


def _upcast(*ts: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.to(_dtypes.compute_dtype(torch, t.dtype)) for t in ts)


def vjp_grad_y(y: Tensor, g: Tensor, h: Tensor, axes: Axes, mask: Tensor | None, log: bool):
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


def jvp_grad_y(y: Tensor, t: Tensor, h: Tensor, axes: Axes, mask: Tensor | None, log: bool):
    """``h^T dT/dy`` for the JVP ``T(y, t)``.

    softmax's JVP is its VJP; log-softmax: ``T = t - sum(exp(y) t)``, so the gradient is
    ``-exp(y) t sum(h)``.
    """
    if not log:
        return vjp_grad_y(y, t, h, axes, mask, log)
    dtype = y.dtype
    y, t, h = _upcast(y, t, h)
    r = -torch.exp(y) * t * _rowsum(_keep(mask, h), axes)
    return _keep(mask, r).to(dtype)
