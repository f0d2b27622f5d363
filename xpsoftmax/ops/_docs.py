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
    "out": """\
out : array, optional
        As in :func:`softmax`.""",
    "dtype": """\
dtype : dtype, optional
        The result dtype, as in :func:`softmax`: the inputs are cast to it first (an upcast
        fused into the pass on the NumPy path).""",
    "examples": """\
Examples
    --------
    >>> import numpy as np
    >>> import xpsoftmax""",
}


def pair_inputs(first: str, forward: str, second: str, what: str) -> str:
    """The Parameters entries of a VJP or JVP: the forward output, the (co)tangent, the axis."""
    return f"""\
{first} : array
        The forward output ``{forward}(x, axis, where=where)``.
    {second} : array
        {what}, same namespace and shape as ``{first}``.
    axis : int or tuple of ints or None, optional
        The axis the forward pass normalized over."""


def jvp_sections(first: str, forward: str) -> str:
    """The Parameters and Returns sections of a JVP."""
    return f"""\
Parameters
    ----------
    {pair_inputs(first, forward, "dx", "The input tangent")}
    where : array of bool, optional
        The forward pass's mask; masked entries get exactly 0.

    Returns
    -------
    array
        The output tangent, in the namespace, device and shape of ``{first}``."""


def doc(**extra: str) -> Callable[[F], F]:
    """Fill the ``$name`` pieces of the decorated function's docstring."""

    def fill(fn: F) -> F:
        fn.__doc__ = string.Template(fn.__doc__ or "").substitute(PIECES, **extra)
        return fn

    return fill
