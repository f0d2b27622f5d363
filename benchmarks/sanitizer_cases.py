#!/usr/bin/env python3
"""A handful of small cases per kernel tier, for compute-sanitizer.

Run it under the sanitizer; it exercises every kernel path once or twice with tiny inputs::

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/sanitizer_cases.py

Cases: row lengths 7, 32, 100, 1000, 3000, 20000 and 300000 (several rows per warp, a warp per
row, a block per row, the split-row path), a non-last-axis case and masked cases; softmax,
log-softmax, their backward and JVP; float16 and float32; inputs and ``out=`` aligned and offset
by one element (the scalar head/tail of the vector loads). CuPy's memory pool is switched off, so
each array is its own allocation and memcheck sees any access past its end.

Inputs are made on the host and copied, so almost every kernel launched is one of ours. The last
line printed is ``sanitizer_cases: N`` (the number of calls), which ``gpu_bench.py`` reads.
``--quick`` runs a subset (float32, forward and backward, aligned), sized for racecheck.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

LENGTHS = [7, 32, 100, 1000, 3000, 20000, 300000]
QUICK_LENGTHS = [100, 3000, 20000, 300000]
OPS = [
    ("softmax", False, False),
    ("log_softmax", True, False),
    ("softmax_backward", False, True),
    ("log_softmax_backward", True, True),
    ("softmax_jvp", False, True),
    ("log_softmax_jvp", True, True),
]
OUT_OPS = {"softmax", "log_softmax", "softmax_backward", "log_softmax_backward"}


def host_forward(x: np.ndarray, axis: int, log: bool, mask: np.ndarray | None) -> np.ndarray:
    """float64 softmax / log-softmax on the host, masked entries 0 / -inf (inputs for the VJP)."""
    x = x.astype(np.float64)
    if mask is not None:
        x = np.where(mask, x, -np.inf)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))
        r = x - lse if log else np.exp(x - lse)
    if mask is not None:
        r = np.where(mask, r, -np.inf if log else 0.0)
    return r


def to_device(cupy, a: np.ndarray, offset: int):
    """``a`` on the device, ``offset`` elements into its own allocation (no kernel launched)."""
    if offset == 0:
        return cupy.asarray(np.ascontiguousarray(a))
    flat = np.empty(a.size + offset, dtype=a.dtype)
    flat[offset:] = a.ravel()
    return cupy.asarray(flat)[offset:].reshape(a.shape)


def empty_out(cupy, shape, dtype, offset: int):
    buf = cupy.empty(int(np.prod(shape)) + offset, dtype=dtype)
    return buf[offset:].reshape(shape)


def cases(quick: bool):
    """(dtype, shape, axis, mask kind, offset, op names) for every group of calls."""
    dtypes = ["float32"] if quick else ["float16", "float32"]
    offsets = [0] if quick else [0, 1]
    ops = [o for o in OPS if not o[0].endswith("_jvp")] if quick else OPS
    lengths = QUICK_LENGTHS if quick else LENGTHS
    for dtype in dtypes:
        for n in lengths:
            rows = 2 if n >= 100000 else 3
            for offset in offsets:
                yield dtype, (rows, n), -1, None, offset, ops
        yield dtype, (3, 37, 50), 1, None, 0, ops  # non-last axis, short
        yield dtype, (2, 3000, 16), 1, None, 0, ops  # non-last axis, long
        if not quick:
            yield dtype, (4, 1000), -1, "full", 0, ops
            yield dtype, (3, 20000), -1, "columns", 1, ops
            yield dtype, (3, 37, 50), 1, "inner", 0, ops


def make_mask(kind: str | None, shape, rng) -> np.ndarray | None:
    if kind is None:
        return None
    if kind == "full":
        m = rng.random(shape) < 0.7
        m[0] = False  # a fully masked row
        return m
    if kind == "columns":
        m = rng.random((1, shape[-1])) < 0.6
        m[0, 0] = True
        return m
    if kind == "inner":
        m = rng.random((1, shape[1], 1)) < 0.6
        m[0, 0, 0] = True
        return m
    raise ValueError(kind)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a subset, for racecheck")
    args = p.parse_args(argv)

    import cupy

    import xpsoftmax

    cupy.cuda.set_allocator(None)  # one cudaMalloc per array: memcheck sees overruns
    rng = np.random.default_rng(0)
    count = 0
    with xpsoftmax.kernels("always"):
        for dtype, shape, axis, mask_kind, offset, ops in cases(args.quick):
            x = (2 * rng.standard_normal(shape)).astype(dtype)
            g = rng.standard_normal(shape).astype(dtype)
            mask = make_mask(mask_kind, shape, rng)
            where = None if mask is None else cupy.asarray(mask)
            full = None if mask is None else np.broadcast_to(mask, shape)
            dx = to_device(cupy, x, offset)
            dg = to_device(cupy, g, offset)
            for name, log, pair in ops:
                fn = getattr(xpsoftmax, name)
                if pair:
                    y = host_forward(x, axis, log, full).astype(dtype)
                    inputs = (to_device(cupy, y, offset), dg)
                else:
                    inputs = (dx,)
                kwargs = {"axis": axis}
                if where is not None:
                    kwargs["where"] = where
                if offset and name in OUT_OPS:
                    kwargs["out"] = empty_out(cupy, shape, dtype, offset)
                result = fn(*inputs, **kwargs)
                if result.shape != shape or str(result.dtype) != dtype:
                    msg = f"{name} {dtype} {shape}: got {result.shape} {result.dtype}"
                    raise AssertionError(msg)
                count += 1
            cupy.cuda.get_current_stream().synchronize()
    cupy.cuda.Device().synchronize()
    print(f"sanitizer_cases: {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
