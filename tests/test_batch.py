"""``xpsoftmax run`` beyond the CPU: cross_entropy, block planning, the GPU path, Dask, bench.

The GPU streaming loop runs here on the CPU with a stand-in for CuPy (:class:`FakeCupy`) that
defers every device -> host copy until its event is waited on and checks that no pinned input
buffer is overwritten while its copy is in flight: the loop's bookkeeping is tested, not CUDA.
The tests marked ``gpu`` run the real thing and are skipped without a CUDA device.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.special
import torch
from _helpers import has_gpu, ref_softmax

from xpsoftmax.tools import cli, devices
from xpsoftmax.tools.batch import dask as _batch_dask
from xpsoftmax.tools.batch import gpu as _batch_gpu
from xpsoftmax.tools.batch import job as _batch

TIMEOUT = 180


def _save(folder: Path, name: str, array: np.ndarray, fortran: bool = False) -> str:
    path = folder / name
    np.save(path, np.asfortranarray(array) if fortran else array)
    return str(path)


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    status = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.out, out.err


def _listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def _one_line_error(status: int, out: str, err: str, expected: str) -> None:
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("xpsoftmax: error: "), err
    assert expected in err, err


def _torch_cross_entropy(logits: np.ndarray, targets: np.ndarray, axis: int) -> np.ndarray:
    """Per-row losses from torch (class axis moved to 1, as torch wants it), in float64."""
    x = np.asarray(logits, dtype=np.float64)
    t = np.asarray(targets, dtype=np.int64)
    if x.ndim == 1:  # one sample
        return _torch_cross_entropy(x[None], t[None], 1)[0]
    x, t = torch.from_numpy(np.moveaxis(x, axis, 1).copy()), torch.from_numpy(t.copy())
    return torch.nn.functional.cross_entropy(x, t, reduction="none").numpy()


# --------------------------------------------------------------------------------------------
# cross_entropy


@pytest.mark.parametrize(
    ("shape", "axis", "fortran", "dtype"),
    [
        ((300, 17), -1, False, np.float32),  # many blocks of rows
        ((6, 7, 8), 1, False, np.float64),  # classes on a middle axis
        ((6, 7, 8), 1, True, np.float64),  # a Fortran-ordered file
        ((9,), 0, False, np.float32),  # one sample: a 0-d output
    ],
)
def test_cross_entropy_matches_torch(shape, axis, fortran, dtype, tmp_path, capsys):
    rng = np.random.default_rng(0)
    logits = (3 * rng.standard_normal(shape)).astype(dtype)
    n = shape[axis]
    targets = rng.integers(
        0, n, size=tuple(s for d, s in enumerate(shape) if d != axis % len(shape))
    )
    x = _save(tmp_path, "x.npy", logits, fortran)
    t = _save(tmp_path, "t.npy", targets.astype(np.int32))
    out = tmp_path / "loss.npy"
    argv = ["run", "cross_entropy", x, t, "-o", out, "--axis", axis, "--batch-mb", "0.0005"]
    status, stdout, err = _main(argv, capsys)
    assert status == 0, err
    assert err == ""
    rows = math.prod(shape) // n
    assert stdout.startswith(f"cross_entropy: {rows} rows of {n} {np.dtype(dtype)} (axis")
    result = np.load(out)
    assert result.dtype == dtype
    assert result.shape == targets.shape
    assert np.isfortran(result) == (fortran and result.ndim > 1)
    tol = 2e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(result, _torch_cross_entropy(logits, targets, axis), rtol=tol)
    assert _listing(tmp_path) == ["loss.npy", "t.npy", "x.npy"]


def test_cross_entropy_with_mask(tmp_path, capsys):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((40, 6))
    mask = np.array([True, True, False, True, False, True])
    targets = rng.choice(np.flatnonzero(mask), size=40)
    paths = [_save(tmp_path, n, a) for n, a in (("x.npy", logits), ("t.npy", targets))]
    m = _save(tmp_path, "m.npy", mask)
    out = tmp_path / "loss.npy"
    status, _, err = _main(["run", "cross_entropy", *paths, "-o", out, "--where", m], capsys)
    assert status == 0, err
    # The loss over the unmasked classes only: torch on the columns kept.
    ref = _torch_cross_entropy(logits[:, mask], np.searchsorted(np.flatnonzero(mask), targets), 1)
    np.testing.assert_allclose(np.load(out), ref, rtol=1e-13)


@pytest.mark.parametrize(
    ("reduction", "smoothing", "ignore"),
    [
        ("none", 0.0, -100),
        ("none", 0.2, None),
        ("none", 0.3, 2),
        ("mean", 0.0, None),
        ("mean", 0.0, -100),
        ("mean", 0.1, 4),
        ("sum", 0.25, -100),
        ("sum", 0.0, None),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_options_match_torch(reduction, smoothing, ignore, dtype, tmp_path, capsys):
    """--reduction, --label-smoothing and --ignore-index against torch, over many blocks (the
    mean over blocks is torch's mean over the rows not ignored)."""
    rng = np.random.default_rng(4)
    rows, n = 301, 13
    logits = (3 * rng.standard_normal((rows, n))).astype(dtype)
    targets = rng.integers(0, n, size=rows)
    targets[rng.random(rows) < 0.3] = -100 if ignore in (None, -100) else ignore
    if ignore is None:  # nothing to ignore: every target a class
        targets[targets < 0] = 1
    x = _save(tmp_path, "x.npy", logits)
    t = _save(tmp_path, "t.npy", targets)
    out = tmp_path / "loss.npy"
    argv = ["run", "cross_entropy", x, t, "-o", out, "--batch-mb", "0.0005"]  # 40 blocks
    argv += ["--reduction", reduction, "--label-smoothing", smoothing]
    argv += [] if ignore is None else ["--ignore-index", ignore]
    status, stdout, err = _main(argv, capsys)
    assert status == 0, err
    result = np.load(out)
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits.astype(np.float64)),
        torch.from_numpy(targets),
        reduction=reduction,
        label_smoothing=smoothing,
        ignore_index=-12345 if ignore is None else ignore,
    ).numpy()
    assert result.dtype == dtype
    assert result.shape == expected.shape == (() if reduction != "none" else (rows,))
    tol = 2e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(result, expected, rtol=tol, atol=tol if reduction == "none" else 0)
    assert _listing(tmp_path) == ["loss.npy", "t.npy", "x.npy"]


