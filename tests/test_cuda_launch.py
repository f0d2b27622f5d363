"""The CUDA launch code on a machine without a GPU, through the recording CuPy stand-in.

``tests/_cupy_standin.py`` replaces CuPy: each launch is checked against the kernel's signature
parsed from ``kernels/*.cu``, against the limits of an H100 and of an A100, and for memory
safety, then emulated in float64 through the pointers and strides it was given. The public
functions run unchanged on top (the registry is narrowed to the CuPy backend, then generic), so
every result here is compared with float64 math written in this file or with torch; what the
GPU itself computes (rounding, +inf and NaN rows) is ``tests/test_gpu.py``'s.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _cupy_standin import DEVICES, DeviceArray, LaunchError, install, parse_signature, to_device
from _helpers import ref_softmax, tolerance

import xpsoftmax as xps
from xpsoftmax import _compat, _config, backends
from xpsoftmax.backends.cuda import launch, loader, torch_bridge
from xpsoftmax.backends.cuda.specs import SOURCES

_CUPY_FIRST = (("cupy", ".cuda.launch", "is_cupy_array"), ("generic", ".generic", None))
_TORCH_FIRST = (
    ("torch-cuda", ".cuda.torch_bridge", "is_torch_cuda_array"),
    ("generic", ".generic", None),
)


@pytest.fixture(params=sorted(DEVICES))
def gpu(request, monkeypatch):
    """The stand-in for one declared device, with device arrays routed to the CuPy backend."""
    standin = install(monkeypatch, request.param)
    monkeypatch.setattr(backends, "REGISTRY", _CUPY_FIRST)
    monkeypatch.setattr(_compat, "is_cupy_array", lambda x: isinstance(x, DeviceArray))
    return standin


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------
# float64 references (the kernels' math, written independently of the library)


def _keep(mask, shape):
    return np.ones(shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), shape)


def _axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axis = (axis,) if isinstance(axis, int) else axis
    return tuple(a % ndim for a in axis)


def _ref(op: str, a: np.ndarray, b: np.ndarray | None, axis, mask) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if op in ("softmax", "log_softmax"):
        return ref_softmax(a, axis, where=mask, log=op == "log_softmax")
    b = np.asarray(b, np.float64)
    keep = _keep(mask, a.shape)
    ax = _axes(axis, a.ndim)

    def total(v):
        return np.sum(np.where(keep, v, 0.0), axis=ax, keepdims=True)

    if op in ("softmax_backward", "softmax_jvp"):
        out = a * (b - total(a * b))
    elif op == "log_softmax_backward":
        out = b - np.exp(a) * total(b)
    else:  # log_softmax_jvp
        out = b - total(np.exp(a) * b)
    return np.where(keep, out, 0.0)


_OPS = (
    "softmax",
    "log_softmax",
    "softmax_backward",
    "log_softmax_backward",
    "softmax_jvp",
    "log_softmax_jvp",
)


def _inputs(op: str, shape, dtype, seed: int):
    rng = _rng(seed)
    a = rng.standard_normal(shape).astype(dtype)
    if op in ("softmax_backward", "softmax_jvp"):
        a = rng.uniform(0.0, 1.0, shape).astype(dtype)  # a probability-like y
    b = None if op in ("softmax", "log_softmax") else rng.standard_normal(shape).astype(dtype)
    return a, b


def _call(op, a, b, axis, mask, out=None):
    fn = getattr(xps, op)
    kw = {} if mask is None else {"where": mask}
    if out is not None:
        kw["out"] = out
    return fn(a, axis=axis, **kw) if b is None else fn(a, b, axis=axis, **kw)


def _check(op, a, b, axis, mask, got):
    assert isinstance(got, DeviceArray)
    want = _ref(op, a, b, axis, None if mask is None else np.asarray(mask))
    tol = tolerance(a.dtype)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **tol)


def _random_mask(shape, axis, seed):
    """A mask with at least one kept entry in every softmax row."""
    rng = _rng(seed)
    m = rng.random(shape) < 0.7
    ax = _axes(axis, len(shape))
    first = tuple(slice(0, 1) if i in ax else slice(None) for i in range(len(shape)))
    m[first] = True
    return m


# --------------------------------------------------------------------------------------------
# every tier, every op, both devices


# (shape, dtype, kernel family the launch must take on both devices)
_ROW_CASES = [
    ((7, 3), np.float32, "warp"),  # 1 lane a row
    ((5, 33), np.float32, "warp"),
    ((4, 100), np.float64, "warp"),
    ((3, 1000), np.float16, "warp"),
    ((2, 2000), np.float32, "warp"),  # 32 lanes x 16 packs: the unmasked forward only
    ((3, 5000), np.float32, "block"),
    ((2, 3000), np.float64, "block"),
]


@pytest.mark.parametrize("op", _OPS)
@pytest.mark.parametrize(("shape", "dtype", "tier"), _ROW_CASES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_rows_every_tier_matches_float64(gpu, op, shape, dtype, tier, masked):
    a, b = _inputs(op, shape, dtype, seed=1)
    mask = _random_mask(shape, -1, seed=2) if masked else None
    args = [to_device(a), None if b is None else to_device(b)]
    got = _call(op, args[0], args[1], -1, None if mask is None else to_device(mask))
    _check(op, a, b, -1, mask, got)
    kinds = {n.split("<")[0] for n in gpu.names}
    if tier == "warp" and shape[1] == 2000 and (masked or op != "softmax" and op != "log_softmax"):
        tier = "block"  # only the unmasked forward holds 2048-element rows in registers
    assert any(f"_{tier}" in k for k in kinds), gpu.names


@pytest.mark.parametrize("op", ["softmax", "log_softmax", "softmax_backward", "log_softmax_jvp"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_split_rows_match_float64(gpu, op, masked, dtype):
    """Rows over several chunks (forced split tier): two launches, partials in between."""
    n = 70000 if dtype != np.float64 else 40000  # three chunks of 128 KiB (two for float64)
    a, b = _inputs(op, (2, n), dtype, seed=3)
    mask = _random_mask((2, n), -1, seed=4) if masked else None
    with _config.gpu_tuning(tier="split"):
        got = _call(
            op,
            to_device(a),
            None if b is None else to_device(b),
            -1,
            None if mask is None else to_device(mask),
        )
    _check(op, a, b, -1, mask, got)
    assert [n.split("<")[0].rsplit("_", 1)[1] for n in gpu.names] == ["part", "apply"]


def test_rows_too_long_for_shared_memory_split_on_the_a100_only(gpu):
    """180 KB float32 rows: cached in a block on the H100 (227 KiB), split on the A100 (163 KiB)."""
    a, _ = _inputs("softmax", (2, 45000), np.float32, seed=5)
    got = xps.softmax(to_device(a))
    _check("softmax", a, None, -1, None, got)
    want = "block" if gpu.device.smem_optin > 200 * 1024 else "part"
    assert want in gpu.names[0], gpu.names


@pytest.mark.parametrize("op", _OPS)
@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((3, 50, 40), np.float32), ((2, 17, 5), np.float16), ((2, 9, 33), np.float64)],
)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_middle_axis_runs_the_strided_kernels(gpu, op, shape, dtype, masked):
    a, b = _inputs(op, shape, dtype, seed=6)
    mask = _random_mask(shape, 1, seed=7) if masked else None
    got = _call(
        op,
        to_device(a),
        None if b is None else to_device(b),
        1,
        None if mask is None else to_device(mask),
    )
    _check(op, a, b, 1, mask, got)
    assert gpu.names == [gpu.names[0]] and "_strided<" in gpu.names[0]
    assert gpu.names[0].endswith("true>")  # the tile fits in shared memory: cached


@pytest.mark.parametrize("op", ["softmax", "softmax_backward"])
def test_middle_axis_too_long_to_cache_reads_twice(gpu, op):
    """A tile of n x 32 bytes that does not fit, the static arrays and the reserve included."""
    dev = gpu.device
    arrays = 1 if op == "softmax" else 2
    n = (dev.smem_optin - 16 * 1024) // (32 * arrays)  # fits alone, not with the reserve
    a, b = _inputs(op, (1, n, 8), np.float32, seed=8)
    got = _call(op, to_device(a), None if b is None else to_device(b), 1, None)
    _check(op, a, b, 1, None, got)
    assert gpu.names[0].endswith("false>"), gpu.names


def test_the_strided_shared_memory_check_rejects_a_tile_past_the_limit(gpu, monkeypatch):
    """If the launch believed the device had more shared memory, the stand-in would refuse: the
    check that catches a dropped reserve (dynamic + static beyond the opt-in limit)."""
    dev = gpu.device
    n = (dev.smem_optin - 4 * 1024) // 32
    monkeypatch.setattr(loader, "max_dynamic_smem", lambda device=None: dev.smem_optin + 32 * 1024)
    a, _ = _inputs("softmax", (1, n, 8), np.float32, seed=9)
    with pytest.raises((LaunchError, ValueError), match="exceed"):
        xps.softmax(to_device(a), axis=1)


# --------------------------------------------------------------------------------------------
# layouts: strides, alignment, masks, out=, aliasing


def _layouts(a: np.ndarray):
    """(name, device view, the same values in NumPy) of one (rows, n) array in several layouts."""
    rows, n = a.shape
    wide = np.zeros((rows, n + 5), a.dtype)
    wide[:, 1 : n + 1] = a
    dw = to_device(wide)
    wide4 = np.zeros((rows, n + 8), a.dtype)
    wide4[:, :n] = a
    d4 = to_device(wide4)
    t = to_device(np.ascontiguousarray(a.T))
    lead = np.ascontiguousarray(a.reshape(2, rows // 2, n).transpose(1, 0, 2))
    dl = to_device(lead).transpose(1, 0, 2)
    return [
        ("c", to_device(a), a),
        ("row-stride-misaligned", dw[:, 1 : n + 1], a),
        ("row-stride-aligned", d4[:, :n], a),
        ("fortran", t.T, a),
        ("unmergeable-leading", dl, a.reshape(2, rows // 2, n)),
    ]


@pytest.mark.parametrize("op", _OPS)
@pytest.mark.parametrize("n", [6, 300, 5000])
def test_row_layouts(gpu, op, n):
    a, b = _inputs(op, (6, n), np.float32, seed=10)
    for (name, da, va), (_, db, vb) in zip(
        _layouts(a), _layouts(b if b is not None else a), strict=True
    ):
        got = _call(op, da, None if b is None else db, -1, None)
        _check(op, va, None if b is None else vb, -1, None, got)
        assert got.shape == va.shape, name


@pytest.mark.parametrize("op", ["softmax", "log_softmax_backward"])
@pytest.mark.parametrize(
    "mask_kind", ["row-broadcast", "column-broadcast", "transposed", "scalar-true"]
)
@pytest.mark.parametrize("n", [12, 3000, 70000])
def test_mask_layouts(gpu, op, mask_kind, n):
    rows = 4
    a, b = _inputs(op, (rows, n), np.float32, seed=11)
    rng = _rng(12)
    if mask_kind == "row-broadcast":
        m = rng.random((1, n)) < 0.6
        m[0, 0] = True
        dm = to_device(m)
    elif mask_kind == "column-broadcast":
        m = np.array([[True], [True], [True], [True]])
        dm = to_device(m)
    elif mask_kind == "transposed":
        m = _random_mask((rows, n), -1, seed=13)
        dm = to_device(np.ascontiguousarray(m.T)).T
    else:
        m = np.array(True)
        dm = to_device(m)
    got = _call(op, to_device(a), None if b is None else to_device(b), -1, dm)
    _check(op, a, b, -1, np.broadcast_to(m, a.shape), got)


@pytest.mark.parametrize("op", _OPS[:4])
@pytest.mark.parametrize("n", [40, 5000])
def test_out_and_aliasing(gpu, op, n):
    """out= of C order, out= strided, and out= the input itself (the alias fallback)."""
    a, b = _inputs(op, (4, n), np.float32, seed=14)
    want_in = a
    # a separate, C-contiguous out: the kernel writes it directly
    out = to_device(np.full(a.shape, 7.0, np.float32))
    got = _call(op, to_device(a), None if b is None else to_device(b), -1, None, out=out)
    assert got is out
    _check(op, a, b, -1, None, out)
    # a strided out (every other column of a wider array)
    wide = to_device(np.zeros((4, 2 * n), np.float32))
    got = _call(op, to_device(a), None if b is None else to_device(b), -1, None, out=wide[:, ::2])
    _check(op, a, b, -1, None, got)
    np.testing.assert_array_equal(np.asarray(wide[:, 1::2]), 0.0)
    # in place: out is the (first) input
    da = to_device(want_in)
    got = _call(op, da, None if b is None else to_device(b), -1, None, out=da)
    _check(op, a, b, -1, None, da)


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((2, 3, 4, 5), (1, 3)), ((3, 4, 5), None), ((4, 6, 1, 1), 1), ((5, 4), ()), ((), None)],
    ids=["two-axes", "all-axes", "trailing-ones", "no-axis", "0-d"],
)
@pytest.mark.parametrize("op", _OPS)
def test_axis_forms(gpu, op, shape, axis):
    a, b = _inputs(op, shape, np.float64, seed=15)
    mask = _random_mask(shape, axis, seed=16) if shape and axis != () else None
    got = _call(
        op,
        to_device(a),
        None if b is None else to_device(b),
        axis,
        None if mask is None else to_device(mask),
    )
    if axis == ():
        keep = np.ones(shape, bool)
        want = {"softmax": np.ones(shape), "log_softmax": np.zeros(shape)}.get(op)
        if want is None:  # one-element rows: the VJP/JVP formulas with n = 1
            want = _ref(op, a.reshape(*shape, 1), b.reshape(*shape, 1), -1, None).reshape(shape)
        np.testing.assert_allclose(
            np.asarray(got), np.where(keep, want, 0.0), rtol=1e-12, atol=1e-12
        )
        return
    _check(op, a, b, axis, mask, got)


# --------------------------------------------------------------------------------------------
# the fused cross-entropy kernels


def _xent_inputs(rows: int, n: int, dtype, seed: int, ignore: int | None = None):
    rng = _rng(seed)
    x = rng.standard_normal((rows, n)).astype(dtype)
    t = rng.integers(0, n, rows)
    if ignore is not None:
        t[::3] = ignore
    return x, t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("ignore", "smoothing"), [(None, 0.0), (-100, 0.0), (2, 0.1)])
@pytest.mark.parametrize(("n", "dtype"), [(10, np.float32), (700, np.float64), (3000, np.float16)])
def test_cross_entropy_kernels_match_torch(gpu, reduction, ignore, smoothing, n, dtype):
    rows = 7
    x, t = _xent_inputs(rows, n, dtype, seed=17, ignore=ignore)
    kw = {"reduction": reduction, "label_smoothing": smoothing}
    if ignore is not None:
        kw["ignore_index"] = ignore
    got = xps.cross_entropy(to_device(x), to_device(t), **kw)
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    tkw = {
        "reduction": reduction,
        "label_smoothing": smoothing,
        "ignore_index": -100 if ignore is None else ignore,
    }
    want = torch.nn.functional.cross_entropy(xt, torch.tensor(t), **tkw)
    tol = tolerance(dtype)
    np.testing.assert_allclose(np.asarray(got, np.float64), want.detach().numpy(), **tol)
    dloss = _rng(18).standard_normal(rows) if reduction == "none" else 0.75
    dx = xps.cross_entropy_backward(
        to_device(x), to_device(t), **kw, dloss=to_device(np.asarray(dloss, dtype))
    )
    (gx,) = torch.autograd.grad(want, xt, torch.tensor(dloss, dtype=torch.float64))
    np.testing.assert_allclose(np.asarray(dx, np.float64), gx.numpy(), **tol)
    assert [n.split("<")[0] for n in gpu.names] == ["xps_xent_fwd", "xps_xent_bwd"]


def test_cross_entropy_forms_without_a_kernel_use_the_row_kernels(gpu):
    """Probability targets take the generic path, whose log-softmax comes back to the kernels."""
    x, _ = _xent_inputs(5, 9, np.float32, seed=19)
    p = _rng(20).dirichlet(np.ones(9), 5).astype(np.float32)
    got = xps.cross_entropy(to_device(x), to_device(p))
    want = torch.nn.functional.cross_entropy(
        torch.tensor(x, dtype=torch.float64), torch.tensor(p, dtype=torch.float64)
    )
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    assert all("xent" not in n for n in gpu.names) and gpu.names


def test_cross_entropy_with_class_weights_uses_the_row_kernels(gpu):
    """Class weights take the generic path (no fused xent kernel), values as torch's."""
    x, t = _xent_inputs(5, 9, np.float32, seed=21)
    w = _rng(22).uniform(0.1, 2.0, 9).astype(np.float32)
    got = xps.cross_entropy(to_device(x), to_device(t), weight=to_device(w))
    want = torch.nn.functional.cross_entropy(
        torch.tensor(x, dtype=torch.float64),
        torch.tensor(t, dtype=torch.int64),
        weight=torch.tensor(w, dtype=torch.float64),
    )
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    assert all("xent" not in n for n in gpu.names) and gpu.names


