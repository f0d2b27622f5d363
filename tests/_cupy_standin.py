"""A recording stand-in for CuPy that runs xpsoftmax's CUDA launch code on a machine without a GPU.

:func:`install` puts a fake ``cupy`` module in ``sys.modules`` for one test. Arrays are
:class:`DeviceArray`: NumPy arrays in host memory that carry CuPy's ``.data.ptr`` and
``.device.id``, so the launch code (``backends/cuda/launch.py``, the torch bridge, the loader)
runs unchanged, pointer arithmetic and strides included. Every kernel launch is:

1. **checked against the kernel's real signature**, parsed from the ``.cu`` text that the loader
   hands to ``RawModule`` (the template parameters bound from the name expression): the argument
   count, each scalar's exact NumPy type (``long long`` takes ``np.int64``, ``int`` takes
   ``np.int32``, ``double`` takes ``np.float64``) and each pointer's element type;
2. **checked against the device the stand-in declares** (an H100 SXM or an A100 SXM, see
   :data:`DEVICES`): grid and block within the limits, the block equal to the kernel's
   ``__launch_bounds__`` (every kernel of ``kernels/`` is written for exactly that many threads),
   dynamic plus static shared memory (the static part as ptxas reports it, from
   ``tests/data/kernel_static_smem.json``) within the opt-in limit, and the kernel opted in
   before it asks for more than 48 KiB;
3. **checked for memory safety**, as ``compute-sanitizer`` would: every element the kernel touches
   lies inside one live allocation, pointers used for 16-byte packs (``vec`` = 1) are 16-byte
   aligned with 16-byte row strides, outputs do not overlap inputs (the kernels' pointers are
   ``__restrict__``), and the shared memory a cached tile or row needs was passed;
4. **emulated** in float64 NumPy from the kernels' documented arithmetic (``softmax_common.cuh``,
   the header comments of ``softmax_split.cu`` and ``cross_entropy.cu``), reading and writing
   memory through the pointers and strides the launch passed. So a wrong row stride, mask
   stride, alias fallback or tier shows up as a wrong value in the test comparing with an
   independent reference.

The emulation covers finite inputs (the +inf/NaN/all -inf semantics are tested on a GPU by
``tests/test_gpu.py``); registers and occupancy limits other than threads and shared memory are
not modelled.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEVICES", "DeviceArray", "LaunchError", "StandIn", "install"]

_STATIC_SMEM = Path(__file__).with_name("data") / "kernel_static_smem.json"
_OPTIN_DEFAULT = 48 * 1024


class LaunchError(AssertionError):
    """A launch a real GPU would reject or run wrongly (arguments, limits, memory)."""


@dataclass(frozen=True)
class Device:
    """The limits of one CUDA device that the stand-in enforces."""

    name: str
    arch: str
    sms: int
    smem_optin: int  # cudaDevAttrMaxSharedMemoryPerBlockOptin
    smem_per_sm: int
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    max_threads: int = 1024
    max_grid_x: int = 2**31 - 1


DEVICES = {
    "H100": Device(
        "NVIDIA H100 SXM", "sm_90", sms=132, smem_optin=227 * 1024, smem_per_sm=228 * 1024
    ),
    "A100": Device(
        "NVIDIA A100 SXM", "sm_80", sms=108, smem_optin=163 * 1024, smem_per_sm=164 * 1024
    ),
}

# --------------------------------------------------------------------------------------------
# memory: allocations in host memory, addressed by pointer


@dataclass
class _Region:
    start: int
    nbytes: int
    owner: Any


class _Memory:
    """Live allocations by address; reads and writes through (pointer, shape, byte strides)."""

    def __init__(self) -> None:
        self.regions: list[_Region] = []

    def add(self, start: int, nbytes: int, owner: Any) -> None:
        self.regions.append(_Region(start, nbytes, owner))

    def cover(self, a: np.ndarray) -> None:
        """Count the memory of ``a``'s owner as an allocation (a NumPy result's new memory)."""
        lo = a.__array_interface__["data"][0]
        if not a.nbytes or self.find(lo, lo + a.itemsize) is not None:
            return
        root = a
        while isinstance(root.base, np.ndarray):
            root = root.base
        lo = root.__array_interface__["data"][0]
        if root.nbytes and self.find(lo, lo + root.nbytes) is None:
            self.add(lo, root.nbytes, root)

    def find(self, lo: int, hi: int) -> _Region | None:
        for r in self.regions:
            if r.start <= lo and hi <= r.start + r.nbytes:
                return r
        return None

    @staticmethod
    def extent(ptr: int, shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int):
        """Byte range [lo, hi) that the elements of a strided view touch, None when empty."""
        if any(d == 0 for d in shape):
            return None
        lo = ptr + sum(min(0, (d - 1) * s) for d, s in zip(shape, strides, strict=True))
        hi = ptr + sum(max(0, (d - 1) * s) for d, s in zip(shape, strides, strict=True)) + itemsize
        return lo, hi

    def view(self, what: str, ptr: int, dtype: Any, shape, strides) -> np.ndarray:
        dtype = np.dtype(dtype)
        shape, strides = tuple(int(d) for d in shape), tuple(int(s) for s in strides)
        if ptr % dtype.itemsize:
            raise LaunchError(f"{what}: pointer {ptr:#x} is not aligned to its {dtype} elements")
        ext = self.extent(ptr, shape, strides, dtype.itemsize)
        if ext is None:
            return np.empty(shape, dtype)
        region = self.find(*ext)
        if region is None:
            raise LaunchError(
                f"{what}: bytes [{ext[0]:#x}, {ext[1]:#x}) of shape {shape}, strides {strides} "
                "are not inside one allocation (an out-of-bounds access)"
            )
        buf = (ctypes.c_ubyte * region.nbytes).from_address(region.start)
        return np.ndarray(shape, dtype, buffer=buf, offset=ptr - region.start, strides=strides)


_MEMORY = _Memory()


class _Ptr:
    __slots__ = ("ptr",)

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class _DeviceId:
    __slots__ = ("id",)

    def __init__(self, i: int) -> None:
        self.id = i


class DeviceArray(np.ndarray):
    """A NumPy array standing in for a ``cupy.ndarray``: ``.data.ptr``, ``.device.id``.

    One that owns its memory (a NumPy operation's new result) is a new allocation.
    """

    def __array_finalize__(self, obj: Any) -> None:
        _MEMORY.cover(self)

    def __array_function__(self, func, types, args, kwargs):
        return _wrap(super().__array_function__(func, types, args, kwargs))

    @property
    def data(self) -> _Ptr:  # type: ignore[override]
        return _Ptr(self.__array_interface__["data"][0])

    @property
    def device(self) -> _DeviceId:  # type: ignore[override]
        return _DeviceId(0)


def _wrap(r: Any) -> Any:
    """NumPy results as device arrays, as CuPy's functions return CuPy arrays."""
    if isinstance(r, tuple):
        return tuple(_wrap(v) for v in r)
    if not isinstance(r, np.ndarray) or isinstance(r, DeviceArray):
        return r
    _MEMORY.cover(r)
    return r.view(DeviceArray)


class _Namespace:
    """The array namespace of device arrays: array-api-compat's NumPy one, results wrapped."""

    def __init__(self, base: Any) -> None:
        self._base = base
        self._cache: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        v = getattr(self._base, name)
        if not callable(v) or isinstance(v, type) or name.startswith("__"):
            return v
        f = self._cache.get(name)
        if f is None:

            def f(*args: Any, **kwargs: Any) -> Any:
                return _wrap(v(*args, **kwargs))

            self._cache[name] = f
        return f


def _alloc(shape, dtype) -> DeviceArray:
    """A new C-contiguous "device" allocation, 256-byte aligned as CuPy's pool gives."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + 256, np.uint8)
    off = (-raw.ctypes.data) % 256
    _MEMORY.add(raw.ctypes.data + off, nbytes, raw)
    return raw[off : off + nbytes].view(dtype).reshape(shape).view(DeviceArray)


def array_namespace_patch(original: Any) -> Any:
    """``array_namespace`` that answers the device namespace for device arrays."""
    import array_api_compat

    ns = _Namespace(array_api_compat.array_namespace(np.empty(0)))

    def array_namespace(*arrays: Any, **kwargs: Any) -> Any:
        if (
            arrays
            and all(isinstance(a, DeviceArray) for a in arrays if isinstance(a, np.ndarray))
            and any(isinstance(a, DeviceArray) for a in arrays)
        ):
            return ns
        return original(*arrays, **kwargs)

    return array_namespace


def to_device(a: Any) -> DeviceArray:
    """A C-contiguous device copy of ``a`` (take views of it for other layouts)."""
    a = np.asarray(a)
    d = _alloc(a.shape, a.dtype)
    d[...] = a
    return d


# --------------------------------------------------------------------------------------------
# kernel signatures, parsed from the source text


_CTYPES = {"__half": np.float16, "float": np.float32, "double": np.float64}
_ACC = {"__half": np.float32, "float": np.float32, "double": np.float64}
_SCALARS = {"long long": np.int64, "int": np.int32, "double": np.float64, "float": np.float32}
_KERNEL = re.compile(
    r"template\s*<([^>]*)>\s*__global__\s+void\s+(?:__launch_bounds__\(([^)]*)\)\s*)?"
    r"(\w+)\s*\(([^)]*)\)",
    re.S,
)
_DEFINE = re.compile(r"^#define\s+(\w+)\s+(\d+)\s*$", re.M)
_TYPE_WORDS = {"int", "long", "double", "float", "char", "unsigned", "short", "bool"}


@dataclass(frozen=True)
class Param:
    name: str | None
    pointer: bool
    dtype: Any  # element type of a pointer, NumPy scalar type of a scalar


@dataclass(frozen=True)
class Signature:
    kernel: str
    params: tuple[Param, ...]
    threads: int | None  # the first __launch_bounds__ argument, evaluated


def _split_args(text: str) -> list[str]:
    return [a.strip() for a in text.split(",") if a.strip()]


def _param(text: str, bind: dict[str, str]) -> Param:
    text = re.sub(r"\b(const|__restrict__)\b", " ", text)
    if "*" in text:
        pointee, _, name = text.rpartition("*")
        pointee = " ".join(pointee.split())
        if pointee in bind:
            dtype = _CTYPES[bind[pointee]]
        elif re.fullmatch(r"typename (\w+::)?AccT<T>::type", pointee):
            dtype = _ACC[bind["T"]]
        elif pointee == "unsigned char":
            dtype = np.uint8
        elif pointee == "long long":
            dtype = np.int64
        else:
            raise LaunchError(f"the stand-in does not know the pointer type {pointee!r}")
        return Param(name.strip() or None, True, dtype)
    words = text.split()
    name = None
    if words[-1] not in _TYPE_WORDS:
        name = words.pop()
    kind = " ".join(words)
    if kind not in _SCALARS:
        raise LaunchError(f"the stand-in does not know the scalar type {kind!r}")
    return Param(name, False, _SCALARS[kind])


def parse_signature(source: str, expression: str) -> Signature:
    """The signature of one instantiation, such as ``"xps_fwd_block<float, 256>"``."""
    m = re.fullmatch(r"(\w+)<(.*)>", expression.strip())
    if m is None:
        raise LaunchError(f"not a template name expression: {expression!r}")
    kernel, targs = m[1], _split_args(m[2])
    defines = dict(_DEFINE.findall(source))
    for tparams, bounds, name, params in _KERNEL.findall(source):
        if name != kernel:
            continue
        names = [p.split()[-1] for p in _split_args(tparams)]
        if len(names) != len(targs):
            raise LaunchError(f"{expression}: {kernel} has template parameters {names}")
        bind = dict(zip(names, targs, strict=True))
        threads = None
        if bounds:
            first = _split_args(bounds)[0]
            scope = {k: int(v) for k, v in {**defines, **bind}.items() if v.isdigit()}
            threads = int(eval(first, {"__builtins__": {}}, scope))  # noqa: S307
        return Signature(kernel, tuple(_param(p, bind) for p in _split_args(params)), threads)
    raise LaunchError(f"no __global__ kernel {kernel!r} in the source")


# --------------------------------------------------------------------------------------------
# emulation of each kernel family (positional arguments, as in the .cu signatures)


def _pad16(b: int) -> int:
    return (b + 15) & ~15


def _mask(mp: int, shape, strides) -> np.ndarray | None:
    if mp == 0:
        return None
    return _MEMORY.view("mask", mp, np.uint8, shape, strides) != 0


def _softmax(x: np.ndarray, keep: np.ndarray | None, axis: int, log: bool) -> np.ndarray:
    """float64 (log-)softmax along ``axis``, entries outside ``keep`` 0 (log: -inf)."""
    keep = np.ones(x.shape, bool) if keep is None else keep
    m = np.max(np.where(keep, x, -np.inf), axis=axis, keepdims=True)
    e = np.where(keep, np.exp(x - m), 0.0)
    s = np.sum(e, axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (x - m) - np.log(s) if log else e / s
    return np.where(keep, out, -np.inf if log else 0.0)


def _linear(y: np.ndarray, g: np.ndarray, keep, axis: int, op: int) -> np.ndarray:
    """The backward/JVP row formulas of softmax_common.cuh (OP_SOFTMAX, OP_LOG_VJP, OP_LOG_JVP)."""
    keep = np.ones(y.shape, bool) if keep is None else keep
    y, g = np.where(keep, y, 0.0), np.where(keep, g, 0.0)  # masked entries take no part
    s = np.sum(_term(y, g, op), axis=axis, keepdims=True)
    out = (y * (g - s)) if op == 0 else (g - np.exp(y) * s) if op == 1 else (g - s)
    return np.where(keep, out, 0.0)


def _term(y: np.ndarray, g: np.ndarray, op: int) -> np.ndarray:
    return y * g if op == 0 else g if op == 1 else np.exp(y) * g


@dataclass
class _Access:
    """What one launch reads and writes: views by role, for the restrict check."""

    reads: list[tuple[str, np.ndarray]] = field(default_factory=list)
    writes: list[tuple[str, np.ndarray]] = field(default_factory=list)

    def read(self, what, ptr, dtype, shape, strides) -> np.ndarray:
        v = _MEMORY.view(what, ptr, dtype, shape, strides)
        self.reads.append((what, v))
        return v

    def write(self, what, ptr, dtype, shape, strides) -> np.ndarray:
        v = _MEMORY.view(what, ptr, dtype, shape, strides)
        self.writes.append((what, v))
        return v

    def check_restrict(self, kernel: str) -> None:
        def span(v):
            return _Memory.extent(v.__array_interface__["data"][0], v.shape, v.strides, v.itemsize)

        for wname, w in self.writes:
            ws = span(w)
            for rname, r in self.reads:
                rs = span(r)
                if ws and rs and ws[0] < rs[1] and rs[0] < ws[1]:
                    raise LaunchError(
                        f"{kernel}: output {wname} overlaps input {rname}, but the kernel's "
                        "pointers are __restrict__"
                    )


def _check_vec(kernel: str, vec: int, pairs) -> None:
    if not vec:
        return
    for what, ptr, ld_bytes in pairs:
        if ptr % 16 or ld_bytes % 16:
            raise LaunchError(
                f"{kernel}: vec=1 but {what} (pointer {ptr:#x}, row stride {ld_bytes} bytes) is "
                "not 16-byte aligned: the 16-byte pack accesses would fault"
            )


def _row_inputs(k: Kernel, a: tuple):
    """(element type, item size, forward?, inputs, [(pointer, row stride)]) of a row kernel."""
    t = k.ctype
    fwd = k.kernel.startswith("xps_fwd")
    n_in = 1 if fwd else 2
    ins = [(_ptr(a[2 * i]), int(a[2 * i + 1])) for i in range(n_in)]
    return t, np.dtype(t).itemsize, fwd, n_in, ins


def _rows_kernel(k: Kernel, a: tuple, acc: _Access) -> None:
    """xps_{fwd,bwd}_{warp,block}[_plain]: rows at x + r * ld, the mask at mp + r*mrs + c*mcs."""
    t, isz, fwd, n_in, ins = _row_inputs(k, a)
    plain = k.kernel.endswith("_plain")
    optr, ld_out = a[2 * n_in], int(a[2 * n_in + 1])
    mp, mrs, mcs, rows, n, flag, vec = (int(v) for v in a[2 * n_in + 2 :])
    if "_warp" in k.kernel:
        lanes, packs = int(k.targs[1]), int(k.targs[2])
        if n > lanes * packs * (16 // isz):
            raise LaunchError(f"{k.name}: rows of {n} do not fit its {lanes} x {packs} packs")
    else:  # the block tier caches the row(s) (and the mask bytes) in dynamic shared memory
        need = n_in * _pad16(n * isz) + (n if mp and not plain else 0)
        if k.last_smem < need:
            raise LaunchError(
                f"{k.name}: rows of {n} need {need} bytes of dynamic shared memory, "
                f"the launch passed {k.last_smem}"
            )
    names = ("x",) if fwd else ("y", "g")
    _check_vec(
        k.name,
        vec,
        [(nm, _ptr(p), ld * isz) for nm, (p, ld) in zip(names, ins, strict=True)]
        + [("the output", _ptr(optr), ld_out * isz)],
    )
    arrays = [
        acc.read(nm, _ptr(p), t, (rows, n), (ld * isz, isz)).astype(np.float64)
        for nm, (p, ld) in zip(names, ins, strict=True)
    ]
    keep = None if plain else _mask(mp, (rows, n), (mrs, mcs))
    out = acc.write("the output", _ptr(optr), t, (rows, n), (ld_out * isz, isz))
    acc.check_restrict(k.name)
    res = _softmax(arrays[0], keep, 1, bool(flag)) if fwd else _linear(*arrays, keep, 1, flag)
    out[...] = res


def _split_kernel(k: Kernel, a: tuple, acc: _Access) -> None:
    """xps_{fwd,bwd}_{part,apply}: items (row, chunk); partials in part[] (compute dtype)."""
    t, isz, fwd, n_in, ins = _row_inputs(k, a)
    apply = k.kernel.endswith("_apply")
    rest = list(a[2 * n_in :])
    optr = ld_out = None
    if apply:
        optr, ld_out = _ptr(rest[0]), int(rest[1])
        rest = rest[2:]
    mp, mrs, mcs, rows, n = (int(v) for v in rest[:5])
    rest = rest[5:]
    flag = 0
    if apply or not fwd:
        flag, rest = int(rest[0]), rest[1:]
    vec, C, chunk = (int(v) for v in rest[:3])
    part_ptr = _ptr(rest[3])
    if C != -(-n // chunk) or chunk % (16 // isz):
        raise LaunchError(f"{k.name}: C={C} chunks of {chunk} do not cover rows of {n} in packs")
    names = ("x",) if fwd else ("y", "g")
    pairs = [(nm, p, ld * isz) for nm, (p, ld) in zip(names, ins, strict=True)]
    if apply:
        pairs.append(("the output", optr, ld_out * isz))
    _check_vec(k.name, vec, pairs)
    arrays = [
        acc.read(nm, p, t, (rows, n), (ld * isz, isz)).astype(np.float64)
        for nm, (p, ld) in zip(names, ins, strict=True)
    ]
    keep = _mask(mp, (rows, n), (mrs, mcs))
    keep = np.ones((rows, n), bool) if keep is None else keep
    per = 2 if fwd else 1
    acc_t = _ACC[k.targs[0]]
    if not apply:
        part = acc.write("part", part_ptr, acc_t, (rows * C * per,), (np.dtype(acc_t).itemsize,))
        acc.check_restrict(k.name)
        for r in range(rows):
            for c in range(C):
                sl = slice(c * chunk, min(n, (c + 1) * chunk))
                it = r * C + c
                if fwd:
                    v = arrays[0][r, sl][keep[r, sl]]
                    m = v.max() if v.size else -np.inf
                    part[2 * it] = m
                    part[2 * it + 1] = np.exp(v - m).sum() if v.size else 0.0
                else:
                    k_ = keep[r, sl]
                    part[it] = _term(arrays[0][r, sl][k_], arrays[1][r, sl][k_], flag).sum()
        return
    part = acc.read("part", part_ptr, acc_t, (rows * C * per,), (np.dtype(acc_t).itemsize,))
    part = part.astype(np.float64)
    out = acc.write("the output", optr, t, (rows, n), (ld_out * isz, isz))
    acc.check_restrict(k.name)
    res = np.empty((rows, n))
    for r in range(rows):
        x = arrays[0][r]
        if fwd:
            ms, ss = (
                part[2 * r * C : 2 * (r + 1) * C : 2],
                part[2 * r * C + 1 : 2 * (r + 1) * C : 2],
            )
            M = ms.max()
            S = np.sum(np.where(ms > -np.inf, ss * np.exp(ms - M), 0.0))
            e = np.exp(x - M) / S if not flag else (x - M) - np.log(S)
            res[r] = np.where(keep[r], e, -np.inf if flag else 0.0)
        else:
            S = part[r * C : (r + 1) * C].sum()
            y, g = np.where(keep[r], arrays[0][r], 0.0), np.where(keep[r], arrays[1][r], 0.0)
            o = (y * (g - S)) if flag == 0 else (g - np.exp(y) * S) if flag == 1 else (g - S)
            res[r] = np.where(keep[r], o, 0.0)
    out[...] = res


def _strided_kernel(k: Kernel, a: tuple, acc: _Access) -> None:
    """xps_{fwd,bwd}_strided<T, CACHED>: C-contiguous (outer, n, inner), softmax over axis 1."""
    t = k.ctype
    isz = np.dtype(t).itemsize
    fwd = k.kernel.startswith("xps_fwd")
    n_in = 1 if fwd else 2
    ptrs = [_ptr(p) for p in a[: n_in + 1]]
    mp, mso, msj, msi, outer, n, inner, flag = (int(v) for v in a[n_in + 1 :])
    if k.targs[1] == "true":
        w = 32 // isz
        need = n_in * _pad16(n * w * isz) + (n * w if mp else 0)
        if k.last_smem < need:
            raise LaunchError(
                f"{k.name}: a cached tile of n={n} needs {need} bytes of dynamic "
                f"shared memory, the launch passed {k.last_smem}"
            )
    shape = (outer, n, inner)
    strides = (n * inner * isz, inner * isz, isz)
    names = ("x",) if fwd else ("y", "g")
    arrays = [
        acc.read(nm, p, t, shape, strides).astype(np.float64)
        for nm, p in zip(names, ptrs, strict=False)
    ]
    keep = _mask(mp, shape, (mso, msj, msi))
    out = acc.write("the output", ptrs[n_in], t, shape, strides)
    acc.check_restrict(k.name)
    out[...] = _softmax(arrays[0], keep, 1, bool(flag)) if fwd else _linear(*arrays, keep, 1, flag)


def _xent_kernel(k: Kernel, a: tuple, acc: _Access) -> None:
    """xps_xent_{fwd,bwd}<T>: rows x n row-major logits, int64 targets (cross_entropy.cu)."""
    t = k.ctype
    isz = np.dtype(t).itemsize
    acc_t = _ACC[k.targs[0]]
    fwd = k.kernel == "xps_xent_fwd"
    rows, n, ignore, has_ignore, eps = (*(int(v) for v in a[-5:-1]), float(a[-1]))
    x = acc.read("x", _ptr(a[0]), t, (rows, n), (n * isz, isz)).astype(np.float64)
    tgt = acc.read("target", _ptr(a[1]), np.int64, (rows,), (8,)).astype(np.int64)
    ignored = (tgt == ignore) if has_ignore else np.zeros(rows, bool)
    if np.any(~ignored & ((tgt < 0) | (tgt >= n))):
        raise LaunchError(f"{k.name}: a target outside [0, {n}) reached the kernel")
    logp = _softmax(x, None, 1, True)
    safe = np.where(ignored, 0, tgt)
    if fwd:
        loss = acc.write("loss", _ptr(a[2]), acc_t, (rows,), (np.dtype(acc_t).itemsize,))
        acc.check_restrict(k.name)
        nll = -logp[np.arange(rows), safe]
        smooth = -logp.mean(axis=1)
        loss[...] = np.where(ignored, 0.0, (1 - eps) * nll + eps * smooth)
        return
    stride = int(a[3])
    scale = acc.read("scale", _ptr(a[2]), acc_t, (rows,), (stride * np.dtype(acc_t).itemsize,))
    dx = acc.write("dx", _ptr(a[4]), t, (rows, n), (n * isz, isz))
    acc.check_restrict(k.name)
    q = np.full((rows, n), eps / n)
    q[np.arange(rows), safe] += 1 - eps
    g = (np.exp(logp) - q) * scale.astype(np.float64)[:, None]
    dx[...] = np.where(ignored[:, None], 0.0, g)


_FAMILIES = {
    "xps_fwd_warp": _rows_kernel,
    "xps_fwd_warp_plain": _rows_kernel,
    "xps_bwd_warp": _rows_kernel,
    "xps_bwd_warp_plain": _rows_kernel,
    "xps_fwd_block": _rows_kernel,
    "xps_fwd_block_plain": _rows_kernel,
    "xps_bwd_block": _rows_kernel,
    "xps_bwd_block_plain": _rows_kernel,
    "xps_fwd_part": _split_kernel,
    "xps_fwd_apply": _split_kernel,
    "xps_bwd_part": _split_kernel,
    "xps_bwd_apply": _split_kernel,
    "xps_fwd_strided": _strided_kernel,
    "xps_bwd_strided": _strided_kernel,
    "xps_xent_fwd": _xent_kernel,
    "xps_xent_bwd": _xent_kernel,
}

#: The parameter names each family's emulator reads by position (checked against the source).
_NAMES = {
    "xps_fwd_warp": "x ldx y ldy mp mrs mcs rows n log vec",
    "xps_bwd_warp": "y ldy g ldg dx ldd mp mrs mcs rows n op vec",
    "xps_fwd_block": "x ldx y ldy mp mrs mcs rows n log vec",
    "xps_bwd_block": "y ldy g ldg dx ldd mp mrs mcs rows n op vec",
    "xps_fwd_part": "x ldx mp mrs mcs rows n vec C chunk part",
    "xps_fwd_apply": "x ldx y ldy mp mrs mcs rows n log vec C chunk part",
    "xps_bwd_part": "y ldy g ldg mp mrs mcs rows n op vec C chunk part",
    "xps_bwd_apply": "y ldy g ldg dx ldd mp mrs mcs rows n op vec C chunk part",
    "xps_fwd_strided": "x y mp mso msj msi outer n inner log",
    "xps_bwd_strided": "y g dx mp mso msj msi outer n inner op",
    "xps_xent_fwd": "x target loss rows n ignore_index has_ignore smoothing",
    "xps_xent_bwd": "x target scale scale_stride dx rows n ignore_index has_ignore smoothing",
}


def _ptr(arg: Any) -> int:
    return arg.data.ptr if isinstance(arg, np.ndarray) else int(arg)


# --------------------------------------------------------------------------------------------
# the fake cupy: RawModule / RawKernel, device attributes, occupancy, array functions


@dataclass
class Launch:
    name: str
    grid: tuple[int, ...]
    block: tuple[int, ...]
    shared_mem: int
    args: tuple[Any, ...]


class Kernel:
    """A compiled kernel of the stand-in: checks, records and emulates each launch."""

    def __init__(self, standin: StandIn, source: str, name: str) -> None:
        self.standin = standin
        self.name = name
        self.signature = parse_signature(source, name)
        self.kernel = self.signature.kernel
        self.targs = _split_args(re.fullmatch(r"\w+<(.*)>", name)[1])
        self.ctype = _CTYPES[self.targs[0]]
        self.shared_size_bytes = standin.static_smem[name]
        self.max_dynamic_shared_size_bytes = _OPTIN_DEFAULT - self.shared_size_bytes
        self.kernel_ptr = id(self)
        self.last_smem = 0
        family = self.kernel.removesuffix("_plain")
        expected = _NAMES[family].split()
        found = [p.name for p in self.signature.params]
        if len(found) == len(expected) and any(
            f is not None and f != e for f, e in zip(found, expected, strict=True)
        ):
            raise LaunchError(
                f"{name}: the source's parameters {found} are not the stand-in's "
                f"{expected}; update tests/_cupy_standin.py"
            )

    def _check_args(self, args: tuple) -> None:
        params = self.signature.params
        if len(args) != len(params):
            raise LaunchError(
                f"{self.name}: launched with {len(args)} arguments, the kernel takes {len(params)}"
            )
        for i, (arg, p) in enumerate(zip(args, params, strict=True)):
            label = f"{self.name}: argument {i} ({p.name or 'unnamed'})"
            if p.pointer:
                if isinstance(arg, np.ndarray):
                    ok = arg.dtype == p.dtype or (p.dtype is np.uint8 and arg.dtype == np.bool_)
                    if not isinstance(arg, DeviceArray) or not ok:
                        raise LaunchError(
                            f"{label}: a {np.dtype(p.dtype)} device pointer, got a "
                            f"{type(arg).__name__} of {arg.dtype}"
                        )
                elif type(arg) is not np.uint64:
                    raise LaunchError(f"{label}: a pointer, got {type(arg).__name__}")
            elif type(arg) is not p.dtype:
                raise LaunchError(
                    f"{label}: {np.dtype(p.dtype)} expected, got {type(arg).__name__} {arg!r}"
                )

    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:
        dev = self.standin.device
        grid, block = tuple(int(g) for g in grid), tuple(int(b) for b in block)
        self._check_args(tuple(args))
        if not 1 <= grid[0] <= dev.max_grid_x or any(g != 1 for g in grid[1:]):
            raise LaunchError(f"{self.name}: grid {grid} outside the device's limits")
        threads = int(np.prod(block))
        if not 1 <= threads <= dev.max_threads:
            raise LaunchError(f"{self.name}: block {block} outside the device's limits")
        bound = self.signature.threads
        if bound is not None and threads != bound:
            raise LaunchError(
                f"{self.name}: launched with {threads} threads, the kernel is "
                f"written for __launch_bounds__({bound})"
            )
        if bound is None and threads % 32:
            raise LaunchError(f"{self.name}: {threads} threads, not whole warps")
        if shared_mem + self.shared_size_bytes > dev.smem_optin:
            raise LaunchError(
                f"{self.name}: {shared_mem} bytes of dynamic shared memory and "
                f"{self.shared_size_bytes} static exceed the {dev.smem_optin} that "
                f"{dev.name} allows a block"
            )
        if shared_mem > self.max_dynamic_shared_size_bytes:
            raise LaunchError(
                f"{self.name}: {shared_mem} bytes of dynamic shared memory, but the "
                f"kernel was opted into {self.max_dynamic_shared_size_bytes}"
            )
        self.last_smem = shared_mem
        self.standin.launches.append(Launch(self.name, grid, block, shared_mem, tuple(args)))
        _FAMILIES[self.kernel](self, tuple(args), _Access())


class StandIn:
    """The state of one installed stand-in: the device, the static smem table, the launches."""

    def __init__(self, device: Device) -> None:
        self.device = device
        table = json.loads(_STATIC_SMEM.read_text())["smem"][device.arch]
        self.static_smem = {name: v for per_file in table.values() for name, v in per_file.items()}
        self.launches: list[Launch] = []
        self.by_ptr: dict[int, Kernel] = {}

    @property
    def names(self) -> list[str]:
        return [launch.name for launch in self.launches]

    # -- cupy.RawModule ---------------------------------------------------------------------
    def raw_module(self, *, code: str, options, name_expressions):
        standin = self

        class Module:
            def get_function(self, name: str):
                if name not in name_expressions:
                    raise LaunchError(f"{name} was not compiled (name_expressions)")
                k = Kernel(standin, code, name)
                standin.by_ptr[k.kernel_ptr] = k
                wrapper = _KernelWrapper(k)
                return wrapper

        return Module()

    # -- device queries ----------------------------------------------------------------------
    def attribute(self, attribute: int, device: int) -> int:
        if attribute == _ATTR_OPTIN:
            return self.device.smem_optin
        if attribute == _ATTR_SMS:
            return self.device.sms
        raise LaunchError(f"the stand-in does not know device attribute {attribute}")

    def occupancy(self, ptr: int, block: int, smem: int) -> int:
        k = self.by_ptr[ptr]
        dev = self.device
        used = smem + k.shared_size_bytes
        if block > dev.max_threads or used > dev.smem_optin:
            return 0
        per_sm = min(dev.blocks_per_sm, dev.threads_per_sm // (-(-block // 32) * 32))
        if used:
            per_sm = min(per_sm, dev.smem_per_sm // (used + 1024))  # 1 KiB reserved a block
        return per_sm


class _KernelWrapper:
    """What CuPy's ``RawKernel`` offers: the call, ``name``, ``kernel.ptr``, shared-memory sizes."""

    def __init__(self, k: Kernel) -> None:
        self._k = k
        self.name = k.name
        self.kernel = types.SimpleNamespace(ptr=k.kernel_ptr)

    @property
    def shared_size_bytes(self) -> int:
        return self._k.shared_size_bytes

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        return self._k.max_dynamic_shared_size_bytes

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int) -> None:
        dev = self._k.standin.device
        if value + self._k.shared_size_bytes > dev.smem_optin:
            raise LaunchError(
                f"{self.name}: an opt-in to {value} bytes of dynamic shared memory "
                f"and {self._k.shared_size_bytes} static would exceed the "
                f"{dev.smem_optin} that {dev.name} allows a block"
            )
        self._k.max_dynamic_shared_size_bytes = value

    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:
        self._k(grid, block, args, shared_mem)