def test_cross_entropy_mean_of_only_ignored_rows_is_nan(tmp_path, capsys):
    x = _save(tmp_path, "x.npy", np.zeros((5, 3)))
    t = _save(tmp_path, "t.npy", np.full(5, -100))
    out = tmp_path / "loss.npy"
    argv = ["run", "cross_entropy", x, t, "-o", out, "--reduction", "mean", "--ignore-index"]
    status, _, err = _main([*argv, "-100", "--batch-mb", "0.0001"], capsys)
    assert status == 0, err
    ref = torch.nn.functional.cross_entropy(
        torch.zeros(5, 3, dtype=torch.float64), torch.full((5,), -100), reduction="mean"
    )
    assert math.isnan(ref) and np.isnan(np.load(out))


BAD_CROSS_ENTROPY = [
    ("float targets", "x.npy xf.npy", [], "targets '{t}/xf.npy': dtype float64, expected integer"),
    ("bool targets", "x.npy tb.npy", [], "dtype bool, expected integer class indices"),
    (
        "target shape",
        "x.npy t5.npy",
        [],
        "targets '{t}/t5.npy' has shape (5,), expected (4,) (the logits' shape (4, 3) without",
    ),
    ("one input", "x.npy", [], "takes 2 inputs (logits, targets), got 1"),
    ("no classes", "x0.npy t.npy", [], "logits of shape (4, 0) have no class on axis 1"),
    ("class out of range", "x.npy tbig.npy", [], "ValueError: "),
    (
        "uint64 class beyond int64",  # 2**64 - 100 once wrapped to -100, the ignored index
        "x.npy tu64.npy",
        [],
        "targets contain the class index 18446744073709551516, out of range for 3 classes",
    ),
    ("axis", "x.npy t.npy", ["--axis", "2"], "--axis 2 is out of range"),
    ("smoothing", "x.npy t.npy", ["--label-smoothing", "1.5"], "must be in [0, 1], got 1.5"),
    ("smoothing nan", "x.npy t.npy", ["--label-smoothing", "nan"], "must be in [0, 1], got nan"),
    ("reduction", "x.npy t.npy", ["--reduction", "max"], "argument --reduction: invalid choice"),
    ("ignore", "x.npy t.npy", ["--ignore-index", "x"], "--ignore-index: invalid int value: 'x'"),
    (
        "reduction on dask",
        "x.npy t.npy",
        ["--reduction", "sum", "--dask", "local:1"],
        "--reduction sum with --dask is not supported",
    ),
    (
        "options of cross_entropy",  # the op is replaced by softmax below
        "x.npy",
        ["--ignore-index", "-100", "--reduction", "mean"],
        "run softmax: --reduction, --ignore-index: an option of cross_entropy only",
    ),
]


@pytest.mark.parametrize(
    ("inputs", "extra", "expected"),
    [c[1:] for c in BAD_CROSS_ENTROPY],
    ids=[c[0] for c in BAD_CROSS_ENTROPY],
)
def test_cross_entropy_bad_input(inputs, extra, expected, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((4, 3)))
    np.save(tmp_path / "x0.npy", np.zeros((4, 0)))
    np.save(tmp_path / "xf.npy", np.zeros(4))
    np.save(tmp_path / "tb.npy", np.zeros(4, dtype=bool))
    np.save(tmp_path / "t5.npy", np.zeros(5, dtype=np.int64))
    np.save(tmp_path / "t.npy", np.zeros(4, dtype=np.int64))
    np.save(tmp_path / "tbig.npy", np.array([0, 1, 3, 2]))  # 3 is not a class of 3
    np.save(tmp_path / "tu64.npy", np.array([0, 1, 2**64 - 100, 2], dtype=np.uint64))
    before = _listing(tmp_path)
    t = str(tmp_path)
    op = "cross_entropy" if len(inputs.split()) > 1 or not extra else "softmax"
    argv = ["run", op, *(f"{t}/{p}" for p in inputs.split()), "-o", f"{t}/o.npy"]
    _one_line_error(*_main([*argv, *extra], capsys), expected.format(t=t))
    assert _listing(tmp_path) == before  # no output, no temporary file


# --------------------------------------------------------------------------------------------
# block planning


