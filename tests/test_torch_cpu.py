"""The torch-cpu backend: CPU tensors on the NumPy kernels as ``torch.ops.xpsoftmax`` operators.

Values against ``torch.softmax``/``log_softmax`` (float64), autograd (``gradcheck``,
``gradgradcheck``, double backward), ``torch.func`` (``grad``, ``vjp``, ``vmap``, ``jacrev``) and
``torch.compile(fullgraph=True)`` of the operators; every test counts the operator calls (a spy
on the NumPy entry points the operators run), so a silent fall back to the generic torch ops
fails it.
"""

from __future__ import annotations

import math

import pytest
from _helpers import backend_of, xp_assert_close

import xpsoftmax

torch = pytest.importorskip("torch", reason="torch is a test dependency")
from xpsoftmax.backends import torch_cpu  # noqa: E402  (needs torch)


class _Spy:
    def __init__(self, monkeypatch) -> None:
        self.calls: list[str] = []
        np_backend = torch_cpu._np
        real_forward, real_product = np_backend.forward, np_backend.product

        def forward(*args):
            self.calls.append("forward")
            return real_forward(*args)

        def product(*args):
            self.calls.append(args[4])
            return real_product(*args)

        monkeypatch.setattr(np_backend, "forward", forward)
        monkeypatch.setattr(np_backend, "product", product)


@pytest.fixture
def spy(monkeypatch) -> _Spy:
    monkeypatch.setattr(torch_cpu, "_MIN_PRODUCT_ELEMS", 0)  # small test tensors on the ops
    return _Spy(monkeypatch)


