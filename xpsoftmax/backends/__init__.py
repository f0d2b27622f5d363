"""The backends, one protocol, one registry: :func:`run` sends a validated call to the first
backend that takes it.

Every backend is a module with two functions (the :class:`Backend` protocol):

* ``takes(call) -> bool``: whether it runs this call (operation, dtype, layout, kernel mode);
  it may raise where the kernel mode is ``"always"`` and a GPU input cannot run on the kernels;
* ``run(call) -> array``: the result; it may write into ``call.out`` (and return it) or return
  a new array, which :func:`run` then copies into ``out``;
* optionally ``CASTS = True``: it takes calls whose ``dtype=`` upcast is still to be done
  (:attr:`~xpsoftmax._call.Call.cast`), fused into its pass; the others get the arrays cast.

The registry, tried in order; each entry first asks a cheap question of the array's type, so a
backend's module (and its framework: CuPy, torch) is imported only when an array of its kind
arrives (as einops and array-api-compat do, from ``sys.modules``):

========== =================================== ==================================================
backend    module                              takes
========== =================================== ==================================================
numpy      ``backends/numpy``                  NumPy float16/32/64, the softmax family
dask       ``backends/dask/``                  Dask arrays, the softmax family (split axes too)
cupy       ``backends/cuda/launch.py``         CuPy float16/32/64: the fused kernels of kernels/
torch-cuda ``backends/cuda/torch_bridge.py``   CUDA tensors, to the same kernels through DLPack
torch-cpu  ``backends/torch_cpu.py``           CPU tensors, the softmax family: the NumPy
                                               backend's kernels as torch custom ops
generic    ``backends/generic``                everything: the pure array-API reference
========== =================================== ==================================================

A new backend is a module with ``takes`` and ``run`` and a row in :data:`REGISTRY`; a new
operation is an :class:`~xpsoftmax._call.Op`, a public function in ``ops/`` and a branch in the
``run`` of each backend that takes it (at least ``generic``).
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from .. import _compat
from .._call import Call, XentCall, finish, is_empty

__all__ = ["REGISTRY", "Backend", "run", "select"]


class Backend(Protocol):
    """What every backend module provides."""

    def takes(self, call: Call | XentCall) -> bool: ...

    def run(self, call: Call | XentCall) -> Any: ...


#: (name, module relative to this package, the ``_compat`` test of the first array's type, or
#: None for every array).
REGISTRY: tuple[tuple[str, str, str | None], ...] = (
    ("numpy", ".numpy", "is_numpy_array"),
    ("dask", ".dask", "is_dask_array"),
    ("cupy", ".cuda.launch", "is_cupy_array"),
    ("torch-cuda", ".cuda.torch_bridge", "is_torch_cuda_array"),
    ("torch-cpu", ".torch_cpu", "is_torch_cpu_array"),
    ("generic", ".generic", None),
)

_modules: dict[str, ModuleType] = {}


def _module(path: str) -> ModuleType:
    m = _modules.get(path)
    if m is None:
        m = _modules[path] = importlib.import_module(path, __name__)
    return m


def select(call: Call | XentCall) -> tuple[str, Backend]:
    """The name and module of the backend that runs ``call``."""
    x = call.lead
    for name, path, kind in REGISTRY:
        if kind is None or getattr(_compat, kind)(x):
            backend = _module(path)
            if backend.takes(call):
                return name, backend  # type: ignore[return-value]
    raise AssertionError("the generic backend takes every call")  # pragma: no cover


def _empty(call: Call) -> Any:
    """The result of a call without elements: empty, or ``-inf`` for a ``logsumexp`` whose
    rows are empty (the log of an empty sum)."""
    shape = call.shape
    if call.op.kind == "lse" and not is_empty(shape):
        r = call.xp.full(shape, -math.inf, dtype=call.dtype, device=_compat.device(call.x))
        return finish(r, call.out)
    if call.out is not None:
        return call.out
    return call.xp.empty(shape, dtype=call.dtype, device=_compat.device(call.x))


def _cast(call: Call) -> Call:
    """``call`` with its arrays cast to the result dtype (for a backend that does not fuse it)."""
    xp = call.xp
    return call.derive(arrays=tuple(xp.astype(a, call.dtype) for a in call.arrays), cast=False)


def run(call: Call | XentCall) -> Any:
    """Run ``call`` on its backend; the result is in ``call.out`` when one was given."""
    if call.empty:
        return _empty(call)  # type: ignore[arg-type]
    with np.errstate(all="ignore"):
        # (NumPy-backed namespaces, such as array-api-strict, warn on inf - inf and 0 * inf;
        # the special rows are handled, so those warnings would only be noise.)
        backend = select(call)[1]
        if getattr(call, "cast", False) and not getattr(backend, "CASTS", False):
            # dtype= asked for an upcast that this backend does not fuse: cast first.
            call = _cast(call)  # type: ignore[arg-type]
            backend = select(call)[1]
        return finish(backend.run(call), call.out)