@pytest.mark.parametrize(
    ("shape", "axis", "budget"),
    [
        ((7, 5), 1, 12),
        ((7, 5), 0, 12),
        ((4, 6, 5), 1, 13),
        ((4, 6, 5), 2, 1000),
        ((3, 4, 5, 2), 0, 7),
        ((9,), 0, 2),
        ((2, 3), 1, 1),
    ],
)
def test_blocks_cover_whole_lines_once_within_budget(shape, axis, budget):
    seen = np.zeros(shape, dtype=int)
    lines = 0
    boxes = list(_batch.blocks(shape, axis, budget))
    for box, count in boxes:
        size = [s.stop - s.start for s in box]
        assert box[axis] == slice(0, shape[axis])  # the softmax axis is never split
        assert count == math.prod(size) // shape[axis]
        assert math.prod(size) <= max(budget, shape[axis])  # one line at least
        seen[box] += 1
        lines += count
    assert np.all(seen == 1)
    assert lines == math.prod(shape) // shape[axis]
    first = boxes[0][0]
    assert all(
        math.prod(s.stop - s.start for s in first) >= math.prod(s.stop - s.start for s in b)
        for b, _ in boxes
    )
    # Boxes come in memory order: their first elements' flat offsets increase.
    offsets = [np.ravel_multi_index(tuple(s.start for s in b), shape) for b, _ in boxes]
    assert offsets == sorted(offsets)


def test_within_splits_a_box_into_boxes_of_the_array():
    shape, axis = (10, 4, 6), 1
    box = (slice(3, 8), slice(0, 4), slice(2, 6))
    seen = np.zeros(shape, dtype=int)
    for inner, count in _batch.within(box, axis, 9):
        assert inner[axis] == slice(0, 4)
        assert count * 4 == math.prod(s.stop - s.start for s in inner) <= 9 or count == 1
        seen[inner] += 1
    expected = np.zeros(shape, dtype=int)
    expected[box] = 1
    np.testing.assert_array_equal(seen, expected)


def _job(tmp_path, op="softmax", shape=(100, 64), dtype=np.float32, mask=False, mb=1.0):
    rng = np.random.default_rng(0)
    x = _save(tmp_path, "x.npy", rng.standard_normal(shape).astype(dtype))
    inputs = [x]
    if op.endswith("backward"):
        inputs.append(_save(tmp_path, "dy.npy", rng.standard_normal(shape).astype(dtype)))
    if op == "cross_entropy":
        inputs.append(_save(tmp_path, "t.npy", np.zeros(shape[:-1], dtype=np.int64)))
    where = _save(tmp_path, "m.npy", np.ones(shape[-1], dtype=bool)) if mask else None
    spec = _batch.Spec(op, tuple(inputs), where=where, batch_bytes=int(mb * 2**20))
    return _batch.open_job(spec)


@pytest.mark.parametrize(
    ("op", "dtype", "mask", "line_bytes", "buffers"),
    [
        ("softmax", np.float32, False, 64 * (4 + 4), 2),  # x in, y out
        ("softmax", np.float16, True, 64 * (2 + 1 + 2), 3),  # x, mask, y
        ("log_softmax_backward", np.float64, False, 64 * 8 * 3, 3),  # ly, dy, dx
        ("softmax", np.int16, False, 64 * (2 + 8), 2),  # int16 in, float64 out
        ("cross_entropy", np.float32, False, 64 * 4 + 8 + 4, 3),  # logits, targets, losses
    ],
)
def test_gpu_plan_fits_two_blocks_in_batch_mb(op, dtype, mask, line_bytes, buffers, tmp_path):
    job = _job(tmp_path, op, dtype=dtype, mask=mask, mb=0.05)
    plan = _batch_gpu.plan(job)
    batch = job.spec.batch_bytes
    assert plan.slots == 2
    assert plan.buffers == buffers
    assert plan.lines == batch // (2 * line_bytes)  # the largest that fits
    assert plan.budget == plan.lines * 64
    assert plan.slot_bytes == plan.lines * line_bytes
    assert plan.device_bytes <= batch < 2 * (plan.lines + 1) * line_bytes


def test_gpu_plan_never_exceeds_the_rows_present(tmp_path):
    plan = _batch_gpu.plan(_job(tmp_path, shape=(3, 64), mb=32))
    assert plan.lines == 3


def test_gpu_plan_refuses_a_line_larger_than_batch_mb(tmp_path):
    job = _job(tmp_path, shape=(2, 1 << 16), mb=0.5)  # a line needs 2 * 512 KiB
    with pytest.raises(_batch.BatchError, match=r"--batch-mb 0.5: one softmax line of 65536"):
        _batch_gpu.plan(job)


