"""Quick correctness sweep of every kernel tier on a GPU: a first look before the full test suite.

Runs the six public ops on CuPy arrays through the kernels (forcing each tier where it can take
the row) and compares them with the generic path on float64 copies. Prints one line per failing
case and a summary; exits 1 on any failure.
"""

from __future__ import annotations

import sys

import cupy as cp
import numpy as np

import xpsoftmax
from xpsoftmax._config import gpu_tuning

TOL = {"float16": 2e-3, "float32": 2e-6, "float64": 1e-12}
OPS = {
    "softmax": (xpsoftmax.softmax, 1),
    "log_softmax": (xpsoftmax.log_softmax, 1),
    "softmax_backward": (xpsoftmax.softmax_backward, 2),
    "log_softmax_backward": (xpsoftmax.log_softmax_backward, 2),
    "softmax_jvp": (xpsoftmax.softmax_jvp, 2),
    "log_softmax_jvp": (xpsoftmax.log_softmax_jvp, 2),
}


def _inputs(op: str, shape, dtype, axis, rng, special: bool):
    x = rng.standard_normal(shape, dtype=np.float64) * 3
    if special and shape[-1] > 4:
        x[..., 0] = np.inf if shape[-1] % 2 else -np.inf
        x[..., 1] = -np.inf
    x = cp.asarray(x).astype(dtype)
    if OPS[op][1] == 1:
        return (x,)
    log = op.startswith("log")
    with xpsoftmax.kernels("never"):
        y = (xpsoftmax.log_softmax if log else xpsoftmax.softmax)(x, axis=axis)
    g = cp.asarray(rng.standard_normal(shape)).astype(dtype)
    return (y, g)


def _compare(out, ref, dtype) -> str | None:
    out = cp.asnumpy(out).astype(np.float64)
    ref = cp.asnumpy(ref).astype(dtype).astype(np.float64)
    if out.shape != ref.shape:
        return f"shape {out.shape} != {ref.shape}"
    bad = np.isnan(out) != np.isnan(ref)
    bad |= np.isposinf(out) != np.isposinf(ref)
    bad |= np.isneginf(out) != np.isneginf(ref)
    if bad.any():
        return f"{int(bad.sum())} NaN/inf positions differ"
    fin = np.isfinite(ref)
    num = np.linalg.norm(out[fin] - ref[fin])
    den = np.linalg.norm(ref[fin]) or 1.0
    err = num / den
    if err > TOL[dtype]:
        return f"rel err {err:.2e}"
    return None


def main() -> int:
    rng = np.random.default_rng(0)
    cases = 0
    failures = []
    shapes = [
        ((5, 3), -1),
        ((7, 33), -1),
        ((3, 1000), -1),
        ((4, 1025), -1),
        ((3, 5000), -1),
        ((2, 20000), -1),
        ((2, 70001), -1),
        ((2, 300000), -1),
        ((3, 50, 7), 1),
        ((2, 3000, 9), 1),
        ((2, 40000, 3), 1),
        ((4, 6, 5), 0),
    ]
    for shape, axis in shapes:
        for dtype in ("float32", "float16", "float64"):
            for op, (fn, _) in OPS.items():
                for tier in (None, "warp", "block", "split"):
                    for variant in ("plain", "mask", "special", "misaligned"):
                        args = _inputs(op, shape, dtype, axis, rng, variant == "special")
                        kw = {"axis": axis}
                        if variant == "mask":
                            m = cp.asarray(rng.random(shape[axis]) > 0.3)
                            mshape = [1] * len(shape)
                            mshape[axis] = shape[axis]
                            kw["where"] = m.reshape(mshape)
                        if variant == "misaligned":
                            args = tuple(
                                cp.concatenate([cp.zeros(1, a.dtype), a.ravel()])[1:].reshape(shape)
                                for a in args
                            )
                        with xpsoftmax.kernels("never"):
                            ref = fn(*(a.astype(np.float64) for a in args), **kw)
                        try:
                            with xpsoftmax.kernels("always"), gpu_tuning(tier=tier):
                                out = fn(*args, **kw)
                            cp.cuda.Device().synchronize()
                            problem = _compare(out, ref, dtype)
                        except Exception as exc:
                            problem = f"{type(exc).__name__}: {exc}"[:300]
                        cases += 1
                        if problem:
                            failures.append((op, dtype, shape, axis, tier, variant, problem))
                            print(
                                f"FAIL {op} {dtype} {shape} axis={axis} tier={tier} {variant}: "
                                f"{problem}",
                                flush=True,
                            )
    print(f"smoke: {cases} cases, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