# --------------------------------------------------------------------------------------------
# the torch bridge: CPU tensors viewed through the stand-in's DLPack


@pytest.fixture
def torch_gpu(monkeypatch):
    """The stand-in (H100) behind the torch bridge: CPU tensors take the CUDA-tensor route."""
    standin = install(monkeypatch, "H100")
    monkeypatch.setattr(backends, "REGISTRY", _TORCH_FIRST)
    monkeypatch.setattr(_compat, "is_torch_cuda_array", lambda x: isinstance(x, torch.Tensor))
    monkeypatch.setattr(torch_bridge, "_cupy_importable", lambda: True)

    class _Stream:
        cuda_stream = 0x1234

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    return standin


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_torch_bridge_forward_and_autograd(torch_gpu, log, masked):
    x = torch.randn(6, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(21))
    x.requires_grad_(True)
    mask = torch.rand(6, 40, generator=torch.Generator().manual_seed(22)) < 0.7
    mask[:, 0] = True
    fn = xps.log_softmax if log else xps.softmax
    y = fn(x, axis=-1, where=mask if masked else None)
    ref_x = x.detach().clone().requires_grad_(True)
    filled = ref_x.masked_fill(~mask, -math.inf) if masked else ref_x
    ref = torch.log_softmax(filled, -1) if log else torch.softmax(filled, -1)
    if masked and log:
        ref = ref.masked_fill(~mask, -math.inf)
    torch.testing.assert_close(y, ref)
    h = torch.randn(6, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(23))
    if masked:
        h = h.masked_fill(~mask, 0.0)
    keep = mask if masked else torch.ones_like(mask)
    (g,) = torch.autograd.grad(torch.where(keep, y * h, 0.0).sum(), x)
    (gr,) = torch.autograd.grad(torch.where(keep, ref * h, 0.0).sum(), ref_x)
    torch.testing.assert_close(g, gr)
    assert {n.split("<")[0] for n in torch_gpu.names} >= {"xps_fwd_warp", "xps_bwd_warp"}


