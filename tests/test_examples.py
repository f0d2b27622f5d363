"""The examples run as a user runs them: in a subprocess, checked by exit status and output."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


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


def _run_without(module: str, script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``script`` as ``python examples/SCRIPT`` does, with ``import module`` failing."""
    code = (
        "import runpy, sys\n"
        f"sys.modules[{module!r}] = None\n"  # import raises ModuleNotFoundError
        f"sys.argv = [{str(EXAMPLES / script)!r}, *{list(args)!r}]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("module", "args", "message"),
    [
        (
            "sklearn",
            (),
            "train_digits.py: error: needs scikit-learn for the digits data; install the "
            'examples\' extra: python -m pip install ".[examples]"\n',
        ),
        (
            "cupy",
            ("--device", "gpu"),
            "train_digits.py: error: --device gpu needs CuPy; install it with python -m pip "
            'install ".[cuda13]" (or ".[cuda12]")\n',
        ),
    ],
)
def test_train_digits_without_a_dependency_is_one_line_and_status_2(module, args, message):
    proc = _run_without(module, "train_digits.py", *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == message
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "argument --batch-size: must be a positive int, got '0'"),
        (["--epochs", "-3"], "argument --epochs: must be a positive int, got '-3'"),
        (["--lr", "nan"], "argument --lr: must be a positive float, got 'nan'"),
        (["--lr", "fast"], "argument --lr: must be a positive float, got 'fast'"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    ],
)
def test_train_digits_bad_options_are_one_line_and_status_2(args, message):
    proc = _run("train_digits.py", *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"train_digits.py: error: {message}")
    assert proc.stderr.count("\n") == 1, proc.stderr


def _imported_distributions(path: Path) -> set[str]:
    """The distributions that provide the third-party modules ``path`` imports."""
    tops = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            tops.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    tops -= set(sys.stdlib_module_names) | {"__future__", "xpsoftmax"}
    providers = importlib.metadata.packages_distributions()
    missing = tops - set(providers)
    assert not missing, f"{path.name} imports {sorted(missing)}, which nothing installed provides"
    return {_canonical(dist) for top in tops for dist in providers[top]}


def _canonical(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_examples_extra_lists_what_the_examples_import():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    core = {_canonical(r) for r in project["dependencies"]}
    gpu = {_canonical(r) for key in ("cuda12", "cuda13") for r in extras[key]}
    needed = set().union(*(_imported_distributions(p) for p in EXAMPLES.glob("*.py")))
    # CuPy only for --device gpu, from the cuda extras the message names
    needed -= core | {d for d in needed if d.startswith("cupy")}
    assert gpu <= {"cupy-cuda12x", "cupy-cuda13x"}
    assert {_canonical(r) for r in extras["examples"]} == needed == {"scikit-learn"}
