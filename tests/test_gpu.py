"""The fused CUDA kernels on a real GPU, against float64 references from the generic path.

Skipped as a whole where CuPy is missing or no CUDA device is usable. Every case runs one public
function under ``xpsoftmax.kernels("always")`` on CuPy arrays (or torch CUDA tensors) and
compares it with the same function under ``xpsoftmax.kernels("never")`` (the generic array-API
path) on float64 copies of the same inputs.

How results are compared (:func:`assert_matches`):

* namespace, device, dtype and shape of the result;
* NaN, ``+inf`` and ``-inf`` at exactly the reference's positions (so an entry the kernel never
  wrote, left as the NaN the buffer was poisoned with, fails);
* over the finite entries, ``||out - ref|| / ||ref|| < TOL[dtype]`` (1e-6 float32, 1e-3
  float16, 1e-12 float64), where ``ref`` is the float64 reference rounded once to the output
  dtype. Rounding it first keeps out the error no kernel can avoid: float16 softmax values of long
  rows are subnormal, and rounding them alone is off by more than 1e-3;
* for the backward and JVP ops of the row-length sweep, the denominator is the larger of
  ``||ref||`` and the size of the terms the result is a difference of (:func:`pair_scale`):
  ``g - sum(y g)`` cancels, and float32 arithmetic is only accurate relative to the terms;
* for the forward ops, the same ratio row by row under ``10 * TOL`` (a wrong row hides in a
  global norm). The backward and JVP are ill-conditioned on peaked rows (``g - sum(y g)``
  cancels), so for them only the global norm is meaningful.

The whole module is sized to run in well under 90 s on an H100, kernel compilation included.
Where ``XPSOFTMAX_GPU_TEST_DEADLINE`` (seconds since the epoch) is set, tests that would start
after it are skipped, so a slow run still ends with a complete report.
"""

from __future__ import annotations

import inspect
import math
import os
import time
import zlib
from typing import Any

import pytest
from _helpers import spy_kernels

import xpsoftmax
from xpsoftmax import _compat

cupy = pytest.importorskip("cupy", reason="the GPU tests need CuPy")
if not cupy.is_available():
    pytest.skip("no usable CUDA device (cupy.is_available() is False)", allow_module_level=True)

pytestmark = pytest.mark.gpu

# benchmarks/gpu_check.sh sets this (seconds since the epoch) so that, when the tests run long,
# the rest are skipped and pytest still ends in time to write its report.
_DEADLINE = float(os.environ.get("XPSOFTMAX_GPU_TEST_DEADLINE", "inf"))


@pytest.fixture(autouse=True)
def _within_time_budget():
    if time.time() > _DEADLINE:
        pytest.skip("the GPU check's time budget for the tests is spent")


# op name -> (public function, inputs kind, log)
OPS: dict[str, tuple[Any, str, bool]] = {
    "softmax": (xpsoftmax.softmax, "forward", False),
    "log_softmax": (xpsoftmax.log_softmax, "forward", True),
    "softmax_backward": (xpsoftmax.softmax_backward, "pair", False),
    "log_softmax_backward": (xpsoftmax.log_softmax_backward, "pair", True),
    "softmax_jvp": (xpsoftmax.softmax_jvp, "pair", False),
    "log_softmax_jvp": (xpsoftmax.log_softmax_jvp, "pair", True),
}
OP_NAMES = list(OPS)
FORWARD_OPS = [op for op in OPS if OPS[op][1] == "forward"]
PAIR_OPS = [op for op in OPS if OPS[op][1] == "pair"]
OUT_OPS = [op for op in OPS if "out" in inspect.signature(OPS[op][0]).parameters]
DTYPES = ["float16", "float32", "float64"]
TOL = {"float16": 1e-3, "float32": 1e-6, "float64": 1e-12}

LENGTHS = [
    *(1, 2, 31, 32, 33, 127, 1000, 1024, 1025, 2047, 2048),
    *(4096, 8191, 32768, 65537, 262144, 1048576),
]
MAX_ELEMENTS = 1 << 22  # per case, so the float64 references stay small and fast


