"""The Dask backend: arrays whose softmax axes each sit in one chunk, one task per block.

With no softmax axis split, every block holds whole rows, so each block is the same operation on
a smaller array: the task derives the block's :class:`~xpsoftmax._call.Call` and runs it through
the registry, so NumPy blocks take the NumPy backend and CuPy blocks the fused kernels (a Dask
array of CuPy chunks spread over GPUs runs the kernels on every chunk). Nothing is validated again
per block. The graph gets one task per block instead of the dozen elementwise and reduction
layers of the generic code, and the floating-point warnings of extreme inputs stay inside the
blocks, where the generic code would raise them at compute time. Arrays with a split softmax
axis are left to the generic backend, which reduces across chunks.

Everything stays lazy: ``map_blocks`` only adds tasks to the graph. A task carries the operation,
the axes and the kernel mode of the call that built the graph (so the mode in effect then
applies, whichever thread or worker computes it), never a namespace module (not picklable).
"""

from __future__ import annotations

from typing import Any

from .. import _compat
from .._call import ROW_KINDS, Call, Op, XentCall

__all__ = ["run", "takes"]


def takes(call: Call | XentCall) -> bool:
    """Row operations on Dask arrays whose every softmax axis is in a single chunk."""
    if call.op.kind not in ROW_KINDS:
        return False
    chunks = call.x.chunks
    return all(len(chunks[a]) == 1 for a in call.axes)


def _aligned(a: Any, like: Any) -> Any:
    return a if a.chunks == like.chunks else a.rechunk(like.chunks)


def _block(*blocks: Any, op: Op, axes: tuple[int, ...], masked: bool, mode: str) -> Any:
    """One task: the operation on one block (NumPy or CuPy), through the registry."""
    from . import run

    arrays, mask = (blocks[:-1], blocks[-1]) if masked else (blocks, None)
    xp = _compat.array_namespace(arrays[0])
    a0 = arrays[0]
    call = Call(op, xp, tuple(arrays), axes, mask, None, a0.dtype, mode, a0.size == 0)
    return run(call)


def run(call: Call) -> Any:
    """The operation as one ``map_blocks`` task per block (lazy)."""
    import dask.array as da

    x = call.x
    arrays = [x, *(_aligned(a, x) for a in call.arrays[1:])]
    if call.mask is not None:
        arrays.append(_aligned(call.mask, x))
    return da.map_blocks(
        _block,
        *arrays,
        op=call.op,
        axes=call.axes,
        masked=call.mask is not None,
        mode=call.mode,
        dtype=call.dtype,
        meta=x._meta,
    )
