"""benchmarks/gpu_plot.py: the percentages it plots, and its command line (no GPU needed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_plot.py"
REPORT = SCRIPT.parent / "results" / "2026-11-27-nvidia-h200.json"

_spec = importlib.util.spec_from_file_location("gpu_plot", SCRIPT)
gpu_plot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_plot)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "error", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_percentages_from_the_bytes_each_op_moves():
    report = json.loads(REPORT.read_text(encoding="utf-8"))
    points = {
        (p["op"], p["dtype"], p["impl"], p["n"]): p["percent"]
        for p in gpu_plot.percent_of_copy(report)
    }
    last_axis = [c for c in report["cases"] if c["axis"] == -1]
    assert len(points) == 2 * len(last_axis)  # the axis-1 cases are left out
    for case in last_axis:
        rows, n = case["shape"]
        itemsize = {"float32": 4, "float16": 2}[case["dtype"]]
        arrays = 3 if case["op"].endswith("backward") else 2  # (y, dy) -> dx; x -> y
        nbytes = arrays * rows * n * itemsize
        for impl in ("xpsoftmax", "torch"):
            gbps = nbytes / (case[f"{impl}_ms"] * 1e-3) / 1e9
            # the report's times are rounded to 0.1 microsecond, its GB/s to 0.1
            expected = 100 * gbps / report["copy_gbps"]
            assert points[case["op"], case["dtype"], impl, n] == pytest.approx(expected, rel=1e-3)
    # the README's table: 2097152x32 float32 softmax at 96 % of copy, torch 1.57x slower
    assert points["softmax", "float32", "xpsoftmax", 32] == pytest.approx(96.25, abs=0.01)
    assert points["softmax", "float32", "torch", 32] == pytest.approx(96.25 / 1.573, abs=0.1)


_EMPTY = json.dumps(
    {"device": "G", "date": "d", "cupy": "1", "torch": "2", "copy_gbps": 4000, "cases": []}
)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read it: No such file or directory"),
        ("{", "not a gpu_bench.py report (Expecting property name"),
        ('{"copy_gbps": 4000}', "not a gpu_bench.py report (missing field 'cases')"),
        ("[1, 2]", "not a gpu_bench.py report (list indices must be integers"),
        (_EMPTY, "no last-axis case with a bandwidth"),
    ],
)
def test_a_bad_report_is_one_line_and_status_2(tmp_path, content, message):
    report = tmp_path / "report.json"
    if content is not None:
        report.write_text(content)
    done = _run(str(report), "-o", str(tmp_path / "out.png"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"gpu_plot.py: error: {report}: ")
    assert message in done.stderr
    assert done.stderr.count("\n") == 1
    assert not (tmp_path / "out.png").exists()


def test_plots_the_committed_report(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (the bench extra)")
    out = tmp_path / "h200.png"
    done = _run(str(REPORT), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote {out}\n"
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1210, 836)  # figsize (11, 7.6) at 110 dpi
