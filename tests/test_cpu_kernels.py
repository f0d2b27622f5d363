"""The compiled CPU path (``backends/numpy/compiled.py``, ``kernels.py``): its exponential, the
switch between the CPU paths, the fallback where numba is missing, and the compile cache.

The results of both CPU paths are checked in ``test_numpy_path.py`` (every test there runs on
each); this module checks what only the compiled path has.
"""

from __future__ import annotations

import math
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.special
from _helpers import xp_assert_close

import xpsoftmax
from xpsoftmax import _config
from xpsoftmax.backends import numpy as np_backend

numba = pytest.importorskip("numba")
kernels = pytest.importorskip("xpsoftmax.backends.numpy.kernels")

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# the exponential


@numba.njit(nogil=True)
def _ulp_scan(lo, hi):
    """Max ulp error of ``kernels.exp32`` over the float32 bit patterns ``lo <= b < hi`` against
    float64 ``math.exp`` (libm), and the number of results that are not exactly right where the
    float64 value rounds to 0 or overflows float32."""
    worst, wrong = 0.0, 0
    bits = np.empty(1, dtype=np.uint32)
    view = bits.view(np.float32)
    for b in range(lo, hi):
        bits[0] = b
        x = view[0]
        got = np.float64(kernels.exp32(x))
        ref = math.exp(np.float64(x))
        ref32 = np.float32(ref)
        if ref32 == 0 or math.isinf(ref32):
            # underflow to 0 or overflow: allow the subnormal neighbour of 0 only
            if not (got == ref32 or (ref32 == 0 and got <= 2.0**-149)):
                wrong += 1
            continue
        mant, e = math.frexp(abs(np.float64(ref32)))
        ulp = math.ldexp(1.0, max(e - 24, -149))
        err = abs(got - ref) / ulp
        worst = max(worst, err)
    return worst, wrong


def _f32_bits(v: float) -> int:
    return int(np.array(v, dtype=np.float32).view(np.uint32))


def test_exp32_within_one_ulp_over_every_float32_of_the_finite_range():
    """Every float32 from the first one whose exp underflows to the last one whose exp is finite
    (about 2.2 billion values): at most 1 ulp from float64 ``exp`` (measured 0.94 ulp on
    2026-12-02; NumPy's float32 ``exp`` is specified to 2.5 ulp)."""
    import concurrent.futures

    pos = (0, _f32_bits(89.0))  # +0 .. 89 (exp overflows past 88.72)
    neg = (_f32_bits(-0.0), _f32_bits(-105.0))  # -0 .. -105 (exp underflows past -103.97)
    pieces = [
        (lo, min(lo + (1 << 26), hi)) for lo, hi in (pos, neg) for lo in range(lo, hi, 1 << 26)
    ]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda p: _ulp_scan(*p), pieces))
    worst = max(w for w, _ in results)
    assert sum(n for _, n in results) == 0
    assert worst <= 1.0, worst


def test_exp32_special_values():
    x = np.array(
        [
            -np.inf,
            np.inf,
            np.nan,
            -np.nan,
            0.0,
            -0.0,
            -104.0,
            -110.0,
            -1e30,
            88.8,
            100.0,
            1e30,
            88.72,
            -87.0,
            -103.5,
            1e-30,
            -1e-30,
        ],
        dtype=np.float32,
    )
    out = np.empty_like(x)
    kernels.exp_array(x, out)
    with np.errstate(all="ignore"):
        ref = np.exp(x.astype(np.float64)).astype(np.float32)
    assert out[0] == 0 and out[1] == np.inf
    assert np.isnan(out[2]) and np.isnan(out[3])
    assert out[4] == 1 and out[5] == 1
    assert np.all(out[6:9] == 0)
    assert np.all(out[9:12] == np.inf)
    xp_assert_close(out[12:], ref[12:], rtol=2e-7, atol=0)  # near the limits and the subnormals
    assert 0 < out[14] < np.finfo(np.float32).tiny  # a subnormal result