def test_dask_tasks_cover_the_array_in_whole_blocks(tmp_path):
    job = _job(tmp_path, shape=(1000, 64), mb=0.01)  # 2621 elements: 40 lines per CPU block
    budget = _batch.cpu_budget(job)
    assert budget == 2621
    boxes = _batch_dask.task_boxes(job, threads=2)
    rows = [b[0].stop - b[0].start for b in boxes]
    assert sum(rows) == 1000
    assert len(boxes) == math.ceil(1000 / rows[0])
    assert 64 * rows[0] <= 1000 * 64 / 8  # at least 4 tasks per thread
    big = _batch_dask.task_boxes(_job(tmp_path, shape=(1000, 64), mb=0.001), threads=1)
    assert max(b[0].stop - b[0].start for b in big) * 64 <= 16 * 262  # 16 blocks at most
    assert len(big) == math.ceil(1000 / (16 * 262 // 64))


CPUS = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("text", "address", "workers", "shown"),
    [
        ("local:3", None, 3, "local:3"),
        ("local", None, CPUS, f"local:{CPUS}"),  # one worker per usable CPU
        ("local:", None, CPUS, f"local:{CPUS}"),
        ("tcp://10.0.0.1:8786", "tcp://10.0.0.1:8786", None, "tcp://10.0.0.1:8786"),
    ],
)
def test_dask_address(text, address, workers, shown):
    cluster = _batch_dask.parse_address(text)
    assert (cluster.address, cluster.workers, str(cluster)) == (address, workers, shown)


@pytest.mark.parametrize("text", ["local:0", "local:x", "local:-1", "local:2.5"])
def test_dask_bad_local_count(text, tmp_path, capsys):
    x = _save(tmp_path, "x.npy", np.zeros((2, 3)))
    status, out, err = _main(
        ["run", "softmax", x, "-o", tmp_path / "y.npy", "--dask", text], capsys
    )
    _one_line_error(status, out, err, f"--dask '{text}': expected local:N with N a positive")
    assert _listing(tmp_path) == ["x.npy"]


# --------------------------------------------------------------------------------------------
# the device


def test_device_choice(monkeypatch):
    fake = object()
    monkeypatch.setattr(devices, "cupy_with_gpu", lambda: None)
    assert _batch.pick_device("auto") is None
    assert _batch.pick_device("cpu") is None
    with pytest.raises(_batch.BatchError, match="--device gpu: no CUDA device found"):
        _batch.pick_device("gpu")
    monkeypatch.setattr(devices, "cupy_with_gpu", lambda: fake)
    assert _batch.pick_device("auto") is fake
    assert _batch.pick_device("gpu") is fake
    assert _batch.pick_device("cpu") is None


@pytest.mark.skipif(has_gpu(), reason="checks the error raised where no GPU is present")
def test_device_gpu_without_gpu_is_one_line_error(tmp_path):
    x = _save(tmp_path, "x.npy", np.zeros((2, 3)))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "xpsoftmax",
            "run",
            "softmax",
            x,
            "-o",
            str(tmp_path / "y.npy"),
            "--device",
            "gpu",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        "xpsoftmax: error: --device gpu: no CUDA device found (CuPy is not installed or sees "
        "no GPU)\n"
    )
    assert _listing(tmp_path) == ["x.npy"]


@pytest.mark.skipif(has_gpu(), reason="auto picks the GPU where one is present")
def test_device_auto_without_gpu_runs_on_the_cpu(tmp_path, capsys):
    x = _save(tmp_path, "x.npy", np.zeros((2, 3)))
    status, out, _ = _main(["run", "softmax", x, "-o", tmp_path / "y.npy"], capsys)
    assert status == 0
    assert ", CPU (NumPy) -> " in out


# --------------------------------------------------------------------------------------------
# the GPU loop, on a stand-in for CuPy


class FakeDeviceArray(np.ndarray):
    """A "device" buffer: host memory whose ``set`` is an H2D copy on a stream."""

    def set(self, arr, stream=None):
        assert isinstance(stream, FakeStream), "H2D copies go on the slot's stream"
        self[...] = arr  # the kernel reads it at once, as the stream would in order
        # The pinned source must stay untouched until the stream has passed this point.
        stream.queue.append(("check", arr, arr.copy()))


class FakeEvent:
    def __init__(self, stream, position):
        self.stream, self.position = stream, position

    def synchronize(self):
        self.stream.run(self.position)


class FakeStream:
    def __init__(self, non_blocking=False):
        assert non_blocking
        self.queue, self.done = [], 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def record(self):
        return FakeEvent(self, len(self.queue))

    def run(self, upto):
        for kind, target, value in self.queue[self.done : upto]:
            if kind == "copy":
                np.copyto(target, value)
            else:
                assert np.array_equal(target, value, equal_nan=True), (
                    "a pinned input buffer was overwritten while its copy was in flight"
                )
        self.done = max(self.done, upto)

    def synchronize(self):
        self.run(len(self.queue))


class FakeCupy(types.SimpleNamespace):
    """The parts of CuPy the GPU loop uses; device -> host copies wait for their event."""

    def __init__(self):
        super().__init__(__version__="0.0-fake", device_bytes=0, pinned_bytes=0, streams=[])
        fake = self

        def stream(non_blocking=False):
            s = FakeStream(non_blocking)
            fake.streams.append(s)
            return s

        def alloc_pinned_memory(size):
            fake.pinned_bytes += size
            return bytearray(size)

        self.cuda = types.SimpleNamespace(
            Stream=stream,
            alloc_pinned_memory=alloc_pinned_memory,
            Device=lambda: types.SimpleNamespace(id=0, synchronize=lambda: None),
            runtime=types.SimpleNamespace(getDeviceProperties=lambda i: {"name": b"Fake GPU"}),
        )

    def empty(self, size, dtype):
        self.device_bytes += size * np.dtype(dtype).itemsize
        return np.zeros(size, dtype=dtype).view(FakeDeviceArray)

    def asnumpy(self, a, stream=None, out=None, blocking=True):
        assert not blocking and isinstance(stream, FakeStream) and out is not None
        stream.queue.append(("copy", out, np.array(a)))  # lands when the event is waited on
        return out


GPU_CASES = [
    # (op, shape, axis, fortran, mask, batch-mb)
    ("softmax", (300, 40), -1, False, False, "0.01"),
    ("log_softmax", (30, 8, 9), 1, False, False, "0.002"),
    ("softmax_backward", (50, 33), -1, True, False, "0.003"),
    ("log_softmax_backward", (64, 20), 0, False, True, "0.004"),
    ("cross_entropy", (200, 31), -1, False, True, "0.003"),
    ("softmax", (5, 7), -1, False, False, "32"),  # one block
]


