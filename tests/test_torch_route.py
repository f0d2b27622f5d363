"""The PyTorch CUDA route and the kernel switch, checked on a machine without a GPU.

* CPU tensors never reach the torch-cuda backend (``xpsoftmax.backends.cuda.torch_bridge``,
  ``_torch_cuda`` below), whatever the kernel mode.
* ``_torch_cuda.takes`` accepts float16/32/64 and, under ``always``, rejects other dtypes.
* ``set_kernels`` / ``kernels`` / ``XPSOFTMAX_KERNELS`` accept auto|always|never only.
* The autograd wiring of ``_torch_cuda`` (forward, VJP, JVP, their first and second derivatives,
  ``out=`` rules): the kernel launch is replaced by a stand-in that computes with the generic
  path on CPU tensors, and the results are checked against ``torch.softmax`` autograd,
  ``torch.func.jvp`` and finite differences (``gradcheck``/``gradgradcheck``). What only a GPU
  can check (DLPack, streams, the kernels themselves) is in ``test_gpu.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import types

import array_api_compat
import pytest
from _helpers import backend_of, xp_assert_close

import xpsoftmax
from xpsoftmax import _call, _compat, _config, backends
from xpsoftmax.backends import generic

torch = pytest.importorskip("torch", reason="torch is a test dependency")
from xpsoftmax.backends.cuda import torch_bridge as _torch_cuda  # noqa: E402  (needs torch)

TXP = array_api_compat.array_namespace(torch.zeros(1))
_OPS = {
    ("forward", False): _call.SOFTMAX,
    ("forward", True): _call.LOG_SOFTMAX,
    ("backward", False): _call.SOFTMAX_VJP,
    ("backward", True): _call.LOG_SOFTMAX_VJP,
    ("jvp", False): _call.SOFTMAX_JVP,
    ("jvp", True): _call.LOG_SOFTMAX_JVP,
}
_KIND_NAMES = {"forward": "forward", "vjp": "backward", "jvp": "jvp"}


def _bridge(op: str, *arrays, axes, mask, log, out=None, mode="auto"):
    """The torch-cuda backend's ``run`` on a call of ``op`` (forward, backward or jvp)."""
    call = _call.Call(_OPS[op, log], TXP, arrays, axes, mask, out, arrays[0].dtype, mode)
    return _torch_cuda.run(call)


def _takes(x, mode: str) -> bool:
    call = _call.make_call(_call.SOFTMAX, ((x, "x"),), -1, None, None)
    return _torch_cuda.takes(call.derive(mode=mode))


# --------------------------------------------------------------------------------------------
# CPU tensors never reach _torch_cuda


class _Tripwire(types.ModuleType):
    def __getattr__(self, name: str):
        msg = f"xpsoftmax.backends.cuda.torch_bridge.{name} was used for a CPU tensor"
        raise AssertionError(msg)


@pytest.mark.parametrize("mode", ["auto", "always", "never"])
def test_cpu_tensors_stay_off_the_cuda_route(monkeypatch, mode):
    trip = _Tripwire("xpsoftmax.backends.cuda.torch_bridge")
    monkeypatch.setitem(sys.modules, "xpsoftmax.backends.cuda.torch_bridge", trip)
    monkeypatch.setitem(backends._modules, ".cuda.torch_bridge", trip)
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with xpsoftmax.kernels(mode):
        assert backend_of(x) == ("generic" if mode == "never" else "torch-cpu")
        y = xpsoftmax.softmax(x, axis=1)
        ly = xpsoftmax.log_softmax(x, axis=0)
        dx = xpsoftmax.softmax_backward(y, g, axis=1)
    xp_assert_close(y, torch.softmax(x, dim=1))
    xp_assert_close(ly, torch.log_softmax(x, dim=0))
    xr = x.clone().requires_grad_(True)
    torch.softmax(xr, dim=1).backward(g)
    xp_assert_close(dx, xr.grad)


# --------------------------------------------------------------------------------------------
# takes


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("always", [False, True])
def test_takes_kernel_dtypes(dtype, always):
    assert _takes(torch.zeros(2, dtype=dtype), "always" if always else "auto") is True