def _row_counts(n: int) -> list[int]:
    """1, 3, 1000 and a large count (up to 2**16 rows), capped at MAX_ELEMENTS per case."""
    cap = max(1, MAX_ELEMENTS // n)
    return sorted({1, 3, min(1000, cap), min(1 << 16, cap)})


ROW_CASES = [(n, rows) for n in LENGTHS for rows in _row_counts(n)]


# --------------------------------------------------------------------------------------------
# inputs, references and the comparison


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def _normal(shape: tuple[int, ...], dtype: str, seed: int, scale: float = 2.0):
    rng = cupy.random.default_rng(seed)
    return (rng.standard_normal(shape, dtype=cupy.float32) * scale).astype(dtype)


def _call(op: str, args: tuple, axis: Any, where: Any = None, out: Any = None):
    fn = OPS[op][0]
    kwargs: dict[str, Any] = {"axis": axis}
    if where is not None:
        kwargs["where"] = where
    if out is not None:
        kwargs["out"] = out
    return fn(*args, **kwargs)


def reference(op: str, args: tuple, axis: Any, where: Any = None):
    """The generic array-API path on float64 copies of ``args``."""
    with xpsoftmax.kernels("never"):
        return _call(op, tuple(a.astype(cupy.float64) for a in args), axis, where)


def kernel(op: str, args: tuple, axis: Any, where: Any = None, out: Any = None):
    with xpsoftmax.kernels("always"):
        return _call(op, args, axis, where, out)


def make_inputs(op: str, x, axis: Any = -1, where: Any = None, g=None, seed: int = 0) -> tuple:
    """The inputs of ``op`` in ``x``'s dtype: ``(x,)``, or ``(y, g)`` with ``y`` the forward
    output of ``x`` (log-probabilities for the log ops) and ``g`` random, contiguous."""
    _, kind, log = OPS[op]
    if kind == "forward":
        return (x,)
    y = reference("log_softmax" if log else "softmax", (x,), axis, where).astype(x.dtype)
    if g is None:
        g = _normal(x.shape, str(x.dtype), seed + 1, scale=1.0)
    return (y, g)


def _axes(axis: Any, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    items = axis if isinstance(axis, tuple) else (axis,)
    return tuple(sorted(a % ndim for a in items))


def _rows(a, axis: Any):
    """``a`` with the softmax axes moved last and flattened: shape ``(rows, n)``."""
    axes = _axes(axis, a.ndim)
    rest = [d for d in range(a.ndim) if d not in axes]
    moved = cupy.transpose(a, (*rest, *axes))
    n = math.prod(a.shape[d] for d in axes)
    return moved.reshape(-1, n)


def pair_scale(op: str, args: tuple, axis: Any):
    """Size of the terms a backward/JVP output is the difference of, in float64.

    ``y * (g - sum(y g))`` (and the log-softmax forms) cancel when ``g`` is close to the row sum:
    any float32 evaluation then carries an error of a few ulp of the *terms*, which can be far
    above 1e-6 of the (small) result. The tolerance is taken relative to this scale where it is
    larger than the reference itself.
    """
    y, g = (cupy.nan_to_num(a.astype(cupy.float64), nan=0.0, posinf=0.0, neginf=0.0) for a in args)
    axes = _axes(axis, y.ndim)
    if op in ("softmax_backward", "softmax_jvp"):
        s = cupy.abs(cupy.sum(y * g, axis=axes, keepdims=True))
        return cupy.abs(y) * (cupy.abs(g) + s)
    p = cupy.exp(cupy.minimum(y, 0.0))
    if op == "log_softmax_backward":
        return cupy.abs(g) + p * cupy.abs(cupy.sum(g, axis=axes, keepdims=True))
    return cupy.abs(g) + cupy.abs(cupy.sum(p * g, axis=axes, keepdims=True))


def assert_matches(
    out, ref, *, dtype: str, axis: Any, label: str, like=None, per_row=False, scale=None
):
    """Assert ``out`` matches the float64 ``ref`` (see the module docstring).

    ``scale`` (float64, ``ref``'s shape), when given, is the size of the terms the result is a
    difference of (:func:`pair_scale`); the error is then measured against the larger of
    ``||ref||`` and ``||scale||``.
    """
    like = ref if like is None else like
    assert isinstance(out, cupy.ndarray), f"{label}: result is {type(out)}, not a CuPy array"
    assert _compat.array_namespace(out) is _compat.array_namespace(like), f"{label}: namespace"
    assert out.device == like.device, f"{label}: result on {out.device}, input on {like.device}"
    assert str(out.dtype) == dtype, f"{label}: dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref.shape, f"{label}: shape {out.shape}, expected {ref.shape}"
    o = out.astype(cupy.float64)
    r = ref.astype(dtype).astype(cupy.float64)
    for name, test in (("NaN", cupy.isnan), ("+inf", cupy.isposinf), ("-inf", cupy.isneginf)):
        differ = int(cupy.count_nonzero(test(o) != test(r)))
        assert differ == 0, (
            f"{label}: {differ} of {o.size} entries differ in being {name} "
            f"(result has {int(cupy.count_nonzero(test(o)))}, "
            f"reference {int(cupy.count_nonzero(test(r)))})"
        )
    finite = cupy.isfinite(r)
    rf = cupy.where(finite, r, 0.0)
    d = cupy.where(finite, o, 0.0) - rf
    num, den = float(cupy.linalg.norm(d)), float(cupy.linalg.norm(rf))
    if scale is not None:
        den = max(den, float(cupy.linalg.norm(cupy.where(finite, scale, 0.0))))
    tol = TOL[dtype]
    if den == 0.0:
        assert num == 0.0, f"{label}: reference is all 0 there, result has norm {num:.3g}"
    else:
        assert num / den < tol, f"{label}: ||out - ref|| / ||ref|| = {num / den:.3g} >= {tol:g}"
    if per_row:
        dr, rr = _rows(d, axis), _rows(rf, axis)
        row_num = cupy.sqrt(cupy.sum(dr * dr, axis=1))
        row_den = cupy.sqrt(cupy.sum(rr * rr, axis=1))
        ratio = cupy.where(row_den > 0, row_num / cupy.where(row_den > 0, row_den, 1.0), 0.0)
        ratio = cupy.where((row_den == 0) & (row_num > 0), cupy.inf, ratio)
        worst = int(cupy.argmax(ratio))
        worst_ratio = float(ratio[worst])
        assert worst_ratio < 10 * tol, (
            f"{label}: row {worst} of {ratio.size} has relative error {worst_ratio:.3g} "
            f">= {10 * tol:g}"
        )


def check(op: str, args: tuple, axis: Any, where: Any = None, out: Any = None, label: str = ""):
    """Run ``op`` on the kernels and compare it with the reference; return the result."""
    ref = reference(op, args, axis, where)
    result = kernel(op, args, axis, where, out)
    if out is not None:
        assert result is out, f"{label}: out= was given but another array was returned"
    assert_matches(
        result,
        ref,
        dtype=str(args[0].dtype),
        axis=axis,
        label=label or op,
        like=args[0],
        per_row=OPS[op][1] == "forward",
    )
    return result


# layouts: an array with the same values as the contiguous ``a`` in another memory layout


def relayout(a, kind: str, offset: int = 1):
    if kind == "contiguous":
        return a
    if kind == "misaligned":  # starts ``offset`` elements into a buffer
        buf = cupy.empty(a.size + offset, dtype=a.dtype)
        v = buf[offset:].reshape(a.shape)
        v[...] = a
        return v
    if kind == "transposed":  # Fortran order: the softmax axis has the largest stride
        return cupy.ascontiguousarray(a.T).T
    if kind == "col_stride":  # every other element of a twice-as-wide buffer
        big = cupy.empty((*a.shape[:-1], 2 * a.shape[-1]), dtype=a.dtype)
        v = big[..., ::2]
        v[...] = a
        return v
    if kind == "row_stride":  # every other row
        big = cupy.empty((2 * a.shape[0], *a.shape[1:]), dtype=a.dtype)
        v = big[::2]
        v[...] = a
        return v
    if kind == "reversed":  # negative stride along the softmax axis
        return cupy.ascontiguousarray(a[..., ::-1])[..., ::-1]
    raise ValueError(kind)


def _out_view(buf, shape: tuple[int, ...], kind: str):
    """The view of ``buf`` (a 1-D buffer) that serves as ``out`` in layout ``kind``."""
    size = math.prod(shape)
    if kind == "contiguous":
        return buf[:size].reshape(shape)
    if kind == "misaligned":
        return buf[1 : size + 1].reshape(shape)
    if kind == "transposed":
        return buf[:size].reshape(shape[::-1]).T
    if kind == "col_stride":
        return buf[: 2 * size].reshape(*shape[:-1], 2 * shape[-1])[..., ::2]
    raise ValueError(kind)


def poisoned_out(shape: tuple[int, ...], dtype: str, kind: str):
    """A NaN-filled ``out`` in layout ``kind``, inside a buffer whose other entries are 7.

    Returns ``(out, untouched)``: ``untouched()`` asserts that no entry outside ``out`` changed
    (the buffer extends past ``out`` at the end, and between its entries for ``col_stride``).
    """
    length = 2 * math.prod(shape) + 8
    buf = cupy.full(length, 7, dtype=dtype)
    out = _out_view(buf, shape, kind)
    out[...] = math.nan
    inside = cupy.zeros(length, dtype=bool)
    _out_view(inside, shape, kind)[...] = True

    def untouched() -> None:
        changed = int(cupy.count_nonzero(~inside & (buf != 7)))
        assert changed == 0, f"{changed} entries outside out= were overwritten"

    return out, untouched


# --------------------------------------------------------------------------------------------
# every row length and row count, contiguous, no silent fallback


@pytest.fixture
def no_generic(monkeypatch):
    """Make the generic path raise: a case run under it must use the kernels."""

    def install():
        from xpsoftmax import _generic

        def boom(*args, **kwargs):
            msg = "the kernels path fell back to the generic implementation"
            raise AssertionError(msg)

        for name in ("forward", "backward", "jvp"):
            monkeypatch.setattr(_generic, name, boom)

    return install


@pytest.mark.parametrize(("n", "rows"), ROW_CASES, ids=[f"n{n}-r{r}" for n, r in ROW_CASES])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OP_NAMES)
def test_rows(op, dtype, n, rows, no_generic):
    seed = _seed(op, dtype, n, rows)
    x = _normal((rows, n), dtype, seed)
    args = make_inputs(op, x, seed=seed)
    ref = reference(op, args, -1)
    no_generic()
    # Freed NaN memory is what CuPy's pool hands out next: an entry never written stays NaN.
    junk = cupy.full((rows, n), math.nan, dtype=dtype)
    del junk
    result = kernel(op, args, -1)
    assert_matches(
        result,
        ref,
        dtype=dtype,
        axis=-1,
        label=f"{op} {dtype} ({rows}, {n})",
        like=x,
        per_row=OPS[op][1] == "forward",
        scale=None if OPS[op][1] == "forward" else pair_scale(op, args, -1),
    )


# --------------------------------------------------------------------------------------------
# out=: poisoned with NaN, fully written, nothing outside it touched

OUT_SIZES = [(3, 1), (5, 33), (1000, 32), (3, 1000), (64, 4096), (3, 65537), (2, 262144)]


@pytest.mark.parametrize("kind", ["contiguous", "misaligned", "transposed", "col_stride"])
@pytest.mark.parametrize(("rows", "n"), OUT_SIZES, ids=[f"r{r}-n{n}" for r, n in OUT_SIZES])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OUT_OPS)
def test_out_poisoned(op, dtype, rows, n, kind):
    seed = _seed("out", op, dtype, rows, n, kind)
    args = make_inputs(op, _normal((rows, n), dtype, seed), seed=seed)
    out, untouched = poisoned_out((rows, n), dtype, kind)
    check(op, args, -1, out=out, label=f"{op} {dtype} ({rows}, {n}) out={kind}")
    untouched()


