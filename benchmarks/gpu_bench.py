#!/usr/bin/env python3
"""GPU benchmark: xpsoftmax's fused kernels against torch's native ops and the generic path.

For each case (op, dtype, shape, axis) it times, with CUDA events on one stream:

* ``xpsoftmax``: the public function on CuPy arrays (the fused kernels);
* ``torch``: torch's native op (``torch.softmax``, ``torch._softmax_backward_data``,
  ``torch.log_softmax``, ``torch._log_softmax_backward_data``) on tensors that share the same
  memory (``torch.from_dlpack``);
* ``cupy_composed``: the public function under ``xpsoftmax.kernels("never")``, the generic
  array-API path composed of CuPy operations.

Each figure is the median of ``--repeats`` runs after ``--warmup`` runs. Inputs rotate over as
many buffer sets as it takes for the bytes touched per round to exceed three times a 60 MB L2, so
no run reads data the previous run left in cache (with tensors of 256 MiB one set is enough).
The ceiling is a device-to-device copy of 1 GiB (the best of ``cudaMemcpyAsync``, torch's
``copy_`` and a CuPy copy kernel), counted as bytes read + bytes written. ``gbps`` is the bytes
an op must move (each input read once, the output written once) over xpsoftmax's time.

Writes ``<out>/<YYYY-MM-DD>-<gpu>.json`` (the schema of the kernels issue) and a markdown table
beside it, and prints the table. ``--selftest-report DIR`` writes a report from made-up numbers
without a GPU, to check the writer.

Usage::

    python3 benchmarks/gpu_bench.py [--quick] [--cases REGEX] [--out DIR]
        [--junit gpu-tests.xml] [--sanitizer-log sanitizer.log] [--budget-s 170]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import statistics
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NS = [32, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144]
QUICK_NS = [128, 4096, 65536]
OPS = ["softmax", "log_softmax", "softmax_backward", "log_softmax_backward"]
DTYPES = ["float32", "float16"]
ITEMSIZE = {"float16": 2, "float32": 4, "float64": 8}
MIN_BYTES = 256 * 2**20  # each tensor of a (B, N) case
QUICK_MIN_BYTES = 64 * 2**20
NON_LAST = ((64, 4096, 256), 1)
QUICK_NON_LAST = ((16, 4096, 256), 1)
L2_WORKING_SET = 3 * 60 * 10**6  # bytes touched per rotation round, at least
COPY_BYTES = 2**30
SPLIT_ROW_N = 65536  # the split-row path in the goals when the tier is unknown

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------------
# cases


@dataclass
class Case:
    op: str
    dtype: str
    shape: tuple[int, ...]
    axis: int
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def name(self) -> str:
        return f"{self.op}:{self.dtype}:{'x'.join(map(str, self.shape))}:{self.axis}"

    @property
    def n_inputs(self) -> int:
        return 2 if self.op.endswith("_backward") else 1

    @property
    def bytes_moved(self) -> int:
        return (self.n_inputs + 1) * math.prod(self.shape) * ITEMSIZE[self.dtype]


def make_cases(quick: bool, pattern: str | None) -> list[Case]:
    """Every case, grouped by (dtype, shape) so that the ops of a group share their inputs."""
    ns = QUICK_NS if quick else NS
    min_bytes = QUICK_MIN_BYTES if quick else MIN_BYTES
    cases = []
    for dtype in DTYPES:
        for n in ns:
            rows = math.ceil(min_bytes / (n * ITEMSIZE[dtype]))
            cases += [Case(op, dtype, (rows, n), -1) for op in OPS]
        shape, axis = QUICK_NON_LAST if quick else NON_LAST
        cases += [Case(op, dtype, shape, axis) for op in OPS]
    if pattern:
        rx = re.compile(pattern)
        cases = [c for c in cases if rx.search(c.name)]
    return cases


# --------------------------------------------------------------------------------------------
# timing (CuPy and torch are imported only here, so the report writer runs anywhere)


class _StreamHandle:
    """CUDA stream protocol object for torch's current stream (for CuPy's ``from_external``)."""

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


def time_ms(cupy: Any, fn: Any, arg_sets: list[tuple], warmup: int, repeats: int) -> float:
    """Median time of ``fn(*args)`` in ms over ``repeats`` runs, rotating over ``arg_sets``."""
    for i in range(warmup):
        fn(*arg_sets[i % len(arg_sets)])
    starts = [cupy.cuda.Event() for _ in range(repeats)]
    ends = [cupy.cuda.Event() for _ in range(repeats)]
    for i in range(repeats):
        starts[i].record()
        fn(*arg_sets[(warmup + i) % len(arg_sets)])
        ends[i].record()
    ends[-1].synchronize()
    return statistics.median(
        cupy.cuda.get_elapsed_time(s, e) for s, e in zip(starts, ends, strict=True)
    )


def measure_copy(cupy: Any, torch: Any, repeats: int) -> tuple[float, str]:
    """Best device-to-device copy bandwidth of 1 GiB, in GB/s (read + written), and its method."""
    n = COPY_BYTES // 4
    src = cupy.ones(n, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    kernel = cupy.ElementwiseKernel("T x", "T y", "y = x", "xps_bench_copy")
    methods = {
        "cudaMemcpyAsync": lambda: dst.data.copy_from_device_async(src.data, COPY_BYTES),
        "CuPy copy kernel": lambda: kernel(src, dst),
    }
    if torch is not None:
        s_t, d_t = torch.from_dlpack(src), torch.from_dlpack(dst)
        methods["torch copy_"] = lambda: d_t.copy_(s_t)
    best, best_name = 0.0, ""
    for name, fn in methods.items():
        ms = time_ms(cupy, fn, [()], warmup=2, repeats=max(5, repeats // 2))
        gbps = 2 * COPY_BYTES / (ms * 1e-3) / 1e9
        print(f"copy {name}: {ms:.3f} ms, {gbps:.0f} GB/s", flush=True)
        if gbps > best:
            best, best_name = gbps, name
    return best, best_name


def _inputs(cupy: Any, torch: Any, xps: Any, dtype: str, shape: tuple, axis: int, n_sets: int):
    """``n_sets`` sets of (x, y, ly, g) as CuPy arrays."""
    sets = []
    for k in range(n_sets):
        rng = cupy.random.default_rng(1234 + k)
        x = rng.standard_normal(shape, dtype=cupy.float32).astype(dtype)
        g = rng.standard_normal(shape, dtype=cupy.float32).astype(dtype)
        with xps.kernels("never"):
            y = xps.softmax(x, axis=axis)
            ly = xps.log_softmax(x, axis=axis)
        sets.append({"x": x, "y": y, "ly": ly, "g": g})
    return sets


def _impls(case: Case, xps: Any, torch: Any):
    """(xpsoftmax callable, torch callable or None, names of its inputs)."""
    op, axis = case.op, case.axis
    fn = getattr(xps, op)
    names = {
        "softmax": ("x",),
        "log_softmax": ("x",),
        "softmax_backward": ("y", "g"),
        "log_softmax_backward": ("ly", "g"),
    }[op]

    def ours(*args):
        return fn(*args, axis=axis)

    theirs = None
    if torch is not None:
        dim = axis % len(case.shape)
        tdtype = getattr(torch, case.dtype)
        native = {
            "softmax": lambda x: torch.softmax(x, dim),
            "log_softmax": lambda x: torch.log_softmax(x, dim),
            "softmax_backward": lambda y, g: torch._softmax_backward_data(g, y, dim, tdtype),
            "log_softmax_backward": lambda y, g: torch._log_softmax_backward_data(
                g, y, dim, tdtype
            ),
        }[op]
        theirs = native
    return ours, theirs, names


def _tier(c: Case, device: int) -> str | None:
    """The kernel tier xpsoftmax picks for ``c`` (from its private planner), or None."""
    try:
        from xpsoftmax.backends.cuda import loader, plan

        if c.axis % len(c.shape) != len(c.shape) - 1:
            return "strided"
        smem = loader.max_dynamic_smem(device)
        return plan.choose_tier(c.shape[-1], c.dtype, c.n_inputs, False, smem).name
    except Exception:  # a planner that changed shape: the goals fall back to N >= SPLIT_ROW_N
        return None


def _rel_diff(cupy: Any, a: Any, b: Any) -> float:
    a32, b32 = a.astype(cupy.float32), b.astype(cupy.float32)
    return float(cupy.linalg.norm(a32 - b32) / cupy.linalg.norm(b32))


def run_cases(cases: list[Case], args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    import cupy

    import xpsoftmax as xps

    try:
        import torch

        if not torch.cuda.is_available():
            torch = None
    except ImportError:
        torch = None

    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    rt = cupy.cuda.runtime.runtimeGetVersion()
    drv = cupy.cuda.runtime.driverGetVersion()
    meta = {
        "device": name,
        "cupy": cupy.__version__,
        "torch": torch.__version__ if torch is not None else "not installed",
        "cuda": f"{rt // 1000}.{rt % 1000 // 10}",
        "driver": f"{drv // 1000}.{drv % 1000 // 10}",
        "l2_bytes": int(props.get("l2CacheSize", 0)),
    }
    print(f"device: {name}; CuPy {meta['cupy']}, torch {meta['torch']}, CUDA {meta['cuda']}")

    meta["tiers"] = {c.name: t for c in cases if (t := _tier(c, dev.id)) is not None}

    # Every launch (CuPy, the kernels, torch, the events) on torch's current stream.
    ptr = torch.cuda.current_stream().cuda_stream if torch is not None else 0
    stream = cupy.cuda.Stream.from_external(_StreamHandle(ptr))
    with stream:
        copy_gbps, copy_method = measure_copy(cupy, torch, args.repeats)
        meta["copy_gbps"], meta["copy_method"] = copy_gbps, copy_method
        groups: dict[tuple, list[Case]] = {}
        for c in cases:
            groups.setdefault((c.dtype, c.shape, c.axis), []).append(c)
        for (dtype, shape, axis), group in groups.items():
            if time.monotonic() > deadline:
                for c in group:
                    c.error = "not run: time budget spent"
                continue
            per_round = min(c.bytes_moved for c in group)
            n_sets = max(1, math.ceil(L2_WORKING_SET / per_round))
            try:
                sets = _inputs(cupy, torch, xps, dtype, shape, axis, n_sets)
            except Exception as e:  # out of memory and the like: record, go on
                for c in group:
                    c.error = f"inputs: {type(e).__name__}: {e}"
                continue
            for c in group:
                _run_case(c, sets, cupy, torch, xps, args, copy_gbps)
            del sets
            cupy.get_default_memory_pool().free_all_blocks()
            if torch is not None:
                torch.cuda.empty_cache()
    return meta


def _run_case(c: Case, sets, cupy, torch, xps, args, copy_gbps: float) -> None:
    ours, theirs, names = _impls(c, xps, torch)
    arg_sets = [tuple(s[k] for k in names) for s in sets]
    r: dict[str, Any] = {"xpsoftmax_ms": None, "torch_ms": None, "cupy_composed_ms": None}
    errors = []
    mine = None
    try:
        with xps.kernels("always"):
            r["xpsoftmax_ms"] = time_ms(cupy, ours, arg_sets, args.warmup, args.repeats)
            mine = ours(*arg_sets[0])
    except Exception as e:
        errors.append(f"xpsoftmax: {type(e).__name__}: {e}")
        traceback.print_exc(limit=4)
    if theirs is not None:
        try:
            t_sets = [tuple(torch.from_dlpack(a) for a in s) for s in arg_sets]
            r["torch_ms"] = time_ms(cupy, theirs, t_sets, args.warmup, args.repeats)
            if mine is not None:
                ref = cupy.from_dlpack(theirs(*t_sets[0]))
                r["rel_diff_torch"] = _rel_diff(cupy, mine, ref)
                del ref
        except Exception as e:
            errors.append(f"torch: {type(e).__name__}: {e}")
            traceback.print_exc(limit=4)
    del mine
    try:
        with xps.kernels("never"):
            reps = max(3, args.repeats // 4)
            r["cupy_composed_ms"] = time_ms(cupy, ours, arg_sets, 1, reps)
    except Exception as e:
        errors.append(f"cupy_composed: {type(e).__name__}: {e}")
        traceback.print_exc(limit=4)
    if r["xpsoftmax_ms"]:
        r["gbps"] = c.bytes_moved / (r["xpsoftmax_ms"] * 1e-3) / 1e9
    c.result = r
    c.error = "; ".join(e.splitlines()[0][:300] for e in errors)
    times = ", ".join(
        f"{k.removesuffix('_ms')} {_fmt(r[k], '.4f')}"
        for k in ("xpsoftmax_ms", "torch_ms", "cupy_composed_ms")
    )
    pct = f", {100 * r['gbps'] / copy_gbps:.1f} % of copy" if r.get("gbps") else ""
    print(f"{c.name}: {times} ms{pct}{' ERROR ' + c.error if c.error else ''}", flush=True)


# --------------------------------------------------------------------------------------------
# tests and sanitizer figures from the check script's files


def parse_junit(path: str | None) -> dict[str, int | None]:
    """passed/failed/skipped from a pytest junit XML; None each when missing or unreadable."""
    empty: dict[str, int | None] = {"passed": None, "failed": None, "skipped": None}
    if not path or not Path(path).is_file():
        return empty
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return empty
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = failed = skipped = 0
    for s in suites:
        total += int(s.get("tests", 0))
        failed += int(s.get("failures", 0)) + int(s.get("errors", 0))
        skipped += int(s.get("skipped", 0))
    return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}


def parse_sanitizer(path: str | None) -> dict[str, int | None]:
    """cases (from sanitizer_cases.py's ``sanitizer_cases: N`` line) and errors (from
    compute-sanitizer's ``ERROR SUMMARY: K errors``); None where the line is missing."""
    out: dict[str, int | None] = {"cases": None, "errors": None}
    if not path or not Path(path).is_file():
        return out
    text = Path(path).read_text(errors="replace")
    m = re.search(r"^sanitizer_cases: (\d+)\s*$", text, re.M)
    if m:
        out["cases"] = int(m.group(1))
    m = re.search(r"ERROR SUMMARY: (\d+) error", text)
    if m:
        out["errors"] = int(m.group(1))
    return out


def _triple(text: str, keys: tuple[str, ...]) -> dict[str, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != len(keys):
        msg = f"expected {len(keys)} comma-separated integers ({','.join(keys)}), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return dict(zip(keys, parts, strict=True))


# --------------------------------------------------------------------------------------------
# the report


def _r(v: float | None, nd: int) -> float | None:
    return None if v is None else round(float(v), nd)


def build_report(meta: dict, cases: list[Case], tests: dict, sanitizer: dict, date: str) -> dict:
    """The JSON report, in exactly the schema of the kernels issue."""
    return {
        "device": meta["device"],
        "date": date,
        "cupy": meta["cupy"],
        "torch": meta["torch"],
        "cuda": meta["cuda"],
        "copy_gbps": _r(meta["copy_gbps"], 1),
        "tests": {k: tests.get(k) for k in ("passed", "failed", "skipped")},
        "sanitizer": {k: sanitizer.get(k) for k in ("cases", "errors")},
        "cases": [
            {
                "op": c.op,
                "dtype": c.dtype,
                "shape": list(c.shape),
                "axis": c.axis,
                "xpsoftmax_ms": _r(c.result.get("xpsoftmax_ms"), 4),
                "torch_ms": _r(c.result.get("torch_ms"), 4),
                "cupy_composed_ms": _r(c.result.get("cupy_composed_ms"), 4),
                "gbps": _r(c.result.get("gbps"), 1),
            }
            for c in cases
            if c.result
        ],
    }


def _speedup(c: dict) -> float | None:
    if c["xpsoftmax_ms"] and c["torch_ms"]:
        return c["torch_ms"] / c["xpsoftmax_ms"]
    return None


def _pct(c: dict, copy_gbps: float | None) -> float | None:
    if c["gbps"] and copy_gbps:
        return 100 * c["gbps"] / copy_gbps
    return None


def _label(c: dict) -> str:
    return f"{c['op']} {c['dtype']} {'x'.join(map(str, c['shape']))} axis {c['axis']}"


def case_key(c: dict) -> str:
    """The name of a JSON case, as ``Case.name``: ``op:dtype:shape:axis``."""
    return f"{c['op']}:{c['dtype']}:{'x'.join(map(str, c['shape']))}:{c['axis']}"


def evaluate_goals(report: dict, tiers: dict[str, str] | None = None) -> list[dict]:
    """Each performance goal of the kernels issue: name, met (True/False/None), detail.

    ``tiers`` maps case names to the tier the kernels picked (``warp``, ``block``, ``split``,
    ``strided``); where it is known, the split-row goal covers the ``split`` cases and the 85 %
    goal the other last-axis cases with N >= 4096. Where it is not, N >= SPLIT_ROW_N counts as
    the split-row path.
    """
    cases = report["cases"]
    copy = report["copy_gbps"]
    tiers = tiers or {}

    def is_split(c):
        tier = tiers.get(case_key(c))
        return tier == "split" if tier else c["shape"][-1] >= SPLIT_ROW_N

    def last_axis(c):
        return c["axis"] == -1 or c["axis"] == len(c["shape"]) - 1

    def worst(selected, key, floor, unit):
        vals = [(key(c), c) for c in selected if key(c) is not None]
        if not vals:
            return None, "not measured"
        v, c = min(vals, key=lambda t: t[0])
        misses = sum(1 for x, _ in vals if x < floor)
        text = (
            f"worst {v:.2f}{unit} ({_label(c)}); "
            f"{misses} of {len(vals)} cases below {floor:g}{unit}"
        )
        return misses == 0, text

    goals = []
    met, detail = worst(cases, _speedup, 1.0, "x")
    goals.append(
        {
            "goal": "never slower than torch (speedup >= 1x on every case)",
            "met": met,
            "detail": detail,
        }
    )
    bwd = [c for c in cases if c["op"].endswith("_backward") and last_axis(c)]
    met, detail = worst(bwd, _speedup, 1.3, "x")
    goals.append(
        {"goal": "backward >= 1.3x torch on last-axis cases", "met": met, "detail": detail}
    )
    mid = [c for c in cases if last_axis(c) and c["shape"][-1] >= 4096 and not is_split(c)]
    met, detail = worst(mid, lambda c: _pct(c, copy), 85.0, " %")
    goals.append(
        {
            "goal": ">= 85 % of copy bandwidth for N >= 4096 (last axis, not split-row)",
            "met": met,
            "detail": detail,
        }
    )
    split = [c for c in cases if last_axis(c) and is_split(c)]
    met, detail = worst(split, lambda c: _pct(c, copy), 80.0, " %")
    goals.append(
        {
            "goal": ">= 80 % of copy bandwidth on the split-row path",
            "met": met,
            "detail": detail,
        }
    )
    other = [c for c in cases if not last_axis(c)]
    met, detail = worst(other, _speedup, 2.0, "x")
    goals.append({"goal": "non-last-axis case >= 2x torch", "met": met, "detail": detail})
    return goals


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render_markdown(report: dict, notes: dict) -> str:
    t, s = report["tests"], report["sanitizer"]
    copy = report["copy_gbps"]
    lines = [
        f"# xpsoftmax GPU benchmark: {report['device']}, {report['date']}",
        "",
        f"CuPy {report['cupy']}, torch {report['torch']}, CUDA {report['cuda']}"
        + (f" (driver {notes['driver']})" if notes.get("driver") else "")
        + ".",
        "",
        f"- Copy ceiling: **{_fmt(copy, '.0f')} GB/s** (device-to-device copy of 1 GiB, bytes read "
        f"+ written; best method: {notes.get('copy_method', '-')}).",
        f"- GPU tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped "
        "(`tests/test_gpu.py`).",
        f"- compute-sanitizer memcheck: {s['cases']} cases, {s['errors']} errors "
        "(`benchmarks/sanitizer_cases.py`; `None` means the run did not finish).",
        f"- Timing: CUDA events, median of {notes.get('repeats', '-')} runs after "
        f"{notes.get('warmup', '-')} warm-up runs (composed path: fewer), inputs rotated so each "
        "round touches more than 3 x 60 MB; "
        + (
            "quick run (smaller tensors, indicative only)."
            if notes.get("quick")
            else "each tensor >= 256 MiB."
        ),
        "- Columns: times in ms; *vs torch* = torch ms / xpsoftmax ms (above 1: faster); "
        "*GB/s* = bytes the op must move (inputs read once + output written once) / xpsoftmax "
        "time; *% copy* = that over the copy ceiling; *diff* = ||xpsoftmax - torch|| / ||torch||.",
        "",
        "| op | dtype | shape | axis | tier | xpsoftmax ms | torch ms | composed ms | vs torch "
        "| GB/s | % copy | diff |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    diffs = notes.get("rel_diff", {})
    tiers = notes.get("tiers", {})
    for c in report["cases"]:
        key = case_key(c)
        lines.append(
            f"| {c['op']} | {c['dtype']} | {'x'.join(map(str, c['shape']))} | {c['axis']} "
            f"| {tiers.get(key, '-')} "
            f"| {_fmt(c['xpsoftmax_ms'], '.4f')} | {_fmt(c['torch_ms'], '.4f')} "
            f"| {_fmt(c['cupy_composed_ms'], '.3f')} | {_fmt(_speedup(c), '.2f')} "
            f"| {_fmt(c['gbps'], '.0f')} | {_fmt(_pct(c, copy), '.1f')} "
            f"| {_fmt(diffs.get(key), '.1e')} |"
        )
    lines += ["", "## Goals", ""]
    for g in evaluate_goals(report, tiers):
        mark = {True: "met", False: "NOT MET", None: "not measured"}[g["met"]]
        lines.append(f"- **{mark}**: {g['goal']}: {g['detail']}.")
    lines += [
        "",
        "*tier*: the kernel tier xpsoftmax picked (warp: row in registers; block: row in shared "
        "memory; split: a row over several blocks; strided: the non-last-axis kernel). The "
        "split-row goal covers the `split` cases and the 85 % goal the other last-axis cases "
        f"with N >= 4096; where the tier is unknown (-), N >= {SPLIT_ROW_N} counts as split-row.",
    ]
    errors = notes.get("errors", {})
    if errors:
        lines += ["", "## Errors", ""] + [f"- `{k}`: {v}" for k, v in errors.items()]
    return "\n".join(lines) + "\n"


def gpu_slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "gpu"


def dump_json(report: dict) -> str:
    """The report as JSON text: one line per top-level field and one per case."""
    head = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in report.items() if k != "cases"]
    cases = ",\n".join(f"  {json.dumps(c)}" for c in report["cases"])
    return "{\n" + ",\n".join(head) + ',\n "cases": [\n' + cases + "\n ]\n}\n"


def write_report(report: dict, notes: dict, outdir: Path) -> tuple[Path, Path, str]:
    outdir.mkdir(parents=True, exist_ok=True)
    stem = f"{report['date']}-{gpu_slug(report['device'])}"
    json_path, md_path = outdir / f"{stem}.json", outdir / f"{stem}.md"
    json_path.write_text(dump_json(report))
    md = render_markdown(report, notes)
    md_path.write_text(md)
    return json_path, md_path, md


SCHEMA_CASE_KEYS = [
    "op",
    "dtype",
    "shape",
    "axis",
    "xpsoftmax_ms",
    "torch_ms",
    "cupy_composed_ms",
    "gbps",
]
SCHEMA_KEYS = [
    "device",
    "date",
    "cupy",
    "torch",
    "cuda",
    "copy_gbps",
    "tests",
    "sanitizer",
    "cases",
]


def check_schema(report: dict) -> None:
    """Raise ValueError unless ``report`` has exactly the issue's keys and value types."""

    def fail(what: str) -> None:
        raise ValueError(f"report schema: {what}")

    if list(report) != SCHEMA_KEYS:
        fail(f"top-level keys {list(report)} != {SCHEMA_KEYS}")
    for k in ("device", "date", "cupy", "torch", "cuda"):
        if not isinstance(report[k], str):
            fail(f"{k} is not a string")
    if not re.fullmatch(r"\d{4}-\d\d-\d\d", report["date"]):
        fail(f"date {report['date']!r} is not YYYY-MM-DD")
    if not isinstance(report["copy_gbps"], (int, float)):
        fail("copy_gbps is not a number")
    if list(report["tests"]) != ["passed", "failed", "skipped"]:
        fail("tests keys")
    if list(report["sanitizer"]) != ["cases", "errors"]:
        fail("sanitizer keys")
    for v in (*report["tests"].values(), *report["sanitizer"].values()):
        if v is not None and not isinstance(v, int):
            fail("tests/sanitizer values must be integers (or null when not measured)")
    for c in report["cases"]:
        if list(c) != SCHEMA_CASE_KEYS:
            fail(f"case keys {list(c)}")
        if not (isinstance(c["shape"], list) and all(isinstance(d, int) for d in c["shape"])):
            fail("shape must be a list of ints")
        for k in ("xpsoftmax_ms", "torch_ms", "cupy_composed_ms", "gbps"):
            if c[k] is not None and not isinstance(c[k], (int, float)):
                fail(f"{k} must be a number")


def selftest_report(outdir: Path) -> int:
    """Write a report from made-up numbers (no GPU needed) and check it reads back."""
    cases = make_cases(quick=False, pattern=None)
    copy = 3000.0
    for i, c in enumerate(cases):
        eff = 0.7 + 0.25 * ((i * 7) % 10) / 10  # 70 .. 92.5 % of copy
        ms = c.bytes_moved / (eff * copy * 1e9) * 1e3
        c.result = {
            "xpsoftmax_ms": ms,
            "torch_ms": ms * (0.9 + 0.2 * (i % 5)),
            "cupy_composed_ms": ms * 6,
            "gbps": c.bytes_moved / (ms * 1e-3) / 1e9,
        }
    cases[3].result["torch_ms"] = None  # a case where torch did not run
    meta = {
        "device": "NVIDIA H100 80GB HBM3 (selftest)",
        "cupy": "14.2.0",
        "torch": "2.11.0",
        "cuda": "13.0",
        "copy_gbps": copy,
    }
    tests = _triple("2700,3,25", ("passed", "failed", "skipped"))
    sanitizer = {"cases": 98, "errors": None}
    report = build_report(meta, cases, tests, sanitizer, "2025-01-31")
    notes = {
        "driver": "580.0",
        "copy_method": "cudaMemcpyAsync",
        "repeats": 20,
        "warmup": 5,
        "rel_diff": {cases[0].name: 1.5e-7},
        "errors": {cases[5].name: "made-up error"},
        # made-up tiers: every case with N >= 16384 split, the 3-D cases strided
        "tiers": {
            c.name: "strided" if c.axis != -1 else ("split" if c.shape[-1] >= 16384 else "block")
            for c in cases
        },
    }
    check_schema(report)
    json_path, md_path, md = write_report(report, notes, outdir)
    back = json.loads(json_path.read_text())
    check_schema(back)
    assert back == report, "JSON does not read back equal"
    assert json_path.name == "2025-01-31-nvidia-h100-80gb-hbm3-selftest.json", json_path.name
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| op")]
    assert len(rows) == len(cases) == 104, (len(rows), len(cases))
    goals = evaluate_goals(report)
    assert [g["met"] for g in goals] == [False, False, False, False, False], goals
    # With tiers known, the goals follow them.
    by_tier = evaluate_goals(report, notes["tiers"])
    assert "of 16 cases" in by_tier[2]["detail"] and "of 40 cases" in by_tier[3]["detail"], by_tier
    assert "of 32 cases" in goals[2]["detail"] and "of 24 cases" in goals[3]["detail"], goals
    for c in report["cases"]:  # the same report with every goal met
        if c["torch_ms"] is not None:
            c["xpsoftmax_ms"] = c["torch_ms"] / 2.5
            c["gbps"] = 0.9 * copy
    assert [g["met"] for g in evaluate_goals(report)] == [True] * 5
    assert "2700 passed, 3 failed, 25 skipped" in md and "98 cases, None errors" in md
    assert "| 512x262144 | -1 | split |" in md and "| 64x4096x256 | 1 | strided |" in md
    print(md)
    print(f"selftest: wrote {json_path} and {md_path}; {len(cases)} cases; schema ok")
    return 0


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="report folder")
    p.add_argument("--quick", action="store_true", help="3 row lengths, 64 MiB tensors")
    p.add_argument("--cases", help="regex over case names op:dtype:shape:axis")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--budget-s",
        type=float,
        default=170.0,
        help="stop starting new cases after this many seconds; the report is written",
    )
    p.add_argument("--junit", help="pytest junit XML of the GPU tests")
    p.add_argument("--sanitizer-log", help="compute-sanitizer output of sanitizer_cases.py")
    p.add_argument(
        "--tests",
        type=lambda s: _triple(s, ("passed", "failed", "skipped")),
        help="passed,failed,skipped (instead of --junit)",
    )
    p.add_argument(
        "--sanitizer",
        type=lambda s: _triple(s, ("cases", "errors")),
        help="cases,errors (instead of --sanitizer-log)",
    )
    p.add_argument("--date", help="report date (default: today, UTC)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument(
        "--selftest-report",
        type=Path,
        metavar="DIR",
        help="write a report of made-up numbers into DIR and check it (no GPU)",
    )
    args = p.parse_args(argv)
    if args.selftest_report:
        return selftest_report(args.selftest_report)
    if args.quick:
        args.repeats = min(args.repeats, 8)
        args.warmup = min(args.warmup, 2)
    cases = make_cases(args.quick, args.cases)
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    if not cases:
        print(f"no case matches --cases {args.cases!r}", file=sys.stderr)
        return 2
    start = time.monotonic()
    meta = run_cases(cases, args, deadline=start + args.budget_s)
    tests = args.tests or parse_junit(args.junit)
    sanitizer = args.sanitizer or parse_sanitizer(args.sanitizer_log)
    date = args.date or datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    report = build_report(meta, cases, tests, sanitizer, date)
    check_schema(report)
    notes = {
        "driver": meta.get("driver"),
        "copy_method": meta.get("copy_method"),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "quick": args.quick,
        "tiers": meta.get("tiers", {}),
        "rel_diff": {
            c.name: c.result["rel_diff_torch"] for c in cases if "rel_diff_torch" in c.result
        },
        "errors": {c.name: c.error for c in cases if c.error},
    }
    json_path, md_path, md = write_report(report, notes, args.out)
    print()
    print(md)
    print(f"wrote {json_path} and {md_path} in {time.monotonic() - start:.0f} s")
    return 1 if notes["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