def test_takes_rejects_other_dtypes():
    x = torch.zeros(2, dtype=torch.bfloat16)
    assert _takes(x, "auto") is False
    with pytest.raises(TypeError, match=r"always.*bfloat16"):
        _takes(x, "always")
    assert _takes(torch.zeros(2), "never") is False


# --------------------------------------------------------------------------------------------
# the kernel switch


@pytest.mark.parametrize("mode", ["auto", "always", "never"])
def test_set_kernels_round_trip(mode):
    before = xpsoftmax.get_kernels()
    previous = xpsoftmax.set_kernels(mode)
    try:
        assert previous == before
        assert xpsoftmax.get_kernels() == mode
    finally:
        xpsoftmax.set_kernels(previous)
    assert xpsoftmax.get_kernels() == before
    with xpsoftmax.kernels(mode):
        assert xpsoftmax.get_kernels() == mode
    assert xpsoftmax.get_kernels() == before


@pytest.mark.parametrize("bad", ["", "ALWAYS", "on", "auto ", None, True, 1])
def test_set_kernels_rejects(bad):
    before = xpsoftmax.get_kernels()
    with pytest.raises(ValueError, match=r"mode must be one of 'auto', 'always', 'never'"):
        xpsoftmax.set_kernels(bad)
    with pytest.raises(ValueError, match=r"mode must be one of"):
        with xpsoftmax.kernels(bad):
            pass  # pragma: no cover - the context manager raises on entry
    assert xpsoftmax.get_kernels() == before


def test_kernels_context_restores_after_error():
    before = xpsoftmax.get_kernels()
    with pytest.raises(ZeroDivisionError):
        with xpsoftmax.kernels("never"):
            1 / 0  # noqa: B018
    assert xpsoftmax.get_kernels() == before


def test_kernel_mode_is_per_thread():
    """``set_kernels`` and ``kernels`` hold for the calling thread only; a new thread starts from
    the environment's default (as NumPy's errstate and the decimal context)."""
    seen: dict[str, str] = {}

    def worker() -> None:
        seen["mode"] = xpsoftmax.get_kernels()

    default = _config._DEFAULT_MODE
    other = "never" if default != "never" else "always"
    with xpsoftmax.kernels(other):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert xpsoftmax.get_kernels() == other
    assert seen["mode"] == default


def test_dask_graph_keeps_the_mode_it_was_built_with(monkeypatch):
    da = pytest.importorskip("dask.array")
    import numpy as np

    modes: list[str] = []
    real = backends.run

    def spy(call):
        modes.append(call.mode)
        return real(call)

    x = da.from_array(np.zeros((4, 6)), chunks=(2, 6))
    with xpsoftmax.kernels("never"):
        y = xpsoftmax.softmax(x)
    monkeypatch.setattr(backends, "run", spy)
    with xpsoftmax.kernels("always"):
        r = y.compute(scheduler="threads")
    np.testing.assert_allclose(r, np.full((4, 6), 1 / 6))
    assert modes == ["never", "never"]


_ENV_SCRIPT = """
import numpy as np, xpsoftmax
try:
    y = xpsoftmax.softmax(np.array([0.0, np.log(3.0)]))  # a NumPy call already checks the mode
    mode = xpsoftmax.get_kernels()
    print("OK", mode, repr(y.tolist()))
except ValueError as e:
    print("ValueError", e)
"""


def _run_with_env(value: str) -> str:
    env = {**os.environ, "XPSOFTMAX_KERNELS": value}
    proc = subprocess.run(
        [sys.executable, "-c", _ENV_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return proc.stdout.strip()


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        ("auto", "auto"),
        ("always", "always"),
        ("never", "never"),
        (" Never ", "never"),
        ("", "auto"),
    ],
)
def test_env_var_accepts(value, mode):
    assert _run_with_env(value) == f"OK {mode} [0.25, 0.75]"


@pytest.mark.parametrize("value", ["bogus", "1"])
def test_env_var_rejects(value):
    out = _run_with_env(value)
    assert out.startswith("ValueError environment variable XPSOFTMAX_KERNELS must be one of")
    assert repr(value) in out


