"""The compiled CPU path: the softmax family on NumPy arrays through the numba kernels.

The views, the ``out=`` aliasing rules and the thread pool are those of ``blocked.py`` (its
``_setup`` and ``run_tasks``); what changes is the work per task: one kernel call (``kernels.py``)
that reads each row once for every statistic and writes it once, instead of about ten NumPy calls.

Geometry (depends on the shape and dtype only, never on the thread count, so results are bitwise
the same for any number of threads):

* softmax axes last, the view ``(rows, n)``: a task is as many whole rows as fill the L2 cache
  (at least one); a row longer than the cache is one task, read from memory once per pass;
* a middle axis, the view ``(outer, n, inner)``: a task is ``bo`` outer slices times a tile of
  ``bk`` inner columns, the whole ``n`` of each, so that the tile fits the L2 cache.

float16 and bfloat16 are computed in float32: each task converts its block into per-thread
float32 scratch (``kernels.widen``), runs the float32 kernel there and rounds once into the
output (``kernels.narrow``); never a full-size cast. ``dtype=`` upcasts and softmin (the block
negated as it is converted) take the same staging, writing the wide result directly.

Each kernel takes flat contiguous buffers and element strides (see ``kernels.py``). A view whose
innermost stride is not one element, or that has negative strides, is copied first; an ``out=``
like that receives the result through a temporary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from ... import _config
from ..._dtypes import np_compute_dtype
from . import blocked, kernels

Array = Any

__all__ = ["forward", "logsumexp", "logsumexp_backward", "product"]

_KINDS = {"softmax": 0, "log_vjp": 1, "log_jvp": 2}
# The narrowest inner tile of a middle-axis task. Each row of a tile is one vectorized inner loop
# with its statistics in memory; on (4096, 1024) float32 along axis 0 (2026-12-02, 2-core EPYC)
# tiles of 16/64/256/512 columns took 7.8/5.4/4.5/3.9 ms: loop overhead, more than the L2
# cache, decides, so tiles are at least 256 columns even where that overflows the L2.
_MIN_TILE = 256
_NO_MASK = np.zeros(1, dtype=np.uint8)
_NO_MASK.flags.writeable = False


@dataclass(frozen=True)
class _Tasks:
    count: int  # number of tasks
    rows: int  # 2-D: rows per task; 3-D: outer slices per task
    tile: int  # 3-D: inner columns per task (0 for 2-D)
    tiles: int  # 3-D: tiles per outer block

    def span(self, t: int, total: int) -> tuple[int, int]:
        """2-D: the rows ``[r0, r1)`` of task ``t`` out of ``total``."""
        r0 = t * self.rows
        return r0, min(r0 + self.rows, total)

    def tile_of(self, t: int, outer: int, inner: int) -> tuple[int, int, int, int]:
        """3-D: the outer slices ``[o0, o1)`` and inner columns ``[k0, k1)`` of task ``t``."""
        ob, kb = divmod(t, self.tiles)
        o0, k0 = ob * self.rows, kb * self.tile
        return o0, min(o0 + self.rows, outer), k0, min(k0 + self.tile, inner)


@functools.lru_cache(maxsize=256)
def _tasks(shape: tuple[int, ...], e: int) -> _Tasks:
    if len(shape) == 2:
        outer, n = shape
        rows = max(1, e // n)
        return _Tasks(-(-outer // rows), rows, 0, 1)
    outer, n, inner = shape
    if n * inner <= e:
        rows, tile = max(1, e // (n * inner)), inner
    else:
        rows, tile = 1, min(inner, max(_MIN_TILE, e // n // _MIN_TILE * _MIN_TILE))
    tiles = -(-inner // tile)
    return _Tasks(-(-outer // rows) * tiles, rows, tile, tiles)


def _flat(v: Array, writeable: bool) -> tuple[Array, tuple[int, ...]] | None:
    """``v`` (2-D/3-D) as a flat contiguous buffer from its first element, and its element
    strides but the last; None when the innermost stride is not one element."""
    size = v.itemsize
    strides = v.strides
    if v.flags.c_contiguous:  # (as_strided costs ~3 us a call)
        flat = v.reshape(-1)
        if not writeable:
            flat.flags.writeable = False
        return flat, tuple(s // size for s in strides[:-1])
    if (strides[-1] != size and v.shape[-1] != 1) or any(s < 0 or s % size for s in strides):
        return None
    extent = 1 + sum((d - 1) * (s // size) for d, s in zip(v.shape, strides, strict=True))
    flat = np.lib.stride_tricks.as_strided(v, (extent,), (size,), writeable=writeable)
    return flat, tuple(s // size for s in strides[:-1])


def _input(v: Array) -> tuple[Array, tuple[int, ...]]:
    f = _flat(v, False)
    if f is None:
        f = _flat(np.ascontiguousarray(v), False)
    return f  # type: ignore[return-value]


def _mask(v: Array | None) -> tuple[Array, tuple[int, ...], bool]:
    if v is None:
        return _NO_MASK, (0,) * 2, False
    flat, strides = _input(v.view(np.uint8))
    return flat, strides, True


def _prepare(c: blocked._Call) -> None:
    """Make ``c.out`` a view the kernels can write (a temporary when it is not)."""
    if _flat(c.out, True) is None:
        c.temp = c.out = np.empty(c.out.shape, dtype=c.out.dtype)


def _direct(x: Array, axes: tuple[int, ...], mask: Array | None, out: Array | None) -> bool:
    """A small C-ordered float32/64 call along the last axis, without mask or ``out``: one
    kernel call on the calling thread, none of the view and aliasing set-up (the per-call
    cost of tiny arrays)."""
    return (
        mask is None
        and out is None
        and x.nbytes < blocked._SMALL_BYTES
        and x.dtype.char in "fd"
        and axes[-1] == x.ndim - 1
        and len(axes) == 1
        and x.flags.c_contiguous
    )


def _ro_flat(a: Array) -> Array:
    """A read-only flat view of the C-ordered ``a`` (``reshape`` already makes a new view)."""
    v = a.reshape(-1)
    v.flags.writeable = False
    return v


def _storage_kind(dtype: np.dtype) -> int | None:
    """The ``kind`` of ``kernels.widen``/``narrow`` for a 16-bit storage dtype, else None."""
    if dtype.char == "e":
        return 0
    return 1 if dtype.name == "bfloat16" else None


def _as_3d(v: Array, writeable: bool):
    """(flat 16-bit buffer, first two element strides, (a, b, c)) of a 2-D/3-D view of a
    16-bit dtype, or None when its innermost stride is not one element."""
    f = _flat(v.view(np.uint16), writeable)
    if f is None:
        return None
    flat, st = f
    if v.ndim == 2:
        return flat, (0, st[0]), (1, *v.shape)
    return flat, st, v.shape


def _load(w: Array, src: Array, neg: bool = False) -> None:
    """Fill the scratch ``w`` (contiguous, compute dtype) from the block ``src``: converted to
    ``w``'s dtype, negated for softmin (float16/bfloat16 by the kernels: NumPy's casts of
    float16 cost more than the whole operation)."""
    kind = _storage_kind(src.dtype)
    if kind is not None:
        f = _as_3d(src, False)
        if f is not None:
            flat, (s0, s1), (a, b, c) = f
            kernels.widen(flat, s0, s1, w.reshape(-1), a, b, c, kind, neg)
            return
    if neg:
        np.negative(src, out=w)
    else:
        np.copyto(w, src)


def _store(dst: Array, wo: Array) -> None:
    """Write the block ``wo`` (contiguous, compute dtype) into the result's block ``dst``,
    rounded once to its dtype."""
    kind = _storage_kind(dst.dtype)
    if kind is not None and wo.dtype == np.float32:
        f = _as_3d(dst, True)
        if f is not None:
            flat, (d0, d1), (a, b, c) = f
            kernels.narrow(wo.reshape(-1), flat, d0, d1, a, b, c, kind)
            return
    np.copyto(dst, wo)


def forward(
    x: Array,
    axes: tuple[int, ...],
    mask: Array | None,
    log: bool,
    out: Array | None,
    dtype: np.dtype | None = None,
    neg: bool = False,
) -> Array:
    """softmax (``log=False``) or log-softmax of ``x`` along ``axes`` (see ``blocked.forward``);
    of ``-x`` with ``neg`` (softmin), into the wider ``dtype`` when given (``dtype=``)."""
    if not neg and (dtype is None or dtype == x.dtype) and _direct(x, axes, mask, out):
        n = x.shape[-1]
        r = np.empty(x.shape, dtype=x.dtype)
        kernels.forward_rows(
            _ro_flat(x), n, _NO_MASK, 0, False, r.reshape(-1), n, 0, x.size // n, n, log
        )
        return r
    c = blocked._setup((x,), axes, mask, out, dtype)
    _prepare(c)
    (xv,), ov = c.inputs, c.out
    ct, half = c.ct, xv.dtype != c.ct
    staged = half or neg  # the kernels read a converted (or negated) copy of each block
    direct_out = ov.dtype == ct  # the kernels write the result itself
    mk, ms, masked = _mask(c.mask)
    plan = _tasks(xv.shape, blocked._block_elems(ct.itemsize))
    ff, fs = _flat(ov, True)  # type: ignore[misc]
    if not staged:
        xf, xs = _input(xv)
    if xv.ndim == 2:
        n = xv.shape[1]

        alias = c.aliases[0]

        def task(t: int) -> None:
            r0, r1 = plan.span(t, xv.shape[0])
            if not (staged or alias):
                kernels.forward_rows(xf, xs[0], mk, ms[0], masked, ff, fs[0], r0, r1, n, log)
                return
            # float16, softmin, or out= the input itself: the rows go through scratch (the
            # kernels' loops do not vectorize where input and output overlap).
            if staged:
                w = blocked._scratch.get(0, ct, (r1 - r0, n))
                _load(w, xv[r0:r1], neg)
                src, sx = _ro_flat(w), n
            else:
                src, sx = xf[r0 * xs[0] :], xs[0]
            m0 = mk[r0 * ms[0] :] if masked else mk
            if direct_out and not alias:
                of = ff[r0 * fs[0] :]
                kernels.forward_rows(src, sx, m0, ms[0], masked, of, fs[0], 0, r1 - r0, n, log)
                return
            wo = blocked._scratch.get(1, ct, (r1 - r0, n))
            kernels.forward_rows(src, sx, m0, ms[0], masked, wo.reshape(-1), n, 0, r1 - r0, n, log)
            _store(ov[r0:r1], wo)

    else:
        outer, n, inner = xv.shape

        def task(t: int) -> None:
            o0, o1, k0, k1 = plan.tile_of(t, outer, inner)
            if not staged:
                kernels.forward_cols(xf, *xs, mk, *ms, masked, ff, *fs, o0, o1, k0, k1, n, log)
                return
            w = blocked._scratch.get(0, ct, (o1 - o0, n, k1 - k0))
            _load(w, xv[o0:o1, :, k0:k1], neg)
            wf, bk = _ro_flat(w), k1 - k0
            m0 = mk[o0 * ms[0] + k0 :] if masked else mk
            st = (n * bk, bk)
            if direct_out:
                of = ff[o0 * fs[0] + k0 :]
                kernels.forward_cols(wf, *st, m0, *ms, masked, of, *fs, 0, o1 - o0, 0, bk, n, log)
                return
            wo = blocked._scratch.get(1, ct, w.shape)
            kernels.forward_cols(
                wf, *st, m0, *ms, masked, wo.reshape(-1), *st, 0, o1 - o0, 0, bk, n, log
            )
            _store(ov[o0:o1, :, k0:k1], wo)

    blocked.run_tasks(plan.count, c.threads, task)
    return c.finish()


def product(
    y: Array,
    g: Array,
    axes: tuple[int, ...],
    mask: Array | None,
    kind: str,
    out: Array | None,
    dtype: np.dtype | None = None,
) -> Array:
    """The VJP/JVP product ``kind`` (see ``blocked.product``), into the wider ``dtype`` when
    given (``dtype=``)."""
    same = dtype is None or dtype == y.dtype
    if same and _direct(y, axes, mask, out) and g.flags.c_contiguous:
        n = y.shape[-1]
        r = np.empty(y.shape, dtype=y.dtype)
        kernels.product_rows(
            _ro_flat(y),
            n,
            _ro_flat(g),
            n,
            _NO_MASK,
            0,
            False,
            r.reshape(-1),
            n,
            0,
            y.size // n,
            n,
            _KINDS[kind],
        )
        return r
    c = blocked._setup((y, g), axes, mask, out, dtype)
    _prepare(c)
    (yv, gv), ov = c.inputs, c.out
    ct, half = c.ct, yv.dtype != c.ct
    direct_out = ov.dtype == ct
    k = _KINDS[kind]
    mk, ms, masked = _mask(c.mask)
    plan = _tasks(yv.shape, blocked._block_elems(ct.itemsize))
    ff, fs = _flat(ov, True)  # type: ignore[misc]
    if not half:
        (yf, ys), (gf, gs) = _input(yv), _input(gv)
    if yv.ndim == 2:
        n = yv.shape[1]

        alias = c.aliases[0] or c.aliases[1]

        def task(t: int) -> None:
            r0, r1 = plan.span(t, yv.shape[0])
            if not (half or alias):
                kernels.product_rows(
                    yf, ys[0], gf, gs[0], mk, ms[0], masked, ff, fs[0], r0, r1, n, k
                )
                return
            if half:  # (scratch first: see forward)
                wy = blocked._scratch.get(0, ct, (r1 - r0, n))
                wg = blocked._scratch.get(1, ct, (r1 - r0, n))
                _load(wy, yv[r0:r1])
                _load(wg, gv[r0:r1])
                fy, sy, fg, sg = _ro_flat(wy), n, _ro_flat(wg), n
            else:
                fy, sy, fg, sg = yf[r0 * ys[0] :], ys[0], gf[r0 * gs[0] :], gs[0]
            m0 = mk[r0 * ms[0] :] if masked else mk
            if direct_out and not alias:
                of = ff[r0 * fs[0] :]
                kernels.product_rows(fy, sy, fg, sg, m0, ms[0], masked, of, fs[0], 0, r1 - r0, n, k)
                return
            wo = blocked._scratch.get(2, ct, (r1 - r0, n))
            kernels.product_rows(
                fy, sy, fg, sg, m0, ms[0], masked, wo.reshape(-1), n, 0, r1 - r0, n, k
            )
            _store(ov[r0:r1], wo)

    else:
        outer, n, inner = yv.shape

        def task(t: int) -> None:
            o0, o1, k0, k1 = plan.tile_of(t, outer, inner)
            if not half:
                kernels.product_cols(
                    yf, *ys, gf, *gs, mk, *ms, masked, ff, *fs, o0, o1, k0, k1, n, k
                )
                return
            bk = k1 - k0
            wy = blocked._scratch.get(0, ct, (o1 - o0, n, bk))
            wg = blocked._scratch.get(1, ct, wy.shape)
            _load(wy, yv[o0:o1, :, k0:k1])
            _load(wg, gv[o0:o1, :, k0:k1])
            fy, fg = _ro_flat(wy), _ro_flat(wg)
            m0 = mk[o0 * ms[0] + k0 :] if masked else mk
            st = (n * bk, bk)
            if direct_out:
                of = ff[o0 * fs[0] + k0 :]
                kernels.product_cols(
                    fy, *st, fg, *st, m0, *ms, masked, of, *fs, 0, o1 - o0, 0, bk, n, k
                )
                return
            wo = blocked._scratch.get(2, ct, wy.shape)
            kernels.product_cols(
                fy, *st, fg, *st, m0, *ms, masked, wo.reshape(-1), *st, 0, o1 - o0, 0, bk, n, k
            )
            _store(ov[o0:o1, :, k0:k1], wo)

    blocked.run_tasks(plan.count, c.threads, task)
    return c.finish()


# --------------------------------------------------------------------------------------------
# logsumexp


def _stats_layout(x: Array, axes: tuple[int, ...], mask: Array | None):
    """The plan's view of ``x`` (and of ``mask``), the compute dtype and the task geometry."""
    ct = np_compute_dtype(x.dtype)
    plan = blocked._plan(tuple(x.shape), tuple(axes), ct.itemsize)
    xv = blocked._view_or_copy(x, plan)[0]
    mv = None if mask is None else blocked._view_or_copy(mask, plan)[0]
    tasks = _tasks(xv.shape, blocked._block_elems(ct.itemsize))
    threads = _config.num_threads() if x.nbytes >= blocked._SMALL_BYTES else 1
    return xv, mv, ct, tasks, threads


