"""Shared pieces of the public docstrings, so that each is written once (numpydoc sections).

A docstring names a piece as ``$name`` on a line of its own, indented as its section;
:func:`doc` replaces it with the piece, whose first line takes that indentation and whose other
lines carry their own (four spaces, a function's docstring).
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

PIECES = {
    "axis_forward": """\
axis : int or tuple of ints or None, optional
        The axis the forward pass normalized over.""",
    "out": """\
out : array, optional
        As in :func:`softmax`.""",
    "tangent_where": """\
where : array of bool, optional
        The forward pass's mask; masked entries get exactly 0.""",
    "tangent_returns": """\
Returns
    -------
    array
        The output tangent, in the namespace, device and shape of the forward output.""",
    "examples": """\
Examples
    --------
    >>> import numpy as np
    >>> import xpsoftmax""",
}


def doc(**extra: str) -> Callable[[F], F]:
    """Fill the ``$name`` pieces of the decorated function's docstring."""

    def fill(fn: F) -> F:
        fn.__doc__ = string.Template(fn.__doc__ or "").substitute(PIECES, **extra)
        return fn

    return fill
