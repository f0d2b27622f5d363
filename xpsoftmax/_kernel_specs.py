"""Which CUDA sources exist in ``kernels/`` and which template instantiations each one needs.

This module imports nothing heavy (no CuPy), so the compile check (``_kcheck``) can use it on a
machine with only ``nvcc``. ``_cupy`` uses the same lists as NVRTC ``name_expressions``, so the
compile check covers exactly what runs.
"""

from __future__ import annotations

#: CUDA C++ type name of each supported NumPy dtype name.
CTYPES = {"float16": "__half", "float32": "float", "float64": "double"}


def _rows_kernels() -> list[str]:
    names: list[str] = []
    for t in CTYPES.values():
        names.append(f"xps_scale<{t}>")
    return names


#: file name in ``kernels/`` -> list of name expressions (template instantiations) it must compile.
SOURCES: dict[str, list[str]] = {
    "softmax.cu": _rows_kernels(),
}
