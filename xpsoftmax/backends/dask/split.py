"""The split path: Dask arrays whose softmax axes span several chunks, in two passes.

As the GPU split tier does (``kernels/softmax_split.cu``):

1. one task per block computes the block's partial row statistics (:mod:`.blocks`): for the
   forward pass the row maximum, the sum of ``exp(x - max)``, the number of ``+inf`` entries and
   the number of entries not masked (:func:`row_stats`); for the VJP and JVP the partial row dot
   (``sum(y * dy)``, ``sum(dy)`` or ``sum(exp(y) * t)``);
2. ``da.reduction`` combines the partials in a tree of fixed shape (:data:`SPLIT_EVERY`
   partials per task), so the same chunking gives the same bits;
3. one task per block writes the output from the block and its rows' combined statistics.

Each input chunk is read by two tasks (steps 1 and 3); the statistics are one value per row.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..._call import Call
from . import blocks

__all__ = ["MAX_NDIM", "SPLIT_EVERY", "aligned", "row_stats", "run"]

#: Partials combined per task of the tree reduction (fixed, so results do not depend on
#: ``dask.config``'s ``split_every``).
SPLIT_EVERY = 8


def aligned(a: Any, like: Any) -> Any:
    """``a`` in the chunks of ``like``."""
    return a if a.chunks == like.chunks else a.rechunk(like.chunks)


_LETTERS = "abcdefghijklmnopqrstuvwxy"  # ("z" is the statistics' last axis)

#: The most dimensions the split path takes (one ``blockwise`` letter each).
MAX_NDIM = len(_LETTERS)


def _index(ndim: int) -> str:
    """The ``blockwise`` index of an array of ``ndim`` dimensions."""
    return _LETTERS[:ndim]


def _partials(func: Any, arrays: list[Any], reduced: tuple[int, ...], new: int, dtype: Any, **kw):
    """One task per block: ``func`` of the blocks, each softmax axis reduced to size 1 (and a
    last axis of ``new`` entries when ``new``)."""
    import dask.array as da

    x = arrays[0]
    ind = _index(x.ndim)
    adjust = {ind[a]: 1 for a in reduced}
    out = ind + ("z" if new else "")
    pairs = [p for a in arrays for p in ((a, ind) if a is not None else (None, None))]
    return da.blockwise(
        func,
        out,
        *pairs,
        adjust_chunks=adjust,
        new_axes={"z": new} if new else None,
        dtype=dtype,
        meta=x._meta.astype(dtype),
        **kw,
    )


def _reduce(partials: Any, axes: tuple[int, ...], combine: Any) -> Any:
    """The partials combined along ``axes`` in a tree of fixed shape (keepdims)."""
    import dask.array as da

    def chunk(a: Any, axis: Any, keepdims: bool) -> Any:
        return a  # each block is already one partial per row

    return da.reduction(
        partials,
        chunk,
        combine,
        axis=axes,
        keepdims=True,
        dtype=partials.dtype,
        combine=combine,
        split_every=SPLIT_EVERY,
        concatenate=True,
        meta=partials._meta,
    )


def row_stats(x: Any, mask: Any, axes: tuple[int, ...]) -> Any:
    """The combined forward statistics of the rows of Dask array ``x`` along ``axes`` (lazy).

    Parameters
    ----------
    x : dask.array.Array
        The input, of a real floating dtype.
    mask : dask.array.Array or None
        ``where`` of ``x``'s shape and chunks, or None.
    axes : tuple of int
        The softmax axes, sorted and non-negative; any of them may span several chunks.

    Returns
    -------
    dask.array.Array
        float64, of ``x``'s shape with each of ``axes`` of size 1 and a last axis of 4: the row
        maximum over the entries not masked (NaN if one is NaN; ``-inf`` if none), the sum of
        ``exp(x - max)`` (0 unless the maximum is finite), the number of ``+inf`` entries and
        the number of entries not masked. ``logsumexp`` is ``max + log(sum)`` for a finite
        maximum, ``+inf`` (or NaN) for the others, ``-inf`` where nothing is kept.

    Examples
    --------
    >>> import dask.array as da, numpy as np
    >>> x = da.from_array(np.array([[0.0, 1.0, 2.0, 3.0]]), chunks=(1, 2))
    >>> stats = row_stats(x, None, (1,)).compute()
    >>> stats.shape
    (1, 1, 4)
    >>> m, s = stats[0, 0, 0], stats[0, 0, 1]
    >>> bool(np.isclose(m + np.log(s), np.log(np.exp([0.0, 1.0, 2.0, 3.0]).sum())))
    True
    """
    partials = _partials(blocks.stats_block, [x, mask], axes, 4, np.float64, axes=axes)
    return _reduce(partials, axes, blocks.combine_stats)


def _apply(func: Any, arrays: list[Any], stats: Any, new: bool, dtype: Any, **kw: Any) -> Any:
    """One task per block: ``func`` of the blocks and their rows' statistics (broadcast)."""
    import dask.array as da

    x = arrays[0]
    ind = _index(x.ndim)
    pairs = [p for a in arrays for p in ((a, ind) if a is not None else (None, None))]
    return da.blockwise(
        func,
        ind,
        *pairs,
        stats,
        ind + ("z" if new else ""),
        concatenate=True,
        dtype=dtype,
        meta=x._meta.astype(dtype),
        **kw,
    )


def run(call: Call) -> Any:
    """The operation of ``call`` (forward, VJP or JVP) in two passes over its inputs (lazy)."""
    x, mask, axes, op = call.x, call.mask, call.axes, call.op
    arrays = [x, *(aligned(a, x) for a in call.arrays[1:])]
    mask = None if mask is None else aligned(mask, x)
    if op.kind == "forward":
        stats = row_stats(x, mask, axes)
        return _apply(blocks.forward_block, [x, mask], stats, True, call.dtype, log=op.log)
    ctype = np.float32 if call.dtype == np.float16 else call.dtype
    partials = _partials(blocks.dot_block, [*arrays, mask], axes, 0, ctype, op=op, axes=axes)
    dot = _reduce(partials, axes, blocks.combine_dots)
    return _apply(blocks.grad_block, [*arrays, mask], dot, False, call.dtype, op=op)