def _gpu_inputs(tmp_path, op, shape, axis, fortran, mask):
    rng = np.random.default_rng(3)
    x = (2 * rng.standard_normal(shape)).astype(np.float32)
    arrays = [x]
    if op.endswith("backward"):
        ly = scipy.special.log_softmax(x.astype(np.float64), axis=axis)
        y = np.exp(ly) if op == "softmax_backward" else ly
        arrays = [y.astype(np.float32), rng.standard_normal(shape).astype(np.float32)]
    if op == "cross_entropy":
        arrays.append(rng.integers(0, shape[axis], size=shape[:-1]))
    paths = [_save(tmp_path, f"in{i}.npy", a, fortran) for i, a in enumerate(arrays)]
    extra = ["--axis", str(axis)]
    if mask:
        m = np.ones(shape[axis], dtype=bool)
        m[1] = False
        if op == "cross_entropy":
            arrays[1][arrays[1] == 1] = 0
            paths[1] = _save(tmp_path, "in1.npy", arrays[1])
        extra += [
            "--where",
            _save(
                tmp_path, "m.npy", m.reshape((-1,) + (1,) * (len(shape) - 1 - axis % len(shape)))
            ),
        ]
    return paths, extra


def _independent(op: str, paths: list[str], extra: list[str]) -> np.ndarray:
    """The expected output of ``run op paths extra``, in float64 from the input files: the
    specification's softmax (``ref_softmax``) and the VJP and loss formulas written out here."""
    axis = int(extra[extra.index("--axis") + 1])
    arrays = [np.load(p) for p in paths]
    x = arrays[0].astype(np.float64)
    m = np.ones(x.shape, bool)
    if "--where" in extra:
        m = np.broadcast_to(np.load(extra[extra.index("--where") + 1]), x.shape)
    if op in ("softmax", "log_softmax"):
        return ref_softmax(x, axis, where=m, log=op == "log_softmax")
    if op == "cross_entropy":
        ly = ref_softmax(x, axis, where=m, log=True)
        t = np.expand_dims(arrays[1], axis)
        return -np.take_along_axis(ly, t, axis=axis).squeeze(axis)
    g = np.where(m, arrays[1].astype(np.float64), 0.0)
    if op == "softmax_backward":
        r = x * (g - np.sum(x * g, axis=axis, keepdims=True))
    else:
        r = g - np.exp(x) * np.sum(g, axis=axis, keepdims=True)
    return np.where(m, r, 0.0)


@pytest.mark.parametrize(("op", "shape", "axis", "fortran", "mask", "mb"), GPU_CASES)
def test_gpu_loop_on_a_stand_in_matches_the_cpu(
    op, shape, axis, fortran, mask, mb, tmp_path, capsys, monkeypatch
):
    paths, extra = _gpu_inputs(tmp_path, op, shape, axis, fortran, mask)
    cpu, gpu = tmp_path / "cpu.npy", tmp_path / "gpu.npy"
    status, _, err = _main(["run", op, *paths, "-o", cpu, "--device", "cpu", *extra], capsys)
    assert status == 0, err
    fake = FakeCupy()
    monkeypatch.setattr(devices, "cupy_with_gpu", lambda: fake)
    argv = ["run", op, *paths, "-o", gpu, "--device", "auto", "--batch-mb", mb, *extra]
    status, out, err = _main(argv, capsys)
    assert status == 0, err
    assert out.rstrip().endswith(f"GPU 0 (Fake GPU), CuPy 0.0-fake -> {gpu}")
    expected, result = np.load(cpu), np.load(gpu)
    assert result.dtype == expected.dtype and result.shape == expected.shape
    assert np.isfortran(result) == np.isfortran(expected)
    # The stand-in's device buffers are an ndarray subclass, which takes xpsoftmax's generic
    # code rather than the NumPy fast path: equal to rounding, not byte for byte (float32
    # log-softmax values near 0 are a difference of numbers near 3: a few ulp of 3 absolute).
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(result, _independent(op, paths, extra), rtol=2e-5, atol=2e-6)
    # Two slots, each with device and pinned buffers; both fit in --batch-mb.
    job = _batch.open_job(_batch.Spec(op, tuple(paths), batch_bytes=int(float(mb) * 2**20)))
    assert len(fake.streams) == 2
    assert 0 < fake.device_bytes <= float(mb) * 2**20
    assert 0 < fake.pinned_bytes <= job.spec.batch_bytes
    assert all(s.done == len(s.queue) for s in fake.streams)  # everything waited for
    assert _listing(tmp_path) == sorted(
        [*(Path(p).name for p in paths), "cpu.npy", "gpu.npy", *(["m.npy"] if mask else [])]
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gpu_loop_on_a_stand_in_totals_cross_entropy(reduction, tmp_path, capsys, monkeypatch):
    """--reduction through the GPU loop (blocks finish out of step): torch's total."""
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((200, 31)).astype(np.float32)
    targets = rng.integers(-1, 31, size=200)
    paths = [_save(tmp_path, "x.npy", logits), _save(tmp_path, "t.npy", targets)]
    monkeypatch.setattr(devices, "cupy_with_gpu", FakeCupy)
    out = tmp_path / "gpu.npy"
    argv = ["run", "cross_entropy", *paths, "-o", out, "--batch-mb", "0.003"]
    argv += ["--reduction", reduction, "--ignore-index", "-1", "--label-smoothing", "0.1"]
    status, stdout, err = _main(argv, capsys)
    assert status == 0, err
    assert "Fake GPU" in stdout
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits.astype(np.float64)),
        torch.from_numpy(targets),
        reduction=reduction,
        ignore_index=-1,
        label_smoothing=0.1,
    )
    result = np.load(out)
    assert result.shape == () and result.dtype == np.float32
    np.testing.assert_allclose(result, expected.numpy(), rtol=2e-6)


