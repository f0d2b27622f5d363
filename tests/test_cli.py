"""The ``xpsoftmax`` command: demo, info, kernels and the one-line errors.

The demo and the import checks run in subprocesses (the real entry point, a clean
``sys.modules``); the error paths run in-process through ``cli.main`` to stay fast.
"""

from __future__ import annotations

import errno
import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.special
from _helpers import has_gpu

import xpsoftmax
from xpsoftmax.tools import cli
from xpsoftmax.tools import demo as _demo
from xpsoftmax.tools.batch import files as _files

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 180  # seconds for one subprocess; the demo takes a few seconds on 2 cores


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XPSOFTMAX_KERNELS", "XPSOFTMAX_DEBUG")}
    env.update(extra)
    return env


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xpsoftmax", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env() if env is None else env,
        check=False,
    )


def _lines(text: str) -> dict[str, str]:
    """The demo's ``label  text`` lines as a dict (continuation lines are skipped)."""
    out = {}
    for line in text.splitlines():
        if line and not line[0].isspace():
            label, _, rest = line.partition(" ")
            out[label] = rest.strip()
    return out


# --------------------------------------------------------------------------------------------
# demo


def test_demo_default_run_passes_and_reports():
    done = _run("demo")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    assert "Traceback" not in done.stdout
    lines = _lines(done.stdout)
    assert lines["xpsoftmax"].startswith(f"{xpsoftmax.__version__} demo")
    assert re.match(r"(CPU \(\d+ cores\), NumPy|GPU \d+ \(.*\), CuPy)", lines["device"])
    assert lines["batch"].startswith("(4096, 1000) float32 logits")
    accuracy = float(re.search(r"accuracy ([\d.]+) %", lines["batch"]).group(1))
    assert 50 < accuracy < 100  # a real classifier: mostly right, not trivially
    errors = [float(e) for e in re.findall(r"error ([\d.e+-]+)", lines["forward"])]
    assert len(errors) == 2 and all(0 <= e <= 1e-5 for e in errors)
    errors = [float(e) for e in re.findall(r"error ([\d.e+-]+)", lines["backward"])]
    assert len(errors) == 2 and all(0 <= e <= 1e-5 for e in errors)
    assert lines["check_vjp"].startswith("finite differences on a (8, 64) float64 slice")
    assert "softmax_backward True, log_softmax_backward True" in lines["check_vjp"]
    assert "check_vjp False" in lines["shortcut"]
    shortcut_error = float(re.search(r"gradient error ([\d.e+-]+)", lines["shortcut"]).group(1))
    assert shortcut_error > 1000 * 1e-5  # a thousand times the float32 tolerance
    for label in ("forward", "backward", "check_vjp", "shortcut"):
        assert lines[label].endswith("[ok]"), lines[label]
    times = re.findall(r"(\w+) ([\d.e+-]+) ms \(([\d.e+-]+) GB/s\)", done.stdout)
    assert [name for name, _, _ in times] == [
        "softmax",
        "log_softmax",
        "softmax_backward",
        "log_softmax_backward",
    ]
    assert all(float(ms) > 0 and float(gbs) > 0 for _, ms, gbs in times)
    assert lines["result"] == "all checks passed"


