"""Before/after per-call cost of a change, both versions in one process, side by side.

Copies the ``xpsoftmax`` package of another checkout (``--before DIR``, for example a
``git worktree add /tmp/before HEAD~3``) into a temporary folder as ``xpsoftmax_before`` (its
imports are relative, so it runs as it is) and times each public call of both versions in
alternating blocks, ``--repeats`` times: tiny arrays (the fixed cost per call) and CI-sized float32
arrays (the blocked NumPy path). Prints markdown tables of min / median per call and the ratio
after / before of the minima. Report the machine, the date and ``uptime`` with the numbers.

Usage: ``python benchmarks/overhead_ab.py --before /tmp/before [--repeats 7]``
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import timeit
from pathlib import Path

import numpy as np

SMALL = ((16, 8), (64, 64), (256, 128))
LARGE = ((4096, 1024), (65536, 64), (256, 32768))


def _load_before(checkout: Path, tmp: Path):
    shutil.copytree(checkout / "xpsoftmax", tmp / "xpsoftmax_before")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("xpsoftmax_before")


def _table(libs, shapes, dtype, number: int, repeats: int, unit: str, scale: float) -> str:
    rng = np.random.default_rng(0)
    head = f"| shape | op | before min / median ({unit}) | after min / median ({unit}) | ratio |"
    lines = [head, "|---|---|---:|---:|---:|"]
    for shape in shapes:
        x = rng.standard_normal(shape).astype(dtype)
        g = rng.standard_normal(shape).astype(dtype)
        y = libs["after"].softmax(x)
        ops = {
            "softmax": lambda lib, x=x: lib.softmax(x),
            "log_softmax": lambda lib, x=x: lib.log_softmax(x),
            "softmax_backward": lambda lib, y=y, g=g: lib.softmax_backward(y, g),
            "log_softmax_backward": lambda lib, y=y, g=g: lib.log_softmax_backward(y, g),
        }
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(repeats):
            for name, lib in libs.items():
                for op, fn in ops.items():
                    t = timeit.timeit(lambda fn=fn, lib=lib: fn(lib), number=number) / number
                    times.setdefault((op, name), []).append(t * scale)
        for op in ops:
            b, a = times[op, "before"], times[op, "after"]
            lines.append(
                f"| {'x'.join(map(str, shape))} | {op} | {min(b):.3g} / {statistics.median(b):.3g}"
                f" | {min(a):.3g} / {statistics.median(a):.3g} | {min(a) / min(b):.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, required=True, help="checkout of the old version")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    import xpsoftmax

    with tempfile.TemporaryDirectory() as tmp:
        libs = {"before": _load_before(args.before, Path(tmp)), "after": xpsoftmax}
        print("# per call, float64, tiny arrays (microseconds)")
        print(_table(libs, SMALL, np.float64, 200, args.repeats, "us", 1e6))
        print("\n# per call, float32, blocked NumPy path (milliseconds)")
        print(_table(libs, LARGE, np.float32, 2, max(3, args.repeats // 3), "ms", 1e3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