# --------------------------------------------------------------------------------------------
# misaligned inputs (offset by one element) and mixed alignment of the two inputs

MISALIGNED_LENGTHS = [1, 2, 7, 31, 32, 33, 1000, 1025, 4096, 8191, 65537, 262144]


@pytest.mark.parametrize("n", MISALIGNED_LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OP_NAMES)
def test_misaligned(op, dtype, n):
    rows = 3 if n >= 65536 else 9
    seed = _seed("mis", op, dtype, n)
    args = make_inputs(op, _normal((rows, n), dtype, seed), seed=seed)
    args = tuple(relayout(a, "misaligned") for a in args)
    check(op, args, -1, label=f"{op} {dtype} ({rows}, {n}) misaligned")


@pytest.mark.parametrize(
    "offsets", [(0, 1), (1, 0), (1, 2), (3, 1)], ids=lambda o: f"offsets{o[0]}-{o[1]}"
)
@pytest.mark.parametrize("n", [33, 4096, 65537])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("op", PAIR_OPS)
def test_mixed_alignment(op, dtype, n, offsets):
    rows = 3
    seed = _seed("mixed", op, dtype, n, offsets)
    args = make_inputs(op, _normal((rows, n), dtype, seed), seed=seed)
    args = tuple(
        relayout(a, "misaligned", k) if k else a for a, k in zip(args, offsets, strict=True)
    )
    check(op, args, -1, label=f"{op} {dtype} ({rows}, {n}) offsets {offsets}")


