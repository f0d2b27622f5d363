"""The CuPy side without a GPU: the module imports, and its planning picks kernels that exist.

CuPy installs and imports on machines without a GPU (CI), so everything up to the first device
call is checked here: the tier choice for every row length, that each choice names a template
instantiation the compile check covers, that a register-tier row fits its lanes and packs, that a
block-tier row fits the shared memory it asks for, stride merging, and the split-row chunking.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cupy", reason="the CuPy-side modules need CuPy installed")

from xpsoftmax.backends.cuda import (
    launch,  # noqa: E402
    specs,  # noqa: E402
)
from xpsoftmax.backends.cuda import plan as _cupy  # noqa: E402

SMEM_H100 = 227 * 1024  # cudaDevAttrMaxSharedMemoryPerBlockOptin on Hopper
SMEM_A100 = 163 * 1024
LENGTHS = sorted(
    {*range(1, 140), *(2**k + d for k in range(7, 21) for d in (-1, 0, 1)), 1000, 4096, 65537}
)
DTYPES = ("float16", "float32", "float64")


@pytest.mark.parametrize("smem", [SMEM_H100, SMEM_A100])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("arrays", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_tier_choice_is_a_compiled_kernel_that_fits(dtype, arrays, masked, smem):
    names = set(specs.SOURCES["softmax.cu"])
    direction = "fwd" if arrays == 1 else "bwd"
    v = specs.VEC[dtype]
    itemsize = np.dtype(dtype).itemsize
    seen = []
    for n in LENGTHS:
        tier = _cupy.choose_tier(n, dtype, arrays, masked, smem)
        seen.append(tier.name)
        row_bytes = arrays * (-(-n * itemsize // 16) * 16) + (n if masked else 0)
        if tier.name == "warp":
            plain_fwd = arrays == 1 and not masked and dtype in _cupy.WARP_MAX_PLAIN_FWD
            assert n <= (_cupy.WARP_MAX_PLAIN_FWD if plain_fwd else _cupy.WARP_MAX)[dtype]
            assert specs.warp_name(direction, dtype, tier.lanes, tier.packs, masked) in names
            assert tier.lanes * tier.packs * v >= n, (n, tier)  # the row fits the registers
        elif tier.name == "block":
            assert specs.block_name(direction, dtype, tier.block, masked) in names
            assert tier.smem == row_bytes
            assert tier.smem + _cupy.BLOCK_SMEM_SLACK <= smem
        else:
            assert tier.name == "split"
            assert row_bytes + _cupy.BLOCK_SMEM_SLACK > smem  # only rows no block can cache
    # Tiers only move up as rows get longer: warp, then block, then split.
    order = {"warp": 0, "block": 1, "split": 2}
    ranks = [order[t] for t in seen]
    assert ranks == sorted(ranks)
    assert seen[0] == "warp" and seen[-1] == "split"


@pytest.mark.parametrize("forced", ["warp", "block", "split"])
def test_forced_tier_applies_where_it_can_take_the_row(forced):
    assert _cupy.choose_tier(100, "float32", 1, False, SMEM_H100, forced).name == forced
    # The register tier cannot hold 10000 elements: forcing it falls back to the block tier.
    expected = "block" if forced == "warp" else forced
    assert _cupy.choose_tier(10_000, "float32", 1, False, SMEM_H100, forced).name == expected
    # Nor can a block hold a million: only the split-row tier can.
    assert _cupy.choose_tier(1 << 20, "float32", 1, False, SMEM_H100, forced).name == "split"


def test_split_names_and_chunks():
    split_names = set(specs.SOURCES["softmax_split.cu"])
    for dtype in DTYPES:
        v = specs.VEC[dtype]
        for direction in ("fwd", "bwd"):
            for phase in ("part", "apply"):
                assert specs.split_name(direction, phase, dtype) in split_names
        for n in (1, v, v + 1, 65537, 1 << 20, 3 * (1 << 20) + 5):
            chunk, count = _cupy.split_chunks(n, dtype)
            assert chunk % v == 0 and chunk > 0  # chunks start on 16-byte boundaries
            assert (count - 1) * chunk < n <= count * chunk  # every element, no empty chunk
            assert chunk * np.dtype(dtype).itemsize <= _cupy.SPLIT_CHUNK_BYTES


def test_strided_names_exist():
    names = set(specs.SOURCES["softmax.cu"])
    for dtype in DTYPES:
        for direction in ("fwd", "bwd"):
            for cached in (True, False):
                assert specs.strided_name(direction, dtype, cached) in names


@pytest.mark.parametrize(
    ("shape", "strides", "expected"),
    [
        ((3, 4), (4, 1), 1),  # C order: one stride walks both
        ((3, 4), (8, 1), None),  # padded rows
        ((3, 4), (0, 0), 0),  # broadcast from a scalar
        ((3, 4), (0, 1), None),  # broadcast along rows only
        ((3, 1, 4), (4, 99, 1), 1),  # size-1 dimensions never matter
        ((), (), 0),
        ((5,), (-2,), -2),  # a reversed view is still one stride
    ],
)
def test_merge_dims(shape, strides, expected):
    assert _cupy.merge_dims(shape, strides) == expected


def test_takes_the_kernel_dtypes_only():
    assert all(launch.kernel_dtype(np.dtype(d), "auto") for d in DTYPES)
    assert not launch.kernel_dtype(np.dtype(np.longdouble), "auto")
    with pytest.raises(TypeError, match="float16/32/64"):
        launch.kernel_dtype(np.dtype(np.longdouble), "always")


@pytest.mark.parametrize(("dtype", "packs"), [("float16", 8), ("float32", 16)])
def test_unmasked_forward_rows_of_2048_stay_in_registers(dtype, packs):
    # Only the unmasked forward kernels hold 2048 elements a row in registers; the masked and
    # the backward ones would spill there and use the block tier.
    assert _cupy.choose_tier(2048, dtype, 1, False, SMEM_H100) == _cupy.Tier("warp", 32, packs)
    assert _cupy.choose_tier(2049, dtype, 1, False, SMEM_H100).name == "block"
    assert _cupy.choose_tier(2048, dtype, 1, True, SMEM_H100).name == "block"
    assert _cupy.choose_tier(2048, dtype, 2, False, SMEM_H100).name == "block"
    assert _cupy.choose_tier(1024, dtype, 2, True, SMEM_H100).name == "warp"


@pytest.mark.parametrize("smem", [SMEM_H100, SMEM_A100])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arrays", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_strided_caches_a_tile_only_when_it_fits_with_the_reserve(smem, dtype, arrays, masked):
    itemsize = np.dtype(dtype).itemsize
    width = 32 // itemsize
    for n in (*range(1, 70), 1000, 2000, 3000, 3500, 5000, 7000, 20000):
        choice = _cupy.choose_strided(n, itemsize, arrays, masked, smem)
        tile = arrays * (-(-n * 32 // 16) * 16) + (n * width if masked else 0)
        assert choice.width == width
        assert choice.cached == (tile + 17 * 1024 <= smem), n
        assert choice.smem == (tile if choice.cached else 0)
        # the static arrays of the strided kernels (at most 8256 bytes, ptxas) always fit beside
        assert choice.smem + 8256 + 1024 <= smem
    assert not _cupy.choose_strided(4, itemsize, arrays, masked, smem, forced="split").cached


def test_grid_sizes():
    assert _cupy.grid(1, 132) == 1
    assert _cupy.grid(10**9, 132) == 132 * _cupy.WAVES
    assert _cupy.grid(10**9, 132, waves=1) == 132
    assert _cupy.grid(0, 132) == 1


def test_cross_entropy_blocks_are_whole_warps_growing_with_the_classes():
    blocks = [_cupy.xent_block(n) for n in (1, 128, 129, 512, 513, 2048, 2049, 10**6)]
    assert blocks == [32, 32, 64, 64, 128, 128, 256, 256]


@pytest.mark.parametrize(
    ("ptr", "ld", "itemsize", "ok"),
    [
        (0x1000, 4, 4, True),
        (0x1004, 4, 4, False),
        (0x1000, 5, 4, False),
        (0x1000, 8, 2, True),
        (0x1000, 2, 8, True),
        (0x1000, 3, 8, False),
    ],
)
def test_vectorizable(ptr, ld, itemsize, ok):
    assert _cupy.vectorizable(ptr, ld, itemsize) is ok
