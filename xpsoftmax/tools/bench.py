"""``xpsoftmax bench``: a short benchmark table of softmax and its backward on this machine.

For float32 inputs at two shapes (rows of 1024 and of 32768 classes, ``elements`` in all), it
times, in one process:

* forward: :func:`xpsoftmax.softmax`, the plain formula ``e = exp(x - max); e / sum(e)`` and
  :func:`scipy.special.softmax` when SciPy is installed;
* backward: :func:`xpsoftmax.softmax_backward` and the formula ``y * (dy - sum(y * dy))``;

with NumPy on the CPU, and with CuPy on the GPU when one is present (xpsoftmax's fused kernels
against the formula in CuPy). A time is the best of ``repeat`` runs after one warm-up run; GB/s
is the bytes a function must read and write over that time. Every result is checked against
the formula in float64 on the host. The longer, dated reports are made by ``benchmarks/``.
"""

from __future__ import annotations

import datetime
import importlib.util
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import numpy as np

from .. import __version__
from . import devices

__all__ = ["MIN_ELEMENTS", "run", "shapes"]

MIN_ELEMENTS = 1024
CLASSES = (1024, 32768)
#: The largest error allowed, relative to the largest reference entry (float32 results).
TOLERANCE = 1e-5


def shapes(elements: int) -> list[tuple[int, int]]:
    """The ``(rows, classes)`` shapes for ``elements``: rows of 1024 and of 32768 classes."""
    out: list[tuple[int, int]] = []
    for classes in CLASSES:
        n = min(classes, elements)
        shape = (elements // n, n)
        if shape not in out:
            out.append(shape)
    return out


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return (
        f"{model}, {devices.available_cpus()} of {os.cpu_count()} CPUs usable, {platform.system()} "
        f"{platform.release()} {platform.machine()}, Python {sys.version.split()[0]}"
    )


def _versions(cupy: Any | None) -> str:
    parts = [f"NumPy {np.__version__}"]
    if importlib.util.find_spec("scipy") is not None:
        import scipy

        parts.append(f"SciPy {scipy.__version__}")
    if cupy is not None:
        parts.append(devices.gpu_name(cupy))
    return ", ".join(parts)


def _reference(x: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 softmax of ``x``, it rounded to float32 (the backward's ``y``), and the VJP."""
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    y = p.astype(np.float32)
    y64, dy64 = y.astype(np.float64), dy.astype(np.float64)
    return p, y, y64 * (dy64 - (y64 * dy64).sum(axis=-1, keepdims=True))


def _calls(xp: Any, x: Any, y: Any, dy: Any, gpu: bool) -> dict[str, dict[str, Callable]]:
    """op -> implementation -> a call without arguments."""
    import xpsoftmax

    def formula_forward() -> Any:
        e = xp.exp(x - xp.max(x, axis=-1, keepdims=True))
        return e / xp.sum(e, axis=-1, keepdims=True)

    forward = {"xpsoftmax": lambda: xpsoftmax.softmax(x), "formula": formula_forward}
    if not gpu and importlib.util.find_spec("scipy") is not None:
        import scipy.special

        forward["scipy"] = lambda: scipy.special.softmax(x, axis=-1)
    backward = {
        "xpsoftmax": lambda: xpsoftmax.softmax_backward(y, dy),
        "formula": lambda: y * (dy - xp.sum(y * dy, axis=-1, keepdims=True)),
    }
    return {"forward": forward, "backward": backward}


def _best(fn: Callable[[], Any], sync: Callable[[], None], repeat: int) -> tuple[float, Any]:
    result = fn()  # warm-up: caches, kernel compilation
    sync()
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, result


def _error(result: Any, ref: np.ndarray, to_host: Callable[[Any], np.ndarray]) -> float:
    diff = np.abs(to_host(result).astype(np.float64) - ref)
    return float(np.max(diff) / np.max(np.abs(ref))) if np.all(np.isfinite(diff)) else math.nan


def run(
    *,
    elements: int = 2**22,
    repeat: int = 5,
    device: str = "auto",
    seed: int = 0,
    stream: TextIO | None = None,
) -> bool:
    """Print the benchmark table to ``stream`` (stdout); return True when every result is right.

    Parameters
    ----------
    elements : int, optional
        Elements of each input array, at least :data:`MIN_ELEMENTS` (default ``2**22``).
    repeat : int, optional
        Timed runs per function; the best is reported (default 5).
    device : {"auto", "cpu", "gpu"}, optional
        ``"auto"`` (default): the CPU, and the GPU when CuPy sees one; ``"gpu"`` raises
        ``RuntimeError`` without one.
    seed : int, optional
        Seed of the random inputs.
    stream : file, optional
        Where to print (default ``sys.stdout``).

    Returns
    -------
    bool
        True when every function's result is within ``1e-5`` (relative to the largest entry)
        of the float64 reference.

    Examples
    --------
    >>> import io
    >>> from xpsoftmax.tools import bench
    >>> bench.run(elements=1024, repeat=1, device="cpu", stream=io.StringIO())
    True
    """
    if elements < MIN_ELEMENTS:
        msg = f"elements must be at least {MIN_ELEMENTS}, got {elements}"
        raise ValueError(msg)
    if device not in devices.CHOICES:
        msg = f"device must be 'auto', 'cpu' or 'gpu', got {device!r}"
        raise ValueError(msg)
    out = sys.stdout if stream is None else stream
    cupy = devices.pick_gpu(device)
    where = [] if device == "gpu" else ["CPU"]
    if cupy is not None:
        where.append("GPU")
    now = datetime.datetime.now().astimezone()
    print(f"xpsoftmax {__version__} bench, {now:%Y-%m-%d %H:%M %Z}", file=out)
    print(f"machine: {_machine()}", file=out)
    print(f"libraries: {_versions(cupy)}", file=out)
    print(
        f"float32, last axis, best of {repeat} runs; GB/s: bytes read and written per second; "
        "relative: time over xpsoftmax's; error: vs float64",
        file=out,
    )
    header = ("device", "op", "shape", "impl", "ms", "GB/s", "relative", "error", "")
    widths = (6, 8, 13, 9, 9, 7, 8, 8, 4)
    line = "  ".join(f"{h:<{w}}" for h, w in zip(header, widths, strict=True))
    print(line.rstrip(), file=out)
    ok = True
    rng = np.random.default_rng(seed)
    for shape in shapes(elements):
        x = (3 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        dy = rng.standard_normal(shape, dtype=np.float32)
        p, y, dx = _reference(x, dy)
        refs = {"forward": p, "backward": dx}
        size = x.nbytes
        for name in where:
            if name == "GPU":
                xp, sync, to_host = cupy, cupy.cuda.Device().synchronize, cupy.asnumpy
                arrays = (cupy.asarray(x), cupy.asarray(y), cupy.asarray(dy))
            else:
                xp, sync, to_host = np, lambda: None, np.asarray
                arrays = (x, y, dy)
            for op, impls in _calls(xp, *arrays, gpu=name == "GPU").items():
                moved = (2 if op == "forward" else 3) * size
                base = None
                for impl, fn in impls.items():
                    seconds, result = _best(fn, sync, repeat)
                    base = seconds if base is None else base
                    error = _error(result, refs[op], to_host)
                    good = error <= TOLERANCE
                    ok &= good
                    cells = (
                        name,
                        op,
                        str(shape).replace(" ", ""),
                        impl,
                        f"{seconds * 1e3:.3f}",
                        f"{moved / seconds / 1e9:.2f}",
                        f"{seconds / base:.2f}",
                        f"{error:.1e}",
                        "ok" if good else "FAIL",
                    )
                    row = "  ".join(f"{c:<{w}}" for c, w in zip(cells, widths, strict=True))
                    print(row.rstrip(), file=out)
    return ok
