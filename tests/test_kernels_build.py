"""The CUDA kernels' build: the nvcc compile check, the loader and the wheel that ships the sources.

Everything here runs on a CPU-only machine: the compile check needs ``nvcc`` (skipped without
it), the loader tests need no GPU (CuPy's device calls are replaced by fakes where a device would
be needed), and the packaging test builds and installs the wheel. The few tests marked ``gpu``
compile the real sources with NVRTC and query the occupancy API on a device.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import zipfile
from pathlib import Path

import pytest
from _helpers import has_gpu

from xpsoftmax.backends.cuda import loader as _kernels
from xpsoftmax.backends.cuda.specs import SOURCES
from xpsoftmax.tools import kcheck as _kcheck

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "kernels"
ARCHS = ["sm_80", "sm_90"]

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
# Rows are labelled with the name expressions by demangling ptxas's names; binutils' c++filt
# comes with the host compiler that nvcc needs, cu++filt with the CUDA toolkit.
needs_demangler = pytest.mark.skipif(
    shutil.which("cu++filt") is None and shutil.which("c++filt") is None,
    reason="neither cu++filt nor c++filt is on PATH",
)

# file, kernel, arch, regs, spill stores, spill loads, stack, smem (columns two spaces apart).
_ROW = re.compile(r"^(\S+)  +(\S.*?)  +(sm_\d+[af]?) +(\d+) +(\d+) +(\d+) +(\d+) +(\d+)$")


def _rows(text: str) -> dict[tuple[str, str, str], tuple[int, ...]]:
    rows = {}
    for line in text.splitlines():
        if m := _ROW.match(line):
            rows[m[1], m[2], m[3]] = tuple(int(v) for v in m.groups()[3:])
    return rows


def _check(archs, sources, directory):
    out, err = io.StringIO(), io.StringIO()
    status = _kcheck.check(archs, sources=sources, directory=directory, out=out, err=err)
    return status, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------------------------
# the compile check on the real sources


@needs_nvcc
@needs_demangler
def test_check_passes_on_the_sources_with_a_row_per_kernel_and_arch(capsys):
    status = _kcheck.main(["--check", "--arch", ",".join(ARCHS)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    rows = _rows(captured.out)
    expected = {(f, name, arch) for f, names in SOURCES.items() for name in names for arch in ARCHS}
    assert expected <= set(rows), f"missing rows: {sorted(expected - set(rows))}"
    static_smem = json.loads((REPO / "tests" / "data" / "kernel_static_smem.json").read_text())
    for key in expected:
        regs, spill_st, spill_ld, _stack, smem = rows[key]
        assert 0 < regs <= 255, key
        assert (spill_st, spill_ld) == (0, 0), key
        # the CuPy stand-in of test_cuda_launch.py adds this to each launch's shared memory
        f, name, arch = key
        assert static_smem["smem"][arch][f][name] == smem, (
            f"{key}: static smem {smem}; regenerate tests/data/kernel_static_smem.json"
        )
    last = captured.out.strip().splitlines()[-1]
    kernels = sum(len(names) for names in SOURCES.values())
    assert last.startswith(f"ok: {kernels} kernels x 2 archs (sm_80,sm_90), 0 compile errors, 0 sp")


# --------------------------------------------------------------------------------------------
# the compile check on sources built here

_GOOD = """\
#include "tile_common.cuh"