def test_exp64_within_two_ulp_on_samples(rng):
    x = np.concatenate(
        [rng.uniform(-745, 709.7, 1_000_000), rng.uniform(-1, 1, 100_000), [-745.1, 709.78]]
    )
    out = np.empty_like(x)
    kernels.exp_array(x, out)
    ref = np.exp(x)
    ulp = np.spacing(np.abs(ref))
    assert np.max(np.abs(out - ref) / ulp) <= 2.0
    special = np.array([-np.inf, np.inf, np.nan, -800.0, 710.0, 0.0])
    out = np.empty_like(special)
    kernels.exp_array(special, out)
    assert out[0] == 0 and out[1] == np.inf and np.isnan(out[2])
    assert out[3] == 0 and out[4] == np.inf and out[5] == 1


# ------------------------------------------------------------------------------------------
# the switch and the fallback


def test_compiled_path_is_the_default_and_runs_the_kernels(monkeypatch):
    monkeypatch.delenv("XPSOFTMAX_CPU", raising=False)
    assert np_backend.active_path() == ("compiled", f"numba {numba.__version__}")
    calls = []
    from xpsoftmax.backends.numpy import compiled

    def spy(name):
        real = getattr(compiled.kernels, name)

        def wrapper(*args):
            calls.append(name)
            return real(*args)

        monkeypatch.setattr(compiled.kernels, name, wrapper)

    for name in ("forward_rows", "forward_cols", "product_rows", "product_cols"):
        spy(name)
    x = np.linspace(-3, 3, 60).reshape(3, 4, 5)
    xpsoftmax.softmax(x, axis=-1)
    xpsoftmax.log_softmax(x, axis=1)
    xpsoftmax.softmax_backward(x, x, axis=-1)
    xpsoftmax.log_softmax_jvp(x, x, axis=1)
    assert calls == ["forward_rows", "forward_cols", "product_rows", "product_cols"]
    monkeypatch.setenv("XPSOFTMAX_CPU", "numpy")
    assert np_backend.active_path() == ("numpy", "XPSOFTMAX_CPU=numpy")
    calls.clear()
    xpsoftmax.softmax(x)
    assert calls == []


def test_a_bad_cpu_path_names_the_variable(monkeypatch):
    monkeypatch.setenv("XPSOFTMAX_CPU", "fortran")
    with pytest.raises(ValueError, match="XPSOFTMAX_CPU must be one of 'compiled', 'numpy'"):
        xpsoftmax.softmax(np.zeros(3))
    monkeypatch.setenv("XPSOFTMAX_CPU", " Numpy ")
    assert _config.cpu_path() == "numpy"


