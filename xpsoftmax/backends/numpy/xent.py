"""Fused cross-entropy on NumPy: the per-sample losses, or the gradient, in one kernel per row.

Taken here (see :func:`takes`): class-index targets along the last axis of a float32/float64
ndarray, with or without class weights, without a mask or with a per-sample one (whose fully
masked samples the call's ``valid`` leaves out), on the compiled CPU path. The kernels
(``kernels.xent_rows``, ``kernels.xent_grad_rows``) read each row for its statistics and write
only the losses (or the gradient), where the generic code writes the whole log-softmax first
and reads it back. What surrounds them (ignored samples, the reduction, the per-sample weights
of the backward) is the generic backend's own code, so the two cannot drift apart. Everything
else takes the generic backend, whose log-softmax sub-call comes back to the NumPy backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..._call import XentCall
from ..generic import cross_entropy as generic
from . import blocked, kernels

Array = Any

__all__ = ["run", "takes"]


def _per_sample(mask: Array | None) -> bool:
    """No mask, or one that is the same along the class axis (a per-sample ``where``, broadcast
    along the last axis): its fully masked samples are already left out through ``valid``."""
    return mask is None or (type(mask) is np.ndarray and mask.strides[-1] == 0)


def takes(call: XentCall) -> bool:
    """The loss or its logits gradient, index targets along the last axis of float32/64, class
    weights or not, no mask or a per-sample one (not a per-class mask)."""
    x = call.x_in
    w = call.weight
    return (
        call.op.kind in ("xent", "xent_vjp")
        and call.kind == "index"
        and _per_sample(call.mask)
        and (w is None or (type(w) is np.ndarray and w.dtype == x.dtype))
        and type(x) is np.ndarray
        and x.dtype.char in "fd"
        and x.ndim >= 1
        and call.axis == x.ndim - 1
        and x.shape[-1] > 0
        and x.size > 0
    )


def _rows(call: XentCall) -> tuple[Array, Array, int]:
    """The logits as a flat read-only buffer of C-ordered rows, the targets per row, ``n``."""
    n = call.x_in.shape[-1]
    x = np.ascontiguousarray(call.x_in).reshape(-1)
    x.flags.writeable = False
    t = np.ascontiguousarray(call.targets, dtype=np.int64).reshape(-1)
    t.flags.writeable = False
    return x, t, n


def _tasks(rows: int, n: int, itemsize: int, threads: int, task) -> None:
    per = max(1, blocked._block_elems(itemsize) // n)
    count = -(-rows // per)

    def run(k: int) -> None:
        task(k * per, min(rows, k * per + per))

    big = rows * n * itemsize >= blocked._SMALL_BYTES
    blocked.run_tasks(count, threads if big else 1, run)


def run(call: XentCall) -> Array:
    from ... import _config

    x, t, n = _rows(call)
    rows = x.size // n
    dtype = call.x_in.dtype
    threads = _config.num_threads()
    eps = float(call.eps)
    weighted = call.weight is not None
    wc = np.ascontiguousarray(call.weight) if weighted else np.ones(1, dtype=dtype)
    wc.flags.writeable = False
    if call.op.kind == "xent":
        loss = np.empty(rows, dtype=dtype)
        _tasks(
            rows,
            n,
            dtype.itemsize,
            threads,
            lambda r0, r1: kernels.xent_rows(x, n, t, wc, weighted, r0, r1, n, eps, loss),
        )
        loss = loss.reshape(call.loss_shape)
        if call.valid is not None:
            loss = np.where(call.valid, loss, 0).astype(dtype, copy=False)
        return generic.reduce(call, loss, call.reduction)
    w = generic.sample_weights(call, call.reduction, call.dloss)
    w = np.ascontiguousarray(w, dtype=np.float64).reshape(-1)
    w.flags.writeable = False
    out = np.empty(call.x_in.shape, dtype=dtype)
    flat = out.reshape(-1)
    _tasks(
        rows,
        n,
        dtype.itemsize,
        threads,
        lambda r0, r1: kernels.xent_grad_rows(x, n, t, w, wc, weighted, r0, r1, n, eps, flat, n),
    )
    if call.valid is not None:
        out[~call.valid] = 0
    return out
