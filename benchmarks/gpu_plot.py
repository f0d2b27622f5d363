#!/usr/bin/env python3
"""Plot a committed GPU benchmark: % of the copy bandwidth against row length, xpsoftmax and torch.

Reads a report written by ``gpu_bench.py`` (``benchmarks/results/<date>-nvidia-<gpu>.json``; no
GPU needed) and draws, for the last-axis cases, four panels: softmax and log-softmax, forward and
backward, each with xpsoftmax and torch in float32 (solid) and float16 (dashed). The y axis is
the bytes the op must move (inputs read once, output written once) over its median time, as a
percentage of the device-to-device copy bandwidth measured in the same run (``copy_gbps``);
torch's figure uses the same bytes over torch's time. The style is ``cpu_bench.py``'s plot.

Usage::

    python3 benchmarks/gpu_plot.py [REPORT.json] [-o OUT.png]

The default report is the H200 run of 2026-11-27, the default output the report's name with
``.png``. Needs matplotlib (the ``bench`` extra). A missing or malformed report is one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_REPORT = RESULTS_DIR / "2026-11-27-nvidia-h200.json"
PANELS = (  # (row, column) -> op
    ("softmax", "softmax_backward"),
    ("log_softmax", "log_softmax_backward"),
)
IMPLS = ("xpsoftmax", "torch")
DTYPES = {"float32": "-", "float16": "--"}  # line style


def percent_of_copy(report: dict) -> list[dict]:
    """One point per last-axis case and implementation: op, dtype, impl, row length n, percent."""
    copy = float(report["copy_gbps"])
    points = []
    for case in report["cases"]:
        if case["axis"] not in (-1, len(case["shape"]) - 1) or not case.get("gbps"):
            continue
        gbps = {"xpsoftmax": case["gbps"]}
        if case.get("torch_ms"):  # the same bytes over torch's time
            gbps["torch"] = case["gbps"] * case["xpsoftmax_ms"] / case["torch_ms"]
        for impl, value in gbps.items():
            points.append(
                {
                    "op": case["op"],
                    "dtype": case["dtype"],
                    "impl": impl,
                    "n": case["shape"][-1],
                    "percent": 100 * value / copy,
                }
            )
    return points


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.6), sharex=True, sharey=True)
    colors = {impl: f"C{i}" for i, impl in enumerate(IMPLS)}
    for row, ops in zip(axes, PANELS, strict=True):
        for ax, op in zip(row, ops, strict=True):
            for dtype, style in DTYPES.items():
                for impl in IMPLS:
                    pts = sorted(
                        (p["n"], p["percent"])
                        for p in points
                        if (p["op"], p["dtype"], p["impl"]) == (op, dtype, impl)
                    )
                    if pts:
                        ax.plot(
                            *zip(*pts, strict=True),
                            marker="o",
                            linestyle=style,
                            color=colors[impl],
                            label=f"{impl} {dtype}",
                        )
            ax.axhline(100, color="0.4", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_ylim(0, 110)
            ax.set_title(op)
            ax.grid(True, alpha=0.3)
        row[0].set_ylabel("% of copy bandwidth")
    for ax in axes[1]:
        ax.set_xlabel("row length n (last axis, each tensor >= 256 MiB)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fail(message: str) -> int:
    print(f"gpu_plot.py: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("report", nargs="?", type=Path, default=DEFAULT_REPORT)
    parser.add_argument("-o", "--out", type=Path, help="the PNG (default: REPORT with .png)")
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.report.read_text(encoding="utf-8"))
        points = percent_of_copy(report)
        title = (
            f"{report['device']}, {report['date']}: % of the copy bandwidth "
            f"({float(report['copy_gbps']):.0f} GB/s); CuPy {report['cupy']}, "
            f"torch {report['torch']}"
        )
    except OSError as e:
        return _fail(f"{args.report}: cannot read it: {e.strerror or e}")
    except (ValueError, KeyError, TypeError, IndexError, ZeroDivisionError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        return _fail(f"{args.report}: not a gpu_bench.py report ({what})")
    if not points:
        return _fail(f"{args.report}: no last-axis case with a bandwidth")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return _fail('needs matplotlib: python -m pip install ".[bench]"')
    out = args.out or args.report.with_suffix(".png")
    plot(points, out, title)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