def _python(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


CHECK = """
    import numpy as np, scipy.special, xpsoftmax
    from xpsoftmax.backends import numpy as b
    x = np.random.default_rng(0).standard_normal((50, 70)).astype(np.float32)
    y = xpsoftmax.softmax(x)
    ref = scipy.special.softmax(x.astype(np.float64), axis=-1)
    assert np.allclose(y, ref, rtol=1e-5, atol=1e-7), abs(y - ref).max()
    path = b.active_path()
    hits = 0
    if path[0] == "compiled":
        from xpsoftmax.backends.numpy import kernels
        hits = sum(kernels.forward_rows.stats.cache_hits.values())
    print(*path, hits, sep="|")
"""


def test_without_numba_the_numpy_code_takes_over(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XPSOFTMAX", "COV"))}
    code = "import sys; sys.modules['numba'] = None\n" + textwrap.dedent(CHECK)
    done = _python(code, env, tmp_path)
    assert done.returncode == 0, done.stderr
    path, why, _ = done.stdout.strip().split("|")
    assert path == "numpy"
    assert why.startswith("numba unavailable (ModuleNotFoundError")


def test_compile_cache_from_a_read_only_install(tmp_path):
    """A package directory nobody may write to: numba caches in the user's cache directory
    instead, and a second process loads the kernels from there.

    The directories are made read-only, and (since root writes there anyway) each
    ``__pycache__`` the cache would need is taken by a plain file: the same failure to create
    the cache directory that a read-only install gives.
    """
    site = tmp_path / "site"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "xpsoftmax", site / "xpsoftmax", ignore=ignore)
    for d, _, files in os.walk(site):
        (Path(d) / "__pycache__").write_text("not a directory")
        for f in [*files, "__pycache__"]:
            os.chmod(os.path.join(d, f), stat.S_IRUSR)
        os.chmod(d, stat.S_IRUSR | stat.S_IXUSR)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XPSOFTMAX", "NUMBA", "COV"))}
    env.update(HOME=str(home), PYTHONPATH=str(site), XDG_CACHE_HOME=str(home / ".cache"))
    try:
        first = _python(CHECK, env, tmp_path)
        assert first.returncode == 0, first.stderr
        assert first.stdout.strip().startswith("compiled|numba")
        cached = sorted(p.name for p in home.rglob("*.nbi"))
        assert any(name.startswith("kernels.forward_rows") for name in cached), cached
        assert not list(site.rglob("*.nbi"))
        second = _python(CHECK, env, tmp_path)
        assert second.returncode == 0, second.stderr
        assert sorted(p.name for p in home.rglob("*.nbi")) == cached
        assert first.stdout.strip().endswith("|0")  # compiled, then
        assert not second.stdout.strip().endswith("|0")  # loaded from the cache
    finally:
        for d, _, _ in os.walk(site):
            os.chmod(d, stat.S_IRWXU)


def test_threads_never_wait_for_a_worker_that_has_not_started(monkeypatch):
    """A pool whose worker never starts (a busy machine): the caller does every task itself
    and returns without waiting for it."""
    import concurrent.futures

    from xpsoftmax.backends.numpy import blocked

    class Stalled:
        def submit(self, fn):
            return concurrent.futures.Future()  # pending forever, never run

    monkeypatch.setattr(blocked, "_executor", lambda workers: Stalled())
    done = []
    blocked.run_tasks(5, 2, done.append)
    assert done == [0, 1, 2, 3, 4]
    monkeypatch.setenv("XPSOFTMAX_NUM_THREADS", "2")
    x = np.random.default_rng(1).standard_normal((600, 1000))
    xp_assert_close(xpsoftmax.softmax(x), scipy.special.softmax(x, axis=-1))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("block", [None, 2000])
def test_middle_axis_in_several_tiles(monkeypatch, dtype, block, rng):
    """A middle axis whose inner extent (600) takes three tiles of 256, 256 and 88 columns,
    special columns included, against float64 math and torch autograd's products."""
    torch = pytest.importorskip("torch")
    from xpsoftmax.backends.numpy import blocked, compiled

    if block is not None:
        monkeypatch.setattr(blocked, "_block_elems", lambda itemsize: block)
    compiled._tasks.cache_clear()
    shape = (3, 7, 600)
    x = 3.0 * rng.standard_normal(shape)
    x[0, 2, 5] = np.inf
    x[1, :, 300] = -np.inf
    x[2, 3, 599] = np.nan
    mask = rng.random(shape) > 0.3
    mask[0, :, 257] = False
    xd = x.astype(dtype)
    for log in (False, True):
        f = xpsoftmax.log_softmax if log else xpsoftmax.softmax
        for where in (None, mask):
            r = f(xd, axis=1, where=where)
            ref = _reference(xd, where, log)
            xp_assert_close(r, ref, dtype=dtype, atol=2e-3 if dtype == "float16" else 1e-6)
    t = torch.asarray(rng.standard_normal(shape), requires_grad=True)
    g = rng.standard_normal(shape)
    for log in (False, True):
        y = torch.log_softmax(t, 1) if log else torch.softmax(t, 1)
        (dx,) = torch.autograd.grad(y, t, torch.asarray(g))
        back = xpsoftmax.log_softmax_backward if log else xpsoftmax.softmax_backward
        r = back(y.detach().numpy().astype(dtype), g.astype(dtype), axis=1)
        tol = 2e-2 if dtype == "float16" else 1e-5
        xp_assert_close(r, dx.numpy(), dtype=dtype, rtol=tol, atol=tol)
    compiled._tasks.cache_clear()


def _reference(x, where, log):
    from _helpers import ref_softmax

    return ref_softmax(x.astype(np.float64), 1, where=where, log=log)


def _xent_spy(monkeypatch) -> list[str]:
    from xpsoftmax.backends.numpy import kernels as k

    calls: list[str] = []
    for name in ("xent_rows", "xent_grad_rows"):
        real = getattr(k, name)

        def wrapper(*args, _real=real, _name=name):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(k, name, wrapper)
    return calls


def _xent_both(x, t, reduction, eps, dloss):
    kw = {"reduction": reduction, "label_smoothing": eps, "ignore_index": -100}
    loss = xpsoftmax.cross_entropy(x, t, **kw)
    dx = xpsoftmax.cross_entropy_backward(x, t, dloss=dloss, **kw)
    return loss, dx


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("rows", [9, 3000])  # 3000 x 100: the thread pool and several tasks
def test_fused_cross_entropy_against_torch(monkeypatch, dtype, reduction, eps, rows, rng):
    """Class indices along the last axis run the fused kernels (checked with a spy); loss and
    gradient match torch autograd in float64, ignored samples included."""
    torch = pytest.importorskip("torch")
    calls = _xent_spy(monkeypatch)
    n = 100
    x = (3.0 * rng.standard_normal((rows, n))).astype(dtype)
    t = rng.integers(0, n, rows)
    t[2] = t[5] = -100
    dloss = rng.standard_normal(rows) if reduction == "none" else 1.7
    loss, dx = _xent_both(x, t, reduction, eps, np.asarray(dloss, dtype=dtype))
    assert sorted(set(calls)) == ["xent_grad_rows", "xent_rows"]
    xt = torch.asarray(x.astype(np.float64), requires_grad=True)
    ref = torch.nn.functional.cross_entropy(
        xt, torch.asarray(t), reduction=reduction, label_smoothing=eps, ignore_index=-100
    )
    (ref_dx,) = torch.autograd.grad(ref, xt, torch.asarray(dloss, dtype=torch.float64))
    tol = 1e-5 if dtype == "float32" else 1e-12
    xp_assert_close(loss, ref.detach().numpy().astype(dtype), dtype=dtype, rtol=tol, atol=tol)
    xp_assert_close(dx, ref_dx.numpy().astype(dtype), dtype=dtype, rtol=tol, atol=tol)
    assert np.all(dx[2] == 0) and np.all(dx[5] == 0)  # ignored rows


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_fused_cross_entropy_special_rows(monkeypatch, eps, rng):
    """+inf, NaN and -inf logits: the limits written out here (torch gives NaN for +inf rows),
    and the gradient as the generic code gives it."""
    calls = _xent_spy(monkeypatch)
    n = 10
    x = rng.standard_normal((6, n))
    x[0, 5] = np.inf  # +inf row, target elsewhere: the loss is +inf
    x[1, [2, 7]] = np.inf  # two +inf entries, the target on one: log 2 (eps: +inf)
    x[2, 4] = np.nan  # a NaN row, ignored: 0
    x[3, 9] = -np.inf  # the target at -inf: +inf
    x[4, 1] = np.nan  # a NaN row: NaN
    t = np.array([0, 2, -100, 9, 3, 1])
    dloss = rng.standard_normal(6)
    loss, dx = _xent_both(x, t, "none", eps, dloss)
    assert sorted(set(calls)) == ["xent_grad_rows", "xent_rows"]
    finite_tail = -scipy.special.log_softmax(x[5])[1] * (1 - eps) - eps * np.mean(
        scipy.special.log_softmax(x[5])
    )
    expected = [np.inf, np.log(2.0) if not eps else np.inf, 0.0, np.inf, np.nan, finite_tail]
    xp_assert_close(loss, np.array(expected), rtol=1e-12, atol=0)
    monkeypatch.setenv("XPSOFTMAX_CPU", "numpy")  # the generic code
    _, dx_generic = _xent_both(x, t, "none", eps, dloss)
    xp_assert_close(dx, dx_generic, rtol=1e-12, atol=1e-15)
    limit = dloss[1] * (np.where(np.isinf(x[1]), 0.5, 0.0) - np.eye(n)[2] * (1 - eps) - eps / n)
    xp_assert_close(dx[1], limit, rtol=1e-12, atol=1e-15)


def test_fused_cross_entropy_tuple_axes_and_generic_forms(monkeypatch, rng):
    """Two class axes reach the fused kernels as one flattened last axis (and match torch); a
    per-class mask and the gradient with respect to targets stay in the generic code."""
    torch = pytest.importorskip("torch")
    calls = _xent_spy(monkeypatch)
    x = rng.standard_normal((3, 4, 2, 5))
    t = rng.integers(0, 8, (3, 5))
    t[1, 2] = -100
    xt = torch.asarray(x, requires_grad=True)
    kw = {"reduction": "sum", "label_smoothing": 0.1, "ignore_index": -100}
    ref = torch.nn.functional.cross_entropy(xt.reshape(3, 8, 5), torch.asarray(t), **kw)
    (ref_dx,) = torch.autograd.grad(ref, xt)
    got = xpsoftmax.cross_entropy(x, t, (1, 2), **kw)
    xp_assert_close(got, ref.detach().numpy(), rtol=1e-12)
    xp_assert_close(xpsoftmax.cross_entropy_backward(x, t, (1, 2), **kw), ref_dx.numpy())
    assert sorted(set(calls)) == ["xent_grad_rows", "xent_rows"]
    del calls[:]
    y, s = rng.standard_normal((6, 5)), rng.integers(0, 4, 6)
    xpsoftmax.cross_entropy(y, s, where=np.array([True, True, True, True, False]))  # classes
    xpsoftmax.cross_entropy_backward(y, np.full((6, 5), 0.2), wrt="targets")
    assert calls == []


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("rows", [11, 2500])  # 2500 x 100: the thread pool and several tasks
def test_fused_cross_entropy_weights_and_per_sample_masks(
    monkeypatch, dtype, reduction, eps, rows, rng
):
    """Class weights and per-sample masks (optax) run the fused kernels (checked with a spy);
    loss and gradient match torch autograd in float64 on the samples the mask keeps (a masked
    sample: 0 loss, 0 gradient, left out of the mean, as an ignored one)."""
    torch = pytest.importorskip("torch")
    calls = _xent_spy(monkeypatch)
    n = 100
    x = (3 * rng.standard_normal((rows, n))).astype(dtype)
    t = rng.integers(0, n, rows)
    t[::9] = -100
    w = rng.uniform(0.1, 2.0, n).astype(dtype)
    keep = rng.random(rows) > 0.2
    dloss = rng.standard_normal(rows) if reduction == "none" else 0.7
    kw = {"reduction": reduction, "label_smoothing": eps, "ignore_index": -100}
    xt = torch.asarray(x.astype(np.float64), requires_grad=True)
    tt = torch.asarray(np.where(keep, t, -100))
    ref = torch.nn.functional.cross_entropy(
        xt, tt, weight=torch.asarray(w.astype(np.float64)), **kw
    )
    (ref_dx,) = torch.autograd.grad(ref, xt, torch.asarray(np.asarray(dloss, np.float64)))
    loss = xpsoftmax.cross_entropy(x, t, weight=w, where=keep, **kw)
    dx = xpsoftmax.cross_entropy_backward(x, t, weight=w, where=keep, dloss=dloss, **kw)
    assert sorted(set(calls)) == ["xent_grad_rows", "xent_rows"]
    tol = {"rtol": 2e-5, "atol": 1e-6} if dtype == "float32" else {"rtol": 1e-12, "atol": 1e-14}
    xp_assert_close(loss, ref.detach().numpy().astype(dtype), **tol)
    xp_assert_close(dx, ref_dx.numpy().astype(dtype), **tol)
    assert np.all(dx[~keep] == 0)


def test_fused_weighted_cross_entropy_special_rows_as_the_generic_code(monkeypatch):
    """+inf, -inf and NaN logits with class weights: the fused kernels give the generic code's
    values (its limits, tested against float64 math in test_cross_entropy.py)."""
    n = 4
    x = np.array(
        [
            [np.inf, 0.0, 1.0, 2.0],
            [np.inf, np.inf, 0.0, 1.0],
            [-np.inf, 0.0, 1.0, 2.0],
            [np.nan, 0.0, 1.0, 2.0],
            [1.0, 2.0, 3.0, 4.0],
        ]
    )
    t = np.array([0, 2, 1, 1, 3])
    w = np.array([0.5, 2.0, 1.0, 3.0])
    for eps in (0.0, 0.1):
        kw = {"reduction": "none", "label_smoothing": eps, "weight": w}
        fused = xpsoftmax.cross_entropy(x, t, **kw), xpsoftmax.cross_entropy_backward(x, t, **kw)
        monkeypatch.setenv("XPSOFTMAX_CPU", "numpy")  # the generic code
        generic = xpsoftmax.cross_entropy(x, t, **kw), xpsoftmax.cross_entropy_backward(x, t, **kw)
        monkeypatch.delenv("XPSOFTMAX_CPU")
        xp_assert_close(fused[0], generic[0], rtol=1e-12, atol=0)
        xp_assert_close(fused[1], generic[1], rtol=1e-12, atol=1e-15)
    assert n == x.shape[1]


def test_cross_entropy_takes_the_generic_code_on_the_numpy_path(monkeypatch, rng):
    from xpsoftmax.backends.numpy import kernels as k

    monkeypatch.setattr(k, "xent_rows", None)  # would fail if called
    monkeypatch.setenv("XPSOFTMAX_CPU", "numpy")
    x = rng.standard_normal((5, 7))
    t = rng.integers(0, 7, 5)
    r = xpsoftmax.cross_entropy(x, t)
    ref = -np.mean(scipy.special.log_softmax(x, axis=-1)[np.arange(5), t])
    xp_assert_close(r, np.asarray(ref))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_a_row_gives_the_same_bits_wherever_it_sits(dtype, rng):
    """The result of a row does not depend on the rows around it (how a Dask array is chunked,
    which rows share a kernel call): every slice of rows gives the bits of the whole."""
    x = (3.0 * rng.standard_normal((37, 300))).astype(dtype)
    g = rng.standard_normal((37, 300)).astype(dtype)
    whole = [
        xpsoftmax.softmax(x),
        xpsoftmax.log_softmax(x),
        xpsoftmax.softmax_backward(x, g),
        xpsoftmax.log_softmax_backward(x, g),
    ]
    for lo, hi in [(0, 1), (1, 4), (3, 10), (5, 6), (30, 37), (2, 37)]:
        parts = [
            xpsoftmax.softmax(x[lo:hi]),
            xpsoftmax.log_softmax(x[lo:hi]),
            xpsoftmax.softmax_backward(x[lo:hi], g[lo:hi]),
            xpsoftmax.log_softmax_backward(x[lo:hi], g[lo:hi]),
        ]
        for w, p in zip(whole, parts, strict=True):
            assert w[lo:hi].tobytes() == p.tobytes(), (lo, hi)
    # in place: the same bits as into a new array
    inplace = x.copy()
    assert xpsoftmax.softmax(inplace, out=inplace).tobytes() == whole[0].tobytes()
    inplace = g.copy()
    r = xpsoftmax.softmax_backward(x, inplace, out=inplace)
    assert r.tobytes() == whole[2].tobytes()


# --------------------------------------------------------------------------------------------
# the 16-bit storage conversions (float16, bfloat16) of the staged blocks


def _narrow_samples() -> np.ndarray:
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    edges = [65504.0, 65519.996, 65520.0, 65536.0, 6.0e-8, 2.9802322e-08, 5.9604645e-08]
    edges += [-0.0, 0.0, np.inf, -np.inf, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 3.0e38]
    ties = np.arange(-4096, 4096, dtype=np.float32) + np.float32(0.5)  # ties to even
    return np.concatenate(
        [bits.view(np.float32), np.array(edges, np.float32), ties, ties * np.float32(2.0**-14)]
    )


def test_widen_is_exact_for_every_float16_and_bfloat16():
    from xpsoftmax.backends.numpy import kernels

    ml_dtypes = pytest.importorskip("ml_dtypes")
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(bits.size, np.float32)
    for kind, dtype in ((0, np.float16), (1, ml_dtypes.bfloat16)):
        kernels.widen(bits, 0, 0, out, 1, 1, bits.size, kind, False)
        ref = bits.view(dtype).astype(np.float32)
        nan = np.isnan(ref)
        assert np.array_equal(out[~nan].view(np.uint32), ref[~nan].view(np.uint32))
        assert np.isnan(out[nan]).all()  # (signalling NaNs come back quiet)
        kernels.widen(bits, 0, 0, out, 1, 1, bits.size, kind, True)  # softmin: negated
        assert np.array_equal(out[~nan], -ref[~nan])


def test_narrow_rounds_as_numpy_and_ml_dtypes():
    from xpsoftmax.backends.numpy import kernels

    ml_dtypes = pytest.importorskip("ml_dtypes")
    f = _narrow_samples()
    out = np.empty(f.size, np.uint16)
    nan = np.isnan(f)
    for kind, dtype in ((0, np.float16), (1, ml_dtypes.bfloat16)):
        kernels.narrow(f, out, 0, 0, 1, 1, f.size, kind)
        with np.errstate(all="ignore"):
            ref = f.astype(dtype).view(np.uint16)
        assert np.array_equal(out[~nan], ref[~nan]), dtype
        assert np.isnan(out[nan].view(dtype).astype(np.float32)).all()


def test_strided_blocks_convert_in_place():
    from xpsoftmax.backends.numpy import kernels

    x = np.arange(2 * 3 * 10, dtype=np.float16).reshape(2, 3, 10)[:, :, 2:7]  # strided
    flat = np.lib.stride_tricks.as_strided(x.view(np.uint16), (x.size * 3,), (2,))
    out = np.empty(x.shape, np.float64)  # (float16 to float64, as dtype= does)
    kernels.widen(flat, 30, 10, out.reshape(-1), *x.shape, 0, False)
    assert np.array_equal(out, x.astype(np.float64))
    dst = np.zeros((2, 3, 10), np.float16)
    src = np.arange(30, dtype=np.float32).reshape(2, 3, 5) + np.float32(0.25)
    view = np.lib.stride_tricks.as_strided(dst[:, :, 2:].view(np.uint16), (60,), (2,))
    kernels.narrow(src.reshape(-1), view, 30, 10, *src.shape, 0)
    assert np.array_equal(dst[:, :, 2:7], src.astype(np.float16))
    assert not dst[:, :, :2].any() and not dst[:, :, 7:].any()


@pytest.mark.parametrize(
    ("shape", "axis"), [((37, 300), -1), ((4, 300, 70), 1), ((9, 2, 40), (0, 2))]
)
def test_bfloat16_and_float16_take_the_compiled_path_rounded_once(shape, axis, rng):
    # Each result is the float32 operation on the widened input, rounded once: the same bits as
    # computing in float32 and casting (with masks, softmin, logsumexp and the backward too).
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from xpsoftmax import _call, backends

    x32 = (3 * rng.standard_normal(shape)).astype(np.float32)
    mask = rng.random(shape) > 0.2
    for dtype in (np.float16, ml_dtypes.bfloat16):
        x = x32.astype(dtype)
        call = _call.make_call(_call.SOFTMAX, ((x, "x"),), axis, None, None)
        assert backends.select(call)[0] == "numpy"
        wide = x.astype(np.float32)
        for f in (xpsoftmax.softmax, xpsoftmax.log_softmax, xpsoftmax.softmin):
            for where in (None, mask):
                r = f(x, axis, where=where)
                assert r.dtype == dtype
                assert np.array_equal(
                    r.view(np.uint16), f(wide, axis, where=where).astype(dtype).view(np.uint16)
                )
        y = xpsoftmax.softmax(x, axis)
        g = rng.standard_normal(shape).astype(dtype)
        r = xpsoftmax.softmax_backward(y, g, axis, where=mask)
        ref = xpsoftmax.softmax_backward(
            y.astype(np.float32), g.astype(np.float32), axis, where=mask
        )
        assert np.array_equal(r.view(np.uint16), ref.astype(dtype).view(np.uint16))
        r = xpsoftmax.logsumexp(x, axis)
        assert np.array_equal(
            r.view(np.uint16), xpsoftmax.logsumexp(wide, axis).astype(dtype).view(np.uint16)
        )
