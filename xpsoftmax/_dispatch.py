"""Which implementation runs for a given input: the generic path, the fast NumPy path or kernels.

The routing decision is one function, :func:`select`, so every public function routes the same
way. The choice of GPU kernels versus the generic path can be forced with the environment variable
``XPSOFTMAX_KERNELS=auto|always|never`` (read at import) or :func:`set_kernels`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from . import _compat

_MODES = ("auto", "always", "never")
_ENV = "XPSOFTMAX_KERNELS"


def _mode_from_env() -> str:
    value = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    return value


_mode = _mode_from_env()


def _check_mode(mode: object, source: str) -> str:
    if mode not in _MODES:
        msg = f"{source} must be one of {', '.join(map(repr, _MODES))}, got {mode!r}"
        raise ValueError(msg)
    return mode  # type: ignore[return-value]


def get_kernels() -> str:
    """Return the current kernel mode: ``"auto"``, ``"always"`` or ``"never"``."""
    return _check_mode(_mode, f"environment variable {_ENV}")


def set_kernels(mode: str) -> str:
    """Choose between the fused CUDA kernels and the generic array-API path.

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
    global _mode
    previous = _mode
    _mode = _check_mode(mode, "mode")
    return previous


@contextlib.contextmanager
def kernels(mode: str) -> Iterator[None]:
    """Context manager form of :func:`set_kernels`: ``with xpsoftmax.kernels("never"): ...``."""
    previous = set_kernels(mode)
    try:
        yield
    finally:
        set_kernels(previous)


def _cupy_importable() -> bool:
    if "cupy" in sys.modules:
        return True
    import importlib.util

    return importlib.util.find_spec("cupy") is not None


def select(x: Any, axes: tuple[int, ...] | None = None) -> ModuleType | None:
    """The module that takes ``x`` (the first array argument), or None for the generic path.

    ``axes`` (the normalized softmax axes) lets Dask arrays whose softmax axes are unsplit run
    block by block.

    The returned module has ``forward``, ``backward`` and ``jvp`` with the signatures of the
    functions in ``_generic`` plus an ``out`` argument.
    """
    mode = get_kernels()  # first, so that a bad XPSOFTMAX_KERNELS is an error on every input
    if _compat.is_numpy_array(x):
        # NumPy arrays take the cache-blocked, multi-threaded CPU path (XPSOFTMAX_NUMPY_FAST=0 off).
        from . import _numpy

        return _numpy if _numpy.takes(x) else None
    if axes is not None and _compat.is_dask_array(x):
        # Unsplit softmax axes: each block holds whole rows and goes through the public functions
        # (NumPy fast path or CuPy kernels per block); split axes need the generic reductions.
        from . import _dask

        return _dask if _dask.takes(x, axes) else None
    if mode == "never":
        return None
    if _compat.is_cupy_array(x):
        # CuPy arrays of the kernels' dtypes go to the fused kernels.
        from . import _cupy

        if _cupy.takes(x, always=mode == "always"):
            return _cupy
        return None
    if _compat.is_torch_cuda_array(x):
        # CUDA tensors reach the same kernels zero-copy through DLPack when CuPy is installed.
        if not _cupy_importable():
            if mode == "always":
                msg = (
                    f"{_ENV}=always but CuPy is not installed, so the kernels cannot run on "
                    "torch CUDA tensors; install the cuda12 or cuda13 extra"
                )
                raise RuntimeError(msg)
            return None
        from . import _torch_cuda

        if _torch_cuda.takes(x, always=mode == "always"):
            return _torch_cuda
        return None
    return None
