"""Dask arrays whose softmax axes each sit in one chunk: the whole operation block by block.

With no softmax axis split, every block holds whole rows, so each block goes through the public
functions themselves: NumPy blocks take the fast NumPy path and CuPy blocks the fused kernels (so
a Dask array of CuPy chunks spread over GPUs runs the kernels on every chunk). The graph gets one
task per block instead of the dozen elementwise and reduction layers of the generic code, and the
floating-point warnings of extreme inputs stay inside the block functions (they run under
``np.errstate``), where the generic code would raise them at compute time. Arrays with a split
softmax axis keep the generic array-API code, which reduces across chunks.

Everything stays lazy: ``map_blocks`` only adds tasks to the graph. The block functions run when
Dask computes the graph, so the kernel mode (``xpsoftmax.kernels``) in effect then is the one that
applies to CuPy blocks.
"""

from __future__ import annotations

from typing import Any


def takes(x: Any, axes: tuple[int, ...]) -> bool:
    """True when every softmax axis of the Dask array ``x`` is in a single chunk."""
    return all(len(x.chunks[a]) == 1 for a in axes)


def _aligned(a: Any, like: Any) -> Any:
    return a if a.chunks == like.chunks else a.rechunk(like.chunks)


def _forward_block(xb: Any, mb: Any = None, *, axes: tuple[int, ...], log: bool) -> Any:
    from . import _api

    return (_api.log_softmax if log else _api.softmax)(xb, axis=axes, where=mb)


def _pair_block(yb: Any, gb: Any, mb: Any = None, *, axes, log: bool, jvp: bool) -> Any:
    from . import _api

    if jvp:
        fn = _api.log_softmax_jvp if log else _api.softmax_jvp
    else:
        fn = _api.log_softmax_backward if log else _api.softmax_backward
    return fn(yb, gb, axis=axes, where=mb)


def forward(xp: Any, x: Any, axes, mask, log: bool, out: Any = None) -> Any:
    """softmax / log_softmax of a Dask array, one task per block."""
    import dask.array as da

    arrays = [x] if mask is None else [x, _aligned(mask, x)]
    return da.map_blocks(_forward_block, *arrays, axes=axes, log=log, dtype=x.dtype, meta=x._meta)


def _pair(y: Any, g: Any, axes, mask, log: bool, jvp: bool) -> Any:
    import dask.array as da

    arrays = [y, _aligned(g, y)] + ([] if mask is None else [_aligned(mask, y)])
    return da.map_blocks(
        _pair_block, *arrays, axes=axes, log=log, jvp=jvp, dtype=y.dtype, meta=y._meta
    )


def backward(xp: Any, y: Any, g: Any, axes, mask, log: bool, out: Any = None) -> Any:
    """The VJP of a Dask array, one task per block."""
    return _pair(y, g, axes, mask, log, jvp=False)


def jvp(xp: Any, y: Any, t: Any, axes, mask, log: bool, out: Any = None) -> Any:
    """The JVP of a Dask array, one task per block."""
    return _pair(y, t, axes, mask, log, jvp=True)