def test_torch_bridge_out_and_float16(torch_gpu):
    x = torch.randn(3, 300, dtype=torch.float16, generator=torch.Generator().manual_seed(24))
    out = torch.empty_like(x)
    got = xps.softmax(x, out=out)
    assert got is out
    torch.testing.assert_close(out.double(), torch.softmax(x.double(), -1), atol=1e-3, rtol=1e-3)


def test_torch_bridge_cross_entropy_with_autograd(torch_gpu):
    x = torch.randn(5, 12, dtype=torch.float32, generator=torch.Generator().manual_seed(25))
    x.requires_grad_(True)
    t = torch.tensor([0, 3, 11, 4, 4])
    loss = xps.cross_entropy(x, t, label_smoothing=0.05)
    xr = x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(xr, t, label_smoothing=0.05)
    torch.testing.assert_close(loss, ref)
    (g,) = torch.autograd.grad(loss * 3.0, x)
    (gr,) = torch.autograd.grad(ref * 3.0, xr)
    torch.testing.assert_close(g, gr)
    assert [n.split("<")[0] for n in torch_gpu.names] == ["xps_xent_fwd", "xps_xent_bwd"]


# --------------------------------------------------------------------------------------------
# the stand-in itself: complete, and able to fail


def test_every_kernel_instantiation_parses_and_has_its_static_smem():
    """Each name expression the loader compiles has a parsed signature the emulator reads, and
    a static shared-memory size for both declared devices."""
    import json
    from pathlib import Path

    table = json.loads((Path(__file__).with_name("data") / "kernel_static_smem.json").read_text())
    for filename, names in SOURCES.items():
        text = loader.source(filename)
        for name in names:
            sig = parse_signature(text, name)
            assert sig.params, name
            for arch in ("sm_80", "sm_90"):
                assert name in table["smem"][arch][filename], (arch, name)


