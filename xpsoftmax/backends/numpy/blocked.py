"""The fast NumPy path: cache-blocked, multi-threaded, with no full-size temporaries.

The array is seen as ``(outer, n)`` when the softmax axes are the last ones, else as
``(outer, n, inner)``; both are views whenever the layout allows, so a non-last axis is worked
along in place, without a transposed copy. The view is cut into blocks of rows, each the size
of the L2 cache (see ``_block_elems``); every pass (max, subtract, exp, sum, scale; or the row
dot and the update) runs over one block while it is in cache, so the input is read once and
the output written once. Rows longer than a block, and non-last-axis slabs ``(n, inner)``
larger than a block, are cut into chunks (of whole-width contiguous rows for the latter) whose
row statistics are combined between passes. Blocks run on a thread pool (NumPy releases the
GIL inside ufuncs and reductions); the block geometry depends only on the shape and dtype,
never on the thread count, so results are bitwise the same for any number of threads.

Semantics are exactly those of the generic backend (the special cases listed in
``backends/generic/softmax.py``, ``_normalize``); float16 is computed in float32 scratch, one
block at a time.

Left to the generic backend (see :func:`takes`): dtypes other than float16/32/64
(``longdouble``), ``ndarray`` subclasses, 0-d arrays and ``axis=()``. Copied first: tuple axes
that are not adjacent (moved last in a contiguous copy) and inputs whose strides cannot be merged
into the 2-D/3-D view; an ``out=`` that partly overlaps an input, or cannot be viewed, receives
the result through a temporary.

The entry points run under ``backends.run``'s ``np.errstate(all="ignore")`` on the calling
thread; the pool's workers set their own (errstate and ufunc buffer size are per thread).

Environment: ``XPSOFTMAX_NUM_THREADS`` (a positive integer) overrides the number of threads,
which is otherwise the number of CPUs this process may run on; ``XPSOFTMAX_NUMPY_FAST=0``
sends NumPy arrays to the generic path instead (both are read at every call).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ... import _config
from ..._dtypes import TABLE, np_compute_dtype

Array = Any

__all__ = ["forward", "product", "takes"]

_DTYPES = frozenset(np.dtype(name) for name in TABLE)

# Below this many input bytes a call stays on the calling thread: the pool's hand-off would
# cost more than it saves.
_SMALL_BYTES = 1 << 20
# See _make_plan.
_SMALL_BUFSIZE = 64
# Fewest rows in a chunk of a non-last-axis slab too large for one block; it bounds each array
# of chunk statistics to 1/64 of the input's size.
_MIN_CHUNK_ROWS = 64


# --------------------------------------------------------------------------------------------
# switches


def takes(
    arrays: tuple[Array, ...],
    axes: tuple[int, ...],
    out: Array | None,
    dtypes: frozenset[np.dtype] = _DTYPES,
) -> bool:
    """True when these arguments run here: plain ``ndarray`` inputs (and ``out``) of one dtype
    of ``dtypes`` (the table's), at least one dimension and one softmax axis;
    ``XPSOFTMAX_NUMPY_FAST`` not 0."""
    if not _config.numpy_fast() or not axes or (out is not None and type(out) is not np.ndarray):
        return False
    dtype = arrays[0].dtype
    for a in arrays:  # (a loop: a generator expression costs a microsecond on every call)
        if type(a) is not np.ndarray or a.dtype != dtype or a.ndim == 0:
            return False
    return dtype in dtypes


@functools.cache
def _l2_bytes() -> int:
    """The L2 cache size of one core, clamped to [256 KiB, 8 MiB]; 1 MiB when unknown."""
    size = 0
    try:
        size = os.sysconf("SC_LEVEL2_CACHE_SIZE")
    except (AttributeError, ValueError, OSError):
        pass
    if size <= 0:
        size = _l2_from_sysfs()
    if size <= 0:
        size = 1 << 20
    return min(max(size, 256 << 10), 8 << 20)


def _l2_from_sysfs() -> int:
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(root)
    except OSError:
        return 0
    for entry in sorted(entries):
        try:
            with open(os.path.join(root, entry, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(root, entry, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(root, entry, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        if level == "2" and kind in ("Unified", "Data"):
            units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
            scale = units.get(text[-1:].upper(), 1)
            digits = text[:-1] if text[-1:].upper() in units else text
            return int(digits) * scale if digits.isdigit() else 0
    return 0


def _block_elems(itemsize: int) -> int:
    """Elements of one block: one block of the input (in the compute dtype) fills the L2 cache.

    Measured on a 1 MiB-L2 machine with 1 and 2 threads: half this size costs 5-15 % (more
    NumPy calls and more GIL hand-offs per element), a quarter of it 20-30 %; the output block
    and the scratch of log-softmax and of the backward spill into L3 without a measurable cost.
    """
    return max(4096, _l2_bytes() // itemsize)


# --------------------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True)
class _Plan:
    perm: tuple[int, ...] | None  # transpose making the axes adjacent and last; None if adjacent
    split: tuple[int, int]  # (transposed) dims [0, k0) are outer, [k0, k1) softmax, [k1, :) inner
    shape: tuple[int, ...]  # (outer, n) or (outer, n, inner)
    block: tuple[int, ...]  # block extent along each dim of shape
    counts: tuple[int, ...]  # number of blocks along each dim of shape
    bufsize: int  # ufunc buffer size for the block passes; 0: NumPy's default

    @property
    def chunks(self) -> int:
        """Chunks per row along n; 1 when a whole row fits in one block."""
        return self.counts[1]

    @property
    def ntasks(self) -> int:
        return math.prod(self.counts)

    def index(self, t: int) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """Task ``t``'s block, and its entry in the per-chunk statistics."""
        bo, bn = self.block[0], self.block[1]
        if len(self.shape) == 2:
            io, ic = divmod(t, self.counts[1])
            rows = slice(io * bo, io * bo + bo)
            return (rows, slice(ic * bn, ic * bn + bn)), (rows, slice(ic, ic + 1))
        bi = self.block[2]
        io, rest = divmod(t, self.counts[1] * self.counts[2])
        ic, ii = divmod(rest, self.counts[2])
        rows, cols = slice(io * bo, io * bo + bo), slice(ii * bi, ii * bi + bi)
        return (rows, slice(ic * bn, ic * bn + bn), cols), (rows, slice(ic, ic + 1), cols)


def _plan(shape: tuple[int, ...], axes: tuple[int, ...], itemsize: int) -> _Plan:
    return _make_plan(shape, axes, _block_elems(itemsize))


@functools.lru_cache(maxsize=256)
def _make_plan(shape: tuple[int, ...], axes: tuple[int, ...], e: int) -> _Plan:
    ndim = len(shape)
    if axes == tuple(range(axes[0], axes[-1] + 1)):
        perm, k0, k1, tshape = None, axes[0], axes[-1] + 1, shape
    else:
        kept = tuple(a for a in range(ndim) if a not in axes)
        perm = kept + axes
        k0, k1, tshape = len(kept), ndim, tuple(shape[p] for p in perm)
    outer, n, inner = math.prod(tshape[:k0]), math.prod(tshape[k0:k1]), math.prod(tshape[k1:])
    if inner == 1:
        if n <= e:
            view, block = (outer, n), (max(1, e // n), n)
        else:
            view, block = (outer, n), (1, e)
    else:
        view = (outer, n, inner)
        if n * inner <= e:
            block = (max(1, e // (n * inner)), n, inner)
        else:
            # Chunks of a few whole-width rows (contiguous): measured 1.5-2x faster than whole
            # columns of a narrow inner slice, whose strided rows defeat the cache.
            bi = min(inner, max(1, e // _MIN_CHUNK_ROWS))
            block = (1, max(1, e // bi), bi)
    counts = tuple(-(-d // b) for d, b in zip(view, block, strict=True))
    # Row-wise broadcasts ((rows, n) with (rows, 1)) on rows of 384 to 8191 elements run up to
    # 2x faster with a small ufunc buffer: NumPy then skips buffering the stride-0 operand.
    bufsize = _SMALL_BUFSIZE if inner == 1 and n >= 384 else 0
    return _Plan(perm, (k0, k1), view, block, counts, bufsize)


def _merge(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, int] | None:
    """Size and stride of ``shape``'s dims seen as one, or None when the strides do not allow it."""
    size, stride = 1, 0
    for d, s in zip(reversed(shape), reversed(strides), strict=True):
        if d == 1:
            continue
        if size == 1:
            size, stride = d, s
        elif s == stride * size:
            size *= d
        else:
            return None
    return size, stride


def _view(a: Array, plan: _Plan) -> Array | None:
    """``a`` seen in the plan's 2-D/3-D shape without copying, or None when that needs a copy."""
    if plan.perm is None and a.flags.c_contiguous:
        return a.reshape(plan.shape)  # a view; as_strided costs ~4 us a call on small arrays
    t = a if plan.perm is None else a.transpose(plan.perm)
    k0, k1 = plan.split
    bounds = [(0, k0), (k0, k1)] + ([(k1, t.ndim)] if len(plan.shape) == 3 else [])
    strides = []
    for lo, hi in bounds:
        merged = _merge(t.shape[lo:hi], t.strides[lo:hi])
        if merged is None:
            return None
        strides.append(merged[1])
    return np.lib.stride_tricks.as_strided(t, shape=plan.shape, strides=tuple(strides))


def _view_or_copy(a: Array, plan: _Plan) -> tuple[Array, bool]:
    v = _view(a, plan)
    if v is not None:
        return v, False
    t = a if plan.perm is None else a.transpose(plan.perm)
    return np.ascontiguousarray(t).reshape(plan.shape), True


def _same_view(a: Array, b: Array) -> bool:
    return (
        a.shape == b.shape
        and a.strides == b.strides
        and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
    )


# --------------------------------------------------------------------------------------------
# threads and scratch


class _Scratch(threading.local):
    """Per-thread block-sized buffers, reused from call to call."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[int, np.dtype], np.ndarray] = {}

    def get(self, slot: int, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        size = math.prod(shape)
        key = (slot, np.dtype(dtype))
        buf = self.buffers.get(key)
        if buf is None or buf.size < size:
            buf = self.buffers[key] = np.empty(size, dtype=dtype)
        return buf[:size].reshape(shape)


_scratch = _Scratch()
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_workers = 0
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    global _pool, _pool_workers
    _pool, _pool_workers = None, 0


if hasattr(os, "register_at_fork"):
    # A forked child inherits the pool object but not its threads.
    os.register_at_fork(after_in_child=_forget_pool)


def _executor(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    global _pool, _pool_workers
    with _pool_lock:
        if _pool is None or _pool_workers < workers:
            old = _pool
            _pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="xpsoftmax")
            _pool_workers = workers
            if old is not None:
                old.shutdown(wait=False)
        return _pool


def _ufunc_state(bufsize: int) -> contextlib.AbstractContextManager[None]:
    """On this thread: no floating-point warnings, and ``bufsize`` as the ufunc buffer size.

    Both are per-thread settings in NumPy, so each worker sets them itself. Without a buffer size
    this is ``np.errstate`` itself: a generator-based context costs microseconds a call, which
    tiny inputs feel.
    """
    if not bufsize:
        return np.errstate(all="ignore")
    return _errstate_and_bufsize(bufsize)


@contextlib.contextmanager
def _errstate_and_bufsize(bufsize: int) -> Iterator[None]:
    with np.errstate(all="ignore"):
        previous = np.setbufsize(bufsize)
        try:
            yield
        finally:
            np.setbufsize(previous)


def _run(c: _Call, task: Callable[[int], None]) -> None:
    """``task(t)`` for every task of the plan, on up to ``c.threads`` threads (caller included)."""
    run_tasks(c.plan.ntasks, c.threads, task, c.plan.bufsize)


def run_tasks(ntasks: int, threads: int, task: Callable[[int], None], bufsize: int = 0) -> None:
    """``task(t)`` for ``t < ntasks`` on up to ``threads`` threads, the calling thread included.

    Tasks are handed out one at a time from a shared counter. The caller never waits for a
    worker that has not started: when it runs out of tasks it cancels the hand-offs still
    queued, and waits only for workers already inside a task. On a busy machine a queued worker
    may not be scheduled for a whole time slice (measured: ~8 ms steps); the caller then simply
    does all the work itself, at single-thread speed.
    """
    threads = min(threads, ntasks)
    if threads <= 1:
        # The calling thread already ignores floating-point errors (backends.run's errstate).
        with _errstate_and_bufsize(bufsize) if bufsize else contextlib.nullcontext():
            for t in range(ntasks):
                task(t)
        return
    lock = threading.Lock()
    state = {"next": 0, "failed": False}

    def worker() -> None:
        with _ufunc_state(bufsize):
            while True:
                with lock:
                    t = state["next"]
                    if state["failed"] or t >= ntasks:
                        return
                    state["next"] = t + 1
                try:
                    task(t)
                except BaseException:
                    state["failed"] = True
                    raise

    pool = _executor(threads - 1)
    futures = [pool.submit(worker) for _ in range(threads - 1)]
    try:
        worker()
    finally:
        started = [f for f in futures if not f.cancel()]
        concurrent.futures.wait(started)
    for f in started:
        f.result()


# --------------------------------------------------------------------------------------------
# one call: views, output, aliasing


@dataclass
class _Call:
    plan: _Plan
    inputs: list[Array]  # 2-D/3-D views (or copies) of the array arguments
    mask: Array | None
    out: Array  # 2-D/3-D view the result is written to
    result: Array  # what the public function returns
    temp: Array | None  # set when ``out`` is a temporary to copy into ``result`` at the end
    aliases: list[bool]  # inputs[i] is the very memory of ``out``
    ct: np.dtype  # compute dtype
    threads: int

    def finish(self) -> Array:
        if self.temp is not None:
            r = self.result if self.plan.perm is None else self.result.transpose(self.plan.perm)
            np.copyto(r, self.temp.reshape(r.shape))
        return self.result


def _setup(
    arrays: tuple[Array, ...],
    axes: tuple[int, ...],
    mask: Array | None,
    out: Array | None,
    dtype: np.dtype | None = None,
):
    """A :class:`_Call` for arguments that :func:`takes` accepts; ``dtype`` is the result's
    when it is wider than the inputs' (``dtype=``: computed in its compute dtype)."""
    x = arrays[0]
    dtype = x.dtype if dtype is None else dtype
    ct = np_compute_dtype(dtype)
    plan = _plan(tuple(x.shape), tuple(axes), ct.itemsize)
    views, copied = zip(*(_view_or_copy(a, plan) for a in arrays), strict=True)
    mview = None if mask is None else _view_or_copy(mask, plan)[0]
    result = np.empty(x.shape, dtype=dtype) if out is None else out
    aliases = [False] * len(arrays)
    ov = _view(result, plan)
    if out is not None and ov is not None:
        for i, (a, v, c) in enumerate(zip(arrays, views, copied, strict=True)):
            if c or not np.may_share_memory(out, a):
                continue
            if _same_view(ov, v):
                aliases[i] = True
            else:
                ov = None  # partial overlap: go through a temporary
                break
        if ov is not None and mask is not None and np.may_share_memory(out, mask):
            ov = None
    temp = None
    if ov is None:
        temp = ov = np.empty(plan.shape, dtype=dtype)
        aliases = [False] * len(arrays)
    threads = _config.num_threads() if x.nbytes * len(arrays) >= _SMALL_BYTES else 1
    return _Call(plan, list(views), mview, ov, result, temp, aliases, ct, threads)


def _load(src: Array, ct: np.dtype, slot: int) -> Array:
    """``src`` in the compute dtype: itself, or a float32 copy in scratch for float16."""
    if src.dtype == ct:
        return src
    buf = _scratch.get(slot, ct, src.shape)
    np.copyto(buf, src)
    return buf


def _not(mb: Array) -> Array:
    return np.logical_not(mb, out=_scratch.get(9, np.bool_, mb.shape))


# --------------------------------------------------------------------------------------------
# forward


@functools.lru_cache(maxsize=16)
def _row_starts(rows: int, n: int) -> Array:
    starts = np.arange(0, rows * n, n, dtype=np.intp)
    starts.flags.writeable = False
    return starts


def _row_max(xb: Array, mb: Array | None, ct: np.dtype) -> Array:
    contiguous_rows = xb.ndim == 2 and xb.strides == (xb.shape[1] * xb.itemsize, xb.itemsize)
    if mb is None and contiguous_rows and xb.shape[1] >= 8:
        # On contiguous rows, reduceat runs about twice as fast as reduce along axis 1.
        flat = xb.reshape(-1)
        m = np.maximum.reduceat(flat, _row_starts(*xb.shape))[:, None]
    elif mb is None:
        m = np.maximum.reduce(xb, axis=1, keepdims=True)
    else:
        m = np.maximum.reduce(xb, axis=1, keepdims=True, where=mb, initial=-np.inf)
    return m.astype(ct, copy=m.dtype != ct)


def _row_sum(w: Array, mb: Array | None = None) -> Array:
    """Sums along axis 1, keeping it; masked entries left out."""
    if mb is not None:
        return np.add.reduce(w, axis=1, keepdims=True, where=mb)
    if w.ndim == 2 and w.size > _TINY_ELEMS:
        # A row dot with ones runs several times faster than add.reduce on short rows.
        return np.expand_dims(_vecdot(w, _ones(w.dtype, w.shape[1])), 1)
    return np.add.reduce(w, axis=1, keepdims=True)  # tiny blocks: the BLAS call costs more


#: Blocks of at most this many elements sum with add.reduce (1.2 us for 16x8 float64 on the
#: 2-core CI machine, against 3.3 us through the BLAS row dot).
_TINY_ELEMS = 4096

_ones_cache: dict[np.dtype, np.ndarray] = {}


def _ones(dtype: np.dtype, n: int) -> Array:
    ones = _ones_cache.get(dtype)
    if ones is None or ones.size < n:
        ones = np.ones(max(n, 1024), dtype=dtype)
        ones.flags.writeable = False
        _ones_cache[dtype] = ones
    return ones[:n]


def _shift(m: Array, empty: Array | None) -> tuple[Array, Array | None]:
    """The shift of each row from its maximum ``m`` (modified in place), and the ``+inf`` rows."""
    if empty is None and math.isfinite(np.add.reduce(m, axis=None)):
        return m, None  # every row maximum finite: the common case, two cheap calls
    inf_row = m == np.inf
    if inf_row.any():
        m[inf_row] = 0
    else:
        inf_row = None
    m[m == -np.inf] = np.nan
    if empty is not None:
        m[empty] = 0
    return m, inf_row


def _shifted(w: Array, xb: Array, mb: Array | None, shift: Array, inf_row: Array | None) -> None:
    """``w = xb - shift``, masked entries ``-inf``, each ``+inf`` row replaced by its limit."""
    np.subtract(xb, shift, out=w)
    if mb is not None:
        np.copyto(w, -np.inf, where=_not(mb))
    if inf_row is not None:
        limit = np.where(w == np.inf, 0.0, -np.inf)
        np.copyto(w, limit, where=np.broadcast_to(inf_row, w.shape), casting="unsafe")


def _finish_rows(w: Array, s: Array, mb: Array | None, log: bool) -> None:
    """``w - log(s)`` (log) or ``w / s`` in place; masked entries keep their exact ``-inf``/0.

    Leaving masked entries out keeps them exact even in a row that a NaN poisons, as in
    the generic ``forward``.
    """
    op = np.subtract if log else np.divide
    if mb is None:
        op(w, s, out=w)
    else:
        op(w, s, out=w, where=mb)


def _forward_block(xb: Array, mb: Array | None, ob: Array, log: bool, ct: np.dtype) -> None:
    """Softmax or log-softmax of whole rows, every pass inside the block."""
    empty = None if mb is None else ~np.any(mb, axis=1, keepdims=True)
    shift, inf_row = _shift(_row_max(xb, mb, ct), empty)
    w = ob if ob.dtype == ct else _scratch.get(0, ct, ob.shape)
    _shifted(w, xb, mb, shift, inf_row)
    if log:
        s = _row_sum(np.exp(w, out=_scratch.get(1, ct, w.shape)))
        if empty is not None:
            s[empty] = 1
        _finish_rows(w, np.log(s, out=s), mb, log)
    else:
        s = _row_sum(np.exp(w, out=w))
        if empty is not None:
            s[empty] = 1
        _finish_rows(w, s, mb, log)
    if w is not ob:
        np.copyto(ob, w)


def _stats_shape(plan: _Plan) -> list[int]:
    """Shape of per-chunk row statistics: the view's shape with ``n`` replaced by the chunks."""
    shape = list(plan.shape)
    shape[1] = plan.chunks
    return shape


def _rows(st: tuple[slice, ...], a: Array | None) -> Array | None:
    """The rows of a task's block in a per-row array ``a`` (``n`` reduced to 1)."""
    return None if a is None else a[(st[0], slice(None), *st[2:])]


def _forward_chunked(c: _Call, log: bool) -> None:
    """Rows longer than a block, float32/64: two passes over chunks (online normalization).

    Pass 1 writes each chunk normalized by its own maximum ``m_c`` (exp, or the shifted logits
    for log) into the output and records ``m_c`` and the chunk's sum; pass 2 rescales each
    chunk by ``exp(m_c - M) / S`` (log: adds ``m_c - M - log S``). A chunk with a ``+inf``
    leaves 1 (log: 0) at its ``+inf`` entries and 0 (``-inf``) elsewhere, and counts them, so
    the ``+inf`` rows get their limit without reading the input again: ``out=`` may be ``x``.
    """
    (xv,), mv, ov, plan, ct = c.inputs, c.mask, c.out, c.plan, c.ct
    m_part = np.empty(_stats_shape(plan), dtype=ct)
    s_part = np.empty(_stats_shape(plan), dtype=ct)

    def normalize_pass(t: int) -> None:
        blk, st = plan.index(t)
        ob, mb = ov[blk], None if mv is None else mv[blk]
        m = _row_max(xv[blk], mb, ct)
        m_part[st] = m
        inf_col = m == np.inf
        shift = np.where(np.isfinite(m), m, 0)  # -inf: the chunk gives 0; NaN: the row is NaN
        _shifted(ob, xv[blk], mb, shift, inf_col if inf_col.any() else None)
        e = np.exp(ob, out=_scratch.get(1, ct, ob.shape) if log else ob)
        s_part[st] = _row_sum(e)

    _run(c, normalize_pass)
    coef = _chunk_coefficients(m_part, s_part, log)

    def rescale_pass(t: int) -> None:
        blk, st = plan.index(t)
        op = np.add if log else np.multiply
        if mv is None:
            op(ov[blk], coef[st], out=ov[blk])
        else:
            op(ov[blk], coef[st], out=ov[blk], where=mv[blk])  # masked entries stay exact

    _run(c, rescale_pass)


def _chunk_coefficients(m_part: Array, s_part: Array, log: bool) -> Array:
    """Per chunk and row: the factor (log: the term) that turns pass 1's output into the result.

    The rows' special cases are those of the generic ``_normalize``: a ``+inf`` row splits its
    mass over its ``+inf`` entries (pass 1 left 1s there, ``s_part`` counts them); a row with a
    NaN, or whose unmasked entries are all ``-inf``, is NaN; a fully masked row has no entry
    left to change (pass 2 skips masked entries).
    """
    big = np.max(m_part, axis=1, keepdims=True)
    e = np.exp(m_part - big)  # a chunk with m_c = -inf contributes exactly 0
    total = np.sum(s_part * e, axis=1, keepdims=True)
    if log:
        coef = (m_part - big) - np.log(total)
    else:
        coef = e / total
    inf_row = big == np.inf
    if inf_row.any():
        hit = m_part == np.inf
        k = np.sum(np.where(hit, s_part, 0), axis=1, keepdims=True)
        limit = np.where(hit, -np.log(k), -np.inf) if log else np.where(hit, 1 / k, 0)
        coef = np.where(inf_row, limit, coef)
    nan_row = np.isnan(big) | (big == -np.inf)
    return np.where(nan_row, np.nan, coef).astype(m_part.dtype, copy=False)


def _forward_three_pass(c: _Call, log: bool) -> None:
    """Rows longer than a block, float16: a max pass, a sum pass, and a pass that recomputes.

    The output cannot hold intermediate values at full precision, so the last pass recomputes
    each chunk from the input and rounds once.
    """
    (xv,), mv, ov, plan, ct = c.inputs, c.mask, c.out, c.plan, c.ct
    m_part = np.empty(_stats_shape(plan), dtype=ct)
    any_part = None if mv is None else np.empty(_stats_shape(plan), dtype=bool)
    s_part = np.empty(_stats_shape(plan), dtype=ct)

    def max_pass(t: int) -> None:
        blk, st = plan.index(t)
        mb = None if mv is None else mv[blk]
        m_part[st] = _row_max(xv[blk], mb, ct)
        if any_part is not None:
            any_part[st] = np.any(mb, axis=1, keepdims=True)

    _run(c, max_pass)
    empty = None if any_part is None else ~np.any(any_part, axis=1, keepdims=True)
    shift, inf_row = _shift(np.max(m_part, axis=1, keepdims=True), empty)

    def shifted(t: int) -> tuple[Array, tuple[slice, ...], tuple[slice, ...]]:
        blk, st = plan.index(t)
        w = _scratch.get(0, ct, ov[blk].shape)
        mb = None if mv is None else mv[blk]
        _shifted(w, xv[blk], mb, _rows(st, shift), _rows(st, inf_row))
        return w, blk, st

    def sum_pass(t: int) -> None:
        w, _, st = shifted(t)
        s_part[st] = _row_sum(np.exp(w, out=w))

    _run(c, sum_pass)
    s = np.sum(s_part, axis=1, keepdims=True)
    if empty is not None:
        s[empty] = 1
    if log:
        np.log(s, out=s)

    def write_pass(t: int) -> None:
        w, blk, st = shifted(t)
        if not log:
            np.exp(w, out=w)
        _finish_rows(w, _rows(st, s), None if mv is None else mv[blk], log)
        np.copyto(ov[blk], w)

    _run(c, write_pass)


def forward(
    x: Array, axes: tuple[int, ...], mask: Array | None, log: bool, out: Array | None
) -> Array:
    """softmax (``log=False``) or log_softmax (``log=True``) of ``x`` along ``axes``."""
    c = _setup((x,), axes, mask, out)
    if c.plan.chunks == 1:
        (xv,), mv, ov, plan, ct = c.inputs, c.mask, c.out, c.plan, c.ct

        def task(t: int) -> None:
            blk, _ = plan.index(t)
            _forward_block(xv[blk], None if mv is None else mv[blk], ov[blk], log, ct)

        _run(c, task)
    elif c.out.dtype == c.ct:
        _forward_chunked(c, log)
    else:
        _forward_three_pass(c, log)
    return c.finish()


# --------------------------------------------------------------------------------------------
# backward and JVP
#
# Three products share one shape: a row statistic ``dot`` and an elementwise update.
#   "softmax":  dot = sum(y * g),      r = y * (g - dot)    (softmax VJP and JVP)
#   "log_vjp":  dot = sum(g),          r = g - exp(y) * dot
#   "log_jvp":  dot = sum(exp(y) * g), r = g - dot
# Masked entries are left out of ``dot`` and give exactly 0 in ``r``.


# Longest piece of a row handed to one BLAS dot call: OpenBLAS splits longer dots (more than
# 10000 elements) over its own threads, which on a busy machine can stall a call for a whole
# scheduler time slice (measured: 20 ms instead of 30 us).
_DOT_PIECE = 4096


def _vecdot(a: Array, b: Array) -> Array:
    """Dot products of the rows of ``a`` (2-D) with the rows of ``b`` (2-D, or 1-D for all)."""
    dot = np.vecdot if hasattr(np, "vecdot") else _einsum_vecdot  # NumPy >= 2.0: BLAS dots
    n = a.shape[1]
    if n <= _DOT_PIECE:
        return dot(a, b)
    r = dot(a[:, :_DOT_PIECE], b[..., :_DOT_PIECE])
    for i in range(_DOT_PIECE, n, _DOT_PIECE):
        r += dot(a[:, i : i + _DOT_PIECE], b[..., i : i + _DOT_PIECE])
    return r


def _einsum_vecdot(a: Array, b: Array) -> Array:
    return np.einsum("ij,ij->i", a, np.broadcast_to(b, a.shape))


def _tmp(ob: Array, ct: np.dtype, free: bool) -> Array:
    """A block-shaped work buffer: the output block itself when ``free``, else scratch."""
    return ob if free and ob.dtype == ct else _scratch.get(2, ct, ob.shape)


def _row_dot(
    y: Array, g: Array, mb: Array | None, kind: str, ob: Array, aliases: tuple[bool, bool]
) -> Array:
    """The row statistic; the output block serves as work space unless it is ``y`` or ``g``."""
    if kind == "log_vjp":
        return _row_sum(g, mb)
    if kind == "log_jvp":
        y = np.exp(y, out=_tmp(ob, y.dtype, not any(aliases)))
    if mb is None and y.ndim == 2:
        return np.expand_dims(_vecdot(y, g), 1)
    return _row_sum(np.multiply(y, g, out=_tmp(ob, y.dtype, not any(aliases))), mb)


def _update(
    y: Array,
    g: Array,
    mb: Array | None,
    dot: Array,
    kind: str,
    ob: Array,
    aliases: tuple[bool, bool],
) -> None:
    """Write the update into ``ob``; ``ob`` may be the very memory of ``y`` or ``g``
    (``aliases``), so each step below reads an input before it is overwritten."""
    ct = y.dtype
    direct = ob.dtype == ct
    out_is_y, out_is_g = aliases
    if kind == "softmax":
        t = _tmp(ob, ct, not out_is_y)
        np.subtract(g, dot, out=t)
        r = ob if direct else t
        np.multiply(t, y, out=r)
    elif kind == "log_vjp":
        e = _tmp(ob, ct, not out_is_g)
        np.multiply(np.exp(y, out=e), dot, out=e)
        r = ob if direct else e
        np.subtract(g, e, out=r)
    else:
        r = _tmp(ob, ct, True)
        np.subtract(g, dot, out=r)
    if mb is not None:
        np.copyto(r, 0, where=_not(mb))
    if r is not ob:
        np.copyto(ob, r)


def _product(c: _Call, kind: str) -> Array:
    (yv, gv), mv, ov, plan, ct = c.inputs, c.mask, c.out, c.plan, c.ct
    aliases = (c.aliases[0], c.aliases[1])

    def load(blk: tuple[slice, ...]) -> tuple[Array, Array, Array | None]:
        return _load(yv[blk], ct, 0), _load(gv[blk], ct, 1), None if mv is None else mv[blk]

    if plan.chunks == 1:

        def task(t: int) -> None:
            blk, _ = plan.index(t)
            y, g, mb = load(blk)
            ob = ov[blk]
            _update(y, g, mb, _row_dot(y, g, mb, kind, ob, aliases), kind, ob, aliases)

        _run(c, task)
        return c.finish()

    d_part = np.empty(_stats_shape(plan), dtype=ct)

    def dot_pass(t: int) -> None:
        blk, st = plan.index(t)
        d_part[st] = _row_dot(*load(blk), kind, ov[blk], aliases)

    _run(c, dot_pass)
    dot = np.sum(d_part, axis=1, keepdims=True)

    def update_pass(t: int) -> None:
        blk, st = plan.index(t)
        y, g, mb = load(blk)
        _update(y, g, mb, _rows(st, dot), kind, ov[blk], aliases)

    _run(c, update_pass)
    return c.finish()


def product(
    y: Array, g: Array, axes: tuple[int, ...], mask: Array | None, kind: str, out: Array | None
) -> Array:
    """The VJP or JVP from the forward output ``y`` and ``g`` (cotangent or tangent); ``kind``
    is one of the three products above: ``"softmax"``, ``"log_vjp"`` or ``"log_jvp"``."""
    return _product(_setup((y, g), axes, mask, out), kind)
