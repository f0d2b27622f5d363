"""The package's shape, checked: import-linter's contracts, and what ``import xpsoftmax`` loads.

The contracts live in ``pyproject.toml`` (``[tool.importlinter]``): the layers tools > nn, losses
> ops > backends > _call > _config, _dtypes > _compat, and no import cycle between siblings. A
violation fails here with the offending import named.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    found = str(exe) if exe.exists() else shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports is not installed (the test extra installs import-linter)")
    return found


def test_import_contracts_are_kept():
    proc = subprocess.run(
        [_lint_imports(), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 kept, 0 broken" in proc.stdout, proc.stdout


def test_import_loads_no_tool_backend_or_framework():
    """``import xpsoftmax`` imports the core only: no tools, no CUDA/Dask backend, no framework."""
    code = (
        "import sys, xpsoftmax\n"
        "bad = [m for m in sys.modules if m.startswith(('xpsoftmax.tools', "
        "'xpsoftmax.backends.cuda', 'xpsoftmax.backends.dask', 'xpsoftmax.backends.torch', "
        "'cupy', 'torch', 'jax', 'dask'))]\n"
        "print(bad)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_every_subpackage_ships_in_the_wheel():
    """``[tool.setuptools] packages`` lists every package folder (or the wheel would lack it)."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads TOML")

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"]) - {"xpsoftmax.kernels"}
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "xpsoftmax").rglob("__init__.py")
    }
    assert listed == found


def test_the_generic_backend_names_an_operation_it_lacks():
    """A new Op without its generic branch fails loudly, naming the op (the generic backend is
    the reference every op must have)."""
    import numpy as np
    import pytest

    from xpsoftmax import _call
    from xpsoftmax.backends import generic

    op = _call.Op("logsumexp_to_be", "reduce")
    call = _call.make_call(_call.SOFTMAX, ((np.ones(3), "x"),), -1, None, None).derive(op=op)
    with pytest.raises(NotImplementedError, match="no operation 'logsumexp_to_be'"):
        generic.run(call)
