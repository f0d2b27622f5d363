"""torch CPU tensors on the compiled kernels (``backends/torch_cpu.py``): values against torch,
autograd through the custom operators (first and second derivatives), ``torch.compile`` of the
operators, and the calls left to torch's own operations (``torch.func``, forward-mode AD)."""

from __future__ import annotations

import numpy as np
import pytest

import xpsoftmax
from xpsoftmax import backends

torch = pytest.importorskip("torch")
torch_cpu = pytest.importorskip("xpsoftmax.backends.torch_cpu")


@pytest.fixture(autouse=True)
def _compiled_path(monkeypatch):
    monkeypatch.delenv("XPSOFTMAX_CPU", raising=False)
    monkeypatch.delenv("XPSOFTMAX_NUMPY_FAST", raising=False)


@pytest.fixture
def spy(monkeypatch):
    """The NumPy backend entry points the custom operators call, counted."""
    from xpsoftmax.backends import numpy as np_backend

    calls: list[str] = []
    for name in ("forward", "product"):
        real = getattr(np_backend, name)

        def wrapper(*args, _real=real, _name=name):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(np_backend, name, wrapper)
    return calls


def _route(x, *, kind="forward"):
    from xpsoftmax._call import SOFTMAX, SOFTMAX_VJP, make_call

    if kind == "forward":
        return backends.select(make_call(SOFTMAX, ((x, "x"),), -1, None, None))[0]
    return backends.select(make_call(SOFTMAX_VJP, ((x, "y"), (x, "dy")), -1, None, None))[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("shape", "axis"), [((64, 100), -1), ((6, 50, 70), 1), ((5, 6, 7), (0, 2))]
)
def test_values_against_torch(spy, dtype, shape, axis):
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    x.view(-1)[3] = float("inf")
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.rand(shape, generator=gen) > 0.2
    dims = axis if isinstance(axis, tuple) else (axis,)
    tol = {"rtol": 3e-3, "atol": 1e-3} if dtype == torch.float16 else {"rtol": 1e-5, "atol": 1e-6}
    x64 = x.double()
    for log, f in ((False, xpsoftmax.softmax), (True, xpsoftmax.log_softmax)):
        r = f(x, axis=axis)
        assert r.dtype == dtype and r.shape == x.shape
        ref = _ref(x64, dims, log)
        inf_rows = torch.isnan(ref)  # torch: NaN where the row has +inf; xpsoftmax: the limit
        limit = torch.where(torch.isinf(x64), 0.0 if log else 1.0, -torch.inf if log else 0.0)
        torch.testing.assert_close(r.double(), torch.where(inf_rows, limit, ref), **tol)
    xm = x.clone()
    xm.view(-1)[3] = 0  # (torch's softmax of a +inf row is NaN, ours the limit: checked above)
    y = xpsoftmax.softmax(xm, axis=axis, where=mask)
    ref = _ref(xm.double().masked_fill(~mask, float("-inf")), dims, False)
    torch.testing.assert_close(y.double(), torch.nan_to_num(ref, nan=0.0) * mask, **tol)
    y = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64), dims[-1]).to(dtype)
    dx = xpsoftmax.softmax_backward(y, g, axis=dims[-1])
    yd, gd = y.double(), g.double()
    ref = yd * (gd - (yd * gd).sum(dims[-1], keepdim=True))
    torch.testing.assert_close(dx.double(), ref, **tol)
    assert spy.count("forward") == 3
    assert spy.count("product") == (x.numel() >= torch_cpu._SMALL_PRODUCT)


def _ref(x64, dims, log):
    if len(dims) == 1:
        return torch.log_softmax(x64, dims[0]) if log else torch.softmax(x64, dims[0])
    lse = torch.logsumexp(x64, dims, keepdim=True)
    return x64 - lse if log else torch.exp(x64 - lse)


def test_routes():
    small, big = torch.randn(16, 8), torch.randn(64, 128)
    assert _route(small) == "torch-cpu"
    assert _route(small, kind="vjp") == "generic"  # tiny products: torch's operations are faster
    assert _route(big, kind="vjp") == "torch-cpu"
    assert _route(torch.randn(4, 5, dtype=torch.bfloat16)) == "generic"


