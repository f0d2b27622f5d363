"""Which CUDA sources exist in ``kernels/`` and which template instantiations each one needs.

This module imports nothing heavy (no CuPy), so the compile check (``xpsoftmax.tools.kcheck``)
can use it on a machine with only ``nvcc``. ``loader`` compiles the same lists as NVRTC
``name_expressions``, so the compile check covers exactly what runs.
"""

from __future__ import annotations

from ..._dtypes import TABLE

#: CUDA C++ type name of each dtype the kernels take (from ``_dtypes.TABLE``).
CTYPES = {name: d.ctype for name, d in TABLE.items()}
#: Elements in one 16-byte pack.
VEC = {name: d.vec for name, d in TABLE.items()}

#: Warp tier: threads per row for short rows (one pack a lane), and packs a lane at 32 lanes a row.
WARP_LANES = (1, 2, 4, 8, 16)
WARP_PACKS = {"float16": (1, 2, 4), "float32": (1, 2, 4, 8), "float64": (1, 2, 4, 8)}
#: Longer rows that only the unmasked forward kernels hold in registers (2048 elements; the
#: backward's two rows, and the masked kernels' bookkeeping, would spill).
WARP_PACKS_PLAIN_FWD = {"float16": (8,), "float32": (16,)}
#: Block tier block sizes.
BLOCK_SIZES = (256, 512, 1024)


#: dtypes whose unmasked rows take the ``*_plain`` kernels (no per-element tests). float64 keeps
#: the masked kernels for every row: its plain 512-element warp rows spill (software exp).
PLAIN_DTYPES = tuple(name for name, d in TABLE.items() if d.plain)


def warp_name(direction: str, dtype: str, lanes: int, packs: int, masked: bool = True) -> str:
    """The register-tier kernel for rows with or without a mask."""
    kind = "warp" if masked or dtype not in PLAIN_DTYPES else "warp_plain"
    return f"xps_{direction}_{kind}<{CTYPES[dtype]}, {lanes}, {packs}>"


def block_name(direction: str, dtype: str, block: int, masked: bool = True) -> str:
    """The shared-memory-tier kernel for rows with or without a mask."""
    kind = "block" if masked or dtype not in PLAIN_DTYPES else "block_plain"
    return f"xps_{direction}_{kind}<{CTYPES[dtype]}, {block}>"


def strided_name(direction: str, dtype: str, cached: bool) -> str:
    return f"xps_{direction}_strided<{CTYPES[dtype]}, {'true' if cached else 'false'}>"


def split_name(direction: str, phase: str, dtype: str) -> str:
    return f"xps_{direction}_{phase}<{CTYPES[dtype]}>"


def _softmax_kernels() -> list[str]:
    names: list[str] = []
    for d in ("fwd", "bwd"):
        for t in CTYPES:
            for masked in (True, False) if t in PLAIN_DTYPES else (True,):
                names += [warp_name(d, t, lanes, 1, masked) for lanes in WARP_LANES]
                names += [warp_name(d, t, 32, p, masked) for p in WARP_PACKS[t]]
            if d == "fwd":
                names += [warp_name(d, t, 32, p, False) for p in WARP_PACKS_PLAIN_FWD.get(t, ())]
            for masked in (True, False) if t in PLAIN_DTYPES else (True,):
                names += [block_name(d, t, b, masked) for b in BLOCK_SIZES]
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