def test_a_scalar_of_the_wrong_width_fails_the_launch(gpu, monkeypatch):
    """The Python packing is checked against the signature: an int64 where the kernel takes int."""
    monkeypatch.setattr(launch, "_i32", np.int64)
    with pytest.raises(LaunchError, match=r"int32 expected, got int64"):
        xps.softmax(to_device(np.ones((2, 8), np.float32)))


def test_a_kernel_whose_signature_changed_fails_the_launch(gpu, monkeypatch):
    """A parameter added to the source but not to the launch: caught without a GPU."""
    original = loader.source

    def changed(filename):
        text = original(filename)
        return text.replace(
            "long long rows, int n, int log, int vec)",
            "long long rows, int n, int log, int vec, int extra)",
        )

    monkeypatch.setattr(loader, "source", changed)
    with pytest.raises(LaunchError, match="arguments"):
        xps.softmax(to_device(np.ones((2, 8), np.float32)))


def test_a_launch_without_the_shared_memory_opt_in_fails(gpu, monkeypatch):
    monkeypatch.setattr(loader, "set_max_dynamic_smem", lambda kernel, nbytes: None)
    with pytest.raises(LaunchError, match="opted into"):
        xps.softmax(to_device(np.ones((2, 20000), np.float32)))


def test_an_output_aliasing_an_input_is_an_error_without_the_fallback(gpu, monkeypatch):
    monkeypatch.setattr(launch, "_overlaps", lambda out, inputs: False)
    d = to_device(np.ones((2, 8), np.float32))
    with pytest.raises(LaunchError, match="__restrict__"):
        xps.softmax(d, out=d)


