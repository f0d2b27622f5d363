"""``xpsoftmax demo``: forward, backward and gradient checks on a real batch, on the best device.

The batch is the logits of a linear classifier on synthetic Gaussian data, made deterministically
from a seed, so the demo needs nothing beyond NumPy (and CuPy when a GPU is present). Every
result is compared with a float64 reference computed here with plain NumPy on the host:

* forward: ``softmax`` and ``log_softmax`` against ``exp(x - max) / sum`` and
  ``x - max - log(sum)``;
* backward: the gradient of the mean cross-entropy, taken once through ``log_softmax_backward`` and
  once through ``softmax_backward``, against its textbook closed form ``(p - onehot) / rows``
  (errors relative to ``1 / rows``, the largest an entry can be);
* ``check_vjp`` (finite differences, on a slice of the logits scaled to unit standard deviation,
  so that softmax is not saturated) accepts both backward functions and rejects the elementwise
  ``y * (1 - y)`` shortcut, whose gradient on the slice is wrong.

The batch and the references are made a slice of rows at a time, so the demo holds about six
arrays of the batch's size (:func:`memory_needed`); a batch that would not fit in the memory
available is refused before anything is made (``MemoryError``, one line in the command).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from .. import (
    __version__,
    check_vjp,
    get_kernels,
    log_softmax,
    log_softmax_backward,
    softmax,
    softmax_backward,
)
from . import devices

__all__ = ["DTYPES", "Device", "make_batch", "memory_needed", "pick_device", "run"]

#: dtype name -> tolerance on the largest error relative to the largest reference entry.
DTYPES = {"float32": 1e-5, "float64": 1e-12}

_FEATURES = 64  # features of the synthetic data
_SIGMA = 1.5  # noise of the synthetic data; gives about 80 % accuracy at 1000 classes
_FIT_SAMPLES = 8  # the classifier's class means are estimated from this many samples per class
_SLICE = (8, 64)  # the slice that check_vjp differentiates numerically


@dataclass(frozen=True)
class Device:
    """Where the demo runs: the array module, a description, and how to wait for it."""

    xp: Any
    name: str
    synchronize: Callable[[], None]
    to_host: Callable[[Any], np.ndarray]


def pick_device(choice: str = "auto") -> Device:
    """The device for ``choice`` (``"auto"``, ``"cpu"`` or ``"gpu"``).

    ``"auto"`` takes CuPy's current GPU when CuPy is installed and sees a device, and NumPy on
    the CPU otherwise; ``"gpu"`` raises ``RuntimeError`` when there is no usable GPU.
    """
    if choice not in devices.CHOICES:
        msg = f"device must be 'auto', 'cpu' or 'gpu', got {choice!r}"
        raise ValueError(msg)
    cupy = devices.pick_gpu(choice)
    if cupy is None:
        name = f"CPU ({devices.available_cpus()} cores), NumPy {np.__version__}"
        return Device(np, name, lambda: None, np.asarray)
    name = f"{devices.gpu_name(cupy)}, kernels {get_kernels()!r}"
    return Device(cupy, name, cupy.cuda.Device().synchronize, cupy.asnumpy)


def make_batch(rows: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Float64 logits ``(rows, classes)`` of a linear classifier, and the true labels.

    The data are Gaussian clusters (``_FEATURES`` features, noise ``_SIGMA``) around random
    class centers; the classifier is the linear discriminant with class means estimated from
    ``_FIT_SAMPLES`` samples per class: ``logit_k = (w_k . x - |w_k|^2 / 2) / sigma^2``.
    """
    batch = _Batch(rows, classes, seed)
    return batch.logits(0, rows), batch.labels


