"""Fixtures shared by the whole test suite.

``xp``
    The array-API namespace of one backend (see :class:`_helpers.Backend`): every test that takes
    it runs once per backend, with ids ``numpy``, ``array_api_strict``, ``torch``, ``jax`` and
    ``dask``. It is what ``array_api_compat.array_namespace`` returns for that library, so
    ``array_namespace(result) is xp`` checks that a result stayed in the caller's namespace.
    Torch runs on the CPU; JAX runs on the CPU with ``jax_enable_x64`` (set once, here, at import).
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


@pytest.fixture(params=[pytest.param(b, id=b.id) for b in Backend])
def library(request: pytest.FixtureRequest) -> Backend:
    """The backend of the current test, after applying the skip/xfail markers."""
    backend = request.param
    _apply_backend_markers(request, backend)
    return backend


@pytest.fixture
def xp(library: Backend):
    """The array-API namespace of the current backend (see the module docstring)."""
    return library.namespace()


@pytest.fixture
def rng() -> np.random.Generator:
    """A NumPy random generator with a fixed seed."""
    return np.random.default_rng(1234)