def test_vector_accesses_need_alignment(gpu, monkeypatch):
    monkeypatch.setattr(launch, "_is_aligned", lambda a, ld: True)
    d = to_device(np.ones((2, 13), np.float32))[:, 1:]
    with pytest.raises(LaunchError, match="16-byte"):
        xps.softmax(d)


def test_reads_outside_an_allocation_fail(gpu, monkeypatch):
    real = launch._launch_rows

    def wrong_stride(fwd, arrays, mask, flag, out):  # rows one element longer than they are
        monkeypatch.setattr(
            launch, "_i64", lambda v: np.int64(v + 1 if v == arrays[0].shape[-1] else v)
        )
        return real(fwd, arrays, mask, flag, out)

    monkeypatch.setattr(launch, "_launch_rows", wrong_stride)
    with pytest.raises(LaunchError, match="out-of-bounds"):
        xps.softmax(to_device(np.ones((3, 7), np.float32)))


@pytest.mark.parametrize(
    ("shape", "axis", "swap"),
    [((2, 3, 10, 4), 2, (1, 0)), ((2, 10, 3, 4), 1, (3, 2))],
    ids=["outer", "inner"],
)
def test_middle_axis_with_a_mask_whose_outer_or_inner_dims_do_not_merge(gpu, shape, axis, swap):
    a, _ = _inputs("softmax", shape, np.float32, seed=26)
    m = _random_mask(shape, axis, seed=27)
    order = list(range(4))
    i, j = sorted(swap)
    order[i], order[j] = order[j], order[i]
    dm = to_device(np.ascontiguousarray(m.transpose(order))).transpose(order)  # same values
    got = xps.softmax(to_device(a), axis=axis, where=dm)
    _check("softmax", a, None, axis, m, got)
    assert "_strided<" in gpu.names[0]


