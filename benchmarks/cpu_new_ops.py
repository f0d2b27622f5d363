#!/usr/bin/env python3
"""CPU benchmark of the issue-12 operations, side by side with their peers in one process.

* ``logsumexp``: ``xpsoftmax.logsumexp`` against ``scipy.special.logsumexp`` and
  ``torch.logsumexp``;
* ``logsumexp_backward``: ``xpsoftmax.logsumexp_backward`` against the formula
  ``np.exp(x - lse[..., None]) * dl[..., None]`` and the same in torch (what
  ``torch.logsumexp``'s autograd computes);
* ``softmin``: ``xpsoftmax.softmin`` against ``scipy.special.softmax(-x)`` and
  ``torch.nn.functional.softmin``;
* ``softmax_f16_to_f32``: ``xpsoftmax.softmax(x16, dtype=float32)`` (the fused upcast)
  against casting first (``xpsoftmax.softmax(x16.astype(float32))``) and
  ``torch.softmax(t16, -1, dtype=torch.float32)``;
* ``softmax_f16``, ``softmax_bf16``: float16 and bfloat16 (``ml_dtypes``) arrays against
  ``scipy.special.softmax`` and ``torch.softmax`` of the same dtype.

Timing as in ``cpu_bench.py`` (its ``time_interleaved``: blocks of calls per implementation,
three rounds in rotating order); a figure is the median and the minimum over ``--repeats``
calls. Writes ``<out>/<YYYY-MM-DD>-cpu-new-ops-<machine>.md`` and prints it.

Usage::

    python3 benchmarks/cpu_new_ops.py [--repeats 30] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_bench  # noqa: E402  (the timing and machine helpers)

SHAPES = [(4096, 1024), (256, 32768), (65536, 64)]


def _calls(op: str, shape: tuple[int, ...], rng: np.random.Generator) -> dict:
    import scipy.special
    import torch

    import xpsoftmax

    x = rng.standard_normal(shape, dtype=np.float32) * 3
    t = torch.from_numpy(x)
    if op == "logsumexp":
        return {
            "xpsoftmax": lambda: xpsoftmax.logsumexp(x),
            "scipy": lambda: scipy.special.logsumexp(x, axis=-1),
            "torch": lambda: torch.logsumexp(t, -1),
        }
    if op == "logsumexp_backward":
        lse = xpsoftmax.logsumexp(x)
        dl = rng.standard_normal(lse.shape, dtype=np.float32)
        lt, dt = torch.from_numpy(lse), torch.from_numpy(dl)
        return {
            "xpsoftmax": lambda: xpsoftmax.logsumexp_backward(x, lse, dl),
            "formula": lambda: np.exp(x - lse[:, None]) * dl[:, None],
            "torch": lambda: torch.exp(t - lt[:, None]) * dt[:, None],
        }
    if op == "softmin":
        return {
            "xpsoftmax": lambda: xpsoftmax.softmin(x),
            "scipy": lambda: scipy.special.softmax(-x, axis=-1),
            "torch": lambda: torch.nn.functional.softmin(t, -1),
        }
    x16 = x.astype(np.float16)
    t16 = torch.from_numpy(x16)
    if op == "softmax_f16":
        return {
            "xpsoftmax": lambda: xpsoftmax.softmax(x16),
            "scipy": lambda: scipy.special.softmax(x16, axis=-1),
            "torch": lambda: torch.softmax(t16, -1),
        }
    if op == "softmax_bf16":
        import ml_dtypes

        xb = x.astype(ml_dtypes.bfloat16)
        tb = t.to(torch.bfloat16)
        return {
            "xpsoftmax": lambda: xpsoftmax.softmax(xb),
            "scipy": lambda: scipy.special.softmax(xb, axis=-1),
            "torch": lambda: torch.softmax(tb, -1),
        }
    return {
        "xpsoftmax": lambda: xpsoftmax.softmax(x16, dtype=np.float32),
        "cast first": lambda: xpsoftmax.softmax(x16.astype(np.float32)),
        "torch": lambda: torch.softmax(t16, -1, dtype=torch.float32),
    }


OPS = [
    "logsumexp",
    "logsumexp_backward",
    "softmin",
    "softmax_f16_to_f32",
    "softmax_f16",
    "softmax_bf16",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    info = cpu_bench.machine_info()
    load0 = os.getloadavg()
    lines = []
    for op in OPS:
        lines += [f"### {op}", "", "| shape | impl | median ms | min ms | vs xpsoftmax |"]
        lines.append("|---|---|---|---|---|")
        for shape in SHAPES:
            calls = _calls(op, shape, rng)
            wall, _ = cpu_bench.time_interleaved(calls, args.repeats)
            base = statistics.median(wall["xpsoftmax"])
            for name, ts in wall.items():
                med = statistics.median(ts)
                lines.append(
                    f"| {shape[0]}x{shape[1]} | {name} | {med * 1e3:.2f} | {min(ts) * 1e3:.2f} "
                    f"| {med / base:.2f}x |"
                )
        lines.append("")
    load1 = os.getloadavg()
    today = datetime.date.today().isoformat()
    head = [
        f"# CPU: the issue-12 operations vs their peers ({today})",
        "",
        f"Machine: {info['cpu']}, {info['cpus_usable']} usable cores, L2 {info['l2_bytes']} B; "
        f"Python {info['python']}, NumPy {info['numpy']}, SciPy {info['scipy']}, torch "
        f"{info['torch']} ({info['torch_threads']} threads), xpsoftmax {info['xpsoftmax']} "
        f"({info['xpsoftmax_threads']} threads). Load average before/after: "
        f"{load0[0]:.2f}/{load1[0]:.2f}. float32 unless named; last axis; each call "
        "allocates its result. `vs xpsoftmax` > 1 means slower than xpsoftmax.",
        "",
    ]
    text = "\n".join(head + lines)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{today}-cpu-new-ops-{cpu_bench.machine_slug(info)}.md"
    path.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
