"""The facts about dtypes, in one table: C type, compute dtype, pack width, which kernels exist.

A new floating dtype is a row in :data:`TABLE` (plus its kernel instantiations, which
``backends/cuda/specs.py`` derives from this table). Every backend asks this module, never a list
of its own:

* :func:`compute_dtype` is the one statement of the rule "half precision computes in float32";
* :data:`TABLE` lists the dtypes the fused kernels (CUDA, and the blocked NumPy path) take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["TABLE", "DType", "compute_dtype", "kernel_dtype", "np_compute_dtype"]


@dataclass(frozen=True)
class DType:
    """One floating dtype the kernels take.

    Attributes
    ----------
    name : str
        The NumPy / CuPy / torch dtype name.
    char : str
        NumPy's ``dtype.char`` (a cheap key on the hot path; ``dtype.name`` is a slow property).
    ctype : str
        The CUDA C++ type of the kernels' template argument.
    compute : str
        The dtype the arithmetic runs in: float32 for half precision, else the dtype itself.
    vec : int
        Elements in one 16-byte pack (vectorized loads and stores).
    plain : bool
        Whether unmasked rows take the ``*_plain`` CUDA kernels (float64 does not: its plain
        512-element warp rows spill, because its ``exp`` is in software).
    """

    name: str
    char: str
    ctype: str
    compute: str
    vec: int
    plain: bool


TABLE: dict[str, DType] = {
    "float16": DType("float16", "e", "__half", "float32", 8, plain=True),
    "float32": DType("float32", "f", "float", "float32", 4, plain=True),
    "float64": DType("float64", "d", "double", "float64", 2, plain=False),
}

_BY_CHAR = {d.char: d for d in TABLE.values()}
_NP_COMPUTE = {np.dtype(d.name): np.dtype(d.compute) for d in TABLE.values()}


def kernel_dtype(dtype: Any) -> DType | None:
    """The table row of a NumPy/CuPy dtype (by ``dtype.char``, cheap) or of another library's
    dtype (by name: ``torch.float32``), or None when the kernels do not take it."""
    if isinstance(dtype, np.dtype):
        return _BY_CHAR.get(dtype.char)
    return TABLE.get(str(dtype).rsplit(".", 1)[-1])


_FLOAT32 = np.dtype(np.float32)


def np_compute_dtype(dtype: np.dtype) -> np.dtype:
    """:func:`compute_dtype` for a NumPy dtype of the table, or ``ml_dtypes.bfloat16`` (no
    namespace needed)."""
    ct = _NP_COMPUTE.get(dtype)
    if ct is not None:
        return ct
    if dtype.name == "bfloat16":
        return _FLOAT32
    raise KeyError(dtype)


def compute_dtype(xp: Any, dtype: Any) -> Any:
    """float32 for float16 and bfloat16, the dtype itself otherwise (in namespace ``xp``)."""
    return xp.float32 if xp.finfo(dtype).bits < 32 else dtype
