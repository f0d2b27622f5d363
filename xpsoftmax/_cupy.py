"""CuPy arrays to the fused kernels of ``kernels/``: layout planning, tier choice and launches.

Imported only when a CuPy array (or a CUDA tensor through DLPack) arrives. The planning half
(:func:`choose_tier`, :func:`merge_dims`) is plain Python on shapes and strides, so it is
tested on machines without a GPU; the launch half needs a device.

Layouts:

* softmax over the last axis: the input is viewed as ``(rows, n)`` with a row stride; inputs whose
  leading dimensions cannot be merged into one stride, or whose last axis is not unit-stride,
  are copied to C order first;
* over a middle axis of a C-contiguous array: ``(outer, n, inner)`` for the strided kernels,
  which read coalesced across ``inner`` without a transposing copy;
* several axes: moved to the end (a copy) and flattened into one.

Tiers for rows (see ``kernels/softmax.cu``): ``warp`` keeps the row in registers (up to 1024
elements, 512 for float64, 2048 for the unmasked float16/32 forward), ``block`` caches it in
shared memory, ``split`` spreads it over several cooperating blocks (``kernels/softmax_split.cu``).
Rows without a mask take the ``*_plain`` kernels of the first two tiers (float16/32).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _kernel_specs as specs
from . import _kernels

_DTYPES = ("float16", "float32", "float64")
# dtype.char -> name; dtype.name is a slow Python property, and this runs on every call.
_NAMES = {"e": "float16", "f": "float32", "d": "float64"}

#: Longest row (elements) for the register tier, per dtype.
WARP_MAX = {"float16": 1024, "float32": 1024, "float64": 512}
#: ... and for the unmasked forward kernels, which hold longer rows (specs.WARP_PACKS_PLAIN_FWD).
WARP_MAX_PLAIN_FWD = {"float16": 2048, "float32": 2048}
#: Shared memory the block tier leaves free below the device's opt-in limit (static arrays, slack).
#: Rows whose cached arrays fit go to the block tier: the tier sweep in benchmarks/gpu_tune.py
#: showed it at 2.5 TB/s and more up to 128 KiB rows on an H200, against about 1 TB/s for the
#: split-row path that cached rows across cooperating blocks (since replaced).
BLOCK_SMEM_SLACK = 4 * 1024
#: Bytes of one split-row chunk (one block's share of a row per item). 32 KiB chunks gave each
#: block too little work between its reductions: about 2 TB/s of traffic on an H200.
SPLIT_CHUNK_BYTES = 128 * 1024
#: Grids: the occupancy API's full-device grid times this many waves, at most.
WAVES = 16
_SPLIT_BLOCK = 512
_STRIDED_BLOCK = 512

#: Internal override of the tier choice, for benchmarks and tests: "warp", "block", "split".
_FORCE_TIER: str | None = os.environ.get("XPSOFTMAX_FORCE_TIER") or None
#: Internal switch for benchmarks: False sends unmasked rows to the masked kernels too (the kernels
#: before the ``*_plain`` ones existed), for side-by-side timing in one run.
_PLAIN = True

_OP_SOFTMAX, _OP_LOG_VJP, _OP_LOG_JVP = 0, 1, 2


def takes(x: Any, *, always: bool) -> bool:
    """True when the kernels handle ``x``'s dtype (float16, float32, float64)."""
    if x.dtype.char in _NAMES:
        return True
    if always:
        msg = f"XPSOFTMAX_KERNELS=always, but the kernels take float16/32/64, not {x.dtype}"
        raise TypeError(msg)
    return False


# ------------------------------------------------------------------------------------------------
# planning (pure Python)


def merge_dims(shape: tuple[int, ...], strides: tuple[int, ...]) -> int | None:
    """One stride that walks all of ``shape`` in C order, or None when there is none.

    ``strides`` are in elements. Dimensions of size 1 never matter; an empty ``shape`` merges
    to stride 0.
    """
    dims = [(n, s) for n, s in zip(shape, strides, strict=True) if n != 1]
    if not dims:
        return 0
    for (_, s_outer), (n_inner, s_inner) in zip(dims, dims[1:], strict=False):
        if s_outer != s_inner * n_inner:
            return None
    return dims[-1][1]


@dataclass(frozen=True)
class Tier:
    """A launch choice for rows of length ``n``."""

    name: str  # "warp", "block", "split"
    lanes: int = 0
    packs: int = 0
    block: int = 0
    smem: int = 0


