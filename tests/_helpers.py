"""Test helpers shared by every test module: backends, conversions, assertions, references.

Import them in a test module with ``from _helpers import Backend, xp_assert_close`` (pytest puts
``tests/`` on ``sys.path`` because ``tests/`` has a ``conftest.py`` and no ``__init__.py``).

* :class:`Backend` names the array libraries the ``xp`` fixture of ``conftest.py`` runs over.
* :func:`xp_assert_close` and :func:`xp_assert_equal` check namespace, dtype and shape as well as
  values; values are compared in NumPy (float64) after converting, so a reference computed in
  float64 NumPy (SciPy, torch or JAX converted to NumPy) can be compared with a result from any
  backend.
* :func:`to_numpy` converts an array of any backend to NumPy (computing Dask graphs).
* :func:`ref_softmax` is float64 NumPy reference math written row by row, independent of the
  implementation under test, for the cases no library covers (``+inf`` limits, masks).
"""

from __future__ import annotations

import enum
import functools
import importlib
import math
from typing import Any

import array_api_compat
import numpy as np
import pytest

__all__ = [
    "Backend",
    "backend_of",
    "spy_kernels",
    "dtype_name",
    "move_axes_last",
    "ref_softmax",
    "tolerance",
    "to_numpy",
    "xp_assert_close",
    "xp_assert_equal",
]


