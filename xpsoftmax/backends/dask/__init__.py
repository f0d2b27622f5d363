"""The Dask backend: the softmax family on Dask arrays, lazily, whatever the chunking.

**Whole rows in a block** (every softmax axis in one chunk): each block is the same operation on
a smaller array. The task derives the block's :class:`~xpsoftmax._call.Call` and runs it through
the registry, so NumPy blocks take the NumPy backend and CuPy blocks the fused kernels (a Dask
array of CuPy chunks spread over GPUs runs the kernels on every chunk): one task per block.

**A softmax axis split across chunks** (:mod:`.split`): two passes over the input, as the GPU
split tier does: per block partial row statistics, a tree reduction of fixed shape (the same
chunking gives the same bits), one output task per block. The rules of the generic backend
(``backends/generic/softmax.py``) hold exactly: a row with ``+inf`` entries splits its mass over
them, a row of ``-inf`` (or with a NaN) is NaN, a fully masked row is 0 (log: ``-inf``), masked
entries are exactly 0 (log: ``-inf``) and their values take no part.

Either way no NumPy floating-point warning escapes at compute time, and everything stays lazy:
only graph layers are added. A task carries the operation, the axes and the kernel mode of the
call that built the graph, never a namespace module (not picklable).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ... import _compat
from ..._call import ROW_KINDS, SOFTMAX, Call, Op
from . import blocks, split
from .split import aligned

__all__ = ["run", "takes"]


#: The kinds it takes: the row operations, softmin, logsumexp and its backward.
KINDS = ROW_KINDS | {"softmin", "lse", "lse_vjp"}


def takes(call: Any) -> bool:
    """The :data:`KINDS` on Dask arrays, split softmax axes included."""
    if call.op.kind not in KINDS:
        return False
    # (The split path names each dimension with a letter of ``blockwise``: 25 at most.)
    return call.x.ndim <= split.MAX_NDIM or not _split(call)


def _split(call: Call) -> bool:
    return any(len(call.x.chunks[a]) > 1 for a in call.axes)


def _block(*blocks: Any, op: Op, axes: tuple[int, ...], masked: bool, mode: str) -> Any:
    """One task: the operation on one block (NumPy or CuPy), through the registry."""
    from .. import run

    arrays, mask = (blocks[:-1], blocks[-1]) if masked else (blocks, None)
    xp = _compat.array_namespace(arrays[0])
    a0 = arrays[0]
    call = Call(op, xp, tuple(arrays), axes, mask, None, a0.dtype, mode, a0.size == 0)
    return run(call)


def run(call: Call) -> Any:
    """The operation as lazy Dask layers: one task per block, or two passes for split rows."""
    import dask.array as da

    x = call.x
    kind = call.op.kind
    if kind == "lse":
        return _logsumexp(call)
    if kind == "lse_vjp":  # (lse and dl: one chunk of size 1 along the reduced axes)
        kept = tuple((1,) if i in call.axes else c for i, c in enumerate(x.chunks))
        pair = tuple(a if a.chunks == kept else a.rechunk(kept) for a in call.arrays[1:])
        call = call.derive(arrays=(x, *pair))
    if _split(call):
        if kind == "softmin":  # (the negation is one more step of each chunk's task chain)
            return split.run(call.derive(op=SOFTMAX, arrays=(-x,)))
        if kind == "lse_vjp":
            return _logsumexp_backward(call)
        return split.run(call)
    if kind == "lse_vjp":
        arrays = list(call.arrays)
    else:
        arrays = [x, *(aligned(a, x) for a in call.arrays[1:])]
    if call.mask is not None:
        arrays.append(aligned(call.mask, x))
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


def _logsumexp(call: Call) -> Any:
    """logsumexp from the split path's row statistics (one reduction tree, whatever the
    chunking), each reduced axis kept as size 1 or dropped."""
    import dask.array as da

    x, mask = call.x, call.mask
    stats = split.row_stats(x, None if mask is None else aligned(mask, x), call.axes)
    r = da.map_blocks(
        blocks.lse_block,
        stats,
        drop_axis=stats.ndim - 1,
        rtype=call.dtype,
        dtype=call.dtype,
        meta=x._meta.astype(call.dtype),
    )
    return r if call.keepdims else da.squeeze(r, axis=call.axes)


def _logsumexp_backward(call: Call) -> Any:
    """The logsumexp VJP of a split axis: the rows' +inf counts (a reduction), then one task
    per block; ``lse`` and ``dl`` broadcast along the reduced axes."""
    import dask.array as da

    x, lse, dl = call.arrays
    mask = None if call.mask is None else aligned(call.mask, x)
    hits = x == math.inf if mask is None else (x == math.inf) & mask
    n_inf = da.sum(hits, axis=call.axes, keepdims=True, dtype=np.float64)
    arrays = [x, lse, dl, n_inf] + ([] if mask is None else [mask])
    return da.map_blocks(blocks.lse_grad_block, *arrays, dtype=call.dtype, meta=x._meta)
