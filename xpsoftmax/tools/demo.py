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

__all__ = ["DTYPES", "Device", "make_batch", "pick_device", "run"]

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
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, _FEATURES))
    # The mean of _FIT_SAMPLES draws around a center, drawn directly.
    w = centers + _SIGMA / math.sqrt(_FIT_SAMPLES) * rng.standard_normal((classes, _FEATURES))
    labels = rng.integers(0, classes, size=rows)
    x = centers[labels] + _SIGMA * rng.standard_normal((rows, _FEATURES))
    logits = (x @ w.T - 0.5 * np.sum(w * w, axis=1)) / _SIGMA**2
    return logits, labels


def _reference(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 softmax and log-softmax along the last axis, with plain NumPy."""
    z = logits - np.max(logits, axis=-1, keepdims=True)
    ly = z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))
    return np.exp(ly), ly


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

    logits64, labels = make_batch(rows, classes, seed)
    x_host = logits64.astype(dtype)
    p_ref, ly_ref = _reference(x_host.astype(np.float64))
    idx = np.arange(rows)
    acc = float(np.mean(np.argmax(logits64, axis=1) == labels))
    loss_ref = float(-np.mean(ly_ref[idx, labels]))

    print(f"xpsoftmax {__version__} demo: softmax forward, backward and gradient checks", file=out)
    report("device", dev.name)
    report(
        "batch",
        f"{x_host.shape} {dtype} logits of a linear classifier on synthetic data, "
        f"accuracy {100 * acc:.1f} %, loss {loss_ref:.4f}",
    )

    # Forward.
    x = xp.asarray(x_host)
    y = softmax(x)
    ly = log_softmax(x)
    err_y, err_ly = _error(dev.to_host(y), p_ref), _error(dev.to_host(ly), ly_ref)
    report(
        "forward",
        f"softmax error {err_y:.1e}, log_softmax error {err_ly:.1e} (tolerance {tol:.0e})",
        passed(err_y, err_ly),
    )

    # Backward of the mean cross-entropy, through each function, against (p - onehot) / rows.
    grad_ref = p_ref.copy()
    grad_ref[idx, labels] -= 1.0
    grad_ref /= rows
    rows_d, labels_d = xp.asarray(idx), xp.asarray(labels)
    dly = xp.zeros_like(ly)
    dly[rows_d, labels_d] = -1.0 / rows  # d loss / d ly
    dy = xp.zeros_like(y)
    dy[rows_d, labels_d] = -1.0 / (rows * y[rows_d, labels_d])  # d loss / d y
    dx_log = log_softmax_backward(ly, dly)
    dx_soft = softmax_backward(y, dy)
    # Relative to 1 / rows, the largest an entry of this gradient can be: a batch the classifier
    # gets right with confidence has a far smaller gradient, below what float32 can resolve.
    err_log, err_soft = (
        _error(dev.to_host(dx_log), grad_ref, 1 / rows),
        _error(dev.to_host(dx_soft), grad_ref, 1 / rows),
    )
    report(
        "backward",
        f"cross-entropy gradient (p - onehot) / {rows}: via softmax_backward error "
        f"{err_soft:.1e}, via log_softmax_backward error {err_log:.1e}",
        passed(err_log, err_soft),
    )

    # Finite-difference checks on a small float64 slice, scaled to unit standard deviation: on
    # confident logits softmax saturates, its Jacobian vanishes and no check can tell a wrong one.
    part = logits64[: _SLICE[0], : _SLICE[1]]
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
    nbytes = x_host.nbytes
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
