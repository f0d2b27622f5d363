"""The one place that imports array-api-compat.

Everything else in the package asks this module which namespace an array belongs to, so the
rules for telling backends apart live here. Like array-api-compat itself, the ``is_*`` checks look
at ``sys.modules`` and never import a framework the caller has not imported.
"""

from __future__ import annotations

import importlib.util
import sys

import array_api_compat
import numpy as np
from array_api_compat import (
    array_namespace,
    device,
    is_array_api_obj,
    is_array_api_strict_namespace,
    is_cupy_array,
    is_dask_array,
    is_jax_array,
    is_torch_array,
    size,
)

__all__ = [
    "array_api_compat",
    "array_namespace",
    "cupy_installed",
    "device",
    "is_array_api_obj",
    "is_array_api_strict_namespace",
    "is_cupy_array",
    "is_dask_array",
    "is_jax_array",
    "is_numpy_array",
    "is_torch_array",
    "is_torch_cpu_array",
    "is_torch_cuda_array",
    "is_writeable_array",
    "size",
]


def is_numpy_array(x: object) -> bool:
    """True for a NumPy array (array-api-compat's test, with the plain ``ndarray`` first: this
    runs on every call, and the exact type check costs a tenth of the general one)."""
    return type(x) is np.ndarray or array_api_compat.is_numpy_array(x)


def is_torch_cpu_array(x: object) -> bool:
    """True for a ``torch.Tensor`` that lives on the CPU."""
    return is_torch_array(x) and x.device.type == "cpu"  # type: ignore[attr-defined]


def is_torch_cuda_array(x: object) -> bool:
    """True for a ``torch.Tensor`` that lives on a CUDA device."""
    return is_torch_array(x) and x.device.type == "cuda"  # type: ignore[attr-defined]


def is_writeable_array(x: object) -> bool:
    """True when ``x[...] = value`` writes into ``x`` (NumPy, CuPy, torch, array-api-strict).

    JAX arrays are immutable and Dask arrays are lazy graphs, so neither can serve as ``out``.
    """
    if is_jax_array(x) or is_dask_array(x):
        return False
    if is_numpy_array(x):
        return bool(x.flags.writeable)  # type: ignore[attr-defined]
    return True


def cupy_installed() -> bool:
    """Whether CuPy can be imported (without importing it when it has not been yet)."""
    return "cupy" in sys.modules or importlib.util.find_spec("cupy") is not None