def test_demo_imports_neither_torch_nor_jax():
    code = (
        "import sys\n"
        "from xpsoftmax.tools.cli import main\n"
        "status = main(['demo', '--rows', '64', '--classes', '10', '--repeat', '1'])\n"
        "assert status == 0, status\n"
        "print(sorted(m for m in ('torch', 'jax', 'dask') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, env=_env()
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_demo_float64_small_batch_in_process(capsys):
    status = cli.main(["demo", "--device", "cpu", "--dtype", "float64", "--rows", "50"])
    out = capsys.readouterr()
    assert status == 0, out.out
    lines = _lines(out.out)
    assert lines["device"].startswith("CPU")
    assert lines["batch"].startswith("(50, 1000) float64 logits")
    errors = [float(e) for e in re.findall(r"error ([\d.e+-]+)", lines["forward"])]
    assert all(e <= 1e-12 for e in errors)


@pytest.mark.parametrize(("rows", "classes"), [(1, 2), (2, 2), (3, 3), (8, 2), (8, 3), (2, 10)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_demo_passes_on_the_smallest_batches(rows, classes, dtype, capsys):
    """Few classes: the classifier is right with confidence, softmax saturates, the gradient is
    tiny; the checks are still well posed (this once printed SOME CHECKS FAILED)."""
    argv = ["demo", "--device", "cpu", "--rows", str(rows), "--classes", str(classes)]
    assert cli.main([*argv, "--dtype", dtype, "--repeat", "1"]) == 0, capsys.readouterr().out
    assert "all checks passed" in capsys.readouterr().out


def test_demo_exit_status_1_when_a_check_fails(monkeypatch, capsys):
    # A backward that keeps only the Jacobian's diagonal must make the demo fail.
    monkeypatch.setattr(_demo, "softmax_backward", lambda y, dy, axis=-1: y * (1 - y) * dy)
    status = cli.main(["demo", "--device", "cpu", "--rows", "64", "--classes", "10"])
    out = capsys.readouterr()
    assert status == 1
    lines = _lines(out.out)
    assert lines["backward"].endswith("[FAIL]")
    assert "softmax_backward False, log_softmax_backward True" in lines["check_vjp"]
    assert lines["check_vjp"].endswith("[FAIL]")
    assert lines["forward"].endswith("[ok]")
    assert lines["result"] == "SOME CHECKS FAILED"


# Runs the command, then prints the process's peak resident memory (VmHWM, of this process
# alone: a forked child's ru_maxrss starts from its parent's) on stderr's last line.
_PEAK = """
import sys
from xpsoftmax.tools.cli import main
status = main(sys.argv[1:])
with open("/proc/self/status") as f:
    print(next(line for line in f if line.startswith("VmHWM:")), file=sys.stderr, end="")
raise SystemExit(status)
"""


def _peak_rss(*args: str, address_space: int | None = None) -> tuple[int, int, str]:
    """Exit status, peak resident bytes and stderr (less the peak) of ``xpsoftmax ARGS``, under
    an address-space limit (``ulimit -v``) if one is given. The child sets the limit itself: a
    preexec_fn would fork this multithreaded test process (JAX warns about that)."""
    limit = ""
    if address_space is not None:
        limit = f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({address_space},) * 2)\n"
    done = subprocess.run(
        [sys.executable, "-c", limit + _PEAK, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        timeout=TIMEOUT,
        check=False,
    )
    err, _, peak = done.stderr.rstrip("\n").rpartition("\n")
    assert peak.startswith("VmHWM:"), done.stderr
    return done.returncode, int(peak.split()[1]) * 1024, err + "\n" * bool(err)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_demo_memory_is_a_small_multiple_of_the_batch():
    """Issue 13: 23 GB resident for a 2 GB batch (float64 references, gradients and errors of
    the whole batch). Now about 6 arrays of the batch's size: here a 64 MiB batch."""
    rows, classes = 4096, 4096
    batch = rows * classes * 4
    common = ["demo", "--device", "cpu", "--repeat", "1"]
    status, base, err = _peak_rss(*common, "--rows", "8", "--classes", "2")
    assert status == 0, err
    status, peak, err = _peak_rss(*common, "--rows", str(rows), "--classes", str(classes))
    assert status == 0, err
    # 6 arrays of the batch's size and the float64 slices of the references (about 10 of 8
    # MiB): 7.3 times the batch here on 2026-12-02, 19.3 times before.
    assert peak - base < 6.5 * batch + 128 * 2**20, f"{(peak - base) / batch:.2f} times the batch"


def test_demo_refuses_a_batch_that_does_not_fit_in_memory(capsys):
    argv = ["demo", "--device", "cpu", "--rows", str(10**7), "--classes", str(10**6)]
    assert cli.main(argv) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1
    assert re.match(
        r"xpsoftmax: error: demo: a \(10000000, 1000000\) float32 batch \(40000\.0 GB\) needs "
        r"about \d+\.\d GB of memory \(6 arrays of the batch's size and more\) but \d+\.\d GB "
        r"are available; use fewer --rows or --classes$",
        out.err,
    ), out.err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS, /proc")
def test_demo_refuses_what_ulimit_v_would_not_allow():
    """The issue's case, 100000 x 5000 float32 (2 GB), under a 3 GiB address-space limit: one
    line, status 2, at once (no batch made), instead of a MemoryError or the OOM killer."""
    start = time.monotonic()
    argv = ["demo", "--device", "cpu", "--rows", "100000", "--classes", "5000"]
    status, peak, err = _peak_rss(*argv, address_space=3 << 30)
    assert status == 2, err
    assert err.count("\n") == 1, err
    assert err.startswith("xpsoftmax: error: demo: a (100000, 5000) float32 batch (2.0 GB)")
    assert "GB are available" in err
    assert peak < 1 << 30 and time.monotonic() - start < 30


def test_demo_batch_is_deterministic_and_reference_matches_scipy():
    logits, labels = _demo.make_batch(32, 7, seed=3)
    again, labels_again = _demo.make_batch(32, 7, seed=3)
    assert logits.shape == (32, 7) and logits.dtype == np.float64
    assert labels.shape == (32,) and labels.min() >= 0 and labels.max() < 7
    np.testing.assert_array_equal(logits, again)
    np.testing.assert_array_equal(labels, labels_again)
    assert not np.array_equal(logits, _demo.make_batch(32, 7, seed=4)[0])
    p, ly = _demo._reference(logits)
    np.testing.assert_allclose(p, scipy.special.softmax(logits, axis=-1), rtol=1e-14, atol=0)
    np.testing.assert_allclose(ly, scipy.special.log_softmax(logits, axis=-1), rtol=1e-14)


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs CuPy and a CUDA device")
@pytest.mark.parametrize("mode", ["auto", "never"])
def test_demo_on_the_gpu(mode):
    done = _run("demo", "--device", "gpu", env=_env(XPSOFTMAX_KERNELS=mode))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = _lines(done.stdout)
    assert re.match(rf"GPU \d+ \(.+\), CuPy [\w.]+, kernels '{mode}'$", lines["device"])
    for label in ("forward", "backward", "check_vjp", "shortcut"):
        assert lines[label].endswith("[ok]"), lines[label]
    assert lines["result"] == "all checks passed"


@pytest.mark.skipif(has_gpu(), reason="checks the error raised where no GPU is present")
def test_demo_device_gpu_without_gpu_is_one_line_error():
    done = _run("demo", "--device", "gpu")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("xpsoftmax: error: demo: --device gpu: no CUDA device")


# --------------------------------------------------------------------------------------------
# info


def test_info_reports_versions_without_importing_frameworks():
    code = (
        "import sys\n"
        "from xpsoftmax.tools.cli import main\n"
        "status = main(['info'])\n"
        "print('imported:', sorted(m for m in ('torch', 'jax', 'dask') if m in sys.modules))\n"
        "raise SystemExit(status)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, env=_env()
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    rows = dict(
        re.match(r"(\S+(?: \S+)?) {2,}(.*)", line).groups()
        for line in done.stdout.splitlines()
        if not line.startswith("imported:")
    )
    assert done.stdout.splitlines()[-1] == "imported: []"
    assert rows["xpsoftmax"].startswith(f"{xpsoftmax.__version__} (")
    assert rows["numpy"] == np.__version__
    assert rows["array-api-compat"] == importlib.metadata.version("array-api-compat")
    assert rows["torch"] == importlib.metadata.version("torch")
    assert rows["jax"] == importlib.metadata.version("jax")
    assert rows["dask"] == importlib.metadata.version("dask")
    assert rows["cupy"].startswith(importlib.metadata.version("cupy-cuda13x"))
    assert rows["distributed"] == importlib.metadata.version("distributed")
    assert rows["scipy"] == scipy.__version__
    try:
        assert rows["numba"] == importlib.metadata.version("numba")
    except importlib.metadata.PackageNotFoundError:
        assert rows["numba"] == "not installed"
    threads = len(os.sched_getaffinity(0))
    assert rows["CPU path"] == (
        f"compiled kernels, {threads} thread{'s' * (threads > 1)}; "
        f"numba {importlib.metadata.version('numba')}"
    )
    if has_gpu():
        assert re.match(r"\d+ \(0: ", rows["CUDA devices"])
    else:
        assert rows["CUDA devices"].startswith("none")
    nvcc = shutil.which("nvcc")
    assert rows["nvcc"].startswith(nvcc) if nvcc else rows["nvcc"] == "not on PATH"
    assert rows["kernel mode"] == "auto (XPSOFTMAX_KERNELS unset)"
    assert rows["CPUs"].startswith(f"{len(os.sched_getaffinity(0))} usable")


def test_info_shows_kernel_mode_from_environment():
    done = _run("info", env=_env(XPSOFTMAX_KERNELS="never"))
    assert done.returncode == 0, done.stderr
    assert "kernel mode       never (XPSOFTMAX_KERNELS='never')\n" in done.stdout


def test_info_shows_kernel_mode_set_in_process(monkeypatch, capsys):
    monkeypatch.delenv("XPSOFTMAX_KERNELS", raising=False)
    with xpsoftmax.kernels("always"):
        assert cli.main(["info"]) == 0
    assert "kernel mode       always (XPSOFTMAX_KERNELS unset)\n" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"XPSOFTMAX_NUM_THREADS": "1"}, "compiled kernels, 1 thread; numba "),
        (
            {"XPSOFTMAX_NUM_THREADS": "3", "XPSOFTMAX_CPU": "numpy"},
            "numpy (blocked), 3 threads; XPSOFTMAX_CPU=numpy",
        ),
        ({"XPSOFTMAX_CPU": "fortran"}, "invalid (environment variable XPSOFTMAX_CPU must be"),
        ({"XPSOFTMAX_NUMPY_FAST": "0"}, "generic array-API code (XPSOFTMAX_NUMPY_FAST=0)"),
        ({"XPSOFTMAX_NUMPY_FAST": "2"}, "invalid (environment variable XPSOFTMAX_NUMPY_FAST"),
    ],
)
def test_info_reports_the_cpu_path(env, expected, monkeypatch, capsys):
    for name in ("XPSOFTMAX_NUM_THREADS", "XPSOFTMAX_NUMPY_FAST", "XPSOFTMAX_CPU"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["info"]) == 0
    (row,) = (line for line in capsys.readouterr().out.splitlines() if line.startswith("CPU path"))
    assert row.split(None, 2)[2].startswith(expected)


