"""Which CUDA sources exist in ``kernels/`` and which template instantiations each one needs.

This module imports nothing heavy (no CuPy), so the compile check (``_kcheck``) can use it on a
machine with only ``nvcc``. ``_cupy`` uses the same lists as NVRTC ``name_expressions``, so the
compile check covers exactly what runs.
"""

from __future__ import annotations

#: CUDA C++ type name of each supported NumPy dtype name.
CTYPES = {"float16": "__half", "float32": "float", "float64": "double"}


#: Elements in one 16-byte pack.
VEC = {"float16": 8, "float32": 4, "float64": 2}

#: Warp tier: threads per row for short rows (one pack a lane), and packs a lane at 32 lanes a row.
WARP_LANES = (1, 2, 4, 8, 16)
WARP_PACKS = {"float16": (1, 2, 4), "float32": (1, 2, 4, 8), "float64": (1, 2, 4, 8)}
#: Block tier block sizes.
BLOCK_SIZES = (256, 512, 1024)


def warp_name(direction: str, dtype: str, lanes: int, packs: int) -> str:
    return f"xps_{direction}_warp<{CTYPES[dtype]}, {lanes}, {packs}>"


def block_name(direction: str, dtype: str, block: int) -> str:
    return f"xps_{direction}_block<{CTYPES[dtype]}, {block}>"


def strided_name(direction: str, dtype: str, cached: bool) -> str:
    return f"xps_{direction}_strided<{CTYPES[dtype]}, {'true' if cached else 'false'}>"


def split_name(direction: str, phase: str, dtype: str) -> str:
    return f"xps_{direction}_{phase}<{CTYPES[dtype]}>"


def _softmax_kernels() -> list[str]:
    names: list[str] = []
    for d in ("fwd", "bwd"):
        for t in CTYPES:
            names += [warp_name(d, t, lanes, 1) for lanes in WARP_LANES]
            names += [warp_name(d, t, 32, p) for p in WARP_PACKS[t]]
            names += [block_name(d, t, b) for b in BLOCK_SIZES]
            names += [strided_name(d, t, c) for c in (True, False)]
    return names


def _split_kernels() -> list[str]:
    return [split_name(d, p, t) for d in ("fwd", "bwd") for p in ("part", "apply") for t in CTYPES]


#: file name in ``kernels/`` -> list of name expressions (template instantiations) it must compile.
SOURCES: dict[str, list[str]] = {
    "softmax.cu": _softmax_kernels(),
    "softmax_split.cu": _split_kernels(),
    "cross_entropy.cu": [f"xps_xent_{d}<{t}>" for d in ("fwd", "bwd") for t in CTYPES.values()],
}