def _randn(shape, seed, dtype=torch.float64):
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_values_match_torch(spy, log, axis):
    x = _randn((5, 6, 7), 0)
    assert backend_of(x) == "torch-cpu"
    f, ref = (
        (xpsoftmax.log_softmax, torch.log_softmax) if log else (xpsoftmax.softmax, torch.softmax)
    )
    xp_assert_close(f(x, axis=axis), ref(x, dim=axis))
    xp_assert_close(f(x.transpose(0, 2), axis=axis), ref(x.transpose(0, 2), dim=axis))
    assert spy.calls == ["forward", "forward"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_half_and_single(spy, dtype):
    x = _randn((4, 33), 1).to(dtype) * 8
    x[0, 0] = 11.0  # exp(11) * ... near float16's range is handled in float32
    r = xpsoftmax.softmax(x)
    assert r.dtype == dtype
    tol = {"rtol": 2e-3, "atol": 1e-5} if dtype == torch.float16 else {"rtol": 1e-5, "atol": 1e-7}
    xp_assert_close(r.double(), torch.softmax(x.double(), -1), **tol)
    assert spy.calls == ["forward"]


def test_special_rows_and_mask(spy):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[0.0, inf, inf, 1.0], [-inf] * 4, [0.0, nan, 1.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    x = x.double()
    y = xpsoftmax.softmax(x)
    xp_assert_close(y[0], torch.tensor([0.0, 0.5, 0.5, 0.0], dtype=torch.float64))
    assert bool(torch.isnan(y[1]).all()) and bool(torch.isnan(y[2]).all())
    mask = torch.tensor([[True] * 4, [False] * 4, [True] * 4, [True, False, True, False]])
    ym = xpsoftmax.softmax(x.nan_to_num(posinf=0.0, neginf=0.0), where=mask)
    xp_assert_close(ym[1], torch.zeros(4, dtype=torch.float64))
    p = 1 / (1 + math.e**2)  # entries 1 and 3 of [1, 2, 3, 4]: exp(1), exp(3) normalized
    xp_assert_close(ym[3], torch.tensor([p, 0, 1 - p, 0], dtype=torch.float64))
    assert spy.calls == ["forward", "forward"]


def test_out_is_written_in_place(spy):
    x, g = _randn((3, 8), 2), _randn((3, 8), 3)
    out = torch.full((3, 8), float("nan"), dtype=torch.float64)
    ptr = out.data_ptr()
    assert xpsoftmax.log_softmax(x, out=out) is out and out.data_ptr() == ptr
    xp_assert_close(out, torch.log_softmax(x, -1))
    y = torch.softmax(x, -1)
    r = xpsoftmax.softmax_backward(y, g, out=y)  # aliasing an input
    assert r is y
    xp_assert_close(r, torch._softmax_backward_data(g, torch.softmax(x, -1), 1, torch.float64))
    assert spy.calls == ["forward", "softmax"]


@pytest.mark.parametrize("log", [False, True])
def test_gradcheck_and_double_backward(spy, log):
    f = xpsoftmax.log_softmax if log else xpsoftmax.softmax
    x = _randn((3, 5), 4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: f(x, axis=0), (x,))
    assert torch.autograd.gradgradcheck(lambda x: f(x, axis=1), (x,))
    assert "forward" in spy.calls and ("log_vjp" if log else "softmax") in spy.calls
    g, v = _randn((3, 5), 5), _randn((3, 5), 6)
    (dx,) = torch.autograd.grad(f(x), x, g, create_graph=True)
    (hvp,) = torch.autograd.grad(dx, x, v)
    xr = x.detach().clone().requires_grad_(True)
    ref = torch.log_softmax if log else torch.softmax
    (dxr,) = torch.autograd.grad(ref(xr, -1), xr, g, create_graph=True)
    (hvp_ref,) = torch.autograd.grad(dxr, xr, v)
    xp_assert_close(dx.detach(), dxr.detach())
    xp_assert_close(hvp, hvp_ref)


@pytest.mark.parametrize(
    "kind", ["softmax_backward", "log_softmax_backward", "softmax_jvp", "log_softmax_jvp"]
)
def test_products_gradcheck(spy, kind):
    f = getattr(xpsoftmax, kind)
    y = torch.softmax(_randn((3, 6), 7), -1)
    y = (y.log() if kind.startswith("log") else y).requires_grad_(True)
    g = _randn((3, 6), 8).requires_grad_(True)
    mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(9)) < 0.7
    assert torch.autograd.gradcheck(lambda y, g: f(y, g, where=mask), (y, g))
    assert torch.autograd.gradgradcheck(lambda y, g: f(y, g), (y, g))
    assert len(spy.calls) > 0 and "forward" not in spy.calls


@pytest.mark.parametrize("log", [False, True])
def test_torch_func(spy, log):
    f = xpsoftmax.log_softmax if log else xpsoftmax.softmax
    ref = torch.log_softmax if log else torch.softmax
    x, g = _randn((4, 7), 10), _randn((4, 7), 11)
    xp_assert_close(
        torch.func.grad(lambda x: (f(x) * g).sum())(x),
        torch.func.grad(lambda x: (ref(x, -1) * g).sum())(x),
    )
    y, pull = torch.func.vjp(f, x)
    xp_assert_close(pull(g)[0], torch.func.vjp(lambda x: ref(x, -1), x)[1](g)[0])
    xp_assert_close(torch.func.vmap(f)(x), ref(x, -1))
    xp_assert_close(torch.func.jacrev(f)(x[0]), torch.func.jacrev(lambda x: ref(x, -1))(x[0]))
    assert spy.calls.count("forward") >= 4 and ("log_vjp" if log else "softmax") in spy.calls


@pytest.mark.parametrize("log", [False, True])
def test_compile_fullgraph(spy, log):
    """The operators compile into one graph (aot_eager: inductor's C++ build takes minutes on the
    2-core CI machine and adds nothing here, since custom operators are opaque to it)."""
    graphs: list[str] = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    ops = torch.ops.xpsoftmax
    kind = "log_vjp" if log else "softmax"

    def f(x, g):
        y = ops.forward(x, [1], None, log)
        return y, ops.product(y, g, [1], None, kind)

    x, g = _randn((4, 9), 12), _randn((4, 9), 13)
    y, b = torch.compile(f, fullgraph=True, backend=backend)(x, g)
    assert graphs and "xpsoftmax.forward" in graphs[0] and "xpsoftmax.product" in graphs[0]
    ref = torch.log_softmax(x, -1) if log else torch.softmax(x, -1)
    xp_assert_close(y, ref)
    grad = torch._log_softmax_backward_data if log else torch._softmax_backward_data
    xp_assert_close(b, grad(g, ref, 1, torch.float64))
    xc = x.clone().requires_grad_(True)
    yc = torch.compile(
        lambda x: ops.forward(x, [1], None, log), fullgraph=True, backend="aot_eager"
    )(xc)
    yc.backward(g)
    xr = x.clone().requires_grad_(True)
    (torch.log_softmax if log else torch.softmax)(xr, -1).backward(g)
    xp_assert_close(xc.grad, xr.grad)
    assert spy.calls == ["forward", kind, "forward", kind]


def test_generic_where_the_ops_do_not_apply(spy):
    x = _randn((2, 4), 14)
    assert backend_of(x.to(torch.bfloat16)) == "generic"
    with xpsoftmax.kernels("never"):
        assert backend_of(x) == "generic"
        xp_assert_close(xpsoftmax.softmax(x), torch.softmax(x, -1))
    assert backend_of(x, axis=()) == "generic"
    assert spy.calls == []


def test_small_products_take_the_generic_ops(monkeypatch):
    y, g = torch.softmax(_randn((16, 8), 15), -1), _randn((16, 8), 16)
    assert backend_of(y, g) == "generic"
    assert backend_of(torch.zeros(512, 256), torch.zeros(512, 256)) == "torch-cpu"


def test_empty(spy):
    r = xpsoftmax.softmax(torch.zeros(0, 3))
    assert r.shape == (0, 3) and r.dtype == torch.float32
