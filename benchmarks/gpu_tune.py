"""Tier sweep: time every kernel tier that can take a row length, to place the tier thresholds.

For each dtype and row length N it forces each feasible tier of ``xpsoftmax._cupy`` (warp, block,
split) and times softmax forward and softmax backward with CUDA events (median of repeats, after a
warm-up, rotating among buffers larger than L2), next to torch's native op on the same memory.
It also checks each forced tier against a float64 reference, so a wrong tier shows up here even
where the default thresholds never pick it.

Usage: ``python benchmarks/gpu_tune.py [--out DIR] [--mib 128] [--repeat 15]``; writes
``gpu_tune.json`` to DIR (default ``$OUT`` or ``.``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import cupy as cp
import numpy as np

import xpsoftmax
from xpsoftmax import _cupy

NS = (256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 1048576)


def _time(fn, sets, repeat: int) -> float:
    """Median milliseconds of fn(*args) over `repeat` runs, cycling through the argument sets."""
    for args in sets:
        fn(*args)
    cp.cuda.Device().synchronize()
    times = []
    for i in range(repeat):
        args = sets[i % len(sets)]
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn(*args)
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def _rel_err(out, ref) -> float:
    out = cp.asnumpy(out).astype(np.float64)
    ref = cp.asnumpy(ref)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--mib", type=int, default=128, help="size of one input tensor")
    p.add_argument("--repeat", type=int, default=15)
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        torch = None
    rows_out = []
    rng = cp.random.default_rng(0)
    for dtype in ("float32", "float16"):
        item = np.dtype(dtype).itemsize
        for n in NS:
            b = max(1, args.mib * 2**20 // (n * item))
            sets_f, sets_b = [], []
            for _ in range(3):
                x = rng.standard_normal((b, n), dtype=np.float32).astype(dtype)
                y = xpsoftmax.softmax(x)
                g = rng.standard_normal((b, n), dtype=np.float32).astype(dtype)
                sets_f.append((x,))
                sets_b.append((y, g))
            # float64 reference on a slice, from the generic path.
            xs = sets_f[0][0][: min(b, 64)]
            with xpsoftmax.kernels("never"):
                ref_f = xpsoftmax.softmax(xs.astype(np.float64))
                ref_b = xpsoftmax.softmax_backward(
                    sets_b[0][0][: len(xs)].astype(np.float64),
                    sets_b[0][1][: len(xs)].astype(np.float64),
                )
            nbytes_f = 2 * b * n * item
            nbytes_b = 3 * b * n * item
            torch_f = torch_b = None
            if torch is not None:
                tf = [(torch.from_dlpack(x),) for (x,) in sets_f]
                tb = [(torch.from_dlpack(y), torch.from_dlpack(g)) for y, g in sets_b]
                torch_f = _time(lambda t: torch.softmax(t, -1), tf, args.repeat)
                torch_b = _time(
                    lambda yy, gg: torch._softmax_backward_data(gg, yy, -1, yy.dtype),
                    tb,
                    args.repeat,
                )
            for tier in ("warp", "block", "split"):
                _cupy._FORCE_TIER = tier
                try:
                    if _cupy.choose_tier(n, dtype, 1, False, 227 * 1024, tier).name != tier:
                        continue
                    err_f = _rel_err(xpsoftmax.softmax(xs), ref_f)
                    err_b = _rel_err(
                        xpsoftmax.softmax_backward(
                            sets_b[0][0][: len(xs)], sets_b[0][1][: len(xs)]
                        ),
                        ref_b,
                    )
                    ms_f = _time(xpsoftmax.softmax, sets_f, args.repeat)
                    bwd_tier = _cupy.choose_tier(n, dtype, 2, False, 227 * 1024, tier).name
                    ms_b = _time(xpsoftmax.softmax_backward, sets_b, args.repeat)
                except Exception as exc:  # report and go on: this is a sweep
                    print(f"{dtype} N={n} tier={tier}: {type(exc).__name__}: {exc}", flush=True)
                    continue
                finally:
                    _cupy._FORCE_TIER = None
                row = {
                    "dtype": dtype,
                    "n": n,
                    "rows": b,
                    "tier": tier,
                    "bwd_tier": bwd_tier,
                    "fwd_ms": ms_f,
                    "bwd_ms": ms_b,
                    "fwd_gbps": nbytes_f / ms_f / 1e6,
                    "bwd_gbps": nbytes_b / ms_b / 1e6,
                    "torch_fwd_ms": torch_f,
                    "torch_bwd_ms": torch_b,
                    "err_fwd": err_f,
                    "err_bwd": err_b,
                }
                rows_out.append(row)
                print(
                    f"{dtype:8s} N={n:8d} {tier:5s}/{bwd_tier:5s} fwd {ms_f:7.3f} ms "
                    f"{row['fwd_gbps']:7.0f} GB/s (torch {torch_f or 0:7.3f})  bwd {ms_b:7.3f} ms "
                    f"{row['bwd_gbps']:7.0f} GB/s (torch {torch_b or 0:7.3f})  "
                    f"err {err_f:.1e} {err_b:.1e}",
                    flush=True,
                )
            del sets_f, sets_b
            cp.get_default_memory_pool().free_all_blocks()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_tune.json").write_text(json.dumps(rows_out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