def test_the_stand_in_catches_a_result_read_before_its_event(tmp_path, capsys, monkeypatch):
    """The control: a loop that does not wait for its event writes stale results."""
    paths, _ = _gpu_inputs(tmp_path, "softmax", (300, 40), -1, False, False)
    monkeypatch.setattr(devices, "cupy_with_gpu", FakeCupy)

    def finish_without_waiting(self, out, advance):
        _, index, lines, host_out, _, _ = self.pending
        out[index] = host_out
        self.pending = None
        advance(lines)

    monkeypatch.setattr(_batch_gpu._Slot, "finish", finish_without_waiting)
    out = tmp_path / "gpu.npy"
    status, _, err = _main(["run", "softmax", *paths, "-o", out, "--batch-mb", "0.01"], capsys)
    assert status == 0, err
    ref = scipy.special.softmax(np.load(paths[0]).astype(np.float64), axis=-1)
    assert not np.allclose(np.load(out), ref, atol=1e-3)


def test_gpu_run_refuses_a_line_larger_than_batch_mb(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(devices, "cupy_with_gpu", FakeCupy)
    x = _save(tmp_path, "x.npy", np.zeros((2, 1 << 16), dtype=np.float32))
    argv = ["run", "softmax", x, "-o", tmp_path / "y.npy", "--batch-mb", "0.5"]
    _one_line_error(*_main(argv, capsys), "one softmax line of 65536 elements needs 1 MiB")
    assert _listing(tmp_path) == ["x.npy"]


def test_gpu_loop_error_midway_leaves_no_output(tmp_path, capsys, monkeypatch):
    fake = FakeCupy()
    monkeypatch.setattr(devices, "cupy_with_gpu", lambda: fake)
    calls = []
    real = _batch.compute

    def failing(job, chunks, mask, out=None):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("cudaErrorLaunchFailure")
        return real(job, chunks, mask, out)

    monkeypatch.setattr(_batch_gpu, "compute", failing)
    x = _save(tmp_path, "x.npy", np.zeros((300, 40), dtype=np.float32))
    argv = ["run", "softmax", x, "-o", tmp_path / "y.npy", "--batch-mb", "0.01"]
    status, out, err = _main(argv, capsys)
    assert status == 2 and out == ""
    assert err == "xpsoftmax: error: RuntimeError: cudaErrorLaunchFailure\n"
    assert _listing(tmp_path) == ["x.npy"]
    assert all(s.done == len(s.queue) for s in fake.streams)  # streams drained before freeing


# --------------------------------------------------------------------------------------------
# the GPU, for real


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs CuPy and a CUDA device")
@pytest.mark.parametrize(("op", "shape", "axis", "fortran", "mask", "mb"), GPU_CASES)
def test_gpu_run_matches_the_cpu(op, shape, axis, fortran, mask, mb, tmp_path, capsys):
    paths, extra = _gpu_inputs(tmp_path, op, shape, axis, fortran, mask)
    cpu, gpu = tmp_path / "cpu.npy", tmp_path / "gpu.npy"
    assert _main(["run", op, *paths, "-o", cpu, "--device", "cpu", *extra], capsys)[0] == 0
    argv = ["run", op, *paths, "-o", gpu, "--device", "gpu", "--batch-mb", mb, *extra]
    status, out, err = _main(argv, capsys)
    assert status == 0, err
    assert re.search(r", GPU \d+ \(.+\), CuPy [\w.]+ -> ", out), out
    expected, result = np.load(cpu), np.load(gpu)
    assert result.dtype == expected.dtype and result.shape == expected.shape
    np.testing.assert_allclose(result, expected, rtol=2e-5, atol=2e-6)


# --------------------------------------------------------------------------------------------
# Dask


@pytest.fixture(scope="module")
def scheduler():
    """A LocalCluster of two worker processes (one thread each, no dashboard), for the module."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},  # not 8787, which may be taken
    ) as cluster:
        yield cluster.scheduler_address


DASK_CASES = [
    # (op, shape, axis, fortran, mask)
    ("softmax", (400, 33), -1, False, False),
    ("log_softmax", (20, 9, 11), 1, True, False),
    ("softmax_backward", (64, 50), 0, False, False),
    ("log_softmax_backward", (120, 30), -1, False, True),
    ("cross_entropy", (500, 21), -1, False, True),
]


@pytest.mark.parametrize(("op", "shape", "axis", "fortran", "mask"), DASK_CASES)
def test_dask_matches_one_process_byte_for_byte(
    op, shape, axis, fortran, mask, scheduler, tmp_path, capsys
):
    paths, extra = _gpu_inputs(tmp_path, op, shape, axis, fortran, mask)
    one, many = tmp_path / "one.npy", tmp_path / "many.npy"
    argv = ["run", op, *paths, "--batch-mb", "0.002", "--device", "cpu", *extra]
    status, _, err = _main([*argv, "-o", one], capsys)
    assert status == 0, err
    status, out, err = _main([*argv, "-o", many, "--dask", scheduler, "--progress"], capsys)
    assert status == 0, err
    tasks = re.search(rf"Dask {scheduler} \(2 workers; (\d+) tasks: \1 on CPU \(NumPy\)\) -> ", out)
    assert tasks and int(tasks[1]) >= 4, out
    assert "row/s" in err  # the progress bar
    assert one.read_bytes() == many.read_bytes()
    np.testing.assert_allclose(np.load(many), _independent(op, paths, extra), rtol=2e-5, atol=2e-6)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_dask_error_on_a_worker_is_one_line_and_leaves_nothing(scheduler, tmp_path, capsys):
    x = _save(tmp_path, "x.npy", np.zeros((100, 4)))
    targets = np.zeros(100, dtype=np.int64)
    targets[77] = 9  # not a class
    t = _save(tmp_path, "t.npy", targets)
    argv = ["run", "cross_entropy", x, t, "-o", tmp_path / "l.npy", "--batch-mb", "0.0005"]
    _one_line_error(*_main([*argv, "--dask", scheduler], capsys), "ValueError: ")
    assert _listing(tmp_path) == ["t.npy", "x.npy"]


def test_dask_local_cluster_from_the_command_line(tmp_path, capsys):
    rng = np.random.default_rng(4)
    x = _save(tmp_path, "x.npy", rng.standard_normal((300, 20)).astype(np.float32))
    one, many = tmp_path / "one.npy", tmp_path / "many.npy"
    argv = ["run", "softmax", x, "--batch-mb", "0.002", "--device", "cpu"]
    assert _main([*argv, "-o", one], capsys)[0] == 0
    done = subprocess.run(
        [sys.executable, "-m", "xpsoftmax", *argv, "-o", str(many), "--dask", "local:2"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no log lines from the cluster, no warnings
    assert re.search(
        r"Dask local:2 \(2 workers; \d+ tasks: \d+ on CPU \(NumPy\)\) -> ", done.stdout
    )
    assert one.read_bytes() == many.read_bytes()


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("tcp://127.0.0.1:1", "cannot connect (OSError: Timed out trying to connect"),
        ("nonsense://x", "cannot connect (ValueError: unknown address scheme 'nonsense'"),
    ],
)
def test_dask_scheduler_unreachable(address, expected, tmp_path, capsys):
    import dask
    import distributed  # noqa: F401  (its defaults join dask.config before the set() below)

    x = _save(tmp_path, "x.npy", np.zeros((2, 3)))
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        argv = ["run", "softmax", x, "-o", tmp_path / "y.npy", "--dask", address]
        _one_line_error(*_main(argv, capsys), f"--dask {address}: {expected}")
    assert _listing(tmp_path) == ["x.npy"]


def test_dask_ctrl_c_in_a_terminal_stops_cleanly(tmp_path):
    """SIGINT to the whole process group, as Ctrl-C in a terminal sends it: one line, status
    130, no traceback from the workers, no output and no temporary file left."""
    path = tmp_path / "x.npy"
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(65536, 1024))
    x[::997] = 1.0  # a sparse 256 MiB file
    x.flush()
    del x
    argv = ["run", "softmax", str(path), "-o", str(tmp_path / "y.npy"), "--batch-mb", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "xpsoftmax", *argv, "--dask", "local:2", "--progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell job
    )
    err = ""
    while not re.search(r"\| *[1-9][\d.]*k?/", err):  # a task has finished: workers are busy
        char = proc.stderr.read(1)
        assert char, f"the run ended first: {err}"
        err += char
    os.killpg(proc.pid, signal.SIGINT)
    out, rest = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, err + rest
    assert out == ""
    assert rest.rstrip("\n").splitlines()[-1] == "xpsoftmax: error: interrupted"
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest
    assert _listing(tmp_path) == ["x.npy"]


def _dask_cli(*argv, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "xpsoftmax", *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell job
        **kwargs,
    )


def test_dask_failed_task_and_too_many_workers_are_one_line_each(tmp_path):
    """A task that fails on a worker: one line, status 2, none of distributed's log (its
    "Compute Failed" and traceback) unless --verbose; local:N beyond the CPUs is capped, with a
    note."""
    x = _save(tmp_path, "x.npy", np.zeros((100, 4)))
    targets = np.zeros(100, dtype=np.int64)
    targets[77] = 9  # not a class
    t = _save(tmp_path, "t.npy", targets)
    argv = ["run", "cross_entropy", x, t, "-o", tmp_path / "l.npy", "--batch-mb", "0.0005"]
    many = CPUS + 62
    proc = _dask_cli(*argv, "--dask", f"local:{many}")
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 2, err
    assert out == ""
    assert err.splitlines() == [
        f"xpsoftmax: note: --dask local:{many}: this machine has {CPUS} usable CPU"
        f"{'s' if CPUS > 1 else ''}; starting {CPUS} worker{'s' if CPUS > 1 else ''}",
        "xpsoftmax: error: ValueError: targets contain the class index 9, out of range for 4 "
        "classes along axis 1 of logits (valid: 0 to 3, or ignore_index)",
    ]
    proc = _dask_cli(*argv, "--dask", "local:1", "--verbose")
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 2
    assert " - distributed." in err  # the log comes through when asked for
    assert err.splitlines()[-1].startswith("xpsoftmax: error: ValueError: targets contain")
    assert _listing(tmp_path) == ["t.npy", "x.npy"]


def test_dask_capped():
    cluster, note = _batch_dask.capped(_batch_dask.Cluster(None, CPUS))
    assert cluster == _batch_dask.Cluster(None, CPUS) and note is None
    remote = _batch_dask.Cluster("tcp://10.0.0.1:8786")
    assert _batch_dask.capped(remote) == (remote, None)
    cluster, note = _batch_dask.capped(_batch_dask.Cluster(None, 64 * CPUS))
    assert cluster.workers == CPUS and note.startswith(f"--dask local:{64 * CPUS}: this machine")


def test_dask_ctrl_c_while_the_cluster_starts(tmp_path):
    """Ctrl-C as the LocalCluster starts (its first process has appeared): status 130 within
    about a second, one line, the cluster gone (no process left in the group), no file left."""
    x = _save(tmp_path, "x.npy", np.zeros((4, 5)))
    proc = _dask_cli("run", "softmax", x, "-o", tmp_path / "y.npy", "--dask", "local:2")
    deadline = time.monotonic() + 60
    while len(_group(proc.pid)) < 2:  # the cluster's first process
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=TIMEOUT)
    took = time.monotonic() - sent
    assert proc.returncode == 130, err
    assert (out, err) == ("", "xpsoftmax: error: interrupted\n")
    assert took < 2.5, f"{took:.2f} s to stop"  # measured 0.1-1.1 s on the 2-core CI machine
    deadline = time.monotonic() + 10
    while _group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _group(proc.pid) == []
    assert _listing(tmp_path) == ["x.npy"]


def _group(pgid: int) -> list[int]:
    """The processes of the group ``pgid`` that still run (not zombies)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry))
    return found