def _pad16(b: int) -> int:
    return (b + 15) & ~15


@functools.lru_cache(maxsize=1024)
def choose_tier(
    n: int, dtype: str, arrays: int, masked: bool, smem_limit: int, forced: str | None = None
) -> Tier:
    """The tier for rows of ``n`` elements of ``dtype``.

    ``arrays`` is 1 for the forward kernels and 2 for backward/JVP (two inputs cached);
    ``forced`` names a tier to use wherever it can take the row (benchmarks and tests).
    """
    itemsize = np.dtype(dtype).itemsize
    vec = specs.VEC[dtype]
    row_bytes = arrays * _pad16(n * itemsize) + (n if masked else 0)
    warp_max, packs_list = WARP_MAX[dtype], specs.WARP_PACKS[dtype]
    if arrays == 1 and not masked and dtype in WARP_MAX_PLAIN_FWD:
        warp_max = WARP_MAX_PLAIN_FWD[dtype]
        packs_list = (*packs_list, *specs.WARP_PACKS_PLAIN_FWD[dtype])
    if forced in (None, "warp") and n <= warp_max:
        packs_needed = -(-n // vec)
        if packs_needed <= 16:
            lanes = next(lanes for lanes in (*specs.WARP_LANES, 32) if lanes >= packs_needed)
            return Tier("warp", lanes=lanes, packs=1)
        packs = next(p for p in packs_list if p * 32 >= packs_needed)
        return Tier("warp", lanes=32, packs=packs)
    fits_block = row_bytes + BLOCK_SMEM_SLACK <= smem_limit
    if fits_block and forced in (None, "block", "warp"):
        elems = -(-n // vec)
        block = 256 if elems <= 1024 else (512 if elems <= 4096 else 1024)
        return Tier("block", block=block, smem=row_bytes)
    return Tier("split", block=_SPLIT_BLOCK)


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
    return a.data.ptr % 16 == 0 and (ld * a.itemsize) % 16 == 0


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
    dtype = _NAMES[a0.dtype.char]
    vec = all(_is_aligned(a, ld) for a, ld in views) and _is_aligned(res, ldr)
    direction = "fwd" if fwd else "bwd"
    device = cp.cuda.runtime.getDevice()
    smem_limit = _kernels.max_dynamic_smem(device)
    masked = mask is not None or not _PLAIN
    tier = choose_tier(n, dtype, len(arrays), masked, smem_limit, _FORCE_TIER)
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
        grid = min(-(-rows // rows_per_block), WAVES * _kernels.occupancy_grid(kernel, 128, 0))
        kernel((grid,), (128,), (*ptrs, np.int32(vec)))
    elif tier.name == "block":
        kernel = _kernels.get_function(
            "softmax.cu", specs.block_name(direction, dtype, tier.block, masked)
        )
        _kernels.set_max_dynamic_smem(kernel, tier.smem)
        grid = min(rows, WAVES * _kernels.occupancy_grid(kernel, tier.block, tier.smem))
        kernel((grid,), (tier.block,), (*ptrs, np.int32(vec)), shared_mem=tier.smem)
    else:
        _launch_split(direction, dtype, ptrs, rows, n, vec)
    if out is not None and res is not out:
        out[...] = res
        return out
    return res


def split_chunks(n: int, dtype: str) -> tuple[int, int]:
    """Split-row plan for rows of ``n``: (chunk elements, chunks a row).

    A chunk is a whole number of 16-byte packs, so every chunk of an aligned row starts aligned.
    """
    v = specs.VEC[dtype]
    chunk = max(v, (SPLIT_CHUNK_BYTES // np.dtype(dtype).itemsize) // v * v)
    return chunk, -(-n // chunk)


def _launch_split(direction, dtype, ptrs, rows, n, vec) -> None:
    """The split-row tier: two launches over (row, chunk) items (see kernels/softmax_split.cu)."""
    cp = _cp()
    chunk, C = split_chunks(n, dtype)
    items = rows * C
    acc = np.float64 if dtype == "float64" else np.float32
    part = cp.empty(items * (2 if direction == "fwd" else 1), dtype=acc)
    # ptrs = (inputs..., out, ld_out, mask ptr, mask strides, rows, n, flag).
    n_in = 1 if direction == "fwd" else 2
    inputs, rest = ptrs[: 2 * n_in], ptrs[2 * n_in :]
    out_args, mask_args, flag = rest[:2], rest[2:5], rest[7]
    tail = (np.int32(vec), np.int32(C), np.int32(chunk))
    k1 = _kernels.get_function("softmax_split.cu", specs.split_name(direction, "part", dtype))
    grid1 = min(items, 8 * _kernels.occupancy_grid(k1, _SPLIT_BLOCK, 0))
    if direction == "fwd":
        args1 = (*inputs, *mask_args, _i64(rows), _i32(n), *tail, part)
    else:
        args1 = (*inputs, *mask_args, _i64(rows), _i32(n), flag, *tail, part)
    k1((grid1,), (_SPLIT_BLOCK,), args1)
    k2 = _kernels.get_function("softmax_split.cu", specs.split_name(direction, "apply", dtype))
    grid2 = min(items, 8 * _kernels.occupancy_grid(k2, _SPLIT_BLOCK, 0))
    args2 = (*inputs, *out_args, *mask_args, _i64(rows), _i32(n), flag, *tail, part)
    k2((grid2,), (_SPLIT_BLOCK,), args2)


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
    dtype = _NAMES[a0.dtype.char]
    itemsize = a0.itemsize
    width = 32 // itemsize
    smem = len(arrays) * _pad16(n * width * itemsize) + (n * width if mask is not None else 0)
    direction = "fwd" if fwd else "bwd"
    device = cp.cuda.runtime.getDevice()
    cached = smem + 16 * 1024 + 1024 <= _kernels.max_dynamic_smem(device) and _FORCE_TIER != "split"
    kernel = _kernels.get_function("softmax.cu", specs.strided_name(direction, dtype, cached))
    if not cached:
        smem = 0
    _kernels.set_max_dynamic_smem(kernel, smem)
    tiles = outer * -(-inner // width)
    grid = min(tiles, _kernels.occupancy_grid(kernel, _STRIDED_BLOCK, smem))
    mp, so, sj, si = _strided_mask(mask, axis)
    args = (*arrays, res, mp, _i64(so), _i64(sj), _i64(si), _i64(outer), _i32(n), _i64(inner))
    kernel((grid,), (_STRIDED_BLOCK,), (*args, np.int32(flag)), shared_mem=smem)
    if out is not None and res is not out:
        out[...] = res
        return out
    return res


def _run(fwd: bool, arrays: tuple[Any, ...], axes: tuple[int, ...], mask, flag: int, out):
    cp = _cp()
    a0 = arrays[0]
    ndim = a0.ndim
    if not axes:
        # No softmax axis (axis=() or a 0-d input with axis=None): every element is its own row.
        shape = tuple(a0.shape)
        arrays = tuple(a.reshape((*shape, 1)) for a in arrays)
        mask = None if mask is None else mask.reshape((*shape, 1))
        r = _run(fwd, arrays, (ndim,), mask, flag, None).reshape(shape)
        if out is not None:
            out[...] = r
            return out
        return r
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
        if out is not None:
            out[...] = r
            return out
        return cp.ascontiguousarray(r)
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
            if out is not None:
                out[...] = r
                return out
            return r
        return _launch_rows(fwd, arrays, mask, flag, out)
    return _launch_strided(fwd, arrays, axis, mask, flag, out)


def _on_device(arrays: tuple[Any, ...]) -> Any:
    return _cp().cuda.Device(arrays[0].device.id)


def forward(xp: Any, x: Any, axes: tuple[int, ...], mask: Any | None, log: bool, out: Any | None):
    """softmax / log_softmax of a CuPy array with the fused kernels (see ``_generic.forward``)."""
    with _on_device((x,)):
        return _run(True, (x,), axes, mask, int(log), out)


def backward(xp: Any, y: Any, g: Any, axes, mask, log: bool, out: Any | None):
    """The VJP kernels (see ``_generic.backward``)."""
    with _on_device((y,)):
        return _run(False, (y, g), axes, mask, _OP_LOG_VJP if log else _OP_SOFTMAX, out)


def jvp(xp: Any, y: Any, t: Any, axes, mask, log: bool, out: Any | None):
    """The JVP kernels (see ``_generic.jvp``)."""
    with _on_device((y,)):
        return _run(False, (y, t), axes, mask, _OP_LOG_JVP if log else _OP_SOFTMAX, out)