@pytest.mark.parametrize("command", ["demo", "run", "bench", "info"])
def test_help_ends_with_examples_that_parse(command, capsys):
    """Each subcommand's --help ends with two or three examples, each a valid command line."""
    import shlex

    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    head, _, tail = text.rstrip("\n").rpartition("\nexamples:\n")
    assert head.startswith(f"usage: xpsoftmax {command}")
    examples = tail.splitlines()
    assert 2 <= len(examples) <= 3, text
    for line in examples:
        words = shlex.split(line, comments=True)
        while "=" in words[0]:  # an environment assignment in front
            words.pop(0)
        assert words[:2] == ["xpsoftmax", command], line
        namespace = cli._parser().parse_args(words[1:])  # raises CommandError if it does not
        assert namespace.func.__name__ == f"_{command}"


def test_info_reports_an_invalid_kernel_mode():
    done = _run("info", env=_env(XPSOFTMAX_KERNELS="sometimes"))
    assert done.returncode == 0, done.stderr
    assert "kernel mode       invalid (environment variable XPSOFTMAX_KERNELS must be one of" in (
        done.stdout
    )


# --------------------------------------------------------------------------------------------
# kernels, entry points


def test_kernels_help_is_passed_to_kcheck():
    done = _run("kernels", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: xpsoftmax kernels")
    assert "--check" in done.stdout


def test_console_script_is_declared():
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="xpsoftmax")
    assert script.load() is cli.main


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"xpsoftmax {xpsoftmax.__version__}\n"


# --------------------------------------------------------------------------------------------
# errors: one line on stderr, status 2, no traceback


def test_unknown_subcommand_from_the_real_entry_point():
    done = _run("frobnicate")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith(
        "xpsoftmax: error: argument COMMAND: invalid choice: 'frobnicate'"
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["info", "--bogus"], "unrecognized arguments: --bogus"),
        (["demo", "--rows", "0"], "argument --rows: expected a positive integer, got 0"),
        (["demo", "--rows", "many"], "argument --rows: expected a positive integer, got 'many'"),
        (["demo", "--classes", "1"], "demo: --classes must be at least 2, got 1"),
        (["demo", "--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
        (["demo", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    ],
)
def test_usage_errors_are_one_line_with_status_2(argv, expected, capsys):
    assert cli.main(argv) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.count("\n") == 1
    assert out.err.startswith("xpsoftmax: error: ")
    assert expected in out.err


def test_unexpected_error_is_one_line(monkeypatch, capsys):
    def broken(**kwargs):
        raise OSError("disk\nfull")

    monkeypatch.setattr(_demo, "run", broken)
    assert cli.main(["demo"]) == 2
    assert capsys.readouterr().err == "xpsoftmax: error: OSError: disk\n"


def test_debug_variable_shows_the_traceback(monkeypatch):
    def broken(**kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(_demo, "run", broken)
    monkeypatch.setenv("XPSOFTMAX_DEBUG", "1")
    with pytest.raises(OSError, match="disk full"):
        cli.main(["demo"])


def test_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_demo, "run", interrupted)
    assert cli.main(["demo"]) == 130
    assert capsys.readouterr().err == "xpsoftmax: error: interrupted\n"


# --------------------------------------------------------------------------------------------
# README and CI agree


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("\n## Quick start\n", 1)[1]
    block = re.search(r"```[a-z]*\n(.*?)```", quick_start, re.S).group(1)
    install_and_demo, test = block.strip().splitlines()
    assert install_and_demo.endswith("python -m xpsoftmax demo")
    assert test.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in ci
    commands = [line for line in ci[1:] if line and not line.startswith(("#", "set ", "cd "))]
    assert commands == [test]


# --------------------------------------------------------------------------------------------
# run: .npy files in, .npy file out, streamed


def _softmax64(x, axis):
    return scipy.special.softmax(np.asarray(x, dtype=np.float64), axis=axis)


def _log_softmax64(x, axis):
    return scipy.special.log_softmax(np.asarray(x, dtype=np.float64), axis=axis)


def _reference(op, arrays, axis):
    """float64 references: scipy for the forward ops, the VJP formulas in float64 for backward."""
    if op == "softmax":
        return _softmax64(arrays[0], axis)
    if op == "log_softmax":
        return _log_softmax64(arrays[0], axis)
    y, dy = (np.asarray(a, dtype=np.float64) for a in arrays)
    if op == "softmax_backward":
        return y * (dy - np.sum(y * dy, axis=axis, keepdims=True))
    return dy - np.exp(y) * np.sum(dy, axis=axis, keepdims=True)


def _inputs(op, x, rng):
    """Input arrays for ``op``: logits, or a forward output and a cotangent."""
    if op in ("softmax", "log_softmax"):
        return [x]
    axis = -1
    forward = _softmax64(x, axis) if op == "softmax_backward" else _log_softmax64(x, axis)
    return [forward.astype(x.dtype), rng.standard_normal(x.shape).astype(x.dtype)]


def _save(tmp_path, name, array, fortran=False):
    path = tmp_path / name
    np.save(path, np.asfortranarray(array) if fortran else array)
    return str(path)


def _listing(path):
    return sorted(p.name for p in path.iterdir())


OPS = ("softmax", "log_softmax", "softmax_backward", "log_softmax_backward")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    ("shape", "axis", "fortran", "batch_mb"),
    [
        ((40, 30), -1, False, "0.001"),  # one block per line or so: many blocks
        ((40, 30), 0, False, "0.001"),  # blocks of columns
        ((5, 6, 7), 1, False, "0.0002"),  # middle axis, blocks split the last axis
        ((5, 6, 7), -1, True, "0.0002"),  # Fortran-ordered input and output
        ((5, 6, 7), 0, False, "32"),  # one block
        ((50,), 0, False, "0.0001"),  # one line, larger than the budget
    ],
)
def test_run_matches_reference(op, shape, axis, fortran, batch_mb, tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal(shape)).astype(np.float32)
    if op.endswith("backward"):
        x = np.moveaxis(x, axis, -1)  # make the forward output along `axis`
        arrays = [np.moveaxis(a, -1, axis) for a in _inputs(op, x, rng)]
    else:
        arrays = _inputs(op, x, rng)
    paths = [_save(tmp_path, f"in{i}.npy", a, fortran) for i, a in enumerate(arrays)]
    out = str(tmp_path / "out.npy")
    argv = ["run", op, *paths, "-o", out, "--axis", str(axis), "--batch-mb", batch_mb]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.startswith(f"{op}: ")
    assert captured.out.rstrip().endswith(f"-> {out}")
    result = np.load(out, allow_pickle=False)
    assert result.dtype == np.float32
    assert result.shape == shape
    assert np.isfortran(result) == (fortran and len(shape) > 1)
    ref = _reference(op, arrays, axis)
    np.testing.assert_allclose(result, ref, rtol=2e-5, atol=2e-6)
    whole = getattr(xpsoftmax, op)(*arrays, axis=axis)
    if fortran:  # NumPy sums a Fortran-ordered block in another order: equal to rounding
        np.testing.assert_allclose(result, whole, rtol=1e-5, atol=1e-7)
    else:  # streaming changes nothing: the same bytes as one in-memory call
        np.testing.assert_array_equal(result, whole)
    assert _listing(tmp_path) == sorted([*(os.path.basename(p) for p in paths), "out.npy"])


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(np.int16, np.float64), (np.bool_, np.float64), (np.float16, np.float16), (">f8", "<f8")],
)
def test_run_output_dtype(dtype, expected, tmp_path, capsys):
    x = np.arange(24).reshape(4, 6) % 5
    path = _save(tmp_path, "x.npy", x.astype(dtype))
    out = tmp_path / "y.npy"
    assert cli.main(["run", "softmax", path, "-o", str(out)]) == 0
    result = np.load(out)
    assert result.dtype == np.dtype(expected)
    tol = 1e-3 if expected == np.float16 else 1e-12
    np.testing.assert_allclose(result, _softmax64(x.astype(dtype), -1), rtol=tol, atol=tol)