class _Batch:
    """The synthetic batch of :func:`make_batch`, whose logits are made a slice of rows at a
    time (the features are ``rows x _FEATURES``, small; the logits are the batch)."""

    def __init__(self, rows: int, classes: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        centers = rng.standard_normal((classes, _FEATURES))
        # The mean of _FIT_SAMPLES draws around a center, drawn directly.
        noise = _SIGMA / math.sqrt(_FIT_SAMPLES) * rng.standard_normal((classes, _FEATURES))
        self.w = centers + noise
        self.labels = rng.integers(0, classes, size=rows)
        self.x = centers[self.labels] + _SIGMA * rng.standard_normal((rows, _FEATURES))
        self.bias = 0.5 * np.sum(self.w * self.w, axis=1)

    def logits(self, start: int, stop: int) -> np.ndarray:
        return (self.x[start:stop] @ self.w.T - self.bias) / _SIGMA**2


#: float64 elements of one slice of rows the references are computed on (8 MiB each).
_CHUNK = 2**20

#: Arrays of the batch's size the demo holds at once (logits, y, ly, dly, dy and one result),
#: on the device; the host holds the logits once more when the device is a GPU.
_COPIES = 6
#: Memory beyond them: the interpreter and libraries, the float64 slices of the references.
_OVERHEAD = 256 * 2**20


def _slices(rows: int, classes: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK // classes)
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def memory_needed(rows: int, classes: int, dtype: str, gpu: bool) -> tuple[int, int]:
    """Bytes of host memory and of device memory (0 on the CPU) the demo needs, about."""
    batch = rows * classes * np.dtype(dtype).itemsize
    features = 3 * rows * _FEATURES * 8 + 2 * classes * _FEATURES * 8
    if gpu:
        return batch + features + _OVERHEAD, _COPIES * batch
    return _COPIES * batch + features + _OVERHEAD, 0


def _check_fits(rows: int, classes: int, dtype: str, dev: Device) -> None:
    """Raise :class:`MemoryError` with the numbers when the demo would not fit."""
    gpu = dev.xp is not np
    host, device = memory_needed(rows, classes, dtype, gpu)
    batch = rows * classes * np.dtype(dtype).itemsize
    where = [("memory", host, devices.available_memory())]
    if gpu:
        where.append(("GPU memory", device, dev.xp.cuda.runtime.memGetInfo()[0]))
    for what, need, have in where:
        if have is not None and need > have:
            msg = (
                f"a ({rows}, {classes}) {dtype} batch ({batch / 1e9:.1f} GB) needs about "
                f"{need / 1e9:.1f} GB of {what} ({_COPIES} arrays of the batch's size"
                f"{' on the GPU' if gpu and what == 'GPU memory' else ''} and more) but "
                f"{have / 1e9:.1f} GB are available; use fewer --rows or --classes"
            )
            raise MemoryError(msg)


def _reference(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 softmax and log-softmax along the last axis, with plain NumPy."""
    z = logits - np.max(logits, axis=-1, keepdims=True)
    ly = z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))
    return np.exp(ly), ly


class _MaxError:
    """The largest absolute error over slices, relative to ``scale`` or to the largest
    reference entry (NaN if any entry is NaN): :func:`_error` over the whole, slice by slice."""

    def __init__(self, scale: float | None = None) -> None:
        self.diff, self.ref, self.scale, self.nan = 0.0, 0.0, scale, False

    def add(self, result: np.ndarray, ref: np.ndarray) -> None:
        diff = np.abs(np.asarray(result, dtype=np.float64) - ref)
        if not np.all(np.isfinite(diff)):
            self.nan = True
        elif diff.size:
            self.diff = max(self.diff, float(np.max(diff)))
            self.ref = max(self.ref, float(np.max(np.abs(ref))))

    @property
    def value(self) -> float:
        if self.nan:
            return math.nan
        return self.diff / (self.ref if self.scale is None else self.scale)


def _error(result: np.ndarray, ref: np.ndarray, scale: float | None = None) -> float:
    """Largest absolute error, relative to ``scale`` (default: the largest reference entry;
    NaN if any entry is NaN)."""
    diff = np.abs(np.asarray(result, dtype=np.float64) - ref)
    if not np.all(np.isfinite(diff)):
        return math.nan
    return float(np.max(diff) / (np.max(np.abs(ref)) if scale is None else scale))


def _elementwise_shortcut(y: Any, dy: Any, /, axis: Any = -1) -> Any:
    """The wrong derivative: only the Jacobian's diagonal ``y * (1 - y)``."""
    return y * (1 - y) * dy


def _best_time(fn: Callable[[], Any], device: Device, repeat: int) -> float:
    fn()  # warm-up: kernel compilation, caches
    device.synchronize()
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        device.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def run(
    *,
    device: str = "auto",
    rows: int = 4096,
    classes: int = 1000,
    dtype: str = "float32",
    repeat: int = 5,
    seed: int = 0,
    stream: TextIO | None = None,
) -> bool:
    """Run the demo, print what it did to ``stream`` (stdout) and return True when all checks pass.

    Parameters
    ----------
    device : {"auto", "cpu", "gpu"}
        Where to run (see :func:`pick_device`).
    rows, classes : int
        The batch shape; ``rows >= 1``, ``classes >= 2``.
    dtype : {"float32", "float64"}
        The dtype of the batch on the device.
    repeat : int
        Timed runs per function (the best is reported), after one warm-up run.
    seed : int
        Seed of the synthetic data.
    stream : file, optional
        Where to print; default ``sys.stdout``.

    Returns
    -------
    bool
        True when every check passed.

    Examples
    --------
    >>> import io
    >>> from xpsoftmax.tools import demo
    >>> demo.run(device="cpu", rows=64, classes=10, repeat=1, stream=io.StringIO())
    True
    """
    if dtype not in DTYPES:
        msg = f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}"
        raise ValueError(msg)
    if rows < 1 or classes < 2:
        msg = f"the batch needs rows >= 1 and classes >= 2, got rows={rows}, classes={classes}"
        raise ValueError(msg)
    if repeat < 1:
        msg = f"repeat must be >= 1, got {repeat}"
        raise ValueError(msg)
    out = sys.stdout if stream is None else stream
    dev = pick_device(device)
    xp = dev.xp
    tol = DTYPES[dtype]
    checks: list[bool] = []

    def report(label: str, text: str, ok: bool | None = None) -> None:
        if ok is not None:
            checks.append(ok)
            text = f"{text}  [{'ok' if ok else 'FAIL'}]"
        print(f"{label:<10} {text}", file=out, flush=True)

    def passed(*errors: float) -> bool:
        return all(e <= tol for e in errors)  # False for NaN

    _check_fits(rows, classes, dtype, dev)
    # The batch and its float64 references are made a slice of rows at a time: the demo holds
    # _COPIES arrays of the batch's size, not a dozen float64 ones (issue 13: 23 GB resident
    # for a 2 GB batch).
    batch = _Batch(rows, classes, seed)
    labels = batch.labels
    slices = _slices(rows, classes)
    x_host = np.empty((rows, classes), dtype=dtype)
    correct, loss_sum = 0, 0.0
    for a, b in slices:
        part = batch.logits(a, b)
        x_host[a:b] = part
        correct += int(np.count_nonzero(np.argmax(part, axis=1) == labels[a:b]))
        _, ly_part = _reference(x_host[a:b].astype(np.float64))
        loss_sum -= float(np.sum(ly_part[np.arange(b - a), labels[a:b]]))
    acc, loss_ref = correct / rows, loss_sum / rows

    print(f"xpsoftmax {__version__} demo: softmax forward, backward and gradient checks", file=out)
    report("device", dev.name)
    report(
        "batch",
        f"{(rows, classes)} {dtype} logits of a linear classifier on synthetic data, "
        f"accuracy {100 * acc:.1f} %, loss {loss_ref:.4f}",
    )

    def compare(result: Any, scale: float | None, reference: Callable) -> float:
        """``result`` against ``reference(a, b, p, ly)`` (float64 on the host), by slices."""
        error = _MaxError(scale)
        for a, b in slices:
            p_ref, ly_ref = _reference(dev.to_host(x[a:b]).astype(np.float64))
            error.add(dev.to_host(result[a:b]), reference(a, b, p_ref, ly_ref))
        return error.value

    # Forward.
    x = xp.asarray(x_host)
    del x_host  # on a GPU, the device's copy only from now on
    y = softmax(x)
    ly = log_softmax(x)
    err_y = compare(y, None, lambda a, b, p, ly_ref: p)
    err_ly = compare(ly, None, lambda a, b, p, ly_ref: ly_ref)
    report(
        "forward",
        f"softmax error {err_y:.1e}, log_softmax error {err_ly:.1e} (tolerance {tol:.0e})",
        passed(err_y, err_ly),
    )

    # Backward of the mean cross-entropy, through each function, against (p - onehot) / rows.
    def grad_ref(a: int, b: int, p: np.ndarray, ly_ref: np.ndarray) -> np.ndarray:
        p[np.arange(b - a), labels[a:b]] -= 1.0
        return p / rows

    idx = np.arange(rows)
    rows_d, labels_d = xp.asarray(idx), xp.asarray(labels)
    dly = xp.zeros_like(ly)
    dly[rows_d, labels_d] = -1.0 / rows  # d loss / d ly
    dy = xp.zeros_like(y)
    dy[rows_d, labels_d] = -1.0 / (rows * y[rows_d, labels_d])  # d loss / d y
    # Relative to 1 / rows, the largest an entry of this gradient can be: a batch the classifier
    # gets right with confidence has a far smaller gradient, below what float32 can resolve.
    err_log = compare(log_softmax_backward(ly, dly), 1 / rows, grad_ref)
    err_soft = compare(softmax_backward(y, dy), 1 / rows, grad_ref)
    report(
        "backward",
        f"cross-entropy gradient (p - onehot) / {rows}: via softmax_backward error "
        f"{err_soft:.1e}, via log_softmax_backward error {err_log:.1e}",
        passed(err_log, err_soft),
    )

    # Finite-difference checks on a small float64 slice, scaled to unit standard deviation: on
    # confident logits softmax saturates, its Jacobian vanishes and no check can tell a wrong one.
    part = batch.logits(0, min(rows, _SLICE[0]))[:, : _SLICE[1]]
    small_host = (part - part.mean()) / (part.std() or 1.0)
    small = xp.asarray(small_host)
    ok_soft = check_vjp(softmax, softmax_backward, small)
    ok_log = check_vjp(log_softmax, log_softmax_backward, small)
    report(
        "check_vjp",
        f"finite differences on a {tuple(small.shape)} float64 slice (scaled): "
        f"softmax_backward {ok_soft}, log_softmax_backward {ok_log}",
        ok_soft and ok_log,
    )
    ok_short = check_vjp(softmax, _elementwise_shortcut, small)
    p_small, _ = _reference(small_host)
    g_small = np.random.default_rng(seed).standard_normal(small_host.shape)
    short_ref = p_small * (g_small - np.sum(p_small * g_small, axis=-1, keepdims=True))
    err_short = _error(
        dev.to_host(_elementwise_shortcut(xp.asarray(p_small), xp.asarray(g_small))), short_ref
    )
    report(
        "shortcut",
        f"the elementwise y * (1 - y) * dy: check_vjp {ok_short}, gradient error "
        f"{err_short:.1e} on the slice (must fail)",
        not ok_short and not err_short <= tol,
    )

    # Timings.
    nbytes = rows * classes * np.dtype(dtype).itemsize
    timed = [
        ("softmax", lambda: softmax(x), 2 * nbytes),
        ("log_softmax", lambda: log_softmax(x), 2 * nbytes),
        ("softmax_backward", lambda: softmax_backward(y, dy), 3 * nbytes),
        ("log_softmax_backward", lambda: log_softmax_backward(ly, dly), 3 * nbytes),
    ]
    parts = []
    for name, fn, moved in timed:
        seconds = _best_time(fn, dev, repeat)
        parts.append(f"{name} {1e3 * seconds:.3g} ms ({moved / seconds / 1e9:.3g} GB/s)")
    report("time", ", ".join(parts[:2]))
    report("", f"{', '.join(parts[2:])}; best of {repeat}")

    ok = all(checks)
    report("result", "all checks passed" if ok else "SOME CHECKS FAILED")
    print(
        "(error: max |result - reference| / max |reference|, / (1 / rows) for the gradient; "
        "reference in float64 on the host)",
        file=out,
    )
    return ok