template <typename T, unsigned V>
__global__ void xps_tile(const T* __restrict__ x, T* __restrict__ y) {
  __shared__ float tile[256];
  tile[threadIdx.x] = xps_twice((float)x[threadIdx.x]) * V;
  __syncthreads();
  y[threadIdx.x] = (T)tile[255 - threadIdx.x];
}
"""
_GOOD_HEADER = "__device__ inline float xps_twice(float v) { return v + v; }\n"

_BROKEN = """\
template <typename T>
__global__ void xps_broken(const T* x, T* y) {
  y[0] = x[0] + xps_undefined_thing;
}
"""

# 96 values live across a reduction while __launch_bounds__ caps registers at 32 per thread.
_SPILL = """\
template <typename T>
__global__ void __launch_bounds__(1024, 2) xps_spill(const T* __restrict__ x, T* __restrict__ y,
                                                     int n) {
  T v[96];
#pragma unroll
  for (int i = 0; i < 96; ++i) v[i] = x[threadIdx.x + i * n];
  T s = 0;
#pragma unroll
  for (int i = 0; i < 96; ++i) s += v[i] * v[95 - i];
#pragma unroll
  for (int i = 0; i < 96; ++i) y[threadIdx.x + i * n] = v[i] * s;
}
"""


@needs_nvcc
@needs_demangler
def test_check_reports_static_smem_and_labels_rows_with_the_name_expressions(tmp_path):
    (tmp_path / "tile.cu").write_text(_GOOD)
    (tmp_path / "tile_common.cuh").write_text(_GOOD_HEADER)
    # Written without the "u" that c++filt prints for the unsigned template argument.
    names = ["xps_tile<float, 4>", "xps_tile<double, 2>"]
    # An expression spelled unlike the demangled name: its row carries the demangled name.
    odd = "xps_tile<double, 1 + 2>"
    status, out, err = _check(["sm_80"], {"tile.cu": [*names, odd]}, tmp_path)
    assert status == 0, err
    rows = _rows(out)
    labels = [*names, "xps_tile<double, 3u>"]
    assert set(rows) == {("tile.cu", label, "sm_80") for label in labels}
    for label in labels:
        # The kernel declares __shared__ float tile[256]: 256 * 4 bytes of static shared memory.
        assert rows["tile.cu", label, "sm_80"][1:] == (0, 0, 0, 256 * 4)
    assert err == (
        f"xpsoftmax kernels: note: no row is labelled {odd} (tile.cu); its kernel is listed "
        "under the name the demangler gives\n"
    )


@needs_nvcc
def test_check_fails_on_a_compile_error_naming_the_source_file(tmp_path):
    (tmp_path / "broken.cu").write_text(_BROKEN)
    status, _out, err = _check(["sm_80"], {"broken.cu": ["xps_broken<float>"]}, tmp_path)
    assert status == 1
    assert "broken.cu failed to compile for sm_80" in err
    # nvcc's own message, pointing at line 3 of the real file.
    assert f"{tmp_path / 'broken.cu'}(3): error" in err
    assert "xps_undefined_thing" in err


@needs_nvcc
def test_check_fails_on_a_name_expression_the_source_lacks(tmp_path):
    (tmp_path / "tile.cu").write_text(_GOOD)
    (tmp_path / "tile_common.cuh").write_text(_GOOD_HEADER)
    names = ["xps_tile<float, 4>", "xps_missing<float>"]
    status, _out, err = _check(["sm_80"], {"tile.cu": names}, tmp_path)
    assert status == 1
    assert "tile.cu failed to compile for sm_80" in err
    assert (
        "<name expressions of tile.cu in xpsoftmax.backends.cuda.specs.SOURCES>(2): error: "
        'identifier "xps_missing"' in err
    )
    assert "xpsoftmax-kcheck-" not in err  # the temporary file is not named


@needs_nvcc
def test_units_of_a_broken_source_report_its_error_once(tmp_path, monkeypatch):
    monkeypatch.setattr(_kcheck, "_CHUNK", 1)  # each name expression in its own unit
    (tmp_path / "broken.cu").write_text(_BROKEN)
    names = ["xps_broken<float>", "xps_broken<double>"]
    status, out, err = _check(["sm_80"], {"broken.cu": names}, tmp_path)
    assert status == 1
    assert err.count("broken.cu failed to compile for sm_80") == 1
    assert err.count(f"{tmp_path / 'broken.cu'}(3): error") == 1
    assert ", 1 compile errors," in out


@needs_nvcc
def test_units_keep_the_line_of_a_missing_name_expression(tmp_path, monkeypatch):
    monkeypatch.setattr(_kcheck, "_CHUNK", 1)
    (tmp_path / "tile.cu").write_text(_GOOD)
    (tmp_path / "tile_common.cuh").write_text(_GOOD_HEADER)
    names = ["xps_tile<float, 4>", "xps_missing<float>"]
    status, _out, err = _check(["sm_80"], {"tile.cu": names}, tmp_path)
    assert status == 1
    assert (
        "<name expressions of tile.cu in xpsoftmax.backends.cuda.specs.SOURCES>(2): error: "
        'identifier "xps_missing"' in err
    )


@needs_nvcc
@needs_demangler
def test_rows_are_printed_while_later_units_still_compile(tmp_path, monkeypatch):
    monkeypatch.setattr(_kcheck, "_CHUNK", 1)
    (tmp_path / "tile.cu").write_text(_GOOD)
    (tmp_path / "tile_common.cuh").write_text(_GOOD_HEADER)
    out, err = io.StringIO(), io.StringIO()
    first = re.compile(r"^tile\.cu +xps_tile<float, 4> +sm_80 ", re.MULTILINE)
    seen_while_compiling = []
    compile_one = _kcheck._compile

    def compile_slowly(nvcc, tu, filename, arch):
        if "xps_tile<double, 2>" in tu.read_text():  # the second unit waits for the first row
            deadline = time.monotonic() + 60
            while not first.search(out.getvalue()) and time.monotonic() < deadline:
                time.sleep(0.05)
            seen_while_compiling.append(bool(first.search(out.getvalue())))
        return compile_one(nvcc, tu, filename, arch)

    monkeypatch.setattr(_kcheck, "_compile", compile_slowly)
    names = ["xps_tile<float, 4>", "xps_tile<double, 2>"]
    status = _kcheck.check(
        ["sm_80"], sources={"tile.cu": names}, directory=tmp_path, out=out, err=err
    )
    assert status == 0, err.getvalue()
    assert seen_while_compiling == [True]
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["file", "kernel", "arch", "regs", "spill", "st", "spill", "ld",
                                "stack", "smem"]  # fmt: skip
    assert [line.split("  ")[1].strip() for line in lines[1:3]] == names
    assert len({len(line) for line in lines[:3]}) == 1  # columns fixed before the rows came
    assert err.getvalue() == ""  # not a terminal: no progress bar


@needs_nvcc
def test_progress_bar_counts_kernel_instantiations_on_err(tmp_path):
    (tmp_path / "tile.cu").write_text(_GOOD)
    (tmp_path / "tile_common.cuh").write_text(_GOOD_HEADER)
    out, err = io.StringIO(), io.StringIO()
    names = ["xps_tile<float, 4>", "xps_tile<double, 2>"]
    status = _kcheck.check(
        ARCHS, sources={"tile.cu": names}, directory=tmp_path, out=out, err=err, progress=True
    )
    assert status == 0, err.getvalue()
    assert re.search(r"nvcc: +0%\|.*\| 0/4 ", err.getvalue()), err.getvalue()
    # 4 = 2 name expressions x 2 archs; the bar is cleared when the check ends
    assert re.search(r"\r +\r$", err.getvalue()), err.getvalue()
    assert "nvcc" not in out.getvalue()


@pytest.mark.parametrize(
    ("flags", "progress"), [([], None), (["--progress"], True), (["--no-progress"], False)]
)
def test_progress_flags_reach_the_check(monkeypatch, flags, progress):
    calls = []
    monkeypatch.setattr(_kcheck, "check", lambda archs, **kw: calls.append((archs, kw)) or 0)
    assert _kcheck.main(["--check", "--arch", "sm_80", *flags]) == 0
    assert calls == [(["sm_80"], {"progress": progress})]


@needs_nvcc
def test_check_fails_on_a_missing_source(tmp_path):
    status, out, err = _check(["sm_80"], {"gone.cu": ["xps_gone<float>"]}, tmp_path)
    assert status == 1
    assert out == ""
    assert err == f"xpsoftmax kernels: error: kernel source {tmp_path / 'gone.cu'} not found\n"


@needs_nvcc
@needs_demangler
def test_check_fails_on_a_spill_naming_the_kernel(tmp_path):
    (tmp_path / "spill.cu").write_text(_SPILL)
    (tmp_path / "tile.cu").write_text(_GOOD)
    (tmp_path / "tile_common.cuh").write_text(_GOOD_HEADER)
    sources = {"spill.cu": ["xps_spill<float>"], "tile.cu": ["xps_tile<float, 1>"]}
    status, out, err = _check(ARCHS, sources, tmp_path)
    assert status == 1
    rows = _rows(out)
    assert set(rows) == {(f, n[0], a) for f, n in sources.items() for a in ARCHS}
    for arch in ARCHS:
        _regs, spill_st, spill_ld, _stack, _smem = rows["spill.cu", "xps_spill<float>", arch]
        assert spill_st > 0 and spill_ld > 0
        assert rows["tile.cu", "xps_tile<float, 1>", arch][1:3] == (0, 0)
        assert re.search(rf"xps_spill<float> in spill\.cu spills on {arch}: \d+ bytes stored", err)
    assert "xps_tile" not in err
    assert out.strip().splitlines()[-1].startswith("FAILED:")


# --------------------------------------------------------------------------------------------
# the command line's usage errors: status 2, one line, no traceback


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "nothing to do; pass --check"),
        (["--check", "--arch", " , "], "--arch needs at least one architecture"),
        (["--check", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, argv, message):
    assert _kcheck.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("xpsoftmax kernels: error: ")
    assert message in captured.err


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_35", "sm80", "compute_90"])
def test_an_architecture_nvcc_cannot_compile_for_exits_2(capsys, arch):
    assert _kcheck.main(["--check", "--arch", f"sm_80,{arch}"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert f"--arch {arch!r} is not an architecture this nvcc compiles for" in captured.err


def test_missing_nvcc_exits_2_with_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert _kcheck.main(["--check"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        "xpsoftmax kernels: error: nvcc not found on PATH (install the CUDA toolkit)\n"
    )


# --------------------------------------------------------------------------------------------
# the loader without a GPU


def test_source_starts_with_a_line_directive_naming_the_real_file():
    for filename in SOURCES:
        path = KERNELS / filename
        assert _kernels.source_path(filename) == path
        text = _kernels.source(filename)
        first, rest = text.split("\n", 1)
        assert first == f'#line 1 "{path}"'
        assert rest == path.read_text(encoding="utf-8")
        assert _kernels.source(filename) is text  # read once


def test_source_path_of_a_missing_file_names_the_places_looked_in():
    with pytest.raises(FileNotFoundError) as info:
        _kernels.source_path("no_such_kernel.cu")
    message = str(info.value)
    assert "'no_such_kernel.cu' not found" in message
    assert str(_kernels._PACKAGE_DIR / "kernels" / "no_such_kernel.cu") in message
    assert str(KERNELS / "no_such_kernel.cu") in message


@pytest.mark.parametrize("filename", ["", "../kernels/softmax.cu", "kernels/softmax.cu", 3])
def test_source_path_takes_only_a_bare_file_name(filename):
    with pytest.raises(ValueError, match="filename must be the bare name of a file in kernels/"):
        _kernels.source_path(filename)


def test_get_function_rejects_unknown_names_before_importing_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # importing cupy would raise
    filename = next(iter(SOURCES))
    with pytest.raises(
        ValueError,
        match=rf"'xps_nope<float>' is not a name expression of kernels/{re.escape(filename)}",
    ):
        _kernels.get_function(filename, "xps_nope<float>")
    with pytest.raises(ValueError, match=r"filename must be one of .*, got 'nope\.cu'"):
        _kernels.get_function("nope.cu", "xps_nope<float>")


def test_get_function_without_cupy_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    filename, names = next(iter(SOURCES.items()))
    with pytest.raises(ImportError, match="need CuPy; install xpsoftmax with the cuda12 or cuda13"):
        _kernels.get_function(filename, names[0])


def test_modules_import_without_cupy():
    code = (
        "import sys; sys.modules['cupy'] = None\n"
        "import xpsoftmax.backends.cuda.loader as k, xpsoftmax.tools.kcheck\n"
        "from xpsoftmax.backends.cuda.specs import SOURCES\n"
        "print(*(k.source_path(f) for f in SOURCES), sep='\\n')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(KERNELS / f) for f in SOURCES]


@pytest.mark.skipif(has_gpu(), reason="checks the error raised where no GPU is present")
def test_without_a_device_the_loader_raises_a_clear_error():
    cupy = pytest.importorskip("cupy")
    assert not cupy.is_available()
    filename, names = next(iter(SOURCES.items()))
    with pytest.raises(
        RuntimeError, match=rf"compiling kernels/{re.escape(filename)} needs a CUDA"
    ):
        _kernels.get_function(filename, names[0])
    with pytest.raises(RuntimeError, match="max_dynamic_smem needs a CUDA device"):
        _kernels.max_dynamic_smem()
    with pytest.raises(RuntimeError, match="occupancy_grid needs a CUDA device"):
        _kernels.occupancy_grid(object(), 256)


# Fakes for CuPy's device calls: they record what the loader asks for.


class _FakeModule:
    made: list[_FakeModule] = []

    def __init__(self, *, code, options, name_expressions):
        self.code, self.options, self.name_expressions = code, options, name_expressions
        self.device = _FakeDevice.current()
        self.fetched: list[str] = []
        _FakeModule.made.append(self)

    def get_function(self, name):
        self.fetched.append(name)
        return ("kernel", self.device, name)


class _FakeDevice:
    local = threading.local()

    @classmethod
    def current(cls) -> int:
        return getattr(cls.local, "id", 0)


@pytest.fixture
def fake_cupy(monkeypatch):
    cupy = pytest.importorskip("cupy")
    _FakeModule.made = []
    monkeypatch.setattr(cupy, "RawModule", _FakeModule)
    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", _FakeDevice.current)
    monkeypatch.setattr(_kernels, "_modules", {})
    monkeypatch.setattr(_kernels, "_functions", {})
    monkeypatch.setattr(_kernels, "_smem_opt_in", {})
    monkeypatch.setattr(_kernels, "_grids", {})
    _kernels._device_attribute.cache_clear()
    yield cupy
    _kernels._device_attribute.cache_clear()


def test_get_function_compiles_each_kernel_once_per_device(fake_cupy):
    filename, names = next(iter(SOURCES.items()))
    results: dict[tuple[int, int, str], object] = {}

    def work(device: int, worker: int) -> None:
        _FakeDevice.local.id = device
        for name in names:
            results[device, worker, name] = _kernels.get_function(filename, name)

    threads = [threading.Thread(target=work, args=(d, w)) for d in (0, 1) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # One module per (device, kernel), however many threads asked for it at once.
    made = sorted((m.device, tuple(m.name_expressions)) for m in _FakeModule.made)
    assert made == sorted((d, (name,)) for d in (0, 1) for name in names)
    for module in _FakeModule.made:
        assert module.code == _kernels.source(filename)
        assert module.options == ("-std=c++17", f"-I{KERNELS}")
        assert module.fetched == list(module.name_expressions)
    for (device, _worker, name), kernel in results.items():
        assert kernel == ("kernel", device, name)


def test_occupancy_grid_is_sms_times_blocks_per_sm_and_memoized(fake_cupy, monkeypatch):
    calls = []

    def occupancy(func, block, smem):
        calls.append((func, block, smem))
        return 0 if block == 1024 else 3

    def attribute(attrib, device):
        assert attrib == fake_cupy.cuda.runtime.cudaDevAttrMultiProcessorCount
        return 132

    monkeypatch.setattr(
        fake_cupy.cuda.driver, "occupancyMaxActiveBlocksPerMultiprocessor", occupancy
    )
    monkeypatch.setattr(fake_cupy.cuda.runtime, "deviceGetAttribute", attribute)

    class Kernel:
        name = "_Z3fooIfEvv"

        class kernel:
            ptr = 0xABC

    k = Kernel()
    assert _kernels.occupancy_grid(k, 256, 4096) == 132 * 3
    assert _kernels.occupancy_grid(k, 256, 4096) == 132 * 3
    assert calls == [(0xABC, 256, 4096)]
    with pytest.raises(ValueError, match="cannot run with block=1024 threads and smem=0 bytes"):
        _kernels.occupancy_grid(k, 1024)
    with pytest.raises(ValueError, match="block must be an integer >= 1, got 0"):
        _kernels.occupancy_grid(k, 0)
    with pytest.raises(ValueError, match="smem must be an integer >= 0, got -1"):
        _kernels.occupancy_grid(k, 32, -1)


def test_set_max_dynamic_smem_opts_in_once_within_the_device_limit(fake_cupy, monkeypatch):
    limit = 227 * 1024

    def attribute(attrib, device):
        assert attrib == fake_cupy.cuda.runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin
        return limit

    monkeypatch.setattr(fake_cupy.cuda.runtime, "deviceGetAttribute", attribute)

    class Kernel:
        shared_size_bytes = 1024

        def __init__(self):
            self.set_to: list[int] = []

        @property
        def max_dynamic_shared_size_bytes(self):
            return self.set_to[-1] if self.set_to else 48 * 1024

        @max_dynamic_shared_size_bytes.setter
        def max_dynamic_shared_size_bytes(self, value):
            self.set_to.append(value)

    k = Kernel()
    assert _kernels.max_dynamic_smem() == limit
    _kernels.set_max_dynamic_smem(k, 100_000)
    _kernels.set_max_dynamic_smem(k, 60_000)  # already allowed: no driver call
    _kernels.set_max_dynamic_smem(k, limit - 1024)
    assert k.set_to == [100_000, limit - 1024]
    with pytest.raises(ValueError, match=rf"nbytes={limit - 1023} .* exceed the {limit} bytes"):
        _kernels.set_max_dynamic_smem(k, limit - 1023)
    with pytest.raises(ValueError, match="nbytes must be an integer >= 0"):
        _kernels.set_max_dynamic_smem(k, -5)


# --------------------------------------------------------------------------------------------
# the wheel


def test_wheel_ships_the_sources_and_the_installed_package_finds_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for item in REPO.iterdir():  # pyproject.toml, README, LICENSE, ...: every top-level file
        if item.is_file():
            shutil.copy2(item, src / item.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("xpsoftmax", "kernels"):
        shutil.copytree(REPO / folder, src / folder, ignore=ignore)
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(src)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = dist.glob("xpsoftmax-*.whl")

    shipped = sorted(p.name for p in KERNELS.iterdir() if p.suffix in (".cu", ".cuh"))
    assert set(SOURCES) <= set(shipped)
    with zipfile.ZipFile(wheel) as zf:
        inside = {n for n in zf.namelist() if n.startswith("xpsoftmax/kernels/")}
        assert inside == {f"xpsoftmax/kernels/{name}" for name in shipped}
        for name in shipped:
            assert zf.read(f"xpsoftmax/kernels/{name}") == (KERNELS / name).read_bytes()

    target = tmp_path / "target"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
         "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr

    # -S: no site-packages .pth files, so the editable install of the checkout is not seen;
    # the dependencies come from site-packages, after the target.
    paths = [str(target), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    code = (
        "import json, sys\n"
        f"sys.path[:0] = {paths!r}\n"
        "import xpsoftmax, xpsoftmax.backends.cuda.loader as k\n"
        "from xpsoftmax.backends.cuda.specs import SOURCES\n"
        "print(json.dumps({'package': xpsoftmax.__file__,\n"
        "  'paths': {f: str(k.source_path(f)) for f in SOURCES},\n"
        "  'sources': {f: k.source(f) for f in SOURCES}}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    installed = target / "xpsoftmax"
    assert Path(found["package"]) == installed / "__init__.py"
    for filename in SOURCES:
        path = installed / "kernels" / filename
        assert Path(found["paths"][filename]) == path
        assert found["sources"][filename] == f'#line 1 "{path}"\n' + path.read_text("utf-8")


# --------------------------------------------------------------------------------------------
# on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a CUDA device")
def test_every_kernel_compiles_with_nvrtc_and_sizes_a_grid():
    import cupy

    # cudaGetDeviceProperties, a different call from the attribute queries of the loader.
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())
    sms, optin = props["multiProcessorCount"], props["sharedMemPerBlockOptin"]
    assert _kernels.max_dynamic_smem() == optin
    for filename, names in SOURCES.items():
        for name in names:
            kernel = _kernels.get_function(filename, name)
            assert _kernels.get_function(filename, name) is kernel
            assert kernel.num_regs > 0
            grid = _kernels.occupancy_grid(kernel, 128)
            assert grid >= sms and grid % sms == 0
            big = optin - kernel.shared_size_bytes
            _kernels.set_max_dynamic_smem(kernel, big)
            assert kernel.max_dynamic_shared_size_bytes == big
            assert _kernels.occupancy_grid(kernel, 128, big) == sms  # one such block per SM


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs a CUDA device")
def test_an_nvrtc_compile_error_names_the_source_file(tmp_path, monkeypatch):
    from cupy.cuda.compiler import CompileException

    (tmp_path / "broken.cu").write_text(_BROKEN)
    _kernels.source.cache_clear()  # source() caches by file name
    monkeypatch.setattr(_kernels, "_modules", {})
    monkeypatch.setattr(_kernels, "_functions", {})
    monkeypatch.setitem(_kernels.SOURCES, "broken.cu", ["xps_broken<float>"])
    monkeypatch.setattr(_kernels, "_candidates", lambda filename: [tmp_path / filename])
    with pytest.raises(CompileException, match=re.escape(f"{tmp_path / 'broken.cu'}(3)")):
        _kernels.get_function("broken.cu", "xps_broken<float>")
    _kernels.source.cache_clear()