# --------------------------------------------------------------------------------------------
# autograd wiring of _torch_cuda, with a stand-in for the kernel launch


class _Launcher:
    """Stands in for the DLPack + kernel launch: the generic path on the (CPU) tensors."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, op, arrays, axes, mask, out):
        self.calls.append(_KIND_NAMES[op.kind])
        assert not torch.is_grad_enabled() or not any(a.requires_grad for a in arrays), (
            "the launch must run outside autograd (inside a Function)"
        )
        arrays = tuple(a.detach() for a in arrays)
        call = _call.Call(op, TXP, arrays, axes, mask, None, arrays[0].dtype, "auto")
        r = generic.run(call)
        if out is None:
            return r.contiguous()
        out.copy_(r)
        return out


@pytest.fixture
def launcher(monkeypatch) -> _Launcher:
    stand_in = _Launcher()
    monkeypatch.setattr(_torch_cuda, "_launch", stand_in)
    return stand_in


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, seed, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, generator=_gen(seed))


# (shape, axes, mask-maker): last axis, a middle axis, a tuple of axes, a full mask with a fully
# masked row, a broadcast mask.
def _no_mask(shape):
    return None


def _full_mask(shape):
    m = torch.rand(shape, generator=_gen(7)) < 0.7
    m.view(-1, shape[-1])[0] = False  # a fully masked row (along the last axis)
    return m


def _broadcast_mask(shape):
    m = torch.rand((1, shape[1], 1) if len(shape) == 3 else (1, shape[-1]), generator=_gen(8)) < 0.6
    m.view(-1)[0] = True
    return torch.broadcast_to(m, shape)


_CASES = [
    pytest.param((3, 6), (1,), _no_mask, id="2d-last"),
    pytest.param((2, 5, 3), (1,), _no_mask, id="3d-middle"),
    pytest.param((2, 3, 4), (0, 2), _no_mask, id="3d-tuple"),
    pytest.param((4, 6), (1,), _full_mask, id="2d-full-mask"),
    pytest.param((2, 5, 3), (1,), _broadcast_mask, id="3d-broadcast-mask"),
]


def _torch_forward(x, axes, mask, log):
    """softmax by torch primitives (masked entries -> -inf first), the autograd reference."""
    if mask is not None:
        x = torch.where(mask, x, torch.tensor(-torch.inf, dtype=x.dtype))
    lse = torch.logsumexp(x, dim=axes, keepdim=True)
    r = x - lse if log else torch.exp(x - lse)
    if mask is not None:
        fill = torch.tensor(-torch.inf if log else 0.0, dtype=x.dtype)
        r = torch.where(mask, r, fill)
    return r


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize(("shape", "axes", "make_mask"), _CASES)
def test_forward_autograd(launcher, shape, axes, make_mask, log):
    mask = make_mask(shape)
    if mask is not None and not bool(mask.any()):
        pytest.fail("the test mask masks everything")
    x = _randn(shape, 1).requires_grad_(True)
    g = _randn(shape, 2)
    y = _bridge("forward", x, axes=axes, mask=mask, log=log)
    assert launcher.calls == ["forward"]
    assert y.requires_grad and y.grad_fn is not None
    xr = x.detach().clone().requires_grad_(True)
    y_ref = _torch_forward(xr, axes, mask, log)
    # Fully masked rows: torch's logsumexp of all -inf is -inf and the reference is filled.
    xp_assert_close(y.detach(), y_ref.detach())
    y.backward(g)
    assert launcher.calls == ["forward", "backward"]
    y_ref.backward(g)
    xp_assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize(("shape", "axes", "make_mask"), _CASES)
def test_forward_second_derivatives(launcher, shape, axes, make_mask, log):
    mask = make_mask(shape)
    x = _randn(shape, 3).requires_grad_(True)

    def f(x):
        y = _bridge("forward", x, axes=axes, mask=mask, log=log)
        # Masked log-probabilities are the constant -inf, which finite differences cannot take.
        return y if mask is None else torch.where(mask, y, 0.0)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("op", ["backward", "jvp"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize(("shape", "axes", "make_mask"), _CASES)
def test_vjp_jvp_derivatives(launcher, op, shape, axes, make_mask, log):
    """First and second derivatives of the VJP and JVP in both arguments (finite differences)."""
    mask = make_mask(shape)
    # y: a forward output (log: log-probabilities), any values work for the formulas.
    y0 = generic.softmax.forward(TXP, _randn(shape, 4), axes, mask, log)
    y0 = torch.where(torch.isfinite(y0), y0, -3.0)  # finite, so finite differences stay finite
    y = y0.clone().requires_grad_(True)
    g = _randn(shape, 5).requires_grad_(True)

    def f(y, g):
        return _bridge(op, y, g, axes=axes, mask=mask, log=log)

    assert torch.autograd.gradcheck(f, (y, g))
    assert torch.autograd.gradgradcheck(f, (y, g))


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_hessian_vector_product_matches_torch(launcher, log):
    """Double backward through x (VJP of the VJP) against torch's own softmax."""
    shape, axes = (4, 7), (1,)
    x = _randn(shape, 10).requires_grad_(True)
    g, v = _randn(shape, 11), _randn(shape, 12)
    y = _bridge("forward", x, axes=axes, mask=None, log=log)
    (dx,) = torch.autograd.grad(y, x, g, create_graph=True)
    (hvp,) = torch.autograd.grad(dx, x, v)
    xr = x.detach().clone().requires_grad_(True)
    yr = torch.log_softmax(xr, dim=1) if log else torch.softmax(xr, dim=1)
    (dxr,) = torch.autograd.grad(yr, xr, g, create_graph=True)
    (hvp_ref,) = torch.autograd.grad(dxr, xr, v)
    xp_assert_close(dx.detach(), dxr.detach())
    xp_assert_close(hvp, hvp_ref)