_ATTR_OPTIN, _ATTR_SMS = 97, 16  # the CUDA runtime's attribute numbers


class _CUDARuntimeError(RuntimeError):
    pass


def _as_device(a: Any) -> DeviceArray:
    if isinstance(a, DeviceArray):
        return a
    return to_device(a)


def _ascontiguousarray(a: Any, dtype: Any = None) -> DeviceArray:
    a = _as_device(a)
    if a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    d = _alloc(a.shape, a.dtype if dtype is None else dtype)
    d[...] = a
    return d


def _asarray(a: Any, dtype: Any = None) -> DeviceArray:
    if isinstance(a, DeviceArray) and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    return to_device(np.asarray(a, dtype=dtype))


def _from_dlpack(t: Any) -> DeviceArray:
    """A torch CPU tensor viewed as a device array (zero-copy; its storage is the allocation)."""
    storage = t.untyped_storage()
    _MEMORY.add(storage.data_ptr(), storage.nbytes(), t)
    return np.from_dlpack(t).view(DeviceArray)


@contextlib.contextmanager
def _null_context(*_args: Any, **_kwargs: Any):
    yield


def _module(standin: StandIn) -> types.ModuleType:
    cp = types.ModuleType("cupy")
    cp.__file__ = __file__
    cp.ndarray = DeviceArray
    cp.bool_ = np.bool_
    cp.RawModule = standin.raw_module
    cp.empty = _alloc
    cp.ascontiguousarray = _ascontiguousarray
    cp.asarray = _asarray
    cp.may_share_memory = np.may_share_memory
    cp.moveaxis = lambda a, s, d: np.moveaxis(a, s, d)
    cp.from_dlpack = _from_dlpack
    runtime = types.SimpleNamespace(
        getDevice=lambda: 0,
        deviceGetAttribute=standin.attribute,
        cudaDevAttrMaxSharedMemoryPerBlockOptin=_ATTR_OPTIN,
        cudaDevAttrMultiProcessorCount=_ATTR_SMS,
        CUDARuntimeError=_CUDARuntimeError,
    )
    stream = types.SimpleNamespace(from_external=_stream_from_external)
    driver = types.SimpleNamespace(occupancyMaxActiveBlocksPerMultiprocessor=standin.occupancy)
    cp.cuda = types.SimpleNamespace(
        Device=_null_context, runtime=runtime, driver=driver, Stream=stream
    )
    return cp


