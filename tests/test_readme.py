"""Every fenced ``python`` block of README.md runs as written, each in a fresh interpreter.

A block runs with ``python -W error -c BLOCK`` in an empty temporary directory and must exit with
status 0. A block that cannot run on the CI machine says so on its first line, visibly in the
README: ``# needs: a GPU, CuPy and dask-cuda``; it is skipped with that reason (keep such blocks
few: prefer a snippet that runs on NumPy and says in a comment what to change for a GPU).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_NEEDS = re.compile(r"# needs: (.+)")


class Block(NamedTuple):
    line: int  # of the opening fence, 1-based
    code: str
    needs: str | None  # the reason it cannot run here, from its first line


def python_blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text`` whose info string is ``python``."""
    blocks = []
    for m in _FENCE.finditer(text):
        if m[1] != "python":
            continue
        code = m[2]
        first = code.split("\n", 1)[0].strip()
        needs = n[1].strip() if (n := _NEEDS.fullmatch(first)) else None
        blocks.append(Block(text.count("\n", 0, m.start()) + 1, code, needs))
    return blocks


def run_block(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_block_runs(block, tmp_path):
    if block.needs:
        pytest.skip(f"README.md:{block.line} needs {block.needs}")
    done = run_block(block.code, tmp_path)
    assert done.returncode == 0, f"README.md:{block.line} failed:\n{block.code}\n{done.stderr}"


def test_most_blocks_run_here():
    assert len(BLOCKS) >= 4
    assert sum(b.needs is not None for b in BLOCKS) <= 1, [b.line for b in BLOCKS if b.needs]


def test_blocks_are_found_with_their_lines_and_markers():
    text = (
        "# title\n"
        "```python\nx = 1\n```\n"
        "```bash\nls\n```\n"
        "```text\n```python\n"  # a fence inside a text block is text
        "```\n"
        "```python\n# needs: a GPU\nimport cupy\n```\n"
        "```pycon\n>>> 1\n```\n"
    )
    assert python_blocks(text) == [
        Block(2, "x = 1\n", None),
        Block(11, "# needs: a GPU\nimport cupy\n", "a GPU"),
    ]


def test_a_snippet_that_uses_an_undefined_name_fails(tmp_path):
    # the README's loss snippet before it defined its inputs
    code = "import xpsoftmax\nact = xpsoftmax.Softmax()\nact.forward(logits)\n"
    done = run_block(code, tmp_path)
    assert done.returncode == 1
    assert "NameError: name 'logits' is not defined" in done.stderr


def test_a_snippet_that_warns_fails(tmp_path):
    done = run_block("import warnings\nwarnings.warn('deprecated', DeprecationWarning)\n", tmp_path)
    assert done.returncode == 1
    assert "DeprecationWarning: deprecated" in done.stderr
