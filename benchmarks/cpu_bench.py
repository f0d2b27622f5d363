#!/usr/bin/env python3
"""CPU benchmark: xpsoftmax's NumPy path against scipy.special, the plain formula and torch CPU.

For each case (shape, axis, dtype) and op it times, in the same process, each implementation in
blocks of back-to-back calls, over three rounds in rotating order (so that a change of machine
load hits every implementation alike, while one library's spinning thread pool does not slow the
next library's call):

* ``forward``: ``xpsoftmax.softmax``, ``scipy.special.softmax`` and ``torch.softmax``;
* ``backward``: ``xpsoftmax.softmax_backward``, the formula everybody copies,
  ``y * (dy - (y * dy).sum(axis, keepdims=True))``, and ``torch._softmax_backward_data``;
* ``log_backward``: ``xpsoftmax.log_softmax_backward``, its formula
  ``dy - np.exp(ly) * dy.sum(axis, keepdims=True)`` and ``torch._log_softmax_backward_data``.

Every call allocates its result, as a user's call would. A figure is the median of ``--repeats``
runs after two warm-up runs; torch runs on tensors sharing the NumPy arrays' memory
(``torch.from_numpy``) with its default thread count. ``GB/s`` is the bytes an op must move
(forward: read x, write y; backward: read y and dy, write dx) over xpsoftmax's median time.

Peak memory: each (case, op, implementation) runs once more in a fresh subprocess that builds
its inputs, warms the library up on a tiny array, resets the peak RSS (``/proc/self/clear_refs``),
calls the op and reads the peak RSS again (``VmHWM``; ``ru_maxrss`` where there is no
``/proc``): the growth, output included, as a multiple of the output's size.

It also sweeps the row length at a fixed array size (float32, last axis) and plots GB/s against
it (matplotlib). Writes ``<out>/<YYYY-MM-DD>-cpu-<machine>.md``, ``.json`` and ``.png`` and prints
the markdown.

Usage::

    python3 benchmarks/cpu_bench.py [--quick] [--repeats 15] [--out benchmarks/results]
        [--dtypes float32,float64] [--no-memory] [--no-plot]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

CASES = [
    ((4096, 1024), -1),
    ((256, 32768), -1),
    ((65536, 64), -1),
    ((4096, 1024), 0),
    ((16384, 1024), -1),  # 64 MiB of float32: the bandwidth goal
]
OPS = ["forward", "backward", "log_backward"]
# "numpy": xpsoftmax's blocked NumPy code (XPSOFTMAX_CPU=numpy), the path before the compiled
# kernels; "copy": np.copyto of the same bytes (forward: x into y; the backward ops: two reads
# and a write as x + g into y), the machine's bandwidth in the same run.
PEERS = {"forward": ["numpy", "scipy", "torch", "copy"]}
PEERS["backward"] = ["numpy", "formula", "torch", "copy"]
PEERS["log_backward"] = ["numpy", "formula", "torch", "copy"]
IMPLS = ["xpsoftmax", "numpy", "scipy", "formula", "torch", "copy"]
SWEEP_ELEMS = 1 << 22
SWEEP_NS = [16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576]
QUICK_SWEEP_NS = [64, 1024, 32768]
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The goals of the compiled-CPU issue: ratio = xpsoftmax time / peer time (dtype, op, peer, limit).
GOALS = [
    ("float32", "forward", "torch", 0.9, "forward softmax at most 0.9x torch.softmax"),
    ("float32", "backward", "torch", 1.0, "backward at most 1.0x torch._softmax_backward_data"),
    ("float32", "log_backward", "torch", 1.0, "log-softmax backward at most 1.0x torch"),
    ("float64", "forward", "torch", 0.5, "float64 forward at most 0.5x torch"),
    ("float64", "backward", "torch", 0.5, "float64 backward at most 0.5x torch"),
    ("float64", "log_backward", "torch", 0.5, "float64 log-softmax backward at most 0.5x torch"),
]
# Share of the copy bandwidth on arrays of at least 64 MiB (time of the copy / xpsoftmax's).
BANDWIDTH_GOAL = (64 << 20, 0.8)
MEMORY_GOAL = 1.15


# --------------------------------------------------------------------------------------------
# the implementations


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _scipy_special():
    try:
        import scipy.special
    except ImportError:
        return None
    return scipy.special


def available(impl: str) -> bool:
    if impl == "torch":
        return _torch() is not None
    if impl == "scipy":
        return _scipy_special() is not None
    return True


def make_call(impl: str, op: str, arrays: dict[str, np.ndarray], axis: int) -> Callable[[], Any]:
    """A no-argument function running ``op`` with ``impl`` on ``arrays`` (x, y, ly, g)."""
    x, y, ly, g = arrays["x"], arrays["y"], arrays["ly"], arrays["g"]
    if impl == "xpsoftmax":
        import xpsoftmax

        if op == "forward":
            return lambda: xpsoftmax.softmax(x, axis=axis)
        if op == "backward":
            return lambda: xpsoftmax.softmax_backward(y, g, axis=axis)
        return lambda: xpsoftmax.log_softmax_backward(ly, g, axis=axis)
    if impl == "numpy":
        blocked = make_call("xpsoftmax", op, arrays, axis)

        def call() -> Any:
            os.environ["XPSOFTMAX_CPU"] = "numpy"
            try:
                return blocked()
            finally:
                del os.environ["XPSOFTMAX_CPU"]

        return call
    if impl == "copy":
        if op == "forward":
            return lambda: np.copyto(np.empty_like(x), x)
        return lambda: np.add(y, g)
    if impl == "scipy":
        special = _scipy_special()
        return lambda: special.softmax(x, axis=axis)
    if impl == "formula":
        if op == "backward":
            return lambda: y * (g - (y * g).sum(axis, keepdims=True))
        return lambda: g - np.exp(ly) * g.sum(axis, keepdims=True)
    torch = _torch()
    xt, yt, lyt, gt = (torch.from_numpy(a) for a in (x, y, ly, g))
    if op == "forward":
        return lambda: torch.softmax(xt, axis)
    if op == "backward":
        return lambda: torch._softmax_backward_data(gt, yt, axis, yt.dtype)
    return lambda: torch._log_softmax_backward_data(gt, lyt, axis, lyt.dtype)


def _fill_normal(a: np.ndarray, rng: np.random.Generator, scale: float = 1.0) -> None:
    """Fill ``a`` (C-contiguous) in chunks, so no full-size float64 temporary exists."""
    flat = a.reshape(-1)
    step = 1 << 20
    for i in range(0, flat.size, step):
        rng.standard_normal(out=flat[i : i + step], dtype=flat.dtype)
        flat[i : i + step] *= scale


def make_inputs(shape: tuple[int, ...], axis: int, dtype: str, seed: int = 0) -> dict:
    """Logits x, their softmax y and log-softmax ly, and a cotangent g; no large temporaries."""
    import xpsoftmax

    rng = np.random.default_rng(seed)
    x = np.empty(shape, dtype=dtype)
    g = np.empty(shape, dtype=dtype)
    _fill_normal(x, rng, 3.0)
    _fill_normal(g, rng)
    y = xpsoftmax.softmax(x, axis=axis)
    ly = xpsoftmax.log_softmax(x, axis=axis)
    return {"x": x, "y": y, "ly": ly, "g": g}


def moved_bytes(op: str, shape: tuple[int, ...], dtype: str) -> int:
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return (2 if op == "forward" else 3) * size


# --------------------------------------------------------------------------------------------
# timing and memory


def time_interleaved(
    calls: dict[str, Callable[[], Any]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU (all threads) seconds per call, in blocks per implementation.

    Three rounds; in each, every implementation runs two warm-up calls and then a third of the
    repeats back to back, the order rotating from round to round. Alternating implementations
    call by call measured each one slowed by the other's thread pool: torch's OpenMP threads keep
    spinning after a call and take the cores from the next call (on 2 cores torch.softmax took
    6.7 ms interleaved with xpsoftmax against 1.7 ms alone).
    """
    names = list(calls)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    per_round = max(1, -(-repeats // 3))
    for r in range(3):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            for _ in range(2):
                calls[name]()
            for _ in range(per_round):
                gc.collect()
                c0, t0 = time.process_time(), time.perf_counter()
                result = calls[name]()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                del result
    return wall, cpu


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _peak_rss() -> int:
    """The peak resident set size in bytes: ``VmHWM`` where Linux has it, else ``ru_maxrss``.

    ``ru_maxrss`` of a process started by ``subprocess`` can hold the peak of the parent that
    spawned it (Linux keeps the larger of the process's own peak and one inherited at exec),
    and ``clear_refs`` does not reset that part; ``VmHWM`` is the process's own peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(spec: dict) -> dict:
    """Runs in a subprocess: the peak RSS growth of one op call, output included."""
    shape, axis, dtype = tuple(spec["shape"]), spec["axis"], spec["dtype"]
    impl, op = spec["impl"], spec["op"]
    tiny = make_inputs((4, 8), -1, dtype)
    make_call(impl, op, tiny, -1)()  # import and initialise the library on a tiny array
    arrays = make_inputs(shape, axis, dtype)
    call = make_call(impl, op, arrays, axis)
    gc.collect()
    reset = _reset_peak_rss()
    before = _peak_rss()
    result = call()
    after = _peak_rss()
    out_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return {
        "growth_bytes": after - before,
        "out_bytes": out_bytes,
        "reset": reset,
        "result_shape": list(result.shape),
    }


def measure_memory(impl: str, op: str, shape, axis: int, dtype: str) -> float | None:
    """Peak growth over output size, from a fresh subprocess; None if it failed."""
    spec = {"impl": impl, "op": op, "shape": list(shape), "axis": axis, "dtype": dtype}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        print(f"memory {impl} {op} {shape} {dtype}: failed: {exc}", file=sys.stderr)
        return None
    if not res["reset"]:
        print(
            "warning: could not reset the peak RSS; memory figures include setup", file=sys.stderr
        )
    return res["growth_bytes"] / res["out_bytes"]


# --------------------------------------------------------------------------------------------
# machine description


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import xpsoftmax
    from xpsoftmax._config import available_cpus, num_threads
    from xpsoftmax.backends.numpy import blocked as _numpy

    torch = _torch()
    special = _scipy_special()
    cpus = available_cpus()
    return {
        "cpu": _cpu_model(),
        "cpus_usable": cpus,
        "l2_bytes": _numpy._l2_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": None if special is None else __import__("scipy").__version__,
        "torch": None if torch is None else torch.__version__,
        "xpsoftmax": xpsoftmax.__version__,
        "xpsoftmax_threads": num_threads(),
        "torch_threads": None if torch is None else torch.get_num_threads(),
    }


def machine_slug(info: dict) -> str:
    model = re.sub(r"\(.*?\)|processor|cpu|@.*", "", info["cpu"], flags=re.IGNORECASE)
    words = re.findall(r"[a-z0-9]+", model.lower())[:3]
    return f"{info['cpus_usable']}core-" + ("-".join(words) or "unknown")


# --------------------------------------------------------------------------------------------
# the run


def run_cases(dtypes, repeats, memory) -> list[dict]:
    rows = []
    for shape, axis in CASES:
        for dtype in dtypes:
            arrays = make_inputs(shape, axis, dtype)
            for op in OPS:
                impls = ["xpsoftmax"] + [p for p in PEERS[op] if available(p)]
                calls = {impl: make_call(impl, op, arrays, axis) for impl in impls}
                times, cpu = time_interleaved(calls, repeats)
                row = {
                    "shape": list(shape),
                    "axis": axis,
                    "dtype": dtype,
                    "op": op,
                    "ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
                    "ms_min": {k: 1e3 * min(v) for k, v in times.items()},
                    "cpu_ms": {k: 1e3 * statistics.median(v) for k, v in cpu.items()},
                }
                row["gbps"] = moved_bytes(op, shape, dtype) / (row["ms"]["xpsoftmax"] * 1e6)
                row["ratio"] = {
                    p: row["ms"]["xpsoftmax"] / row["ms"][p] for p in impls if p != "xpsoftmax"
                }
                if memory:
                    row["peak_x_output"] = {
                        impl: measure_memory(impl, op, shape, axis, dtype)
                        for impl in impls
                        if impl not in ("numpy", "copy")
                    }
                rows.append(row)
                print(_row_line(row), flush=True)
            del arrays
    return rows


def run_sweep(ns, repeats) -> list[dict]:
    """GB/s against row length, float32, last axis, arrays of SWEEP_ELEMS elements."""
    points = []
    for n in ns:
        shape = (max(1, SWEEP_ELEMS // n), n)
        arrays = make_inputs(shape, -1, "float32")
        for op in ("forward", "backward"):
            impls = ["xpsoftmax"] + [p for p in PEERS[op] if available(p)]
            calls = {impl: make_call(impl, op, arrays, -1) for impl in impls}
            times, _ = time_interleaved(calls, repeats)
            for impl, t in times.items():
                gbps = moved_bytes(op, shape, "float32") / (statistics.median(t) * 1e9)
                points.append({"n": n, "op": op, "impl": impl, "gbps": gbps})
        del arrays
    return points


def evaluate_goals(rows: list[dict]) -> list[dict]:
    goals = []
    for dtype, op, peer, limit, text in GOALS:
        ratios = [
            (r["ratio"][peer], r)
            for r in rows
            if r["dtype"] == dtype and r["op"] == op and peer in r["ratio"]
        ]
        if not ratios:
            goals.append({"goal": text, "limit": limit, "worst": None, "met": None})
            continue
        worst, row = max(ratios, key=lambda p: p[0])
        met = worst <= limit
        goals.append(
            {"goal": text, "limit": limit, "worst": worst, "worst_case": _case(row), "met": met}
        )
    least, share = BANDWIDTH_GOAL
    big = [
        (r["ms"]["copy"] / r["ms"]["xpsoftmax"], r)
        for r in rows
        if "copy" in r["ms"] and moved_bytes("forward", r["shape"], r["dtype"]) // 2 >= least
    ]
    text = f"at least {share:.0%} of the copy bandwidth on arrays of {least >> 20} MiB or more"
    if big:
        worst, row = min(big, key=lambda p: p[0])
        case = f"{_case(row)} {row['op']}"
        goals.append(
            {
                "goal": text,
                "limit": share,
                "worst": worst,
                "worst_case": case,
                "met": worst >= share,
            }
        )
    mem = [(r["peak_x_output"]["xpsoftmax"], r) for r in rows if r.get("peak_x_output")]
    mem = [(v, r) for v, r in mem if v is not None]
    text = f"peak memory growth at most {MEMORY_GOAL}x the output (output included)"
    if mem:
        worst, row = max(mem, key=lambda p: p[0])
        case = f"{_case(row)} {row['op']}"
        met = worst <= MEMORY_GOAL
        goals.append(
            {"goal": text, "limit": MEMORY_GOAL, "worst": worst, "worst_case": case, "met": met}
        )
    else:
        goals.append({"goal": text, "limit": MEMORY_GOAL, "worst": None, "met": None})
    return goals


# --------------------------------------------------------------------------------------------
# report


def _case(row: dict) -> str:
    return f"{tuple(row['shape'])} axis {row['axis']} {row['dtype']}"


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


def _row_line(row: dict) -> str:
    parts = [f"{k} {v:.2f} ms" for k, v in row["ms"].items()]
    return f"{_case(row):32s} {row['op']:13s} " + ", ".join(parts) + f" ({row['gbps']:.1f} GB/s)"


def markdown(info: dict, rows: list[dict], goals: list[dict], meta: dict) -> str:
    lines = [
        f"# CPU benchmark, {meta['date']}, {info['cpu']} ({info['cpus_usable']} usable cores)",
        "",
        f"NumPy {info['numpy']}, SciPy {info['scipy']}, torch {info['torch']} "
        f"({info['torch_threads']} threads), xpsoftmax {info['xpsoftmax']} "
        f"({info['xpsoftmax_threads']} threads), Python {info['python']}, L2 "
        f"{info['l2_bytes'] // 1024} KiB per core. Median of {meta['repeats']} runs, in three "
        "rounds of back-to-back blocks per implementation, each after 2 warm-up calls; every "
        "call allocates its result. scipy and the formula run on one "
        "thread (NumPy ufuncs), torch and xpsoftmax on all usable cores.",
        "",
        f"Load average (1 min) {meta['load_start']:.2f} at the start, {meta['load_end']:.2f} at "
        f"the end. {meta['note']}",
        "",
        "Times in ms; ratio = xpsoftmax time / peer time (below 1: xpsoftmax is faster); GB/s = "
        "bytes the op must move / xpsoftmax's time; peak = growth of the peak RSS during one call "
        "in a fresh process, output included, in multiples of the output's size.",
        "",
        "| case | op | xpsoftmax | GB/s | numpy (blocked) | scipy | formula | torch | copy "
        "| vs numpy | vs scipy | vs formula | vs torch | peak xpsoftmax | peak scipy "
        "| peak formula | peak torch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms, ratio, peak = r["ms"], r["ratio"], r.get("peak_x_output") or {}
        lines.append(
            f"| {_case(r)} | {r['op']} | {ms['xpsoftmax']:.2f} | {r['gbps']:.1f} | "
            f"{_fmt(ms.get('numpy'))} | "
            f"{_fmt(ms.get('scipy'))} | {_fmt(ms.get('formula'))} | {_fmt(ms.get('torch'))} | "
            f"{_fmt(ms.get('copy'))} | {_fmt(ratio.get('numpy'))} | "
            f"{_fmt(ratio.get('scipy'))} | {_fmt(ratio.get('formula'))} | "
            f"{_fmt(ratio.get('torch'))} | {_fmt(peak.get('xpsoftmax'))} | "
            f"{_fmt(peak.get('scipy'))} | {_fmt(peak.get('formula'))} | {_fmt(peak.get('torch'))} |"
        )
    lines += [
        "",
        "## CPU time per call",
        "",
        "Median CPU seconds the process used during one call, all its threads together (ms): "
        "the work each implementation does, less sensitive than wall time to other processes "
        "on the machine. Threads that spin while waiting (torch's OpenMP) count too.",
        "",
        "| case | op | xpsoftmax | scipy | formula | torch |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        cpu = r["cpu_ms"]
        lines.append(
            f"| {_case(r)} | {r['op']} | {cpu['xpsoftmax']:.2f} | {_fmt(cpu.get('scipy'))} | "
            f"{_fmt(cpu.get('formula'))} | {_fmt(cpu.get('torch'))} |"
        )
    lines += ["", "## Goals (worst case over the shapes)", ""]
    lines += ["| goal | limit | worst | case | met |", "|---|---:|---:|---|---|"]
    for g in goals:
        met = "not measured" if g["met"] is None else ("met" if g["met"] else "**not met**")
        lines.append(
            f"| {g['goal']} | {g['limit']} | {_fmt(g['worst'])} | {g.get('worst_case', '—')} "
            f"| {met} |"
        )
    if meta.get("plot"):
        lines += ["", f"![GB/s against row length]({meta['plot']})"]
    return "\n".join(lines) + "\n"


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, op in zip(axes, ("forward", "backward"), strict=True):
        for impl in IMPLS:
            pts = sorted((p["n"], p["gbps"]) for p in points if p["op"] == op and p["impl"] == impl)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("row length n (float32, last axis, 2^22 elements)")
        ax.set_title(op)
        ax.grid(True, alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("GB/s (bytes the op must move / time)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="float32, 5 repeats, no memory")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--note", default="", help="a sentence for the report (e.g. the load)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(memory_child(json.loads(args.child))))
        return 0
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    dtypes = ["float32"] if args.quick else [d.strip() for d in args.dtypes.split(",")]
    for d in dtypes:
        if d not in ("float32", "float64"):
            parser.error(f"--dtypes takes float32 and float64, got {d!r}")
    repeats = 5 if args.quick else args.repeats
    memory = not (args.quick or args.no_memory)

    info = machine_info()
    date = datetime.date.today().isoformat()
    load_start = os.getloadavg()[0]
    start = time.time()
    rows = run_cases(dtypes, repeats, memory)
    sweep_ns = QUICK_SWEEP_NS if args.quick else SWEEP_NS
    points = [] if args.no_plot else run_sweep(sweep_ns, max(3, repeats // 3))
    load_end = os.getloadavg()[0]
    goals = evaluate_goals(rows)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{date}-cpu-{machine_slug(info)}"
    meta = {
        "date": date,
        "repeats": repeats,
        "load_start": load_start,
        "load_end": load_end,
        "seconds": round(time.time() - start, 1),
        "note": args.note,
        "plot": None,
    }
    if points:
        png = args.out / f"{stem}.png"
        plot(points, png, f"xpsoftmax CPU, {info['cpu']}, {info['cpus_usable']} cores, {date}")
        meta["plot"] = png.name
    md = markdown(info, rows, goals, meta)
    (args.out / f"{stem}.md").write_text(md)
    report = {"machine": info, **meta, "cases": rows, "goals": goals, "sweep": points}
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(md)
    print(f"wrote {args.out / stem}.md, .json" + (", .png" if points else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