@contextlib.contextmanager
def _stream_from_external(handle: Any):
    kind, ptr = handle.__cuda_stream__()
    if kind != 0 or not isinstance(ptr, int):
        raise LaunchError(f"__cuda_stream__ gave {(kind, ptr)!r}, not (0, stream pointer)")
    yield


def install(monkeypatch: Any, device: str = "H100") -> StandIn:
    """Replace ``cupy`` (and the loader's per-device caches) for the rest of the test."""
    from xpsoftmax.backends.cuda import loader

    standin = StandIn(DEVICES[device])
    monkeypatch.setattr(sys.modules[__name__], "_MEMORY", _Memory())
    monkeypatch.setitem(sys.modules, "cupy", _module(standin))
    from xpsoftmax import _compat

    monkeypatch.setattr(_compat, "array_namespace", array_namespace_patch(_compat.array_namespace))
    for cache in ("_modules", "_functions", "_smem_opt_in", "_grids"):
        monkeypatch.setattr(loader, cache, {})
    monkeypatch.setattr(loader, "_device_attribute", standin.attribute)
    return standin


def regenerate_static_smem() -> None:
    """Rewrite ``tests/data/kernel_static_smem.json`` from the compile check (needs ``nvcc``):
    ``python tests/_cupy_standin.py``."""
    import io

    from xpsoftmax.tools import kcheck

    out, err = io.StringIO(), io.StringIO()
    archs = sorted({d.arch for d in DEVICES.values()})
    if kcheck.check(archs, out=out, err=err) != 0:
        raise SystemExit(err.getvalue())
    row = re.compile(r"^(\S+)  +(\S.*?)  +(sm_\d+[af]?) +(\d+) +(\d+) +(\d+) +(\d+) +(\d+)$")
    table: dict[str, dict[str, dict[str, int]]] = {}
    for line in out.getvalue().splitlines():
        if m := row.match(line):
            table.setdefault(m[3], {}).setdefault(m[1], {})[m[2]] = int(m[8])
    about = json.loads(_STATIC_SMEM.read_text())["about"]
    _STATIC_SMEM.write_text(json.dumps({"about": about, "smem": table}, indent=1, sort_keys=True))


if __name__ == "__main__":
    regenerate_static_smem()