# --------------------------------------------------------------------------------------------
# non-contiguous inputs


@pytest.mark.parametrize("kind", ["transposed", "col_stride", "row_stride", "reversed"])
@pytest.mark.parametrize("n", [33, 1000, 4096, 65537])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OP_NAMES)
def test_noncontiguous(op, dtype, n, kind):
    rows = 3 if n >= 65536 else 6
    seed = _seed("nc", op, dtype, n, kind)
    args = make_inputs(op, _normal((rows, n), dtype, seed), seed=seed)
    args = tuple(relayout(a, kind) for a in args)
    assert not args[0].flags.c_contiguous
    check(op, args, -1, label=f"{op} {dtype} ({rows}, {n}) {kind}")


# --------------------------------------------------------------------------------------------
# every axis of a 3-D array, tuple axes, the non-last-axis kernel

AXIS_CASES = [
    ((6, 129, 35), 0),
    ((6, 129, 35), 1),
    ((6, 129, 35), 2),
    ((6, 129, 35), -2),
    ((6, 129, 35), (0, 1)),
    ((6, 129, 35), (1, 2)),
    ((6, 129, 35), (0, 2)),
    ((6, 129, 35), None),
    ((4, 1000, 64), 1),
    ((3, 5000, 40), 1),
    ((2, 70000, 3), 1),
    ((65, 3, 7), 0),
    ((8, 4096, 1), 1),
]


@pytest.mark.parametrize(
    ("shape", "axis"), AXIS_CASES, ids=[f"{'x'.join(map(str, s))}-ax{a}" for s, a in AXIS_CASES]
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OP_NAMES)
def test_axes(op, dtype, shape, axis):
    seed = _seed("axes", op, dtype, shape, axis)
    args = make_inputs(op, _normal(shape, dtype, seed), axis, seed=seed)
    check(op, args, axis, label=f"{op} {dtype} {shape} axis={axis}")


# --------------------------------------------------------------------------------------------
# masks: full shape, broadcast, fully masked rows; masked cotangents may be NaN


def _mask(kind: str, shape: tuple[int, ...], seed: int):
    rng = cupy.random.default_rng(seed)
    if kind == "full":
        m = rng.random(shape) < 0.7
        m[0] = False  # a fully masked row
        if shape[0] > 2:
            m[2] = True
        return m
    if kind == "columns":  # shape (1, n): the same entries masked in every row
        m = rng.random((1, shape[-1])) < 0.6
        m[0, 0] = True
        return m
    if kind == "rows":  # shape (rows, 1): whole rows masked
        m = rng.random((shape[0], 1)) < 0.5
        m[0, 0], m[-1, 0] = False, True
        return m
    if kind == "all":
        return cupy.ones(shape, dtype=bool)
    if kind == "inner":  # 3-D, axis 1, shape (1, n, 1)
        m = rng.random((1, shape[1], 1)) < 0.6
        m[0, 0, 0] = True
        return m
    raise ValueError(kind)


MASK_CASES = [
    ("full", (5, 1), -1),
    ("full", (5, 33), -1),
    ("full", (7, 1000), -1),
    ("full", (4, 4096), -1),
    ("full", (3, 65537), -1),
    ("columns", (6, 1025), -1),
    ("columns", (3, 262144), -1),
    ("rows", (9, 2047), -1),
    ("all", (4, 100), -1),
    ("inner", (3, 500, 20), 1),
    ("full", (3, 500, 20), 1),
]


@pytest.mark.parametrize(
    ("kind", "shape", "axis"),
    MASK_CASES,
    ids=[f"{k}-{'x'.join(map(str, s))}" for k, s, _ in MASK_CASES],
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OP_NAMES)
def test_masks(op, dtype, kind, shape, axis):
    seed = _seed("mask", op, dtype, kind, shape)
    where = _mask(kind, shape, seed)
    full = cupy.broadcast_to(where, shape)
    x = _normal(shape, dtype, seed)
    g = None
    if OPS[op][1] == "pair":
        # Masked cotangents are NaN: the semantics leave them out of the sums and give 0.
        g = cupy.where(full, _normal(shape, dtype, seed + 1, scale=1.0), math.nan).astype(dtype)
    args = make_inputs(op, x, axis, where, g=g, seed=seed)
    check(op, args, axis, where=where, label=f"{op} {dtype} {shape} mask={kind}")