def test_run_with_mask(tmp_path, capsys):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 8))
    mask = rng.random((6, 8)) > 0.4
    mask[2] = False  # a fully masked row
    mask[3] = True
    paths = [_save(tmp_path, "x.npy", x), _save(tmp_path, "m.npy", mask)]
    for op, fill in (("softmax", 0.0), ("log_softmax", -np.inf)):
        out = tmp_path / f"{op}.npy"
        argv = ["run", op, paths[0], "-o", str(out), "--where", paths[1], "--batch-mb", "1e-4"]
        assert cli.main(argv) == 0
        result = np.load(out)
        assert np.all(result[~mask] == fill)
        for row in range(6):
            if mask[row].any():
                ref = (_softmax64 if op == "softmax" else _log_softmax64)(x[row, mask[row]], -1)
                np.testing.assert_allclose(result[row, mask[row]], ref, rtol=1e-12)
    # A mask that broadcasts: one column pattern for every row.
    column = np.array([True, False] * 4)
    mpath = _save(tmp_path, "col.npy", column)
    out = tmp_path / "bcast.npy"
    assert cli.main(["run", "softmax", paths[0], "-o", str(out), "--where", mpath]) == 0
    result = np.load(out)
    assert np.all(result[:, ~column] == 0)
    np.testing.assert_allclose(result[:, column], _softmax64(x[:, column], -1), rtol=1e-12)


def test_run_empty_input(tmp_path, capsys):
    path = _save(tmp_path, "x.npy", np.zeros((0, 5), dtype=np.float32))
    out = tmp_path / "y.npy"
    assert cli.main(["run", "log_softmax", path, "-o", str(out)]) == 0
    result = np.load(out)
    assert result.shape == (0, 5) and result.dtype == np.float32
    assert capsys.readouterr().out.startswith("log_softmax: 0 rows of 5")