def test_kernel_mode_never_reaches_the_log_softmax_inside_cross_entropy(gpu):
    """The generic cross-entropy's log-softmax sub-call keeps the caller's kernel mode."""
    x, _ = _xent_inputs(5, 9, np.float32, seed=28)
    p = _rng(29).dirichlet(np.ones(9), 5).astype(np.float32)
    with xps.kernels("never"):
        got = xps.cross_entropy(to_device(x), to_device(p))
    want = torch.nn.functional.cross_entropy(
        torch.tensor(x, dtype=torch.float64), torch.tensor(p, dtype=torch.float64)
    )
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    assert gpu.names == []


def test_dtype_upcast_casts_then_runs_the_kernels(gpu):
    """``dtype=`` on CuPy: the input is cast first (no fused upcast kernel yet), then the row
    kernels run on the wide array; values as torch's ``dtype=``."""
    x = (3 * _rng(23).standard_normal((6, 300))).astype(np.float16)
    got = xps.softmax(to_device(x), dtype=np.float32)
    assert isinstance(got, DeviceArray) and got.dtype == np.float32
    want = torch.softmax(torch.from_numpy(x), -1, dtype=torch.float32).numpy()
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-8)
    assert gpu.names and all("<float," in n for n in gpu.names)  # the float32 kernels only