# --------------------------------------------------------------------------------------------
# +inf, -inf and NaN rows


def _special_rows(n: int, dtype: str, seed: int):
    """Rows: finite; one +inf; two +inf; some -inf; all -inf; one NaN; all +inf; -inf and +inf;
    NaN and +inf; all NaN; then finite rows (a warp of short rows mixes special and plain rows)."""
    x = _normal((12, n), dtype, seed)
    inf, nan = math.inf, math.nan
    x[1, n // 2] = inf
    x[2, 0] = inf
    x[2, n - 1] = inf
    x[3, ::3] = -inf
    x[3, 0] = 0.5  # some -inf, not all (for n <= 3 this keeps one finite entry)
    x[4] = -inf
    x[5, n // 3] = nan
    x[6] = inf
    x[7, ::2] = -inf
    x[7, n - 1] = inf
    x[8, n - 1] = nan
    x[8, 0] = inf
    x[9] = nan
    return x


@pytest.mark.parametrize("n", [1, 2, 33, 1000, 2000, 2048, 4096, 65537])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OP_NAMES)
def test_nonfinite_rows(op, dtype, n):
    seed = _seed("special", op, dtype, n)
    args = make_inputs(op, _special_rows(n, dtype, seed), seed=seed)
    check(op, args, -1, label=f"{op} {dtype} special rows n={n}")


# --------------------------------------------------------------------------------------------
# the same bits on a second run

DETERMINISM_CASES = [
    ((1000, 1000), -1),
    ((64, 4096), -1),
    ((16, 65537), -1),
    ((4, 262144), -1),
    ((2, 1048576), -1),
    ((8, 3000, 64), 1),
]


@pytest.mark.parametrize(
    ("shape", "axis"),
    DETERMINISM_CASES,
    ids=[f"{'x'.join(map(str, s))}-ax{a}" for s, a in DETERMINISM_CASES],
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OP_NAMES)
def test_bitwise_reproducible(op, dtype, shape, axis):
    seed = _seed("det", op, dtype, shape)
    args = make_inputs(op, _normal(shape, dtype, seed), axis, seed=seed)
    first = kernel(op, args, axis)
    junk = cupy.full(shape, math.nan, dtype=dtype)  # a different pool state for the second run
    second = kernel(op, args, axis)
    del junk
    uint = {"float16": cupy.uint16, "float32": cupy.uint32, "float64": cupy.uint64}[dtype]
    differ = int(cupy.count_nonzero(first.view(uint) != second.view(uint)))
    assert differ == 0, f"{op} {dtype} {shape}: {differ} entries differ between two runs"


# --------------------------------------------------------------------------------------------
# dtype promotion on the kernel path


def test_integer_input_promotes_to_float64():
    x = cupy.arange(-20, 20, dtype=cupy.int32).reshape(4, 10)
    ref = reference("softmax", (x,), -1)
    assert_matches(kernel("softmax", (x,), -1), ref, dtype="float64", axis=-1, label="int32")


def test_mixed_dtypes_promote():
    x = _normal((5, 300), "float32", 1)
    y = reference("softmax", (x,), -1).astype(cupy.float32)
    g = _normal((5, 300), "float64", 2)
    ref = reference("softmax_backward", (y, g), -1)
    result = kernel("softmax_backward", (y, g), -1)
    assert_matches(result, ref, dtype="float64", axis=-1, label="float32 y, float64 g")


# --------------------------------------------------------------------------------------------
# PyTorch CUDA tensors through DLPack


def _torch():
    torch = pytest.importorskip("torch", reason="the torch route tests need PyTorch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return torch


TORCH_DTYPES = ["float16", "float32", "float64"]
TORCH_CASES = [((7, 33), -1), ((5, 4096), 1), ((3, 65537), -1), ((4, 300, 16), 1), ((3, 5, 7), 0)]
_TORCH_IDS = [f"{'x'.join(map(str, s))}-ax{a}" for s, a in TORCH_CASES]


def _t_assert(actual, desired, x, label: str) -> None:
    """``actual`` is a tensor like ``x`` and within TOL of ``desired`` (norm-wise, finite)."""
    torch = _torch()
    assert isinstance(actual, torch.Tensor), f"{label}: result is {type(actual)}"
    assert actual.device == x.device, f"{label}: result on {actual.device}, input on {x.device}"
    assert actual.dtype == x.dtype, f"{label}: dtype {actual.dtype}, expected {x.dtype}"
    assert actual.shape == desired.shape, f"{label}: shape {actual.shape} != {desired.shape}"
    a, d = actual.detach().double(), desired.detach().double()
    assert torch.equal(torch.isnan(a), torch.isnan(d)), f"{label}: NaN positions differ"
    assert torch.equal(torch.isinf(a), torch.isinf(d)), f"{label}: inf positions differ"
    fin = torch.isfinite(d)
    num = torch.linalg.vector_norm(torch.where(fin, a - d, 0.0)).item()
    den = torch.linalg.vector_norm(torch.where(fin, d, 0.0)).item()
    tol = TOL[str(x.dtype).removeprefix("torch.")]
    assert num <= tol * den, f"{label}: relative error {num / max(den, 1e-300):.3g} >= {tol:g}"


def _t_randn(shape, dtype, seed, device="cuda"):
    torch = _torch()
    gen = torch.Generator(device=device).manual_seed(seed)
    return (2 * torch.randn(shape, generator=gen, device=device, dtype=torch.float32)).to(
        getattr(torch, dtype)
    )


@pytest.mark.parametrize(("shape", "axis"), TORCH_CASES, ids=_TORCH_IDS)
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_torch_forward_and_autograd(log, dtype, shape, axis):
    """Values and gradients against torch's own softmax and autograd in the same dtype."""
    torch = _torch()
    x = _t_randn(shape, dtype, _seed("t", log, dtype, shape)).requires_grad_(True)
    g = _t_randn(shape, dtype, _seed("tg", log, dtype, shape))
    fn = xpsoftmax.log_softmax if log else xpsoftmax.softmax
    with xpsoftmax.kernels("always"):
        y = fn(x, axis=axis)
    assert y.requires_grad and y.grad_fn is not None
    xr = x.detach().clone().requires_grad_(True)
    yr = (torch.log_softmax if log else torch.softmax)(xr, dim=axis)
    _t_assert(y, yr, x, f"forward {dtype} {shape}")
    y.backward(g)
    yr.backward(g)
    _t_assert(x.grad, xr.grad, x, f"autograd {dtype} {shape}")


@pytest.mark.parametrize(("shape", "axis"), TORCH_CASES, ids=_TORCH_IDS)
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_torch_backward_matches_native(log, dtype, shape, axis):
    torch = _torch()
    x = _t_randn(shape, dtype, _seed("tb", log, dtype, shape))
    g = _t_randn(shape, dtype, _seed("tbg", log, dtype, shape))
    y = (torch.log_softmax if log else torch.softmax)(x, dim=axis)
    native = torch._log_softmax_backward_data if log else torch._softmax_backward_data
    fn = xpsoftmax.log_softmax_backward if log else xpsoftmax.softmax_backward
    with xpsoftmax.kernels("always"):
        dx = fn(y, g, axis=axis)
    _t_assert(dx, native(g, y, axis % x.ndim, x.dtype), x, f"backward {dtype} {shape}")


# torch.func.jvp loads decompositions through torch.jit.script, deprecated in recent torch.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_torch_jvp_matches_torch_func(log, dtype):
    torch = _torch()
    x = _t_randn((6, 1500), dtype, 3)
    t = _t_randn((6, 1500), dtype, 4)
    ref_fn = torch.log_softmax if log else torch.softmax
    y, dy_ref = torch.func.jvp(lambda v: ref_fn(v, dim=-1), (x,), (t,))
    fn = xpsoftmax.log_softmax_jvp if log else xpsoftmax.softmax_jvp
    with xpsoftmax.kernels("always"):
        dy = fn(y, t)
    _t_assert(dy, dy_ref, x, f"jvp {dtype}")


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_torch_double_backward(log):
    """Hessian-vector product through our forward and VJP against torch's own softmax."""
    torch = _torch()
    x = _t_randn((5, 777), "float64", 5).requires_grad_(True)
    g, v = _t_randn((5, 777), "float64", 6), _t_randn((5, 777), "float64", 7)
    with xpsoftmax.kernels("always"):
        y = (xpsoftmax.log_softmax if log else xpsoftmax.softmax)(x)
        (dx,) = torch.autograd.grad(y, x, g, create_graph=True)
        (hvp,) = torch.autograd.grad(dx, x, v)
    xr = x.detach().clone().requires_grad_(True)
    yr = (torch.log_softmax if log else torch.softmax)(xr, dim=-1)
    (dxr,) = torch.autograd.grad(yr, xr, g, create_graph=True)
    (hvp_ref,) = torch.autograd.grad(dxr, xr, v)
    _t_assert(dx, dxr, x, "first derivative")
    _t_assert(hvp, hvp_ref, x, "Hessian-vector product")


@pytest.mark.parametrize("kind", ["full", "columns"])
@pytest.mark.parametrize("op", OP_NAMES)
def test_torch_masks(op, kind):
    """Masked calls on tensors against the generic path on the same tensors in float64."""
    torch = _torch()
    shape = (6, 1025)
    x = _t_randn(shape, "float32", _seed("tm", op, kind))
    gen = torch.Generator(device="cuda").manual_seed(9)
    if kind == "full":
        where = torch.rand(shape, generator=gen, device="cuda") < 0.7
        where[0] = False
    else:
        where = torch.rand((1, shape[1]), generator=gen, device="cuda") < 0.6
        where[0, 0] = True
    fn, kind_, log = OPS[op]
    if kind_ == "forward":
        args = (x,)
    else:
        with xpsoftmax.kernels("never"):
            y = (xpsoftmax.log_softmax if log else xpsoftmax.softmax)(x, where=where)
        args = (y, _t_randn(shape, "float32", 10))
    with xpsoftmax.kernels("never"):
        ref = fn(*(a.double() for a in args), where=where)
    with xpsoftmax.kernels("always"):
        result = fn(*args, where=where)
    _t_assert(result, ref, x, f"{op} mask={kind}")


@pytest.mark.parametrize("op", OUT_OPS)
def test_torch_out(op):
    torch = _torch()
    shape = (4, 2049)
    x = _t_randn(shape, "float32", _seed("to", op))
    fn, kind, log = OPS[op]
    args = (x,) if kind == "forward" else ((torch.log_softmax if log else torch.softmax)(x, -1), x)
    out = torch.full(shape, math.nan, device="cuda")
    with xpsoftmax.kernels("never"):
        ref = fn(*(a.double() for a in args))
    with xpsoftmax.kernels("always"):
        result = fn(*args, out=out)
    assert result is out
    _t_assert(out, ref, x, f"{op} out=")
    with pytest.raises(RuntimeError, match=r"out= does not support automatic differentiation"):
        with xpsoftmax.kernels("always"):
            fn(*(a.clone().requires_grad_(True) for a in args), out=out)


@pytest.mark.parametrize("layout", ["transposed", "col_stride"])
def test_torch_noncontiguous(layout):
    torch = _torch()
    base = _t_randn((4097, 5), "float32", 11)
    x = base.t() if layout == "transposed" else _t_randn((5, 8194), "float32", 12)[:, ::2]
    assert not x.is_contiguous()
    with xpsoftmax.kernels("always"):
        y = xpsoftmax.softmax(x)
    _t_assert(y, torch.softmax(x, dim=-1), x, layout)


def test_torch_side_stream():
    """Work is ordered on torch's current stream: inputs made on a side stream just before."""
    torch = _torch()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), xpsoftmax.kernels("always"):
        x = _t_randn((64, 65537), "float32", 13)
        y = xpsoftmax.softmax(x)
        ly = xpsoftmax.log_softmax(x)
        dx = xpsoftmax.softmax_backward(y, x)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    ref = torch.softmax(x, dim=-1)
    _t_assert(y, ref, x, "softmax on a side stream")
    _t_assert(ly, torch.log_softmax(x, dim=-1), x, "log_softmax on a side stream")
    _t_assert(dx, torch._softmax_backward_data(x, ref, 1, x.dtype), x, "backward, side stream")


def test_torch_bfloat16_routing():
    torch = _torch()
    x = _t_randn((3, 100), "float32", 14).to(torch.bfloat16)
    with xpsoftmax.kernels("auto"):
        y = xpsoftmax.softmax(x)  # not a kernel dtype: the generic path, still a CUDA tensor
    assert isinstance(y, torch.Tensor) and y.device == x.device and y.dtype == torch.bfloat16
    ref = torch.softmax(x.float(), dim=-1)
    assert (y.float() - ref).abs().max().item() < 1e-2
    with xpsoftmax.kernels("always"), pytest.raises(TypeError, match="bfloat16"):
        xpsoftmax.softmax(x)


def test_torch_expanded_gradient():
    """``y.sum().backward()`` hands the backward an expanded (stride 0) gradient."""
    torch = _torch()
    x = _t_randn((4, 3000), "float32", 15).requires_grad_(True)
    with xpsoftmax.kernels("always"):
        xpsoftmax.log_softmax(x).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    torch.log_softmax(xr, dim=-1).sum().backward()
    _t_assert(x.grad, xr.grad, x, "gradient of a sum")


# --------------------------------------------------------------------------------------------
# cross-entropy on torch CUDA tensors and on a second device (the fused kernels, through the
# same registry as softmax), against torch.nn.functional.cross_entropy and its autograd


@pytest.fixture
def xent_kernels(monkeypatch):
    """Names of the cross-entropy kernels fetched through the loader during the test."""
    return spy_kernels(monkeypatch, "cross_entropy.cu")


def _xent_case(torch, dtype: str, device: str, seed: int):
    x = _t_randn((64, 1000), dtype, seed, device=device)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    t = torch.randint(0, 1000, (64,), generator=gen, device=device)
    t[::7] = -100
    return x, t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_cross_entropy_fused_with_autograd(dtype, reduction, xent_kernels):
    torch = _torch()
    F = torch.nn.functional
    x, t = _xent_case(torch, dtype, "cuda", _seed("xe", dtype, reduction))
    kw = {"reduction": reduction, "ignore_index": -100, "label_smoothing": 0.1}
    x.requires_grad_(True)
    with xpsoftmax.kernels("always"):
        loss = xpsoftmax.cross_entropy(x, t, **kw)
    xr = x.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(xr, t, **kw)
    _t_assert(loss, ref, x, f"cross_entropy {reduction}")
    g = _t_randn(ref.shape, dtype, 3) if reduction == "none" else torch.tensor(0.7, device="cuda")
    loss.backward(g.to(loss.dtype))
    ref.backward(g.to(ref.dtype))
    _t_assert(x.grad, xr.grad, x, f"autograd {reduction}")
    with xpsoftmax.kernels("always"):
        dx = xpsoftmax.cross_entropy_backward(x.detach(), t, dloss=g.to(x.dtype), **kw)
    _t_assert(dx, xr.grad, x, f"cross_entropy_backward {reduction}")
    ctype = {"float32": "float", "float64": "double"}[dtype]
    assert xent_kernels.count(f"xps_xent_fwd<{ctype}>") == 1
    assert xent_kernels.count(f"xps_xent_bwd<{ctype}>") == 2


def test_torch_cross_entropy_generic_forms_keep_autograd(xent_kernels):
    """Probability targets and another class axis are not the fused kernel's: the generic path
    (torch operations, autograd included) runs, also under ``always``."""
    torch = _torch()
    F = torch.nn.functional
    x, t = _xent_case(torch, "float32", "cuda", 11)
    t = t.clamp(min=0)
    probs = torch.softmax(_t_randn(x.shape, "float32", 12), dim=-1)
    x.requires_grad_(True)
    with xpsoftmax.kernels("always"):
        loss = xpsoftmax.cross_entropy(x, probs) + xpsoftmax.cross_entropy(x.T, t, axis=0)
    xr = x.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(xr, probs) + F.cross_entropy(xr, t)
    _t_assert(loss, ref, x, "generic forms")
    loss.backward()
    ref.backward()
    _t_assert(x.grad, xr.grad, x, "generic forms, autograd")
    assert xent_kernels == []


def _second_device():
    torch = _torch()
    if cupy.cuda.runtime.getDeviceCount() < 2 or torch.cuda.device_count() < 2:
        pytest.skip("needs a second CUDA device (this machine has one)")
    return torch


def test_cross_entropy_on_a_second_device(xent_kernels):
    """CuPy arrays and torch tensors on device 1, called while device 0 is current: the kernels
    run on device 1 and the results stay there."""
    torch = _second_device()
    F = torch.nn.functional
    x, t = _xent_case(torch, "float32", "cuda:1", 21)
    kw = {"ignore_index": -100}
    ref = F.cross_entropy(x, t, **kw)
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(xr, t, **kw).backward()
    with cupy.cuda.Device(0), torch.cuda.device(0), xpsoftmax.kernels("always"):
        loss_t = xpsoftmax.cross_entropy(x, t, **kw)
        dx_t = xpsoftmax.cross_entropy_backward(x, t, **kw)
        with cupy.cuda.Device(1):
            xc, tc = cupy.asarray(x.cpu().numpy()), cupy.asarray(t.cpu().numpy())
        loss_c = xpsoftmax.cross_entropy(xc, tc, **kw)
        dx_c = xpsoftmax.cross_entropy_backward(xc, tc, **kw)
    _t_assert(loss_t, ref, x, "torch loss on cuda:1")
    _t_assert(dx_t, xr.grad, x, "torch gradient on cuda:1")
    assert loss_c.device.id == 1 and dx_c.device.id == 1
    assert abs(float(loss_c) - float(ref)) <= 1e-6 * abs(float(ref))
    np_grad = xr.grad.cpu().numpy()
    assert float(abs(cupy.asnumpy(dx_c) - np_grad).max()) <= 1e-6 * float(abs(np_grad).max())
    assert len(xent_kernels) == 4


# --------------------------------------------------------------------------------------------
# issue 12's operations on CuPy and torch CUDA: the generic CuPy path (no kernel of their own
# yet), against scipy / torch references in float64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [-1, 0, (0, 2)])
def test_logsumexp_and_backward_on_cupy(dtype, axis):
    import numpy as np
    import scipy.special

    rng = np.random.default_rng(12)
    x = (3 * rng.standard_normal((5, 7, 300))).astype(dtype)
    x[0, 0, 3] = np.inf
    x[1, 2] = -np.inf
    X = cupy.asarray(x)
    lse = xpsoftmax.logsumexp(X, axis, keepdims=True)
    assert isinstance(lse, cupy.ndarray) and lse.dtype == dtype
    ref = scipy.special.logsumexp(x.astype(np.float64), axis=axis, keepdims=True)
    rtol = {"float16": 2e-3, "float32": 1e-6, "float64": 1e-13}[dtype]
    np.testing.assert_allclose(cupy.asnumpy(lse).astype(np.float64), ref, rtol=rtol, atol=0)
    dl = cupy.ones(lse.shape, dtype=dtype)
    dx = xpsoftmax.logsumexp_backward(X, lse, dl, axis)
    assert isinstance(dx, cupy.ndarray) and dx.dtype == dtype
    on_cpu = xpsoftmax.logsumexp_backward(x, cupy.asnumpy(lse), cupy.asnumpy(dl), axis)
    np.testing.assert_allclose(
        cupy.asnumpy(dx).astype(np.float64), on_cpu.astype(np.float64), rtol=20 * rtol, atol=1e-7
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmin_and_dtype_on_cupy(dtype):
    import numpy as np
    import scipy.special

    rng = np.random.default_rng(13)
    x = (3 * rng.standard_normal((64, 1000))).astype(dtype)
    X = cupy.asarray(x)
    r = xpsoftmax.softmin(X)
    assert isinstance(r, cupy.ndarray) and r.dtype == dtype
    ref = scipy.special.softmax(-x.astype(np.float64), axis=-1)
    np.testing.assert_allclose(
        cupy.asnumpy(r).astype(np.float64), ref, rtol=TOL[dtype] * 10, atol=1e-7
    )
    r = xpsoftmax.softmax(X, dtype=cupy.float64)
    assert r.dtype == cupy.float64
    ref = scipy.special.softmax(x.astype(np.float64), axis=-1)
    np.testing.assert_allclose(cupy.asnumpy(r), ref, rtol=1e-12, atol=0)


def test_new_ops_on_torch_cuda_keep_autograd():
    import torch

    x = torch.randn(8, 500, device="cuda", dtype=torch.float64, requires_grad=True)
    lse = xpsoftmax.logsumexp(x)
    lse.sum().backward()
    torch.testing.assert_close(x.grad, torch.softmax(x.detach(), -1))
    torch.testing.assert_close(
        xpsoftmax.softmin(x.detach()), torch.nn.functional.softmin(x.detach(), -1)
    )
