"""Kernel A/B sweep: every kernel variant and tier that can take a row length, side by side.

For each dtype and row length N it times the four last-axis ops (softmax, log_softmax and their
backward) through

* ``default``: what xpsoftmax picks;
* ``masked``: the kernels that unmasked rows used before the ``*_plain`` kernels existed (the
  masked kernels with no mask; ``xpsoftmax._config.gpu_tuning(plain=False)``);
* ``block`` / ``split``: each other tier forced where it can take the row;

next to torch's native op on the same memory, with the benchmark's timing (CUDA events around
back-to-back calls, so the host's per-call overhead overlaps the kernels; median of repeats after a
warm-up; tensors of 256 MiB, three sets rotated). Each variant is also checked against a float64
reference on a slice of rows, so a wrong variant shows up even where the defaults never pick it.

Usage: ``python benchmarks/gpu_tune.py [--out DIR] [--mib 256] [--repeats 20] [--ns 1024,2048]``;
writes ``gpu_tune.json`` to DIR (default ``$OUT`` or ``.``) and prints one line per case.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import time_ms  # noqa: E402

import xpsoftmax  # noqa: E402
from xpsoftmax._config import gpu_tuning  # noqa: E402
from xpsoftmax.backends.cuda import plan as _cupy  # noqa: E402

NS = (32, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 262144)
OPS = ("softmax", "log_softmax", "softmax_backward", "log_softmax_backward")
SMEM = 227 * 1024


def _rel_err(out, ref) -> float:
    out = cp.asnumpy(out).astype(np.float64)
    ref = cp.asnumpy(ref)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _variants(n: int, dtype: str) -> list[tuple[str, str | None, bool]]:
    """(label, forced tier, plain kernels) for every distinct way to run rows of n."""
    out = [("default", None, True), ("masked", None, False)]
    default_f = _cupy.choose_tier(n, dtype, 1, False, SMEM).name
    default_b = _cupy.choose_tier(n, dtype, 2, False, SMEM).name
    for tier in ("block", "split"):
        f = _cupy.choose_tier(n, dtype, 1, False, SMEM, tier).name
        b = _cupy.choose_tier(n, dtype, 2, False, SMEM, tier).name
        if f == tier and (f, b) != (default_f, default_b):
            out.append((tier, tier, True))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--mib", type=int, default=256, help="size of one input tensor")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--ns", help="comma-separated row lengths (default: a sweep to 262144)")
    p.add_argument("--dtypes", default="float32,float16")
    p.add_argument("--budget-s", type=float, default=120.0, help="stop starting new row lengths")
    args = p.parse_args(argv)
    ns = tuple(int(v) for v in args.ns.split(",")) if args.ns else NS
    try:
        import torch
    except ImportError:
        torch = None
    fns = {op: getattr(xpsoftmax, op) for op in OPS}
    t_start = time.monotonic()
    rows_out = []
    rng = cp.random.default_rng(0)
    for dtype in args.dtypes.split(","):
        item = np.dtype(dtype).itemsize
        for n in ns:
            if time.monotonic() - t_start > args.budget_s:
                print(f"budget of {args.budget_s:.0f} s spent: stopping before {dtype} N={n}")
                break
            b = max(1, args.mib * 2**20 // (n * item))
            xs, ys, gs = [], [], []
            for _ in range(3):
                x = rng.standard_normal((b, n), dtype=np.float32).astype(dtype)
                xs.append(x)
                ys.append(xpsoftmax.softmax(x))
                gs.append(rng.standard_normal((b, n), dtype=np.float32).astype(dtype))
            lys = [xpsoftmax.log_softmax(x) for x in xs]
            sets = {
                "softmax": [(x,) for x in xs],
                "log_softmax": [(x,) for x in xs],
                "softmax_backward": list(zip(ys, gs, strict=True)),
                "log_softmax_backward": list(zip(lys, gs, strict=True)),
            }
            k = min(b, 64)
            refs = {}
            with xpsoftmax.kernels("never"):
                for op in OPS:
                    args64 = [a[:k].astype(np.float64) for a in sets[op][0]]
                    refs[op] = fns[op](*args64)
            torch_ms = {}
            if torch is not None:
                tops = {
                    "softmax": lambda t: torch.softmax(t, -1),
                    "log_softmax": lambda t: torch.log_softmax(t, -1),
                    "softmax_backward": lambda yy, gg: torch._softmax_backward_data(
                        gg, yy, -1, yy.dtype
                    ),
                    "log_softmax_backward": lambda yy, gg: torch._log_softmax_backward_data(
                        gg, yy, -1, yy.dtype
                    ),
                }
                for op in OPS:
                    # xpsoftmax's backward takes (output, grad), torch's (grad, output).
                    tsets = [tuple(torch.from_dlpack(a) for a in s) for s in sets[op]]
                    torch_ms[op] = time_ms(cp, tops[op], tsets, args.warmup, args.repeats)
            for label, forced, plain in _variants(n, dtype):
                try:
                    with gpu_tuning(tier=forced, plain=plain):
                        row = {"dtype": dtype, "n": n, "rows": b, "variant": label}
                        row["tier_fwd"] = _cupy.choose_tier(
                            n, dtype, 1, not plain, SMEM, forced
                        ).name
                        row["tier_bwd"] = _cupy.choose_tier(
                            n, dtype, 2, not plain, SMEM, forced
                        ).name
                        for op in OPS:
                            s0 = sets[op][0]
                            row[f"err_{op}"] = _rel_err(fns[op](*(a[:k] for a in s0)), refs[op])
                            ms = time_ms(cp, fns[op], sets[op], args.warmup, args.repeats)
                            nbytes = (len(s0) + 1) * b * n * item
                            row[f"ms_{op}"] = ms
                            row[f"gbps_{op}"] = nbytes / ms / 1e6
                            row[f"torch_ms_{op}"] = torch_ms.get(op)
                except Exception as exc:  # report and go on: this is a sweep
                    print(f"{dtype} N={n} {label}: {type(exc).__name__}: {exc}", flush=True)
                    continue
                rows_out.append(row)
                cells = "  ".join(
                    f"{op.replace('softmax', 'sm')} {row[f'ms_{op}']:.4f}"
                    f"/{torch_ms.get(op) or 0:.4f} {row[f'gbps_{op}']:5.0f} e{row[f'err_{op}']:.0e}"
                    for op in OPS
                )
                print(
                    f"{dtype:7s} N={n:6d} {label:7s} {row['tier_fwd']:5s}/{row['tier_bwd']:5s} "
                    f"ms(xps/torch) GB/s err: {cells}",
                    flush=True,
                )
            del xs, ys, gs, lys, sets
            cp.get_default_memory_pool().free_all_blocks()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_tune.json").write_text(json.dumps(rows_out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
