"""Per-call cost on tiny NumPy arrays: xpsoftmax against scipy and torch (CPU), side by side.

For arrays this small the arithmetic is negligible and what is left is each library's fixed cost
per call (validation, dispatch, planning). Prints microseconds per call, the best of 5 repeats of
N calls each, for softmax, log_softmax and softmax_backward.

Usage: ``python benchmarks/cpu_overhead.py [--calls 20000]``
"""

from __future__ import annotations

import argparse
import platform
import sys
import timeit
from datetime import datetime, timezone

import numpy as np

import xpsoftmax

SHAPES = ((16, 8), (64, 64), (256, 128))


def _us(fn, calls: int) -> float:
    return min(timeit.repeat(fn, number=calls, repeat=5)) / calls * 1e6


def _cases(peers, x, y, g, tx, ty, tg):
    """op -> (xpsoftmax call, {peer: call}) on one set of inputs."""
    sp, torch = peers.get("scipy"), peers.get("torch")
    return {
        "softmax": (
            lambda: xpsoftmax.softmax(x),
            {"scipy": lambda: sp.softmax(x, axis=-1), "torch": lambda: torch.softmax(tx, -1)},
        ),
        "log_softmax": (
            lambda: xpsoftmax.log_softmax(x),
            {
                "scipy": lambda: sp.log_softmax(x, axis=-1),
                "torch": lambda: torch.log_softmax(tx, -1),
            },
        ),
        "softmax_backward": (
            lambda: xpsoftmax.softmax_backward(y, g),
            {
                "scipy": lambda: y * (g - np.sum(y * g, axis=-1, keepdims=True)),
                "torch": lambda: torch._softmax_backward_data(tg, ty, -1, ty.dtype),
            },
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20000)
    args = p.parse_args(argv)
    peers = {}
    try:
        import scipy.special

        peers["scipy"] = scipy.special
    except ImportError:
        pass
    try:
        import torch

        torch.set_num_threads(1)
        peers["torch"] = torch
    except ImportError:
        pass
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    print(f"# per-call microseconds, float64, {platform.processor() or platform.machine()}, {now}")
    print("| shape | op | xpsoftmax | " + " | ".join(peers) + " |")
    print("|---|---|---:|" + "---:|" * len(peers))
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        x = rng.standard_normal(shape)
        y = xpsoftmax.softmax(x)
        g = rng.standard_normal(shape)
        tx, ty, tg = (peers["torch"].from_numpy(a) if "torch" in peers else None for a in (x, y, g))
        cases = _cases(peers, x, y, g, tx, ty, tg)
        for op, (ours, theirs) in cases.items():
            cells = [f"{_us(ours, args.calls):.1f}"]
            cells += [f"{_us(theirs[k], args.calls):.1f}" for k in peers]
            print(f"| {shape[0]}x{shape[1]} | {op} | " + " | ".join(cells) + " |", flush=True)
    print("(softmax_backward under scipy: the NumPy formula y * (g - sum(y * g)); scipy has none)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