def logsumexp(x: Array, axes: tuple[int, ...], mask: Array | None) -> Array:
    """The logsumexp of ``x`` along ``axes`` (normalized, non-empty), ``mask`` broadcast to
    ``x``'s shape or None: an array of the kept axes' shape (in order), ``x``'s dtype."""
    xv, mv, ct, plan, threads = _stats_layout(x, axes, mask)
    half = xv.dtype != ct
    mk, ms, masked = _mask(mv)
    kept = tuple(d for i, d in enumerate(x.shape) if i not in axes)
    if not half:
        xf, xs = _input(xv)
    if xv.ndim == 2:
        rows, n = xv.shape
        r = np.empty(rows, dtype=ct)

        def task(t: int) -> None:
            r0, r1 = plan.span(t, rows)
            if not half:
                kernels.lse_rows(xf, xs[0], mk, ms[0], masked, r, r0, r1, n)
                return
            w = blocked._scratch.get(0, ct, (r1 - r0, n))
            _load(w, xv[r0:r1])
            m0 = mk[r0 * ms[0] :] if masked else mk
            kernels.lse_rows(_ro_flat(w), n, m0, ms[0], masked, r[r0:r1], 0, r1 - r0, n)

    else:
        outer, n, inner = xv.shape
        r = np.empty((outer, inner), dtype=ct)
        rf = r.reshape(-1)

        def task(t: int) -> None:
            o0, o1, k0, k1 = plan.tile_of(t, outer, inner)
            if not half:
                kernels.lse_cols(xf, *xs, mk, *ms, masked, rf, inner, o0, o1, k0, k1, n)
                return
            bk = k1 - k0
            w = blocked._scratch.get(0, ct, (o1 - o0, n, bk))
            _load(w, xv[o0:o1, :, k0:k1])
            m0 = mk[o0 * ms[0] + k0 :] if masked else mk
            of = rf[o0 * inner + k0 :]
            wf, st = _ro_flat(w), (n * bk, bk)
            kernels.lse_cols(wf, *st, m0, *ms, masked, of, inner, 0, o1 - o0, 0, bk, n)

    blocked.run_tasks(plan.count, threads, task)
    return r.reshape(kept).astype(x.dtype, copy=False)