# torch.func.jvp loads decompositions through torch.jit.script, deprecated in recent torch.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_jvp_matches_torch_func(launcher, log):
    x, t = _randn((3, 9), 13), _randn((3, 9), 14)

    def ref(x):
        return torch.log_softmax(x, dim=-1) if log else torch.softmax(x, dim=-1)

    y, dy_ref = torch.func.jvp(ref, (x,), (t,))
    dy = _bridge("jvp", y, t, axes=(1,), mask=None, log=log)
    xp_assert_close(dy, dy_ref)


def test_no_autograd_without_requires_grad(launcher):
    x = _randn((2, 3), 15)
    y = _bridge("forward", x, axes=(1,), mask=None, log=False)
    assert y.grad_fn is None and not y.requires_grad
    with torch.no_grad():
        xr = _randn((2, 3), 15).requires_grad_(True)
        y2 = _bridge("forward", xr, axes=(1,), mask=None, log=False)
    assert y2.grad_fn is None


@pytest.mark.parametrize("op", ["forward", "backward", "jvp"])
def test_out_with_requires_grad_raises(launcher, op):
    a = _randn((2, 3), 16).requires_grad_(True)
    out = torch.empty(2, 3, dtype=torch.float64)
    args = (a,) if op == "forward" else (a, _randn((2, 3), 17))
    with pytest.raises(RuntimeError, match=r"out= does not support automatic differentiation"):
        _bridge(op, *args, axes=(1,), mask=None, log=False, out=out)
    assert launcher.calls == []
    with torch.no_grad():  # as in torch, out= is fine without grad mode
        r = _bridge(op, *args, axes=(1,), mask=None, log=False, out=out)
    assert r is out


# --------------------------------------------------------------------------------------------
# the public API on the route (a CPU tensor made to look like a CUDA tensor to the dispatch)


@pytest.fixture
def routed(monkeypatch, launcher) -> _Launcher:
    monkeypatch.setattr(_compat, "is_torch_cuda_array", _compat.is_torch_array)
    monkeypatch.setattr(_torch_cuda, "_cupy_importable", lambda: True)
    return launcher