# --------------------------------------------------------------------------------------------
# bench

BENCH_ROW = re.compile(
    r"(CPU|GPU) +(forward|backward) +\((\d+),(\d+)\) +(\w+) +([\d.]+) +([\d.]+) +([\d.]+) +"
    r"([\d.e+-]+|nan) +(ok|FAIL)$"
)


def _bench_rows(text):
    return [m.groups() for line in text.splitlines() if (m := BENCH_ROW.match(line))]


def test_bench_small(capsys):
    status, out, err = _main(
        ["bench", "--elements", "4096", "--repeat", "1", "--device", "cpu"], capsys
    )
    assert status == 0, err
    assert err == ""
    lines = out.splitlines()
    assert re.match(r"xpsoftmax \S+ bench, \d{4}-\d{2}-\d{2} \d{2}:\d{2}", lines[0])
    assert lines[1].startswith("machine: ") and "CPUs usable" in lines[1]
    assert lines[2].startswith(f"libraries: NumPy {np.__version__}, SciPy {scipy.__version__}")
    rows = _bench_rows(out)
    got = [(d, op, (int(r), int(c)), impl) for d, op, r, c, impl, *_ in rows]
    expected = []
    for shape in ((4, 1024), (1, 4096)):
        expected += [("CPU", "forward", shape, i) for i in ("xpsoftmax", "formula", "scipy")]
        expected += [("CPU", "backward", shape, i) for i in ("xpsoftmax", "formula")]
    assert got == expected
    for *_, ms, gbs, rel, error, verdict in rows:
        assert float(ms) > 0 and float(gbs) > 0 and float(rel) > 0
        assert float(error) <= 1e-5 and verdict == "ok"
    assert [r[7] for r in rows if r[4] == "xpsoftmax"] == ["1.00"] * 4