class Backend(enum.Enum):
    """The array libraries the ``xp`` fixture runs over; the value is the module to import."""

    NUMPY = "numpy"
    ARRAY_API_STRICT = "array_api_strict"
    TORCH = "torch"
    JAX = "jax.numpy"
    DASK = "dask.array"

    @property
    def id(self) -> str:
        """The name in test ids: numpy, array_api_strict, torch, jax or dask."""
        return self.value.split(".")[0]

    def namespace(self) -> Any:
        """The array-API namespace of this library, as ``array_namespace`` returns it.

        That is the array-api-compat wrapper for NumPy, torch and Dask and the library itself for
        JAX and array-api-strict, so ``array_namespace(result) is xp`` checks a result's namespace.
        A library that fails to import skips the test.
        """
        try:
            module = importlib.import_module(self.value)
        except ImportError as exc:  # pragma: no cover - every backend is installed in CI
            pytest.skip(f"{self.value} cannot be imported: {exc}")
        return array_api_compat.array_namespace(module.asarray([0.0]))

    @property
    def has_float16(self) -> bool:
        """array-api-strict only has the dtypes of the standard, which has no float16."""
        return self is not Backend.ARRAY_API_STRICT

    @property
    def writeable(self) -> bool:
        """Whether arrays of this library can serve as ``out=`` (JAX: immutable; Dask: lazy)."""
        return self not in (Backend.JAX, Backend.DASK)


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy copy of ``x`` from any backend (Dask is computed, torch detached)."""
    if array_api_compat.is_torch_array(x):
        x = x.detach().cpu()
        return (x.float() if dtype_name(x.dtype) == "bfloat16" else x).numpy()  # no NumPy bfloat16
    if array_api_compat.is_dask_array(x):
        return np.asarray(x.compute())
    if array_api_compat.is_numpy_array(x) or array_api_compat.is_jax_array(x):
        return np.array(x)  # a writeable copy (NumPy views of JAX arrays are read-only)
    return np.from_dlpack(x).copy()  # array-api-strict and other DLPack producers


def dtype_name(dtype: Any) -> str:
    """The canonical name of a dtype of any library: ``"float32"`` for ``torch.float32`` etc."""
    if isinstance(dtype, str):
        return dtype
    name = getattr(dtype, "name", None)
    if isinstance(name, str):
        return name
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype).rsplit(".", 1)[-1]  # torch.float32, array_api_strict.float32


_TOLERANCES = {
    # (rtol, atol) for data of order 1. float16 and bfloat16 are computed in float32 and rounded
    # once, so they are compared with a float64 reference at about one unit in the last place.
    "float64": (1e-12, 1e-14),
    "float32": (1e-5, 1e-6),
    "float16": (2e-3, 1e-5),
    "bfloat16": (1.6e-2, 1e-4),
}


def tolerance(dtype: Any) -> dict[str, float]:
    """Default ``rtol`` and ``atol`` for results of ``dtype`` (values of order 1)."""
    rtol, atol = _TOLERANCES[dtype_name(dtype)]
    return {"rtol": rtol, "atol": atol}


def _check_meta(actual: Any, desired: Any, xp: Any, dtype: Any, err_msg: str) -> None:
    expected_xp = xp if xp is not None else array_api_compat.array_namespace(desired)
    actual_xp = array_api_compat.array_namespace(actual)
    assert actual_xp is expected_xp, (
        f"namespace {actual_xp.__name__} != expected {expected_xp.__name__} ({type(actual)}) "
        f"{err_msg}"
    )
    expected_dtype = dtype_name(dtype if dtype is not None else desired.dtype)
    assert dtype_name(actual.dtype) == expected_dtype, (
        f"dtype {actual.dtype} != expected {expected_dtype} {err_msg}"
    )
    assert tuple(actual.shape) == tuple(desired.shape), (
        f"shape {tuple(actual.shape)} != expected {tuple(desired.shape)} {err_msg}"
    )


def xp_assert_close(
    actual: Any,
    desired: Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    xp: Any = None,
    dtype: Any = None,
    err_msg: str = "",
) -> None:
    """Assert that ``actual`` is ``desired`` up to tolerances, in namespace, dtype and shape too.

    Parameters
    ----------
    actual : array
        The result under test, from any backend.
    desired : array
        The reference. When it comes from another library than ``actual`` (typically a float64
        NumPy reference), pass the expected namespace as ``xp`` and the expected dtype as
        ``dtype``.
    rtol, atol : float, optional
        Tolerances; the defaults come from :func:`tolerance` for the dtype of ``actual``.
    xp : namespace, optional
        The namespace ``actual`` must belong to (``array_namespace(actual) is xp``); by default
        the namespace of ``desired``.
    dtype : dtype or str, optional
        The dtype ``actual`` must have (a dtype of any library, or its name); by default the
        dtype of ``desired``.
    err_msg : str, optional
        Appended to the failure message.

    Notes
    -----
    Values are compared with :func:`numpy.testing.assert_allclose` in float64 after converting
    both sides to NumPy: NaN must match NaN and infinities must match in position and sign.
    """
    _check_meta(actual, desired, xp, dtype, err_msg)
    if rtol is None or atol is None:
        defaults = tolerance(actual.dtype)
        rtol = defaults["rtol"] if rtol is None else rtol
        atol = defaults["atol"] if atol is None else atol
    np.testing.assert_allclose(
        to_numpy(actual).astype(np.float64),
        to_numpy(desired).astype(np.float64),
        rtol=rtol,
        atol=atol,
        equal_nan=True,
        err_msg=err_msg,
    )


def xp_assert_equal(
    actual: Any, desired: Any, *, xp: Any = None, dtype: Any = None, err_msg: str = ""
) -> None:
    """Like :func:`xp_assert_close` but exact (NaN equals NaN; ``0.0`` equals ``-0.0``)."""
    _check_meta(actual, desired, xp, dtype, err_msg)
    np.testing.assert_array_equal(
        to_numpy(actual).astype(np.float64), to_numpy(desired).astype(np.float64), err_msg=err_msg
    )


def move_axes_last(a: np.ndarray, axis: int | tuple[int, ...] | None) -> tuple[np.ndarray, tuple]:
    """``a`` with the normalized axes moved last and flattened into one: shape ``(..., n)``.

    Returns that array and the axes as a sorted tuple of non-negative ints.
    """
    if axis is None:
        axes = tuple(range(a.ndim))
    else:
        axes = tuple(sorted(ax % a.ndim for ax in (axis if isinstance(axis, tuple) else (axis,))))
    rest = [d for d in range(a.ndim) if d not in axes]
    moved = np.transpose(a, (*rest, *axes))
    n = math.prod(a.shape[d] for d in axes)
    return moved.reshape((*moved.shape[: len(rest)], n)), axes


def _restore(rows: np.ndarray, shape: tuple[int, ...], axes: tuple[int, ...]) -> np.ndarray:
    rest = [d for d in range(len(shape)) if d not in axes]
    moved_shape = tuple(shape[d] for d in (*rest, *axes))
    moved = rows.reshape(moved_shape)
    return np.transpose(moved, np.argsort((*rest, *axes)))


def ref_softmax(
    x: Any,
    axis: int | tuple[int, ...] | None = -1,
    *,
    where: Any = None,
    log: bool = False,
) -> np.ndarray:
    """Float64 softmax (``log=False``) or log-softmax by the specification, row by row.

    Finite rows use the max-shift formula; a row containing ``+inf`` gives the limit (the mass
    split evenly over its ``+inf`` entries); a row with NaN is NaN; an all ``-inf`` row is NaN;
    masked entries (``where`` False) are 0 (log: ``-inf``) and a fully masked row is all 0
    (log: all ``-inf``).
    """
    x = np.asarray(x, dtype=np.float64)
    mask = np.ones(x.shape, bool) if where is None else np.broadcast_to(np.asarray(where), x.shape)
    xr, axes = move_axes_last(x, axis)
    mr, _ = move_axes_last(mask, axis)
    rows, n = math.prod(xr.shape[:-1]), xr.shape[-1]
    xr, mr = xr.reshape(rows, n), mr.reshape(rows, n)
    masked_value = -np.inf if log else 0.0
    out = np.full(xr.shape, masked_value)
    for i in range(xr.shape[0]):
        keep = mr[i]
        v = xr[i][keep]
        if v.size == 0:
            continue  # fully masked row
        if np.isnan(v).any() or (v == -np.inf).all():
            r = np.full(v.shape, np.nan)
        elif (v == np.inf).any():
            k = np.count_nonzero(v == np.inf)
            hit = v == np.inf
            r = np.where(hit, -math.log(k), -np.inf) if log else np.where(hit, 1.0 / k, 0.0)
        else:
            with np.errstate(over="ignore", under="ignore"):
                z = v - v.max()  # may overflow to -inf: exactly the limit
                e = np.exp(z)
            lse = math.log(e.sum())
            r = z - lse if log else e / e.sum()
        out[i, keep] = r
    return _restore(out, x.shape, axes)


def normalize_axes(axis: int | tuple[int, ...] | None, ndim: int) -> tuple[int, ...]:
    """``axis`` as a sorted tuple of non-negative ints (``None``: all axes)."""
    if axis is None:
        return tuple(range(ndim))
    return tuple(sorted(a % ndim for a in (axis if isinstance(axis, tuple) else (axis,))))


def torch_softmax(t: Any, axis: int | tuple[int, ...] | None, *, log: bool = False) -> Any:
    """``torch.softmax`` / ``torch.log_softmax`` over one or several axes of a tensor.

    Several axes are moved last and flattened into one, which is the definition of softmax
    over a tuple of axes; the result is differentiable with torch autograd and ``torch.func``.
    """
    import torch

    axes = normalize_axes(axis, t.ndim)
    rest = [d for d in range(t.ndim) if d not in axes]
    perm = (*rest, *axes)
    moved = t.permute(perm)
    flat = moved.reshape((*moved.shape[: len(rest)], -1))
    fn = torch.log_softmax if log else torch.softmax
    return fn(flat, dim=-1).reshape(moved.shape).permute(tuple(np.argsort(perm).tolist()))


def jax_softmax(
    a: Any, axis: int | tuple[int, ...] | None, *, where: Any = None, log: bool = False
):
    """``jax.nn.softmax`` / ``jax.nn.log_softmax`` (``where`` semantics as in our specification)."""
    import jax

    fn = jax.nn.log_softmax if log else jax.nn.softmax
    return fn(a, axis=axis, where=where)


def cached_reference(fn):
    """Memoize a reference computation whose arguments are hashable (dtype names, axes, flags).

    References (torch autograd, JAX) are computed once per parameter set and shared by the five
    backends. Every call returns fresh copies, so a test may modify what it gets.
    """
    cached = functools.lru_cache(maxsize=None)(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        out = cached(*args)
        if isinstance(out, tuple):
            return tuple(np.array(a) for a in out)
        return np.array(out)

    return wrapper


def has_gpu() -> bool:
    """True when CuPy is installed and sees a usable CUDA device (tests that need one skip)."""
    try:
        import cupy
    except ImportError:
        return False
    try:
        return bool(cupy.is_available())
    except Exception:
        return False


def backend_of(*arrays: Any, axis: Any = "default", where: Any = None) -> str:
    """The name of the backend the registry picks for a softmax-family call on ``arrays``
    (``softmax`` for one array, ``softmax_backward`` for two): numpy, dask, cupy, torch-cuda or
    generic. ``axis`` defaults to -1 (``None`` for a 0-d input)."""
    from xpsoftmax import _call, backends

    if axis == "default":
        axis = None if getattr(arrays[0], "ndim", 1) == 0 else -1
    op = _call.SOFTMAX if len(arrays) == 1 else _call.SOFTMAX_VJP
    names = ("x",) if len(arrays) == 1 else ("y", "dy")
    call = _call.make_call(op, tuple(zip(arrays, names, strict=True)), axis, where, None)
    return backends.select(call)[0]


def spy_kernels(monkeypatch: Any, source: str) -> list[str]:
    """The names of the kernels of ``source`` (such as ``"cross_entropy.cu"``) that the loader
    hands out while the test runs, in order (one entry per launch)."""
    from xpsoftmax.backends.cuda import loader

    calls: list[str] = []
    original = loader.get_function

    def spy(filename: str, name: str) -> Any:
        if filename == source:
            calls.append(name)
        return original(filename, name)

    monkeypatch.setattr(loader, "get_function", spy)
    return calls