def test_public_api_uses_route(routed):
    x = _randn((3, 5), 18).requires_grad_(True)
    g = _randn((3, 5), 19)
    with xpsoftmax.kernels("auto"):
        assert backend_of(x) == "torch-cuda"
        y = xpsoftmax.softmax(x)
        y.backward(g)
        ly = xpsoftmax.log_softmax(x.detach(), axis=0)
        out = torch.full((3, 5), torch.nan, dtype=torch.float64)
        r = xpsoftmax.log_softmax_backward(ly, g, axis=0, out=out)
        t = xpsoftmax.softmax_jvp(y.detach(), g)
    assert routed.calls == ["forward", "backward", "forward", "backward", "jvp"]
    xr = x.detach().clone().requires_grad_(True)
    yr = torch.softmax(xr, dim=-1)
    yr.backward(g)
    xp_assert_close(y.detach(), yr.detach())
    xp_assert_close(x.grad, xr.grad)
    xp_assert_close(ly, torch.log_softmax(x.detach(), dim=0))
    assert r is out
    xp_assert_close(out, torch._log_softmax_backward_data(g, ly, 0, torch.float64))
    xp_assert_close(t, torch._softmax_backward_data(g, yr.detach(), 1, torch.float64))


def test_public_api_out_with_grad_raises(routed):
    x = _randn((2, 4), 20).requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"out= does not support automatic differentiation"):
        xpsoftmax.softmax(x, out=torch.empty(2, 4, dtype=torch.float64))


def test_public_api_never_skips_route(routed):
    x = _randn((2, 4), 21)
    with xpsoftmax.kernels("never"):
        assert backend_of(x) == "generic"
        y = xpsoftmax.softmax(x)
    assert routed.calls == []
    xp_assert_close(y, torch.softmax(x, dim=-1))


def test_public_api_bfloat16(routed):
    x = _randn((2, 4), 22).to(torch.bfloat16)
    with xpsoftmax.kernels("auto"):
        y = xpsoftmax.softmax(x)  # not a kernel dtype: the generic path
    assert routed.calls == []
    assert y.dtype == torch.bfloat16
    ref = torch.softmax(x.float(), dim=-1).to(torch.bfloat16)
    xp_assert_close(y.float(), ref.float(), rtol=1.6e-2, atol=1e-4)
    with xpsoftmax.kernels("always"):
        with pytest.raises(TypeError, match=r"bfloat16"):
            xpsoftmax.softmax(x)


def test_always_without_cupy_raises(monkeypatch):
    monkeypatch.setattr(_compat, "is_torch_cuda_array", _compat.is_torch_array)
    monkeypatch.setattr(_torch_cuda, "_cupy_importable", lambda: False)
    x = _randn((2, 4), 23)
    with xpsoftmax.kernels("always"):
        with pytest.raises(RuntimeError, match=r"CuPy is not installed"):
            xpsoftmax.softmax(x)
    with xpsoftmax.kernels("auto"):
        xp_assert_close(xpsoftmax.softmax(x), torch.softmax(x, dim=-1))


# --------------------------------------------------------------------------------------------
# cross-entropy on the route: the fused-kernel launch replaced by a stand-in