def test_bench_reports_a_wrong_result(capsys, monkeypatch):
    import xpsoftmax

    monkeypatch.setattr(xpsoftmax, "softmax_backward", lambda y, dy: y * (1 - y) * dy)
    status, out, _ = _main(
        ["bench", "--elements", "2048", "--repeat", "1", "--device", "cpu"], capsys
    )
    assert status == 1
    verdicts = {(r[1], r[4]): r[9] for r in _bench_rows(out)}
    assert verdicts[("backward", "xpsoftmax")] == "FAIL"
    assert verdicts[("forward", "xpsoftmax")] == "ok"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["bench", "--elements", "100"], "bench: --elements must be at least 1024, got 100"),
        (["bench", "--repeat", "0"], "argument --repeat: expected a positive integer, got 0"),
    ],
)
def test_bench_usage_errors(argv, expected, capsys):
    _one_line_error(*_main(argv, capsys), expected)


@pytest.mark.skipif(has_gpu(), reason="checks the error raised where no GPU is present")
def test_bench_device_gpu_without_gpu(capsys):
    _one_line_error(*_main(["bench", "--device", "gpu"], capsys), "bench: --device gpu: no CUDA")


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs CuPy and a CUDA device")
def test_bench_gpu_rows(capsys):
    status, out, err = _main(["bench", "--elements", "65536", "--repeat", "2"], capsys)
    assert status == 0, err
    rows = _bench_rows(out)
    gpu = [(op, impl) for d, op, _, _, impl, *_ in rows if d == "GPU"]
    assert (
        gpu
        == [
            ("forward", "xpsoftmax"),
            ("forward", "formula"),
            ("backward", "xpsoftmax"),
            ("backward", "formula"),
        ]
        * 2
    )


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_cross_entropy_totals_add_float32_losses_in_float64(reduction, tmp_path, capsys):
    """One loss of 2**24 beside 127 of log(2) in one float32 block: a float32 sum drops about
    ten units of the total (2 is float32's spacing there); the float64 total rounds once."""
    logits = np.zeros((128, 2), dtype=np.float32)
    logits[0, 1] = 2.0**24  # target 0: loss 2**24
    targets = np.zeros(128, dtype=np.int64)
    x, t = _save(tmp_path, "x.npy", logits), _save(tmp_path, "t.npy", targets)
    out = tmp_path / "loss.npy"
    argv = ["run", "cross_entropy", x, t, "-o", out, "--reduction", reduction]
    status, _, err = _main(argv, capsys)
    assert status == 0, err
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits.astype(np.float64)), torch.from_numpy(targets), reduction=reduction
    ).item()
    assert np.load(out) == np.float32(expected)


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (ValueError("bad\nsecond line"), "ValueError: bad"),
        (KeyError(), "KeyError"),
        (OSError(""), "OSError"),
    ],
)
def test_first_line_of_an_exception(exc, line):
    from xpsoftmax.tools.batch.job import first_line

    assert first_line(exc) == line


def test_pick_device_names_a_bad_choice():
    """The API below the command line (argparse's choices cover the command)."""
    with pytest.raises(_batch.BatchError, match=r"--device must be auto, cpu or gpu, got 'tpu'"):
        _batch.pick_device("tpu")
    assert _batch.pick_device("cpu") is None