def logsumexp_backward(
    x: Array,
    lse: Array,
    dl: Array,
    axes: tuple[int, ...],
    mask: Array | None,
    out: Array | None,
) -> Array:
    """``exp(x - lse) * dl`` (``lse`` and ``dl`` with the reduced axes kept as size 1, ``x``'s
    dtype), the limit for +inf rows, masked entries 0; into ``out`` when given."""
    c = blocked._setup((x,), axes, mask, out)
    _prepare(c)
    (xv,), ov = c.inputs, c.out
    ct, half = c.ct, xv.dtype != c.ct
    staged = half or c.aliases[0]
    mk, ms, masked = _mask(c.mask)
    plan = _tasks(xv.shape, blocked._block_elems(ct.itemsize))
    ff, fs = _flat(ov, True)  # type: ignore[misc]
    stats = xv.shape[:1] + xv.shape[2:]  # (rows,) or (outer, inner)
    # (copies in the compute dtype: one value per row, and never the memory of out)
    lv = np.array(np.squeeze(lse, axis=axes), dtype=ct).reshape(stats)
    dv = np.array(np.squeeze(dl, axis=axes), dtype=ct).reshape(stats)
    if not staged:
        xf, xs = _input(xv)
    if xv.ndim == 2:
        rows, n = xv.shape

        def task(t: int) -> None:
            r0, r1 = plan.span(t, rows)
            if not staged:
                kernels.lse_grad_rows(xf, xs[0], mk, ms[0], masked, lv, dv, ff, fs[0], r0, r1, n)
                return
            w = blocked._scratch.get(0, ct, (r1 - r0, n))
            wo = blocked._scratch.get(1, ct, (r1 - r0, n))
            _load(w, xv[r0:r1])
            m0 = mk[r0 * ms[0] :] if masked else mk
            kernels.lse_grad_rows(
                _ro_flat(w),
                n,
                m0,
                ms[0],
                masked,
                lv[r0:r1],
                dv[r0:r1],
                wo.reshape(-1),
                n,
                0,
                r1 - r0,
                n,
            )
            _store(ov[r0:r1], wo)

    else:
        outer, n, inner = xv.shape
        lf, df = lv.reshape(-1), dv.reshape(-1)

        def task(t: int) -> None:
            o0, o1, k0, k1 = plan.tile_of(t, outer, inner)
            if not staged:
                kernels.lse_grad_cols(
                    xf, *xs, mk, *ms, masked, lf, df, inner, ff, *fs, o0, o1, k0, k1, n
                )
                return
            bk = k1 - k0
            w = blocked._scratch.get(0, ct, (o1 - o0, n, bk))
            wo = blocked._scratch.get(1, ct, w.shape)
            _load(w, xv[o0:o1, :, k0:k1])
            m0 = mk[o0 * ms[0] + k0 :] if masked else mk
            st = (n * bk, bk)
            kernels.lse_grad_cols(
                _ro_flat(w),
                *st,
                m0,
                *ms,
                masked,
                lf[o0 * inner + k0 :],
                df[o0 * inner + k0 :],
                inner,
                wo.reshape(-1),
                *st,
                0,
                o1 - o0,
                0,
                bk,
                n,
            )
            _store(ov[o0:o1, :, k0:k1], wo)

    blocked.run_tasks(plan.count, c.threads, task)
    return c.finish()
