"""Settings: the kernel mode, the GPU tuning knob, and the CPU threads, each read in one place.

The kernel mode and the GPU tuning live in :class:`contextvars.ContextVar` objects, as NumPy's
``errstate`` and :mod:`decimal`'s context do: :func:`set_kernels` and ``with kernels(...)`` change
them for the current thread (and the asyncio tasks it starts), never for other threads, so two
threads (or two Dask tasks) cannot switch each other's kernels. Every new thread starts from the
environment's default. The mode in effect is read once per public call, when the call is
validated (:class:`xpsoftmax._call.Call` holds it), so lazy Dask graphs apply the mode of the call
that built them, whichever thread computes them later.

Environment variables (the defaults of every thread):

* ``XPSOFTMAX_KERNELS=auto|always|never``: the kernel mode, read at import;
* ``XPSOFTMAX_FORCE_TIER=warp|block|split``: the GPU tier for benchmarks, read at import;
* ``XPSOFTMAX_NUM_THREADS=N``, ``XPSOFTMAX_NUMPY_FAST=0|1`` and ``XPSOFTMAX_CPU=compiled|numpy``:
  the NumPy path, read at every call.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "KERNELS_ENV",
    "available_cpus",
    "cpu_path",
    "get_kernels",
    "gpu_tuning",
    "kernels",
    "num_threads",
    "numpy_fast",
    "set_kernels",
    "tuning",
]

KERNELS_ENV = "XPSOFTMAX_KERNELS"
_MODES = ("auto", "always", "never")
_FAST_ENV = "XPSOFTMAX_NUMPY_FAST"
_THREADS_ENV = "XPSOFTMAX_NUM_THREADS"
_CPU_ENV = "XPSOFTMAX_CPU"
_CPU_PATHS = ("compiled", "numpy")
_TIERS = ("warp", "block", "split")

# The environment's mode, checked when it is used, so that a bad value is an error on every call
# rather than at import.
_DEFAULT_MODE = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
_mode: contextvars.ContextVar[str] = contextvars.ContextVar("xpsoftmax_kernels")


def _check_mode(mode: object, source: str) -> str:
    if mode not in _MODES:
        msg = f"{source} must be one of {', '.join(map(repr, _MODES))}, got {mode!r}"
        raise ValueError(msg)
    return mode  # type: ignore[return-value]


def _current_mode() -> str:
    return _mode.get(_DEFAULT_MODE)


def get_kernels() -> str:
    """Return the kernel mode in effect: ``"auto"``, ``"always"`` or ``"never"``.

    Raises
    ------
    ValueError
        If ``XPSOFTMAX_KERNELS`` holds another value and no mode was set in code.
    """
    return _check_mode(_current_mode(), f"environment variable {KERNELS_ENV}")


def set_kernels(mode: str) -> str:
    """Choose between the fused CUDA kernels and the generic array-API path.

    The choice holds for the calling thread (a new thread starts from ``XPSOFTMAX_KERNELS``, or
    ``"auto"``); a Dask graph keeps the mode of the call that built it.

    Parameters
    ----------
    mode : {"auto", "always", "never"}
        ``"auto"`` (the default) sends CuPy arrays and PyTorch CUDA tensors of float16, float32
        or float64 to the kernels; ``"never"`` keeps every input on the generic path;
        ``"always"`` is ``"auto"`` that raises instead of using the generic path for a GPU input
        the kernels cannot take (for example a CUDA tensor when CuPy is not installed).
        Inputs on the CPU are not affected by this switch.

    Returns
    -------
    str
        The previous mode, so that it can be restored.

    Examples
    --------
    >>> import xpsoftmax
    >>> previous = xpsoftmax.set_kernels("never")
    >>> xpsoftmax.set_kernels(previous)
    'never'
    """
    previous = _current_mode()
    _mode.set(_check_mode(mode, "mode"))
    return previous


@contextlib.contextmanager
def kernels(mode: str) -> Iterator[None]:
    """Context manager form of :func:`set_kernels`: ``with xpsoftmax.kernels("never"): ...``."""
    token = _mode.set(_check_mode(mode, "mode"))
    try:
        yield
    finally:
        _mode.reset(token)


# --------------------------------------------------------------------------------------------
# the GPU tuning knob (benchmarks and tests)


@dataclass(frozen=True)
class Tuning:
    """How the CUDA backend picks kernels; the default is what the library ships.

    Attributes
    ----------
    tier : {None, "warp", "block", "split"}
        Force this tier wherever it can take the row (``"split"`` also sends middle-axis
        softmax to the uncached strided kernel); None lets the planner choose.
    plain : bool
        False sends unmasked rows to the masked kernels too (the kernels before the ``*_plain``
        ones existed), for side-by-side timing in one run.
    """

    tier: str | None = None
    plain: bool = True


def _tuning_from_env() -> Tuning:
    tier = os.environ.get("XPSOFTMAX_FORCE_TIER", "").strip() or None
    return Tuning(tier=tier if tier in _TIERS else None)


_DEFAULT_TUNING = _tuning_from_env()
_tuning: contextvars.ContextVar[Tuning] = contextvars.ContextVar("xpsoftmax_tuning")


def tuning() -> Tuning:
    """The GPU tuning in effect (see :func:`gpu_tuning`)."""
    return _tuning.get(_DEFAULT_TUNING)


@contextlib.contextmanager
def gpu_tuning(*, tier: str | None = None, plain: bool = True) -> Iterator[None]:
    """Force a GPU kernel tier (or the masked kernels) for a block of code: the one knob that
    benchmarks use, ``with xpsoftmax._config.gpu_tuning(tier="block"): ...``.

    Not public API: the shipped choice is the measured best; this exists to measure it.
    """
    if tier is not None and tier not in _TIERS:
        msg = f"tier must be None or one of {', '.join(map(repr, _TIERS))}, got {tier!r}"
        raise ValueError(msg)
    token = _tuning.set(Tuning(tier=tier, plain=bool(plain)))
    try:
        yield
    finally:
        _tuning.reset(token)


# --------------------------------------------------------------------------------------------
# CPUs and the NumPy path


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask on Linux, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def num_threads() -> int:
    """The number of threads a large NumPy call uses: ``XPSOFTMAX_NUM_THREADS`` or the CPUs."""
    value = os.environ.get(_THREADS_ENV, "").strip()
    if not value:
        return available_cpus()
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        msg = f"environment variable {_THREADS_ENV} must be a positive integer, got {value!r}"
        raise ValueError(msg)
    return n


def numpy_fast() -> bool:
    """Whether NumPy arrays take the fast NumPy path (``XPSOFTMAX_NUMPY_FAST``, default 1)."""
    value = os.environ.get(_FAST_ENV, "1").strip()
    if value not in ("0", "1", ""):
        msg = f"environment variable {_FAST_ENV} must be 0 or 1, got {value!r}"
        raise ValueError(msg)
    return value != "0"


def cpu_path() -> str:
    """The NumPy fast path asked for: ``"compiled"`` (the numba kernels, the default) or
    ``"numpy"`` (the blocked NumPy code), from ``XPSOFTMAX_CPU``.

    ``"compiled"`` falls back to ``"numpy"`` where numba is missing or cannot compile
    (``xpsoftmax info`` says which one runs).
    """
    value = os.environ.get(_CPU_ENV, "").strip().lower() or "compiled"
    if value not in _CPU_PATHS:
        msg = (
            f"environment variable {_CPU_ENV} must be one of "
            f"{', '.join(map(repr, _CPU_PATHS))}, got {value!r}"
        )
        raise ValueError(msg)
    return value
