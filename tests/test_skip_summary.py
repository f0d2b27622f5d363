"""The end-of-run summary of skipped tests (``pytest_terminal_summary`` in conftest.py).

A pytest run in a subprocess, with this project's pytest configuration and conftest, on a test
file written here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

_FILE = """\
import pytest

def test_runs():
    pass

@pytest.mark.parametrize("n", [1, 2, 3])
def test_needs_a_gpu(n):
    pytest.skip("no CUDA device")

@pytest.mark.skipif(True, reason="needs nvcc")
def test_needs_nvcc():
    pass
"""


def _pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(_FILE)
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(TESTS.parent / "pyproject.toml"),
         "-p", "conftest", "-p", "no:cacheprovider", "--no-cov", *args, "test_sample.py"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
        check=False,
    )  # fmt: skip


def test_skips_are_summarized_one_line_per_reason(tmp_path):
    done = _pytest(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "SKIPPED [" not in done.stdout  # addopts has no -rs
    (head,) = [i for i, line in enumerate(lines) if " 4 skipped, 2 reasons " in line]
    assert set(lines[head]) <= {"=", " ", *"4 skipped, 2 reasons"}
    assert lines[head + 1 : head + 3] == [
        "3  no CUDA device  (first: test_sample.py:8)",
        "1  needs nvcc  (first: test_sample.py:10)",
    ]
    assert "1 passed, 4 skipped" in lines[-1]


def test_no_summary_without_skips(tmp_path):
    done = _pytest(tmp_path, "-k", "runs")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skipped" not in done.stdout.replace("4 deselected", "")
    assert "reasons" not in done.stdout