def test_autograd_through_the_custom_ops(spy):
    x = torch.randn(64, 80, dtype=torch.float64, requires_grad=True)
    for f in (xpsoftmax.softmax, xpsoftmax.log_softmax):
        assert "xpsoftmax" in type(f(x).grad_fn).__name__
    assert torch.autograd.gradcheck(lambda t: xpsoftmax.log_softmax(t, axis=0), (x,))
    assert torch.autograd.gradcheck(xpsoftmax.softmax, (x,))
    assert torch.autograd.gradgradcheck(xpsoftmax.softmax, (x,))
    assert torch.autograd.gradgradcheck(xpsoftmax.log_softmax, (x,))
    y = torch.softmax(torch.randn(64, 80, dtype=torch.float64), -1).requires_grad_()
    g = torch.randn(64, 80, dtype=torch.float64, requires_grad=True)
    for f in (
        xpsoftmax.softmax_backward,
        xpsoftmax.log_softmax_backward,
        xpsoftmax.log_softmax_jvp,
    ):
        assert torch.autograd.gradcheck(f, (y, g))
    assert "product" in spy and "forward" in spy


def test_masked_gradient_matches_torch():
    x = torch.randn(70, 90, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(70, 90) > 0.3
    mask[0] = False  # a fully masked row: gradient 0
    w = torch.randn(70, 90, dtype=torch.float64)
    (got,) = torch.autograd.grad((xpsoftmax.softmax(x, where=mask) * w).sum(), x)
    ref_y = torch.nan_to_num(torch.softmax(x.masked_fill(~mask, float("-inf")), -1), nan=0.0)
    (ref,) = torch.autograd.grad((ref_y * w).sum(), x)
    torch.testing.assert_close(got, ref)
    assert torch.all(got[0] == 0)


def test_torch_compile_fullgraph_runs_the_custom_ops():
    forward, product = torch_cpu.ops()
    seen: list[str] = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    @torch.compile(fullgraph=True, backend=backend)
    def f(t, w):
        y = torch.ops.xpsoftmax.forward(t, [1], None, False)
        return torch.ops.xpsoftmax.product(y, w, [1], None, "softmax") * 2

    t, w = torch.randn(40, 70), torch.randn(40, 70)
    got = f(t, w)
    y = torch.softmax(t, 1)
    torch.testing.assert_close(got, 2 * y * (w - (y * w).sum(1, keepdim=True)))
    assert any("xpsoftmax.forward" in s for s in seen) and any(
        "xpsoftmax.product" in s for s in seen
    )
    x = torch.randn(40, 70, requires_grad=True)
    g = torch.compile(
        lambda t: torch.ops.xpsoftmax.forward(t, [1], None, True),
        fullgraph=True,
        backend="aot_eager",
    )
    (dx,) = torch.autograd.grad(g(x)[:, 3].sum(), x)
    (ref,) = torch.autograd.grad(torch.log_softmax(x, 1)[:, 3].sum(), x)
    torch.testing.assert_close(dx, ref)


# (torch.func.jvp loads torch's own decompositions, which call the deprecated torch.jit.script)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torch_func_and_forward_mode_take_torch_operations(spy):
    x = torch.randn(30, 40, dtype=torch.float64)
    grad = torch.func.grad(lambda t: xpsoftmax.log_softmax(t)[:, 1].sum())(x)
    ref = torch.func.grad(lambda t: torch.log_softmax(t, -1)[:, 1].sum())(x)
    torch.testing.assert_close(grad, ref)
    tangent = torch.randn(30, 40, dtype=torch.float64)
    _, got = torch.func.jvp(xpsoftmax.softmax, (x,), (tangent,))
    _, want = torch.func.jvp(lambda t: torch.softmax(t, -1), (x,), (tangent,))
    torch.testing.assert_close(got, want)
    vm = torch.vmap(xpsoftmax.softmax)(x)
    torch.testing.assert_close(vm, torch.softmax(x, -1))
    assert spy == []


def test_numpy_cpu_path_leaves_tensors_to_torch(monkeypatch):
    monkeypatch.setenv("XPSOFTMAX_CPU", "numpy")
    assert _route(torch.randn(64, 128)) == "generic"
    monkeypatch.setenv("XPSOFTMAX_CPU", "compiled")
    monkeypatch.setenv("XPSOFTMAX_NUMPY_FAST", "0")
    assert _route(torch.randn(64, 128)) == "generic"


def test_out_receives_the_result():
    x = torch.randn(20, 30)
    out = torch.empty(20, 30)
    assert xpsoftmax.softmax(x, out=out) is out
    torch.testing.assert_close(out, torch.softmax(x, -1))
    np.testing.assert_allclose(out.sum(-1).numpy(), 1.0, rtol=1e-6)
