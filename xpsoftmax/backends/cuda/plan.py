"""Launch planning for the CUDA kernels, in plain Python on shapes, strides and dtypes.

Nothing here imports CuPy or needs a device, so the tier choice and the row layouts are tested on
machines without a GPU (``tests/test_cupy_plan.py``); ``launch.py`` asks these functions and
launches what they answer.

Tiers for rows (see ``kernels/softmax.cu``): ``warp`` keeps the row in registers (up to 1024
elements, 512 for float64, 2048 for the unmasked float16/32 forward), ``block`` caches it in
shared memory, ``split`` spreads it over several cooperating blocks (``kernels/softmax_split.cu``).
Rows without a mask take the ``*_plain`` kernels of the first two tiers (float16/32).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from . import specs

__all__ = [
    "Strided",
    "Tier",
    "choose_strided",
    "choose_tier",
    "grid",
    "merge_dims",
    "split_chunks",
    "vectorizable",
    "xent_block",
]

#: Longest row (elements) for the register tier, per dtype.
WARP_MAX = {"float16": 1024, "float32": 1024, "float64": 512}
#: ... and for the unmasked forward kernels, which hold longer rows (specs.WARP_PACKS_PLAIN_FWD).
WARP_MAX_PLAIN_FWD = {"float16": 2048, "float32": 2048}
#: Shared memory the block tier leaves free below the device's opt-in limit (static arrays, slack).
#: Rows whose cached arrays fit go to the block tier: the tier sweep in benchmarks/gpu_tune.py
#: showed it at 2.5 TB/s and more up to 128 KiB rows on an H200, against about 1 TB/s for the
#: split-row path that cached rows across cooperating blocks (since replaced).
BLOCK_SMEM_SLACK = 4 * 1024
#: Bytes of one split-row chunk (one block's share of a row per item). 32 KiB chunks gave each
#: block too little work between its reductions: about 2 TB/s of traffic on an H200.
SPLIT_CHUNK_BYTES = 128 * 1024
#: Grids: the occupancy API's full-device grid times this many waves, at most.
WAVES = 16
SPLIT_BLOCK = 512
STRIDED_BLOCK = 512
#: Shared memory the strided tier leaves free below the opt-in limit: the kernels' static arrays
#: (up to about 8 KiB, ``red_m``/``red_s``/``fin`` of kernels/softmax.cu) with room to spare, and
#: the 1 KiB the hardware reserves a block.
STRIDED_SMEM_RESERVE = 16 * 1024 + 1024


def merge_dims(shape: tuple[int, ...], strides: tuple[int, ...]) -> int | None:
    """One stride that walks all of ``shape`` in C order, or None when there is none.

    ``strides`` are in elements. Dimensions of size 1 never matter; an empty ``shape`` merges
    to stride 0.
    """
    dims = [(n, s) for n, s in zip(shape, strides, strict=True) if n != 1]
    if not dims:
        return 0
    for (_, s_outer), (n_inner, s_inner) in zip(dims, dims[1:], strict=False):
        if s_outer != s_inner * n_inner:
            return None
    return dims[-1][1]


@dataclass(frozen=True)
class Tier:
    """A launch choice for rows of length ``n``."""

    name: str  # "warp", "block", "split"
    lanes: int = 0
    packs: int = 0
    block: int = 0
    smem: int = 0


def _pad16(b: int) -> int:
    return (b + 15) & ~15


@functools.lru_cache(maxsize=1024)
def choose_tier(
    n: int, dtype: str, arrays: int, masked: bool, smem_limit: int, forced: str | None = None
) -> Tier:
    """The tier for rows of ``n`` elements of ``dtype``.

    ``arrays`` is 1 for the forward kernels and 2 for backward/JVP (two inputs cached);
    ``forced`` names a tier to use wherever it can take the row (benchmarks and tests).
    """
    itemsize = np.dtype(dtype).itemsize
    vec = specs.VEC[dtype]
    row_bytes = arrays * _pad16(n * itemsize) + (n if masked else 0)
    warp_max, packs_list = WARP_MAX[dtype], specs.WARP_PACKS[dtype]
    if arrays == 1 and not masked and dtype in WARP_MAX_PLAIN_FWD:
        warp_max = WARP_MAX_PLAIN_FWD[dtype]
        packs_list = (*packs_list, *specs.WARP_PACKS_PLAIN_FWD[dtype])
    if forced in (None, "warp") and n <= warp_max:
        packs_needed = -(-n // vec)
        if packs_needed <= 16:
            lanes = next(lanes for lanes in (*specs.WARP_LANES, 32) if lanes >= packs_needed)
            return Tier("warp", lanes=lanes, packs=1)
        packs = next(p for p in packs_list if p * 32 >= packs_needed)
        return Tier("warp", lanes=32, packs=packs)
    fits_block = row_bytes + BLOCK_SMEM_SLACK <= smem_limit
    if fits_block and forced in (None, "block", "warp"):
        elems = -(-n // vec)
        block = 256 if elems <= 1024 else (512 if elems <= 4096 else 1024)
        return Tier("block", block=block, smem=row_bytes)
    return Tier("split", block=SPLIT_BLOCK)


def split_chunks(n: int, dtype: str) -> tuple[int, int]:
    """Split-row plan for rows of ``n``: (chunk elements, chunks a row).

    A chunk is a whole number of 16-byte packs, so every chunk of an aligned row starts aligned.
    """
    v = specs.VEC[dtype]
    chunk = max(v, (SPLIT_CHUNK_BYTES // np.dtype(dtype).itemsize) // v * v)
    return chunk, -(-n // chunk)


def vectorizable(ptr: int, ld: int, itemsize: int) -> bool:
    """Whether rows at ``ptr`` with a stride of ``ld`` elements allow 16-byte packs."""
    return ptr % 16 == 0 and (ld * itemsize) % 16 == 0


@dataclass(frozen=True)
class Strided:
    """A launch choice for the strided tier (softmax over a middle axis)."""

    cached: bool  # the tile is kept in shared memory (one read of the input)
    smem: int  # dynamic shared memory of a block (0 when not cached)
    width: int  # inner positions of one tile (32 bytes of them)


def choose_strided(
    n: int, itemsize: int, arrays: int, masked: bool, smem_limit: int, forced: str | None = None
) -> Strided:
    """The strided plan for ``(outer, n, inner)``: cache the ``n x width`` tile of each input
    (and its mask bytes) when it fits with :data:`STRIDED_SMEM_RESERVE` to spare, else read twice
    (also when the benchmarks force the ``split`` tier)."""
    width = 32 // itemsize
    smem = arrays * _pad16(n * width * itemsize) + (n * width if masked else 0)
    cached = smem + STRIDED_SMEM_RESERVE <= smem_limit and forced != "split"
    return Strided(cached, smem if cached else 0, width)


def grid(items: int, full_device: int, waves: int = WAVES) -> int:
    """Blocks of a grid-stride loop over ``items``: at most ``waves`` device-filling grids."""
    return max(1, min(items, waves * full_device))


def xent_block(n: int) -> int:
    """Threads of a cross-entropy block for rows of ``n`` classes (whole warps, at most 256)."""
    return 32 if n <= 128 else 64 if n <= 512 else 128 if n <= 2048 else 256
