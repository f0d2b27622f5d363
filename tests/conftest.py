"""Fixtures shared by the whole test suite.

``xp``
    The array-API namespace of one backend (see :class:`_helpers.Backend`): every test that takes
    it runs once per backend, with ids ``numpy``, ``array_api_strict``, ``torch``, ``jax`` and
    ``dask``. It is what ``array_api_compat.array_namespace`` returns for that library, so
    ``array_namespace(result) is xp`` checks that a result stayed in the caller's namespace.
    Torch runs on the CPU; JAX runs on the CPU with ``jax_enable_x64`` (set once, here, at import).
    Dask arrays made with ``xp.asarray`` are one chunk, so the Dask backend runs the NumPy path
    block by block. A module that sets ``DASK_SPLIT = True`` also runs a second Dask layout, id
    ``dask-split``: ``xp.asarray`` cuts every axis longer than 1 into two chunks, so the softmax
    axes are split and the Dask backend's two-pass split path runs (``library`` is
    ``Backend.DASK`` in both).
``library``
    The :class:`_helpers.Backend` member of the current ``xp``.
``rng``
    A seeded :class:`numpy.random.Generator`.

Markers (their ``reason=`` is required):

``@pytest.mark.skip_xp_backends(Backend.JAX, Backend.DASK, reason="...")``
    Skip those backends.
``@pytest.mark.xfail_xp_backends(Backend.TORCH, reason="...", strict=True)``
    Expect those backends to fail (strict by default, as ``xfail_strict`` in pyproject).

Assertions and references live in ``tests/_helpers.py``:
``from _helpers import Backend, xp_assert_close``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from _helpers import Backend

# JAX: CPU only and 64-bit floats, set before any JAX array exists.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
try:
    import jax
except ImportError:  # pragma: no cover - jax is a test dependency
    pass
else:
    jax.config.update("jax_enable_x64", True)


_MARKERS = {
    "skip_xp_backends": "skip_xp_backends(*backends, reason): skip the test on these backends",
    "xfail_xp_backends": (
        "xfail_xp_backends(*backends, reason, strict=True): expect the test to fail on these "
        "backends"
    ),
}


def pytest_configure(config: pytest.Config) -> None:
    for text in _MARKERS.values():
        config.addinivalue_line("markers", text)


def _marked_backends(marker: pytest.Mark) -> tuple[Backend, ...]:
    reason = marker.kwargs.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        msg = f"@pytest.mark.{marker.name} needs a reason= saying why"
        raise pytest.UsageError(msg)
    if not marker.args or not all(isinstance(b, Backend) for b in marker.args):
        msg = f"@pytest.mark.{marker.name} takes Backend members, got {marker.args!r}"
        raise pytest.UsageError(msg)
    return marker.args


def _apply_backend_markers(request: pytest.FixtureRequest, backend: Backend) -> None:
    for marker in request.node.iter_markers("skip_xp_backends"):
        if backend in _marked_backends(marker):
            pytest.skip(f"{backend.id}: {marker.kwargs['reason']}")
    for marker in request.node.iter_markers("xfail_xp_backends"):
        if backend in _marked_backends(marker):
            strict = marker.kwargs.get("strict", True)
            reason = f"{backend.id}: {marker.kwargs['reason']}"
            request.applymarker(pytest.mark.xfail(reason=reason, strict=strict))


_DASK_SPLIT = "dask-split"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``library`` over every backend, plus the split Dask layout where the module asks for it."""
    if "library" not in metafunc.fixturenames:
        return
    params = [pytest.param(b, id=b.id) for b in Backend]
    if getattr(metafunc.module, "DASK_SPLIT", False):
        params.append(pytest.param(_DASK_SPLIT, id=_DASK_SPLIT))
    metafunc.parametrize("library", params, indirect=True)


@pytest.fixture
def library(request: pytest.FixtureRequest) -> Backend:
    """The backend of the current test, after applying the skip/xfail markers."""
    backend = Backend.DASK if request.param == _DASK_SPLIT else request.param
    _apply_backend_markers(request, backend)
    return backend


def _halves(a):
    """A Dask array with every axis longer than 1 in two chunks."""
    return a.rechunk(tuple(-(-d // 2) if d > 1 else max(d, 1) for d in a.shape)) if a.ndim else a


@pytest.fixture
def xp(library: Backend, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """The array-API namespace of the current backend (see the module docstring)."""
    ns = library.namespace()
    if request.node.callspec.params.get("library") == _DASK_SPLIT:
        asarray = ns.asarray
        monkeypatch.setattr(ns, "asarray", lambda obj, /, **kw: _halves(asarray(obj, **kw)))
    return ns


@pytest.fixture
def rng() -> np.random.Generator:
    """A NumPy random generator with a fixed seed."""
    return np.random.default_rng(1234)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """The skipped tests, one line per reason with its count and first test, most frequent first.

    Instead of pytest's one ``SKIPPED`` line per test (``-rs``, left out of ``addopts``).
    """
    by_reason: dict[str, list[str]] = {}
    for report in terminalreporter.stats.get("skipped", []):
        if isinstance(report.longrepr, tuple):  # (path, line from 1, "Skipped: reason")
            path, line, reason = report.longrepr
            where = f"{os.path.relpath(path, config.invocation_params.dir)}:{line}"
        else:  # pragma: no cover - pytest gives skips a tuple
            reason, where = str(report.longrepr), report.nodeid
        reason = reason.removeprefix("Skipped: ")
        by_reason.setdefault(reason, []).append(where)
    if not by_reason:
        return
    total = sum(map(len, by_reason.values()))
    terminalreporter.write_sep("=", f"{total} skipped, {len(by_reason)} reasons")
    width = len(str(max(map(len, by_reason.values()))))
    for reason, places in sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        terminalreporter.write_line(f"{len(places):>{width}}  {reason}  (first: {places[0]})")
