"""The examples run as a user runs them: in a subprocess, checked by exit status and output."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def _check_training(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Softmax layer VJP (check_vjp): passed" in proc.stdout
    assert "== fused cross_entropy_backward == (softmax - onehot) / batch: passed" in proc.stdout
    m = re.fullmatch(r"test accuracy: (0\.\d{4}|1\.0000)", _last_line(proc.stdout))
    assert m, proc.stdout
    assert float(m[1]) >= 0.95, proc.stdout


def test_train_digits_cpu():
    _check_training(_run("train_digits.py"))


def test_train_digits_is_deterministic():
    first, second = (
        _run("train_digits.py", "--epochs", "2"),
        _run("train_digits.py", "--epochs", "2"),
    )
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    strip = re.compile(r"^time: .*$", re.MULTILINE)  # the only line that may differ
    assert strip.sub("", first.stdout) == strip.sub("", second.stdout)


def test_squared_error_check():
    proc = _run("squared_error_check.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"VJP.*check_vjp passed", proc.stdout), proc.stdout
    assert re.search(r"elementwise y\*\(1-y\).*check_vjp FAILED", proc.stdout), proc.stdout


@pytest.mark.gpu
def test_train_digits_gpu():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    if not cupy.is_available():
        pytest.skip("no CUDA device")
    _check_training(_run("train_digits.py", "--device", "gpu", timeout=300))