class _XentLauncher:
    """Stands in for the DLPack + cross-entropy kernel launch: the generic path on CPU tensors."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, p, dloss):
        self.calls.append(p.op.kind)
        assert not torch.is_grad_enabled() or not p.x_in.requires_grad, "launch inside autograd"
        return generic.run(p.derive(x_in=p.x_in.detach(), dloss=dloss, mode="never"))


@pytest.fixture
def xent_routed(monkeypatch, routed) -> _XentLauncher:
    stand_in = _XentLauncher()
    monkeypatch.setattr(_torch_cuda, "_xent_launch", stand_in)
    return stand_in


def _xent_inputs():
    x = _randn((6, 5), 30)
    t = torch.tensor([0, 4, -100, 2, 1, 3])
    return x, t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_takes_the_route_with_autograd(xent_routed, reduction):
    F = torch.nn.functional
    x, t = _xent_inputs()
    kw = {"reduction": reduction, "ignore_index": -100, "label_smoothing": 0.2}
    x.requires_grad_(True)
    loss = xpsoftmax.cross_entropy(x, t, **kw)
    assert xent_routed.calls == ["xent"]
    xr = x.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(xr, t, **kw)
    xp_assert_close(loss.detach(), ref.detach())
    g = _randn(ref.shape, 31)
    loss.backward(g)
    ref.backward(g)
    assert xent_routed.calls == ["xent", "xent_vjp"]
    xp_assert_close(x.grad, xr.grad)
    dx = xpsoftmax.cross_entropy_backward(x.detach(), t, dloss=g, **kw)
    assert xent_routed.calls == ["xent", "xent_vjp", "xent_vjp"]
    xp_assert_close(dx, xr.grad)


def test_cross_entropy_route_leaves_the_generic_forms(xent_routed):
    """Probability targets, a mask, another class axis and mode "never" stay generic."""
    F = torch.nn.functional
    x, t = _xent_inputs()
    t = t.clamp(min=0)
    probs = torch.softmax(_randn(x.shape, 32), dim=-1)
    xp_assert_close(xpsoftmax.cross_entropy(x, probs), F.cross_entropy(x, probs))
    xp_assert_close(xpsoftmax.cross_entropy(x.T, t, axis=0), F.cross_entropy(x, t))
    mask = torch.ones(x.shape, dtype=torch.bool)
    xp_assert_close(xpsoftmax.cross_entropy(x, t, where=mask), F.cross_entropy(x, t))
    with xpsoftmax.kernels("never"):
        xp_assert_close(xpsoftmax.cross_entropy(x, t), F.cross_entropy(x, t))
    assert xent_routed.calls == []


def test_cross_entropy_route_leaves_the_new_generic_forms(xent_routed):
    """A per-sample mask and the gradient with respect to probability targets stay generic."""
    F = torch.nn.functional
    x, t = _xent_inputs()
    t = t.clamp(min=0)
    keep = torch.tensor([True, False, True, True, True, True])
    xp_assert_close(xpsoftmax.cross_entropy(x, t, where=keep), F.cross_entropy(x[keep], t[keep]))
    probs = torch.softmax(_randn(x.shape, 33), dim=-1)
    q = probs.clone().requires_grad_(True)
    F.cross_entropy(x, q).backward()
    xp_assert_close(xpsoftmax.cross_entropy_backward(x, probs, wrt="targets"), q.grad)
    assert xent_routed.calls == []


def test_cross_entropy_route_takes_tuple_class_axes(xent_routed):
    """Index targets over two class axes: the kernels on the flattened last axis, autograd
    through the reshape back to the input's layout."""
    F = torch.nn.functional
    x = _randn((3, 4, 2, 5), 34).requires_grad_(True)
    t = torch.tensor([[0, 7, 3, 1, 5], [2, 2, 6, 0, 4], [7, 1, 1, 3, 0]])
    loss = xpsoftmax.cross_entropy(x, t, (1, 2), label_smoothing=0.1)
    xr = x.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(xr.reshape(3, 8, 5), t, label_smoothing=0.1)
    xp_assert_close(loss.detach(), ref.detach())
    loss.backward()
    ref.backward()
    xp_assert_close(x.grad, xr.grad)
    dx = xpsoftmax.cross_entropy_backward(x.detach(), t, (1, 2), label_smoothing=0.1)
    xp_assert_close(dx, xr.grad)
    assert xent_routed.calls == ["xent", "xent_vjp", "xent_vjp"]


def test_cross_entropy_route_always_rules(xent_routed, monkeypatch):
    x, t = _xent_inputs()
    with xpsoftmax.kernels("always"), pytest.raises(TypeError, match=r"bfloat16"):
        xpsoftmax.cross_entropy(x.to(torch.bfloat16), t, ignore_index=-100)
    monkeypatch.setattr(_torch_cuda, "_cupy_importable", lambda: False)
    with xpsoftmax.kernels("always"), pytest.raises(RuntimeError, match=r"CuPy is not installed"):
        xpsoftmax.cross_entropy(x, t, ignore_index=-100)
    assert xent_routed.calls == []
