"""The CuPy backend: CuPy arrays on the fused kernels of ``kernels/``, layouts and launches.

Imported only when a CuPy array (or a CUDA tensor through ``torch_bridge``) arrives. The tier
choice is ``plan.py`` (plain Python, tested without a GPU); the kernels' names and
instantiations are ``specs.py``; compiling and caching them is ``loader.py``.

Layouts:

* softmax over the last axis: the input is viewed as ``(rows, n)`` with a row stride; inputs whose
  leading dimensions cannot be merged into one stride, or whose last axis is not unit-stride,
  are copied to C order first;
* over a middle axis of a C-contiguous array: ``(outer, n, inner)`` for the strided kernels,
  which read coalesced across ``inner`` without a transposing copy;
* several axes: moved to the end (a copy) and flattened into one.

Cross-entropy with class-index targets along the last axis and no mask runs the fused kernels of
``kernels/cross_entropy.cu`` (one block per row, online max and sum); its other forms take the
generic backend, whose log-softmax sub-call comes back here.

Every launch runs on the device of its input (``cupy.cuda.Device(x.device.id)``), so arrays on a
second GPU compute there.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ... import _config, _dtypes
from ..._call import ROW_KINDS, Call, XentCall
from ..generic import cross_entropy as generic_xent
from . import loader as _kernels
from . import specs
from .plan import (
    SPLIT_BLOCK,
    STRIDED_BLOCK,
    choose_strided,
    choose_tier,
    grid,
    merge_dims,
    split_chunks,
    vectorizable,
    xent_block,
)

__all__ = ["kernel_dtype", "run", "takes"]

_OP_SOFTMAX, _OP_LOG_VJP, _OP_LOG_JVP = 0, 1, 2


def kernel_dtype(dtype: Any, mode: str) -> bool:
    """Whether the kernels take ``dtype`` (float16/32/64, of CuPy or torch); under ``"always"``
    another dtype is a ``TypeError`` instead of False."""
    if _dtypes.kernel_dtype(dtype) is not None:
        return True
    if mode == "always":
        msg = (
            f"XPSOFTMAX_KERNELS=always, but the kernels take float16/32/64, not {dtype}; use "
            "kernels('auto') to send it to the generic path"
        )
        raise TypeError(msg)
    return False


def xent_takes(call: XentCall) -> bool:
    """Whether the fused cross-entropy kernels cover the call: the loss or its gradient with
    respect to the logits, index targets, the last axis, no mask (per class or per sample), no
    class weights (the other forms run generically, in every kernel mode)."""
    return (
        call.op.kind in ("xent", "xent_vjp")
        and call.kind == "index"
        and call.axis == call.x_in.ndim - 1
        and call.mask is None
        and call.weight is None
    )


def takes(call: Call | XentCall) -> bool:
    """Calls of the kernels' dtypes that the kernels cover, unless the kernel mode is
    ``"never"`` (the torch bridge asks the same for CUDA tensors)."""
    if call.mode == "never":
        return False
    if isinstance(call, XentCall):
        return kernel_dtype(call.x_in.dtype, call.mode) and xent_takes(call)
    return call.op.kind in ROW_KINDS and kernel_dtype(call.dtype, call.mode)


def run(call: Call | XentCall) -> Any:
    """The call on the fused kernels, on the device of its input."""
    with _cp().cuda.Device(call.lead.device.id):
        if isinstance(call, XentCall):
            return _xent(call)
        kind, log = call.op.kind, call.op.log
        if kind == "forward":
            return _run(True, call.arrays, call.axes, call.mask, int(log), call.out)
        flag = _OP_SOFTMAX if not log else _OP_LOG_VJP if kind == "vjp" else _OP_LOG_JVP
        return _run(False, call.arrays, call.axes, call.mask, flag, call.out)


# ------------------------------------------------------------------------------------------------
# launches


def _cp() -> Any:
    import cupy

    return cupy


def _i64(v: int) -> np.int64:
    return np.int64(v)


def _i32(v: int) -> np.int32:
    if not -(2**31) <= v < 2**31:
        msg = f"a softmax axis of {v} elements is longer than the kernels take (2**31 - 1)"
        raise ValueError(msg)
    return np.int32(v)


def _is_aligned(a: Any, ld: int) -> bool:
    return vectorizable(a.data.ptr, ld, a.itemsize)


def _rows_view(a: Any, n: int) -> tuple[Any, int] | None:
    """``a`` (softmax axis last) as (array, row stride in elements), or None if not expressible."""
    if a.ndim == 0:
        return None
    item = a.itemsize
    strides = tuple(s // item for s in a.strides)
    if n > 1 and strides[-1] != 1:
        return None
    ld = merge_dims(tuple(a.shape[:-1]), strides[:-1])
    if ld is None:
        return None
    return a, ld


def _as_rows(a: Any, n: int) -> tuple[Any, int]:
    v = _rows_view(a, n)
    if v is None:
        a = _cp().ascontiguousarray(a)
        v = (a, n)
    return v


def _mask_rows(mask: Any | None, n: int) -> tuple[Any, int, int]:
    """Mask pointer and (row, column) strides in bytes (elements: bool is one byte)."""
    if mask is None:
        return np.uint64(0), 0, 0
    strides = tuple(mask.strides)
    rs = merge_dims(tuple(mask.shape[:-1]), strides[:-1])
    if rs is None:
        mask = _cp().ascontiguousarray(mask)
        strides = tuple(mask.strides)
        rs = merge_dims(tuple(mask.shape[:-1]), strides[:-1])
    return np.uint64(mask.data.ptr), int(rs), int(strides[-1])


def _overlaps(out: Any, inputs: tuple[Any, ...]) -> bool:
    cp = _cp()
    return any(cp.may_share_memory(out, a) for a in inputs)


def _writable_rows(out: Any | None, shape: tuple[int, ...], dtype: Any, inputs, n: int):
    """An output viewed as rows: ``out`` itself when its layout allows and it aliases nothing."""
    if out is not None and not _overlaps(out, inputs):
        v = _rows_view(out, n)
        if v is not None:
            return out, v[1]
    buf = _cp().empty(shape, dtype=dtype)
    return buf, n


def _launch_rows(fwd: bool, arrays: tuple[Any, ...], mask: Any | None, flag: int, out: Any | None):
    """Run a last-axis kernel over ``arrays`` (softmax axis last, one shape); return the result."""
    cp = _cp()
    a0 = arrays[0]
    shape = tuple(a0.shape)
    n = shape[-1]
    rows = math.prod(shape[:-1])
    views = [_as_rows(a, n) for a in arrays]
    res, ldr = _writable_rows(out, shape, a0.dtype, arrays, n)
    mp, mrs, mcs = _mask_rows(mask, n)
    dtype = _dtypes.kernel_dtype(a0.dtype).name
    vec = all(_is_aligned(a, ld) for a, ld in views) and _is_aligned(res, ldr)
    direction = "fwd" if fwd else "bwd"
    device = cp.cuda.runtime.getDevice()
    smem_limit = _kernels.max_dynamic_smem(device)
    tuning = _config.tuning()
    masked = mask is not None or not tuning.plain
    tier = choose_tier(n, dtype, len(arrays), masked, smem_limit, tuning.tier)
    ptrs: list[Any] = []
    for a, ld in views:
        ptrs += [a, _i64(ld)]
    ptrs += [res, _i64(ldr), mp, _i64(mrs), _i64(mcs), _i64(rows), _i32(n), np.int32(flag)]
    if tier.name == "warp":
        kernel = _kernels.get_function(
            "softmax.cu",
            specs.warp_name(direction, dtype, tier.lanes, tier.packs, masked),
        )
        rows_per_block = 128 // tier.lanes
        g = grid(-(-rows // rows_per_block), _kernels.occupancy_grid(kernel, 128, 0))
        kernel((g,), (128,), (*ptrs, np.int32(vec)))
    elif tier.name == "block":
        kernel = _kernels.get_function(
            "softmax.cu", specs.block_name(direction, dtype, tier.block, masked)
        )
        _kernels.set_max_dynamic_smem(kernel, tier.smem)
        g = grid(rows, _kernels.occupancy_grid(kernel, tier.block, tier.smem))
        kernel((g,), (tier.block,), (*ptrs, np.int32(vec)), shared_mem=tier.smem)
    else:
        _launch_split(direction, dtype, ptrs, rows, n, vec)
    return res


def _launch_split(direction, dtype, ptrs, rows, n, vec) -> None:
    """The split-row tier: two launches over (row, chunk) items (see kernels/softmax_split.cu)."""
    cp = _cp()
    chunk, C = split_chunks(n, dtype)
    items = rows * C
    acc = np.dtype(_dtypes.TABLE[dtype].compute)  # the partials: the compute dtype
    part = cp.empty(items * (2 if direction == "fwd" else 1), dtype=acc)
    # ptrs = (inputs..., out, ld_out, mask ptr, mask strides, rows, n, flag).
    n_in = 1 if direction == "fwd" else 2
    inputs, rest = ptrs[: 2 * n_in], ptrs[2 * n_in :]
    out_args, mask_args, flag = rest[:2], rest[2:5], rest[7]
    tail = (np.int32(vec), np.int32(C), np.int32(chunk))
    k1 = _kernels.get_function("softmax_split.cu", specs.split_name(direction, "part", dtype))
    grid1 = grid(items, _kernels.occupancy_grid(k1, SPLIT_BLOCK, 0), waves=8)
    if direction == "fwd":
        args1 = (*inputs, *mask_args, _i64(rows), _i32(n), *tail, part)
    else:
        args1 = (*inputs, *mask_args, _i64(rows), _i32(n), flag, *tail, part)
    k1((grid1,), (SPLIT_BLOCK,), args1)
    k2 = _kernels.get_function("softmax_split.cu", specs.split_name(direction, "apply", dtype))
    grid2 = grid(items, _kernels.occupancy_grid(k2, SPLIT_BLOCK, 0), waves=8)
    args2 = (*inputs, *out_args, *mask_args, _i64(rows), _i32(n), flag, *tail, part)
    k2((grid2,), (SPLIT_BLOCK,), args2)


def _strided_mask(mask: Any | None, a: int) -> tuple[Any, int, int, int]:
    if mask is None:
        return np.uint64(0), 0, 0, 0
    shape, strides = tuple(mask.shape), tuple(mask.strides)
    so = merge_dims(shape[:a], strides[:a])
    si = merge_dims(shape[a + 1 :], strides[a + 1 :])
    if so is None or si is None:
        mask = _cp().ascontiguousarray(mask)
        shape, strides = tuple(mask.shape), tuple(mask.strides)
        so = merge_dims(shape[:a], strides[:a])
        si = merge_dims(shape[a + 1 :], strides[a + 1 :])
    return np.uint64(mask.data.ptr), int(so), int(strides[a]), int(si)


def _launch_strided(fwd: bool, arrays, axis: int, mask, flag: int, out):
    """Softmax over a middle axis of C-contiguous arrays, without a transposing copy."""
    cp = _cp()
    arrays = tuple(a if a.flags.c_contiguous else cp.ascontiguousarray(a) for a in arrays)
    a0 = arrays[0]
    shape = tuple(a0.shape)
    outer, n, inner = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])
    if out is not None and out.flags.c_contiguous and not _overlaps(out, arrays):
        res = out
    else:
        res = cp.empty(shape, dtype=a0.dtype)
    dtype = _dtypes.kernel_dtype(a0.dtype).name
    direction = "fwd" if fwd else "bwd"
    device = cp.cuda.runtime.getDevice()
    smem_limit = _kernels.max_dynamic_smem(device)
    choice = choose_strided(
        n, a0.itemsize, len(arrays), mask is not None, smem_limit, _config.tuning().tier
    )
    kernel = _kernels.get_function(
        "softmax.cu", specs.strided_name(direction, dtype, choice.cached)
    )
    smem = choice.smem
    _kernels.set_max_dynamic_smem(kernel, smem)
    tiles = outer * -(-inner // choice.width)
    g = grid(tiles, _kernels.occupancy_grid(kernel, STRIDED_BLOCK, smem), waves=1)
    mp, so, sj, si = _strided_mask(mask, axis)
    args = (*arrays, res, mp, _i64(so), _i64(sj), _i64(si), _i64(outer), _i32(n), _i64(inner))
    kernel((g,), (STRIDED_BLOCK,), (*args, np.int32(flag)), shared_mem=smem)
    return res


def _run(fwd: bool, arrays: tuple[Any, ...], axes: tuple[int, ...], mask, flag: int, out):
    """The kernels over ``arrays``: ``out`` when a kernel could write there, else a new array
    that the caller (``backends.run``, or the torch bridge) copies into ``out``."""
    cp = _cp()
    a0 = arrays[0]
    ndim = a0.ndim
    if not axes:
        # No softmax axis (axis=() or a 0-d input with axis=None): every element is its own row.
        shape = tuple(a0.shape)
        arrays = tuple(a.reshape((*shape, 1)) for a in arrays)
        mask = None if mask is None else mask.reshape((*shape, 1))
        r = _run(fwd, arrays, (ndim,), mask, flag, None).reshape(shape)
        return r  # out: filled by the caller (backends.run)
    if len(axes) > 1:
        k = len(axes)
        dest = tuple(range(ndim - k, ndim))
        shape = tuple(a0.shape)
        moved = [cp.moveaxis(a, axes, dest) for a in arrays]
        lead = tuple(moved[0].shape[: ndim - k])
        n = math.prod(shape[ax] for ax in axes)
        flat = tuple(cp.ascontiguousarray(m).reshape((*lead, n)) for m in moved)
        fmask = None
        if mask is not None:
            fmask = cp.ascontiguousarray(cp.moveaxis(mask, axes, dest)).reshape((*lead, n))
        r = _run(fwd, flat, (ndim - k,), fmask, flag, None)
        r = cp.moveaxis(r.reshape(moved[0].shape), dest, axes)
        return r if out is not None else cp.ascontiguousarray(r)  # out: filled by the caller
    (axis,) = axes
    inner = math.prod(a0.shape[axis + 1 :])
    if axis == ndim - 1 or inner == 1:
        if axis != ndim - 1:
            # Only size-1 dimensions follow the axis: drop them, compute, restore the shape.
            shape = tuple(a0.shape)
            keep = shape[: axis + 1]
            arrays = tuple(a.reshape(keep) for a in arrays)
            mask = None if mask is None else mask.reshape(keep)
            r = _launch_rows(fwd, arrays, mask, flag, None).reshape(shape)
            return r  # out: filled by the caller (backends.run)
        return _launch_rows(fwd, arrays, mask, flag, out)
    return _launch_strided(fwd, arrays, axis, mask, flag, out)


# ------------------------------------------------------------------------------------------------
# cross-entropy (kernels/cross_entropy.cu)


def _xent_launch(direction: str, p: XentCall, rows: int, head: tuple[Any, ...]) -> None:
    """Launch one kernel: a block per row, grid-stride over rows (kernel arguments: ``head``,
    then rows, classes, ignore_index, whether it is set, label smoothing)."""
    ctype = _dtypes.kernel_dtype(p.x_in.dtype).ctype
    kernel = _kernels.get_function("cross_entropy.cu", f"xps_xent_{direction}<{ctype}>")
    n = p.n_classes
    block = xent_block(n)
    g = grid(rows, _kernels.occupancy_grid(kernel, block), waves=1)
    ignore = np.int64(0 if p.ignore is None else p.ignore)
    tail = (np.int64(rows), np.int64(n), ignore, np.int32(p.ignore is not None), np.float64(p.eps))
    kernel((g,), (block,), (*head, *tail))


def _xent(p: XentCall) -> Any:
    """The loss (``xent``) or d(loss)/d(logits) (``xent_vjp``) with the fused kernels."""
    cp = _cp()
    rows = math.prod(p.loss_shape)
    x = cp.ascontiguousarray(p.x_in).reshape(rows, p.n_classes)
    t = cp.ascontiguousarray(p.index).reshape(rows)
    if p.op.kind == "xent":
        loss = cp.empty(rows, dtype=p.ctype)  # float32 for float16, rounded once in reduce()
        if rows:
            _xent_launch("fwd", p, rows, (x, t, loss))
        return generic_xent.reduce(p, loss.reshape(p.loss_shape), p.reduction)
    dx = cp.empty(x.shape, dtype=x.dtype)
    if rows and p.n_classes:
        dloss = p.dloss
        if p.reduction == "none" and not isinstance(dloss, float) and dloss.ndim:
            scale, stride = cp.ascontiguousarray(dloss, dtype=p.ctype).reshape(rows), 1
        else:  # one scale for every row; ignored rows are zeroed by the kernel
            scale = cp.asarray(dloss, dtype=p.ctype).reshape(1)
            if p.reduction == "mean":
                scale = generic_xent.mean_scale(p, scale)
            stride = 0
        _xent_launch("bwd", p, rows, (x, t, scale, np.int64(stride), dx))
    return dx.reshape(p.x_in.shape)