def test_run_overwrite(tmp_path, capsys):
    x = np.array([[0.0, np.log(3.0)]])
    path = _save(tmp_path, "x.npy", x)
    out = tmp_path / "y.npy"
    out.write_bytes(b"old")
    assert cli.main(["run", "softmax", path, "-o", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"old"
    assert cli.main(["run", "softmax", path, "-o", str(out), "--overwrite"]) == 0
    np.testing.assert_allclose(np.load(out), [[0.25, 0.75]], rtol=1e-15)
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode
    assert _listing(tmp_path) == ["x.npy", "y.npy"]


def test_run_failure_midway_leaves_no_output(tmp_path, monkeypatch, capsys):
    x = np.random.default_rng(2).standard_normal((64, 16))
    path = _save(tmp_path, "x.npy", x)
    out = tmp_path / "y.npy"
    out.write_bytes(b"previous result")
    calls = []
    real = xpsoftmax.softmax

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the dtype probe, then blocks 1 and 2 succeed, block 3 fails
            raise MemoryError("out of memory in block 3")
        return real(*args, **kwargs)

    monkeypatch.setattr(xpsoftmax, "softmax", failing)
    argv = ["run", "softmax", path, "-o", str(out), "--overwrite", "--batch-mb", "0.001"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == "xpsoftmax: error: MemoryError: out of memory in block 3\n"
    assert len(calls) == 4
    assert out.read_bytes() == b"previous result"  # the old output is untouched
    assert _listing(tmp_path) == ["x.npy", "y.npy"]  # and no temporary file is left


def test_run_progress_bar(tmp_path, capsys):
    path = _save(tmp_path, "x.npy", np.zeros((300, 10)))
    argv = ["run", "softmax", path, "-o", str(tmp_path / "y.npy"), "--batch-mb", "0.001"]
    assert cli.main([*argv, "--progress"]) == 0
    err = capsys.readouterr().err
    assert "300/300" in err and "row/s" in err and "GB/s" in err
    assert cli.main([*argv, "--overwrite", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def _make_bad_files(t):
    """The files that the error cases below refer to, in the folder ``t``."""
    good = t / "good.npy"
    np.save(good, np.zeros((3, 4)))
    np.save(t / "good2.npy", np.zeros((3, 5)))
    (t / "text.npy").write_text("not an array\n")
    (t / "truncated.npy").write_bytes(good.read_bytes()[:-8])
    (t / "extra.npy").write_bytes(good.read_bytes() + b"\0" * 8)
    (t / "header.npy").write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': <f8,  }\n")
    (t / "tiny.npy").write_bytes(b"\x93NU")
    with open(t / "negative.npy", "wb") as f:  # a header numpy reads, with 48 bytes of "data"
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f8", "fortran_order": False, "shape": (-2, 3)}
        )
        f.write(b"\0" * 48)
    (t / "dir.npy").mkdir()
    (t / "link.npy").symlink_to(good)
    os.link(good, t / "hardlink.npy")
    np.save(t / "objects.npy", np.array([{"a": 1}, None], dtype=object))
    np.save(t / "complex.npy", np.zeros((3, 4), dtype=np.complex64))
    np.save(t / "strings.npy", np.array([["a", "b"]]))
    np.save(t / "dates.npy", np.zeros(3, dtype="datetime64[s]"))
    np.save(t / "struct.npy", np.zeros(3, dtype=[("a", "<f8"), ("b", "<i4")]))
    np.save(t / "intmask.npy", np.ones((3, 4), dtype=np.int8))
    np.save(t / "mask5.npy", np.ones(5, dtype=bool))
    np.save(t / "scalar.npy", np.float64(1.0))


# (id, argv after "run" with {t} for the folder, a part of the expected message)
BAD_RUNS = [
    ("missing", "softmax {t}/nope.npy -o {t}/out.npy", "logits '{t}/nope.npy': no such file"),
    ("directory", "softmax {t}/dir.npy -o {t}/out.npy", "dir.npy': is a directory"),
    ("not npy", "softmax {t}/text.npy -o {t}/out.npy", "text.npy': not a .npy file"),
    ("too short", "softmax {t}/tiny.npy -o {t}/out.npy", "tiny.npy': not a .npy file"),
    (
        "truncated",
        "softmax {t}/truncated.npy -o {t}/out.npy",
        "truncated.npy': truncated, 88 bytes of data where its header says 96",
    ),
    ("extra bytes", "softmax {t}/extra.npy -o {t}/out.npy", "8 unexpected bytes after the data"),
    ("bad header", "softmax {t}/header.npy -o {t}/out.npy", "header.npy': corrupt .npy header"),
    (
        "negative shape",
        "softmax {t}/negative.npy -o {t}/out.npy",
        "negative.npy': corrupt .npy header (negative shape (-2, 3))",
    ),
    (
        "pickle",
        "softmax {t}/objects.npy -o {t}/out.npy",
        "objects.npy': holds Python objects (a pickled array)",
    ),
    ("complex", "softmax {t}/complex.npy -o {t}/out.npy", "complex dtype complex64"),
    ("strings", "softmax {t}/strings.npy -o {t}/out.npy", "dtype <U1 is not a real numeric"),
    ("dates", "softmax {t}/dates.npy -o {t}/out.npy", "dtype datetime64[s] is not a real"),
    ("structured", "softmax {t}/struct.npy -o {t}/out.npy", "structured dtype"),
    (
        "shapes",
        "softmax_backward {t}/good.npy {t}/good2.npy -o {t}/out.npy",
        "y has shape (3, 4) but dy has shape (3, 5)",
    ),
    ("one input", "softmax_backward {t}/good.npy -o {t}/out.npy", "takes 2 inputs (y, dy), got 1"),
    (
        "two inputs",
        "log_softmax {t}/good.npy {t}/good.npy -o {t}/out.npy",
        "takes 1 input (logits), got 2",
    ),
    (
        "axis",
        "softmax {t}/good.npy -o {t}/out.npy --axis 2",
        "--axis 2 is out of range for inputs of shape (3, 4)",
    ),
    (
        "axis of a scalar",
        "softmax {t}/scalar.npy -o {t}/out.npy",
        "--axis -1 is out of range for inputs of shape ()",
    ),
    (
        "mask dtype",
        "softmax {t}/good.npy -o {t}/out.npy --where {t}/intmask.npy",
        "intmask.npy': dtype int8, expected bool",
    ),
    (
        "mask shape",
        "softmax {t}/good.npy -o {t}/out.npy --where {t}/mask5.npy",
        "mask5.npy' of shape (5,) does not broadcast to (3, 4)",
    ),
    (
        "mask missing",
        "softmax {t}/good.npy -o {t}/out.npy --where {t}/nomask.npy",
        "mask '{t}/nomask.npy': no such file",
    ),
    (
        "mask is pickled",
        "softmax {t}/good.npy -o {t}/out.npy --where {t}/objects.npy",
        "holds Python objects",
    ),
    ("output is input", "softmax {t}/good.npy -o {t}/good.npy --overwrite", "is the input"),
    (
        "output is mask",
        "softmax {t}/good.npy -o {t}/mask5.npy --overwrite --where {t}/mask5.npy",
        "is the input '{t}/mask5.npy'",
    ),
    ("output is a symlink", "softmax {t}/good.npy -o {t}/link.npy --overwrite", "is the input"),
    (
        "output is a hard link",
        "softmax {t}/good.npy -o {t}/hardlink.npy --overwrite",
        "is the input",
    ),
    ("output exists", "softmax {t}/good.npy -o {t}/good2.npy", "exists; pass --overwrite"),
    ("output directory", "softmax {t}/good.npy -o {t}/dir.npy --overwrite", "is a directory"),
    ("no directory", "softmax {t}/good.npy -o {t}/no/out.npy", "directory '{t}/no' does not exist"),
    ("unknown op", "softmin {t}/good.npy -o {t}/out.npy", "argument OP: invalid choice: 'softmin'"),
    ("no output", "softmax {t}/good.npy", "the following arguments are required: -o/--output"),
    (
        "batch size",
        "softmax {t}/good.npy -o {t}/out.npy --batch-mb 0",
        "argument --batch-mb: expected a positive number, got '0'",
    ),
    (
        "axis not an int",
        "softmax {t}/good.npy -o {t}/out.npy --axis last",
        "argument --axis: invalid int value: 'last'",
    ),
]


@pytest.mark.parametrize(
    ("argv", "expected"), [c[1:] for c in BAD_RUNS], ids=[c[0] for c in BAD_RUNS]
)
def test_run_bad_input_is_one_line_with_status_2(argv, expected, tmp_path, capsys):
    _make_bad_files(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    t = str(tmp_path)
    assert cli.main(["run", *argv.format(t=t).split()]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.count("\n") == 1
    assert out.err.startswith("xpsoftmax: error: ")
    assert expected.format(t=t) in out.err
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # nothing written, nothing left behind, nothing changed
    assert not (tmp_path / "dir.npy").is_file()


def test_run_bad_input_from_the_real_entry_point(tmp_path):
    (tmp_path / "x.npy").write_bytes(b"\x93NUMPY garbage")
    done = _run("run", "softmax", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert _listing(tmp_path) == ["x.npy"]


# --------------------------------------------------------------------------------------------
# run on a large file: bounded memory, Ctrl-C, a crash

BIG_ROWS, BIG_COLS = 524288, 1024  # 2 GiB of float32: a multi-GiB file, as issue 6 asks


@pytest.fixture(scope="module")
def big_input(tmp_path_factory):
    """A 2 GiB float32 .npy file; mostly zeros (a sparse file, quick to make), some rows not."""
    path = tmp_path_factory.mktemp("big") / "logits.npy"
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(BIG_ROWS, BIG_COLS))
    rows = np.arange(0, BIG_ROWS, 4099)
    x[rows] = np.random.default_rng(5).standard_normal((rows.size, BIG_COLS)).astype(np.float32)
    x.flush()
    del x
    return path, rows


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "xpsoftmax", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )


def _status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _wait_for_part(folder, proc, timeout=60.0):
    """Wait until the run's temporary file exists (the run is writing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.name.endswith(".part") for p in folder.iterdir()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.002)
    raise AssertionError("the run never started writing")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")
def test_run_streams_a_large_file_in_bounded_anonymous_memory(big_input, tmp_path):
    path, rows = big_input
    out = tmp_path / "probs.npy"
    proc = _start("run", "softmax", str(path), "-o", str(out), "--batch-mb", "8")
    peak_anon = peak_rss = 0
    while proc.poll() is None:
        anon, rss = _status_kib(proc.pid, "RssAnon"), _status_kib(proc.pid, "VmHWM")
        peak_anon, peak_rss = max(peak_anon, anon or 0), max(peak_rss, rss or 0)
        time.sleep(0.001)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, stderr
    assert stdout.startswith(f"softmax: {BIG_ROWS} rows of {BIG_COLS}")
    # Anonymous memory (heap, temporaries) stays far below the 2 GiB input and 2 GiB output;
    # the file pages counted in RSS are page cache, not process memory.
    assert 0 < peak_anon < 160 * 1024, f"peak RssAnon {peak_anon} KiB"
    result = np.load(out, mmap_mode="r")
    assert result.shape == (BIG_ROWS, BIG_COLS) and result.dtype == np.float32
    x = np.load(path, mmap_mode="r")
    check = np.concatenate([rows[:50], [1, 2, BIG_ROWS - 1]])
    np.testing.assert_allclose(result[check], _softmax64(x[check], -1), rtol=1e-5, atol=1e-9)
    del result
    out.unlink()  # 2 GiB: do not keep it among pytest's retained temporary folders


@pytest.mark.parametrize("sig", _files.SIGNALS, ids=[s.name for s in _files.SIGNALS])
def test_run_interrupted_leaves_no_output(sig, big_input, tmp_path):
    """Every terminating signal a program can catch ends a run as Ctrl-C does: one line, status
    128 + the signal's number (143 for SIGTERM), the folder as it was (the old output kept)."""
    path, _ = big_input
    out = tmp_path / "probs.npy"
    out.write_bytes(b"previous result")
    argv = ["run", "log_softmax", str(path), "-o", str(out), "--batch-mb", "1", "--overwrite"]
    proc = _start(*argv)
    _wait_for_part(tmp_path, proc)
    time.sleep(0.2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 128 + sig, stderr
    assert stdout == ""
    told = "interrupted" if sig == signal.SIGINT else f"interrupted by {sig.name}"
    assert stderr == f"xpsoftmax: error: {told}\n"
    assert _listing(tmp_path) == ["probs.npy"]  # no temporary file
    assert out.read_bytes() == b"previous result"


def test_run_killed_never_leaves_a_partial_output_and_the_next_run_cleans_up(
    big_input, tmp_path, capsys
):
    path, _ = big_input
    out = tmp_path / "probs.npy"
    proc = _start("run", "softmax", str(path), "-o", str(out), "--batch-mb", "1")
    _wait_for_part(tmp_path, proc)
    time.sleep(0.2)
    proc.kill()
    proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # only the temporary file can be left, never a partial output
    assert _listing(tmp_path) == [".probs.npy.xpsoftmax.part"]  # recognizably this output's
    # The next run to the same output reuses it (the killed run's lock died with it).
    small = _save(tmp_path, "x.npy", np.zeros((2, 3)))
    assert cli.main(["run", "softmax", small, "-o", str(out)]) == 0, capsys.readouterr().err
    np.testing.assert_allclose(np.load(out), np.full((2, 3), 1 / 3), rtol=1e-15)
    assert _listing(tmp_path) == ["probs.npy", "x.npy"]


# --------------------------------------------------------------------------------------------
# run: a full disk, a changing input, a racing twin, long names


def _one_line(status: int, out, expected: str) -> None:
    assert status == 2
    assert out.out == ""
    assert out.err.count("\n") == 1 and out.err.startswith("xpsoftmax: error: "), out.err
    assert expected in out.err, out.err


def test_run_no_space_to_reserve_is_one_line(tmp_path, monkeypatch, capsys):
    path = _save(tmp_path, "x.npy", np.zeros((64, 16)))
    out = tmp_path / "y.npy"
    out.write_bytes(b"previous result")

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    status = cli.main(["run", "softmax", path, "-o", str(out), "--overwrite"])
    _one_line(status, capsys.readouterr(), f"output '{out}': cannot be written (no space left")
    assert out.read_bytes() == b"previous result"
    assert _listing(tmp_path) == ["x.npy", "y.npy"]


def test_run_disk_full_midway_is_one_line(tmp_path, monkeypatch, capsys):
    """A file system that cannot reserve space fills up while the output is written."""
    path = _save(tmp_path, "x.npy", np.zeros((64, 16)))
    out = tmp_path / "y.npy"
    writes = []
    real = os.pwritev

    def pwritev(fd, buffers, offset):
        writes.append(offset)
        if len(writes) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, buffers, offset)

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    monkeypatch.setattr(os, "pwritev", pwritev)
    status = cli.main(["run", "softmax", path, "-o", str(out), "--batch-mb", "0.001"])
    _one_line(status, capsys.readouterr(), "cannot be written (no space left on the device)")
    assert len(writes) == 3
    assert _listing(tmp_path) == ["x.npy"]


def test_run_file_size_limit_is_one_line(tmp_path):
    """``ulimit -f`` (RLIMIT_FSIZE): EFBIG, and SIGXFSZ, which Python ignores, kills nothing."""
    path = _save(tmp_path, "x.npy", np.zeros((1024, 512), dtype=np.float32))  # 2 MiB out
    out = str(tmp_path / "y.npy")
    argv = [sys.executable, "-m", "xpsoftmax", "run", "softmax", path, "-o", out]
    # The limit is set in the child, which then execs the command (as `ulimit -f` in a shell):
    # a preexec_fn would fork this multithreaded test process (JAX warns about that).
    limited = (
        "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20)); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    done = subprocess.run(
        [sys.executable, "-c", limited, *argv],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1
    assert "cannot be written (file too large for the file system or the file size limit" in (
        done.stderr
    )
    assert _listing(tmp_path) == ["x.npy"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (mounting needs root: skipped where it is not allowed)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_run_on_a_really_full_tmpfs(small_tmpfs, tmp_path):
    path = _save(tmp_path, "x.npy", np.zeros((1024, 512), dtype=np.float32))  # 2 MiB out
    old = small_tmpfs / "y.npy"
    old.write_bytes(b"previous result")
    for extra in ([], ["--overwrite"]):
        target = small_tmpfs / ("new.npy" if not extra else "y.npy")
        done = _run("run", "softmax", path, "-o", str(target), *extra)
        assert done.returncode == 2, done.stderr  # before: SIGBUS (-7), a .part left
        assert done.stderr == (
            f"xpsoftmax: error: output '{target}': cannot be written (no space left on the "
            "device; it needs 2.1 MB)\n"
        )
        assert _listing(small_tmpfs) == ["y.npy"]
        assert old.read_bytes() == b"previous result"


def test_run_input_truncated_while_read(tmp_path):
    """Another process truncates the input mid-run: one line, status 2, nothing left (with
    memory maps this was a SIGBUS)."""
    path = tmp_path / "in" / "x.npy"
    path.parent.mkdir()
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(65536, 1024))
    x[::997] = 1.0  # a sparse 256 MiB file
    x.flush()
    del x
    out = tmp_path / "y.npy"
    proc = _start("run", "softmax", str(path), "-o", str(out), "--batch-mb", "1")
    _wait_for_part(tmp_path, proc)
    os.truncate(path, 2**20)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 2, stderr
    assert stdout == ""
    told = f"logits '{path}': input changed while it was read (it became shorter)"
    assert stderr == f"xpsoftmax: error: {told}\n"
    assert _listing(tmp_path) == ["in"]


def test_run_input_rewritten_while_read(tmp_path, monkeypatch, capsys):
    """The input is rewritten in place (same size) after the first blocks: no output."""
    rng = np.random.default_rng(6)
    path = _save(tmp_path, "x.npy", rng.standard_normal((64, 16)))
    out = tmp_path / "y.npy"
    calls = []
    real = xpsoftmax.softmax

    def rewriting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the dtype probe, block 1, then the file changes
            with open(path, "r+b") as f:
                f.seek(-8, os.SEEK_END)
                f.write(np.float64(1e9).tobytes())
        return real(*args, **kwargs)

    monkeypatch.setattr(xpsoftmax, "softmax", rewriting)
    status = cli.main(["run", "softmax", path, "-o", str(out), "--batch-mb", "0.001"])
    _one_line(status, capsys.readouterr(), f"logits '{path}': input changed while it was read")
    assert _listing(tmp_path) == ["x.npy"]


def test_run_input_replaced_while_read(tmp_path, monkeypatch, capsys):
    """Another file renamed over the input (another inode) is found too."""
    path = _save(tmp_path, "x.npy", np.zeros((64, 16)))
    other = _save(tmp_path, "other.npy", np.ones((64, 16)))
    calls = []
    real = xpsoftmax.softmax

    def replacing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.replace(other, path)
        return real(*args, **kwargs)

    monkeypatch.setattr(xpsoftmax, "softmax", replacing)
    argv = ["run", "softmax", path, "-o", str(tmp_path / "y.npy"), "--batch-mb", "0.001"]
    _one_line(cli.main(argv), capsys.readouterr(), "input changed while it was read")
    assert _listing(tmp_path) == ["x.npy"]


# Each of two processes runs this: for each round, it says it is ready, waits for its twin to be
# ready too (a barrier of files: both start the run within microseconds), then runs to the
# round's output and prints its exit status and stderr.
_TWIN = """
import os, sys, contextlib, io
from xpsoftmax.tools.cli import main
me, other, folder, source, rounds = sys.argv[1:6]
for i in range(int(rounds)):
    open(os.path.join(folder, f"ready{i}.{me}"), "w").close()
    while not os.path.exists(os.path.join(folder, f"ready{i}.{other}")):
        pass
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(["run", "softmax", source, "-o", os.path.join(folder, f"y{i}.npy")])
    print(status, err.getvalue().strip(), flush=True)
"""


def test_run_twin_processes_on_the_same_new_output(tmp_path):
    """Two processes started together on the same new output, 20 times: exactly one writes it
    each time, the other gets status 2 and one line ("exists" or "being written")."""
    rounds = 20
    path = _save(tmp_path, "x.npy", np.random.default_rng(3).standard_normal((256, 64)))
    sync = tmp_path / "sync"
    sync.mkdir()
    twins = [
        subprocess.Popen(
            [sys.executable, "-c", _TWIN, me, other, str(sync), path, str(rounds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for me, other in (("a", "b"), ("b", "a"))
    ]
    outs = [t.communicate(timeout=TIMEOUT) for t in twins]
    assert [t.returncode for t in twins] == [0, 0], outs
    results = [out.splitlines() for out, _ in outs]
    assert all(len(r) == rounds for r in results), outs
    expected = xpsoftmax.softmax(np.load(path))
    for i, pair in enumerate(zip(*results, strict=True)):
        statuses = sorted(int(r.split(" ", 1)[0]) for r in pair)
        assert statuses == [0, 2], (i, pair)
        (err,) = (r.split(" ", 1)[1] for r in pair if r.startswith("2 "))
        assert err.count("\n") == 0 and err.startswith("xpsoftmax: error: output ")
        assert "exists; pass --overwrite" in err or "is being written by another run" in err
        np.testing.assert_array_equal(np.load(sync / f"y{i}.npy"), expected)
    assert sorted(p.name for p in sync.glob("y*")) == sorted(f"y{i}.npy" for i in range(rounds))
    assert not list(sync.glob(".*"))  # no temporary file


def test_run_never_replaces_an_output_made_meanwhile(tmp_path, monkeypatch, capsys):
    """An output that appears while the run computes (another program) is kept: the
    publication is a link, which fails on an existing name, not a check then a rename."""
    path = _save(tmp_path, "x.npy", np.zeros((64, 16)))
    out = tmp_path / "y.npy"
    real = xpsoftmax.softmax
    calls = []

    def meanwhile(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            out.write_bytes(b"the other program's")
        return real(*args, **kwargs)

    monkeypatch.setattr(xpsoftmax, "softmax", meanwhile)
    status = cli.main(["run", "softmax", path, "-o", str(out), "--batch-mb", "0.001"])
    _one_line(status, capsys.readouterr(), f"output '{out}' exists; pass --overwrite")
    assert out.read_bytes() == b"the other program's"
    assert _listing(tmp_path) == ["x.npy", "y.npy"]


def test_run_refuses_an_output_that_a_live_run_writes(tmp_path, capsys):
    import fcntl

    path = _save(tmp_path, "x.npy", np.zeros((4, 3)))
    out = tmp_path / "y.npy"
    part = Path(_files.part_name(str(out)))
    with open(part, "wb") as held:
        held.write(b"being written")
        fcntl.flock(held, fcntl.LOCK_EX)
        status = cli.main(["run", "softmax", path, "-o", str(out)])
        _one_line(status, capsys.readouterr(), f"output '{out}' is being written by another run")
    assert part.read_bytes() == b"being written"  # not the refused run's to remove
    assert not out.exists()


def test_run_reuses_a_leftover_temporary_file(tmp_path, capsys):
    path = _save(tmp_path, "x.npy", np.zeros((4, 3)))
    out = tmp_path / "y.npy"
    part = Path(_files.part_name(str(out)))
    part.write_bytes(b"left by kill -9" * 1000)
    assert cli.main(["run", "softmax", path, "-o", str(out)]) == 0, capsys.readouterr().err
    np.testing.assert_allclose(np.load(out), np.full((4, 3), 1 / 3), rtol=1e-15)
    assert _listing(tmp_path) == ["x.npy", "y.npy"]


@pytest.mark.parametrize("length", [249, 255])
def test_run_output_name_of_any_valid_length(length, tmp_path, capsys):
    path = _save(tmp_path, "x.npy", np.zeros((4, 3)))
    out = tmp_path / ("y" * (length - 4) + ".npy")
    assert cli.main(["run", "softmax", path, "-o", str(out)]) == 0, capsys.readouterr().err
    assert _listing(tmp_path) == sorted([out.name, "x.npy"])


def test_temporary_names_fit_and_differ():
    names = ["y" * 251 + ".npy", "y" * 250 + "z.npy", "é" * 125 + ".npy", "short.npy"]
    parts = [os.path.basename(_files.part_name(f"/tmp/{n}")) for n in names]
    assert all(len(os.fsencode(p)) <= 255 and p.startswith(".") for p in parts)
    assert parts[3] == ".short.npy.xpsoftmax.part"
    assert len(set(parts)) == len(parts)


def test_run_refuses_a_fifo_without_waiting(tmp_path, capsys):
    fifo = tmp_path / "x.npy"
    os.mkfifo(fifo)
    status = cli.main(["run", "softmax", str(fifo), "-o", str(tmp_path / "y.npy")])
    _one_line(status, capsys.readouterr(), "not a regular file (a pipe, socket or device)")


# --------------------------------------------------------------------------------------------
# run: "-" is stdin or stdout, a .npy stream as numpy.save writes it


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _from_npy_bytes(data: bytes) -> np.ndarray:
    import io

    return np.load(io.BytesIO(data))


STREAM_CASES = [
    # (id, op, which input is stdin (None: none), fortran, axis)
    ("stdin to stdout", "softmax", 0, False, -1),
    ("Fortran, axis 0", "log_softmax", 0, True, 0),
    ("file to stdout", "softmax", None, False, -1),
    ("dy on stdin", "log_softmax_backward", 1, False, -1),
    ("targets on stdin", "cross_entropy", 1, False, -1),
]


STREAMS = [
    (f"{c[0]}, -o {'-' if to else 'file'}", *c[1:], to)
    for c in STREAM_CASES
    for to in (True, False)
    if to or c[2] is not None  # at least one stream
]


@pytest.mark.parametrize(
    ("op", "stdin", "fortran", "axis", "to_stdout"),
    [c[1:] for c in STREAMS],
    ids=[c[0] for c in STREAMS],
)
def test_run_streams_stdin_and_stdout(op, stdin, fortran, axis, to_stdout, tmp_path, capsys):
    """Byte for byte what the same run gives from and to files, over many blocks; nothing named
    '-' is made."""
    rng = np.random.default_rng(6)
    shape = (500, 37)
    arrays = [rng.standard_normal(shape).astype(np.float32)]
    if op == "log_softmax_backward":
        arrays = [_log_softmax64(arrays[0], -1).astype(np.float32), arrays[0]]
    if op == "cross_entropy":
        arrays.append(rng.integers(0, 37, size=500))
    if fortran:
        arrays = [np.asfortranarray(a) for a in arrays]
    paths = [_save(tmp_path, f"in{i}.npy", a) for i, a in enumerate(arrays)]
    common = ["--axis", str(axis), "--batch-mb", "0.01"]  # 18 blocks
    reference = tmp_path / "reference.npy"
    assert cli.main(["run", op, *paths, "-o", str(reference), *common]) == 0
    capsys.readouterr()
    inputs = [("-" if i == stdin else p) for i, p in enumerate(paths)]
    out = "-" if to_stdout else str(tmp_path / "out.npy")
    done = subprocess.run(
        [sys.executable, "-m", "xpsoftmax", "run", op, *inputs, "-o", out, *common],
        input=b"" if stdin is None else Path(paths[stdin]).read_bytes(),
        capture_output=True,
        timeout=TIMEOUT,
        env=_env(),
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    summary = (done.stderr if to_stdout else done.stdout).decode()
    rows, n = (37, 500) if axis == 0 else (500, 37)
    assert summary.startswith(f"{op}: {rows} rows of {n}") and summary.count("\n") == 1
    result = done.stdout if to_stdout else (tmp_path / "out.npy").read_bytes()
    assert result == reference.read_bytes()
    assert np.isfortran(_from_npy_bytes(result)) == (fortran and op != "cross_entropy")
    assert not (tmp_path / "-").exists()


def test_run_reads_a_pipe_that_numpy_save_writes_and_writes_one_numpy_reads(tmp_path):
    """numpy.save into a pipe | xpsoftmax run softmax - -o - | numpy reading the stream."""
    x = np.random.default_rng(7).standard_normal((300, 50))
    _save(tmp_path, "x.npy", x)
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, numpy; numpy.save(sys.stdout.buffer, numpy.load('x.npy'))",
        ],
        stdout=subprocess.PIPE,
        cwd=tmp_path,
    )
    reader_code = (
        "import io, sys, numpy\n"
        "y = numpy.load(io.BytesIO(sys.stdin.buffer.read()))\n"
        "numpy.save('y.npy', y)\n"
    )
    run = subprocess.Popen(
        [sys.executable, "-m", "xpsoftmax", "run", "softmax", "-", "-o", "-", "--batch-mb", "0.02"],
        stdin=writer.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    writer.stdout.close()
    reader = subprocess.run(
        [sys.executable, "-c", reader_code], stdin=run.stdout, cwd=tmp_path, timeout=TIMEOUT
    )
    run.stdout.close()
    with run.stderr:
        err = run.stderr.read().decode()
    assert [writer.wait(TIMEOUT), run.wait(TIMEOUT), reader.returncode] == [0, 0, 0], err
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), _softmax64(x, -1), rtol=1e-14)


def _stream_error(args, stdin=b"", **kwargs) -> str:
    """The one line of a refused run; ``stdin``: bytes, or a file descriptor."""
    where = {"input": stdin} if isinstance(stdin, bytes) else {"stdin": stdin}
    done = subprocess.run(
        [sys.executable, "-m", "xpsoftmax", "run", *args],
        **where,
        capture_output="stdout" not in kwargs,
        timeout=TIMEOUT,
        env=_env(),
        check=False,
        **kwargs,
    )
    err = done.stderr.decode() if done.stderr is not None else ""
    assert done.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("xpsoftmax: error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("truncated", "logits '-' (stdin): truncated, the stream ended after"),
        ("extra bytes", "logits '-' (stdin): corrupt, unexpected bytes after the data"),
        ("not npy", "logits '-' (stdin): not a .npy file"),
        ("empty", "logits '-' (stdin): not a .npy file"),
        ("pickle", "logits '-' (stdin): holds Python objects"),
    ],
)
def test_run_bad_stdin_is_one_line_and_no_output(case, expected, tmp_path):
    good = _npy_bytes(np.zeros((200, 30), dtype=np.float32))
    data = {
        "truncated": good[:-100],
        "extra bytes": good + b"\0",
        "not npy": b"hello\n",
        "empty": b"",
        "pickle": _npy_bytes(np.array([{"a": 1}], dtype=object)),
    }[case]
    out = tmp_path / "y.npy"
    err = _stream_error(["softmax", "-", "-o", str(out), "--batch-mb", "0.001"], stdin=data)
    assert expected in err
    assert _listing(tmp_path) == []  # no output, no temporary file


STREAM_REFUSALS = [
    ("axis 0 to stdout", "softmax {x} -o - --axis 0", "the softmax axis 0 of (4, 3)"),
    ("axis 0 from stdin", "softmax - -o {t}/y.npy --axis 0", "logits '-' (stdin): cannot be"),
    ("C dy with F y", "softmax_backward {f} - -o {t}/y.npy --axis 0", "dy '-' (stdin): C-ordered"),
    ("two stdins", "softmax_backward - - -o {t}/y.npy", "only one input can be '-'"),
    ("mask on stdin", "softmax {x} -o {t}/y.npy --where -", "--where -: the mask cannot be stdin"),
    ("dask", "softmax {x} -o - --dask local:1", "--dask cannot stream"),
    (
        "mean ignoring targets",
        "cross_entropy {x} - -o {t}/y.npy --reduction mean --ignore-index 0",
        "reads the targets twice",
    ),
]


@pytest.mark.parametrize(
    ("argv", "expected"), [c[1:] for c in STREAM_REFUSALS], ids=[c[0] for c in STREAM_REFUSALS]
)
def test_run_refuses_what_a_stream_cannot_do(argv, expected, tmp_path):
    x = _save(tmp_path, "x.npy", np.zeros((4, 3)))
    f = _save(tmp_path, "f.npy", np.zeros((4, 3)), fortran=True)
    stdin = _npy_bytes(np.zeros(4, dtype=np.int64) if "cross" in argv else np.zeros((4, 3)))
    before = _listing(tmp_path)
    err = _stream_error(argv.format(x=x, f=f, t=tmp_path).split(), stdin=stdin, cwd=tmp_path)
    assert expected in err, err
    assert _listing(tmp_path) == before


def test_run_refuses_a_terminal_as_stdin_or_stdout(tmp_path):
    x = _save(tmp_path, "x.npy", np.zeros((4, 3)))
    primary, secondary = os.openpty()
    try:
        err = _stream_error(["softmax", "-", "-o", str(tmp_path / "y.npy")], stdin=secondary)
        assert "logits '-' (stdin): stdin is a terminal" in err
        err = _stream_error(["softmax", x, "-o", "-"], stdout=secondary, stderr=subprocess.PIPE)
        assert "output '-' (stdout): stdout is a terminal" in err
    finally:
        os.close(primary)
        os.close(secondary)
    assert _listing(tmp_path) == ["x.npy"]
