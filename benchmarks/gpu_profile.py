"""Host overhead versus kernel time: where a call's time goes, on a GPU.

For a few shapes it times (a) one call between two CUDA events, synchronizing each time (host
overhead included), (b) many calls back to back between two events (host overhead overlapped
with kernel work), for xpsoftmax and torch; then profiles the Python side of 300 small calls with
cProfile and prints the top entries.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys

import cupy as cp
import numpy as np

import xpsoftmax


def _sync_each(fn, args, repeat=20) -> float:
    fn(*args)
    cp.cuda.Device().synchronize()
    ts = []
    for _ in range(repeat):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn(*args)
        b.record()
        b.synchronize()
        ts.append(cp.cuda.get_elapsed_time(a, b))
    return float(np.median(ts))


def _back_to_back(fn, args, repeat=50) -> float:
    fn(*args)
    cp.cuda.Device().synchronize()
    a, b = cp.cuda.Event(), cp.cuda.Event()
    a.record()
    for _ in range(repeat):
        fn(*args)
    b.record()
    b.synchronize()
    return cp.cuda.get_elapsed_time(a, b) / repeat


def _torch_bwd(y, g):
    import torch

    return torch._softmax_backward_data(g, y, -1, y.dtype)


def main() -> int:
    import torch

    rng = cp.random.default_rng(0)
    for dtype in ("float32", "float16"):
        for shape in ((131072, 256), (32768, 1024), (8192, 4096), (16, 8)):
            x = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
            g = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
            y = xpsoftmax.softmax(x)
            tx, ty, tg = (torch.from_dlpack(a) for a in (x, y, g))
            rows = [
                ("xps fwd", xpsoftmax.softmax, (x,)),
                ("torch fwd", lambda t: torch.softmax(t, -1), (tx,)),
                ("xps bwd", xpsoftmax.softmax_backward, (y, g)),
                ("torch bwd", _torch_bwd, (ty, tg)),
            ]
            for name, fn, args in rows:
                s = _sync_each(fn, args)
                b = _back_to_back(fn, args)
                print(
                    f"{dtype} {shape} {name:10s} sync-each {s * 1e3:8.1f} us  back-to-back "
                    f"{b * 1e3:8.1f} us",
                    flush=True,
                )
    x = rng.standard_normal((16, 8), dtype=np.float32)
    xpsoftmax.softmax(x)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        xpsoftmax.softmax(x)
    prof.disable()
    cp.cuda.Device().synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    print(buf.getvalue()[-6000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
