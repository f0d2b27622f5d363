"""``xpsoftmax run``: one operation on ``.npy`` files of any size, in bounded memory.

The pipeline:

1. :func:`open_job` checks the input files (headers, dtypes, sizes; pickles are never loaded),
   opens them for reading box by box (``files.py``: ``pread``, no memory maps) and settles the
   output's shape and dtype: a :class:`Job`.
2. The arrays are covered by boxes of whole softmax lines (:func:`blocks`, :func:`within`); the
   softmax axis is never split.
3. Each box is computed on the CPU with NumPy (:func:`run_cpu`), on a GPU through pinned
   buffers and two CUDA streams (``gpu.py``), or on Dask workers (``dask.py``), which write
   their boxes into the same output file; ``run.py`` picks one for a run.
4. ``files.Output`` is the temporary file beside the output (locked, its space reserved), made
   the output only when complete and when no input changed meanwhile.

A Fortran-ordered input is handled as its C-ordered transpose (the axis mirrored), so blocks are
always in C order and read consecutive parts of the file.

User errors raise :class:`BatchError`, whose message is one line for the command line.
"""

from __future__ import annotations

import itertools
import math
import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import devices
from . import files
from .files import BatchError

__all__ = [
    "OPS",
    "BatchError",
    "Job",
    "Spec",
    "Total",
    "blocks",
    "check_output",
    "check_streams",
    "open_job",
    "open_npy",
    "pick_device",
    "run_cpu",
    "within",
]

#: operation -> the names of its inputs, in order.
OPS = {
    "softmax": ("logits",),
    "log_softmax": ("logits",),
    "softmax_backward": ("y", "dy"),
    "log_softmax_backward": ("ly", "dy"),
    "cross_entropy": ("logits", "targets"),
}
MIB = 2**20

Box = tuple[slice, ...]


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of an exception."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# files


@dataclass(frozen=True)
class Npy:
    """A checked ``.npy`` file, open."""

    path: str
    name: str
    array: files.FileArray  # in the file's own order (the transpose of its data if Fortran)
    fortran: bool


def open_npy(path: str, name: str, *, write: bool = False) -> Npy:
    """Open ``path`` after checking its header, dtype and size; never loads a pickle.

    The data are read (or, with ``write``, written) box by box (:class:`files.FileArray`).
    """
    if path == files.STDIO and not write:
        return _open_stdin(name)
    label = f"{name} {path!r}"
    try:  # O_NONBLOCK: a FIFO does not wait for a writer here (it is refused below)
        fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise BatchError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise BatchError(f"{label}: is a directory, not a .npy file") from None
    except OSError as exc:
        raise BatchError(f"{label}: cannot be read ({exc.strerror})") from None
    handle = files.Fd(fd)
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode):
        raise BatchError(f"{label}: is a directory, not a .npy file")
    if not stat.S_ISREG(mode):
        msg = (
            f"{label}: not a regular file (a pipe, socket or device); pass it on stdin as "
            "'-' or save it to a file first"
        )
        raise BatchError(msg)
    f = open(os.dup(fd), "rb")
    with f:
        shape, fortran, dtype = _read_header(f, label)
        offset = f.tell()
        st = os.fstat(fd)
    _check_dtype(label, dtype, shape)
    nbytes = math.prod(shape) * dtype.itemsize
    size = st.st_size
    if size < offset + nbytes:
        msg = f"{label}: truncated, {size - offset} bytes of data where its header says {nbytes}"
        raise BatchError(msg)
    if size > offset + nbytes:
        msg = f"{label}: corrupt, {size - offset - nbytes} unexpected bytes after the data"
        raise BatchError(msg)
    data_shape = tuple(shape[::-1]) if fortran else tuple(shape)
    array = files.FileArray(
        handle, path, label, offset, dtype, data_shape, files.stamp(st), transposed=fortran
    )
    return Npy(path, name, array, bool(fortran))


class _Counting:
    """A file's ``read``, counting the bytes read (a pipe has no ``tell``)."""

    def __init__(self, fd: int) -> None:
        self.fd, self.count = fd, 0

    def read(self, size: int) -> bytes:
        data = os.read(self.fd, size)
        self.count += len(data)
        return data


def _open_stdin(name: str) -> Npy:
    """The ``.npy`` stream on stdin: its header read now, its data read in file order."""
    label = f"{name} '-' (stdin)"
    try:
        fd = os.dup(sys.stdin.fileno())
    except (OSError, ValueError, AttributeError):
        raise BatchError(f"{label}: there is no stdin") from None
    handle = files.Fd(fd)
    if os.isatty(fd):
        raise BatchError(f"{label}: stdin is a terminal; pipe a .npy file into it")
    reader = _Counting(fd)
    shape, fortran, dtype = _read_header(reader, label)
    _check_dtype(label, dtype, shape)
    data_shape = tuple(shape[::-1]) if fortran else tuple(shape)
    stream = files.Stream(fd, reader.count)
    array = files.FileArray(
        handle, files.STDIO, label, reader.count, dtype, data_shape, (), fortran, stream
    )
    return Npy(files.STDIO, name, array, bool(fortran))


def _read_header(f: Any, label: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
    except ValueError:
        raise BatchError(f"{label}: not a .npy file (bad magic string)") from None
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise BatchError(f"{label}: unsupported .npy format version {version}")
    try:
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(f)
        return np.lib.format.read_array_header_2_0(f)
    except Exception as exc:  # numpy raises ValueError, SyntaxError, TypeError, ...
        raise BatchError(f"{label}: corrupt .npy header ({first_line(exc)})") from None


def _check_dtype(label: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    if dtype.hasobject:
        msg = f"{label}: holds Python objects (a pickled array); pickles are never loaded"
        raise BatchError(msg)
    if dtype.names is not None or dtype.subdtype is not None:
        raise BatchError(f"{label}: structured dtype {dtype} is not supported")
    if dtype.kind == "c":
        raise BatchError(f"{label}: complex dtype {dtype}; softmax needs real numbers")
    if dtype.kind not in "fiub":
        raise BatchError(f"{label}: dtype {dtype} is not a real numeric dtype")
    if any(d < 0 for d in shape):
        raise BatchError(f"{label}: corrupt .npy header (negative shape {shape})")


def check_output(output: str, sources: list[str], overwrite: bool) -> str:
    """The absolute output path, after refusing an input, a directory or an unwanted overwrite."""
    target = os.path.abspath(output)
    directory = os.path.dirname(target)
    for source in sources:
        if source == files.STDIO:
            continue
        same = os.path.realpath(source) == os.path.realpath(target)
        if not same and os.path.exists(source) and os.path.exists(target):
            same = os.path.samefile(source, target)
        if same:
            raise BatchError(f"output {output!r} is the input {source!r}; write another file")
    if not os.path.isdir(directory):
        raise BatchError(f"output {output!r}: directory {directory!r} does not exist")
    if os.path.isdir(target):
        raise BatchError(f"output {output!r} is a directory")
    if os.path.lexists(target) and not overwrite:
        raise BatchError(f"output {output!r} exists; pass --overwrite to replace it")
    return target


# --------------------------------------------------------------------------------------------
# the job


@dataclass(frozen=True)
class Spec:
    """What to run, as plain values (it travels to Dask workers, which open the files again)."""

    op: str
    inputs: tuple[str, ...]
    where: str | None = None
    axis: int = -1
    batch_bytes: int = 32 * MIB
    device: str = "auto"
    # cross_entropy's options; "mean" and "sum" are totals over all blocks (:class:`Total`).
    reduction: str = "none"
    label_smoothing: float = 0.0
    ignore_index: int | None = None


@dataclass(frozen=True)
class Job:
    """An opened :class:`Spec`: memory maps in C order and the output's layout.

    ``arrays``, ``mask``, ``shape`` and ``axis`` are C-ordered views (the transposes of
    Fortran-ordered files) read box by box; ``reduced[i]`` is True for an input without the
    softmax axis (the targets of cross_entropy), ``out_reduced`` likewise for the output;
    ``opened`` are the files, inputs then mask.
    """

    spec: Spec
    arrays: tuple[files.FileArray, ...]
    reduced: tuple[bool, ...]
    mask: files.Broadcast | None
    shape: tuple[int, ...]
    axis: int
    fortran: bool
    out_dtype: np.dtype
    out_reduced: bool
    opened: tuple[Npy, ...] = ()

    def check_unchanged(self) -> None:
        """Raise :class:`BatchError` if a file was replaced, resized or written since it was
        opened (its size, times or inode differ), so that its blocks may mix old and new."""
        for npy in self.opened:
            if npy.array.stream is not None:
                if not npy.array.stream.at_end():
                    msg = f"{npy.array.label}: corrupt, unexpected bytes after the data"
                    raise BatchError(msg)
                continue
            if files.changed(npy.path, npy.array.stamp):
                msg = (
                    f"{npy.name} {npy.path!r}: input changed while it was read (its size, "
                    "modification time or inode differ); nothing was written"
                )
                raise BatchError(msg)

    @property
    def n(self) -> int:
        """The length of a softmax line."""
        return self.shape[self.axis]

    @property
    def lines(self) -> int:
        """The number of softmax lines (rows)."""
        return math.prod(self.shape) // self.n if self.n else 0

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The output's shape in C order (the transpose of the file's when ``fortran``)."""
        return drop(self.shape, self.axis) if self.out_reduced else self.shape

    @property
    def out_fortran(self) -> bool:
        return self.fortran and len(self.out_shape) > 1

    @property
    def moved(self) -> int:
        """Bytes read from the inputs and written to the output."""
        return sum(a.nbytes for a in self.arrays) + math.prod(self.out_shape) * (
            self.out_dtype.itemsize
        )

    def index(self, box: Box, reduced: bool) -> tuple[slice, ...]:
        """The part of an array (reduced or not) that belongs to ``box``."""
        return drop(box, self.axis) if reduced else box


def drop(items: tuple, axis: int) -> tuple:
    """``items`` without the entry at ``axis``."""
    return items[:axis] + items[axis + 1 :]


def open_job(spec: Spec) -> Job:
    """Open and check the files of ``spec``; raise :class:`BatchError` on any problem."""
    op, names = spec.op, OPS[spec.op]
    opened = [open_npy(path, name) for path, name in zip(spec.inputs, names, strict=True)]
    first = opened[0].array
    shape, ndim = first.shape, first.ndim
    xent = op == "cross_entropy"
    if not xent:
        for other in opened[1:]:
            if other.array.shape != shape:
                msg = (
                    f"run {op}: {names[0]} has shape {shape} but {other.name} has shape "
                    f"{other.array.shape}; they must match"
                )
                raise BatchError(msg)
    if not -ndim <= spec.axis < ndim:
        msg = f"--axis {spec.axis} is out of range for inputs of shape {shape}"
        raise BatchError(msg)
    axis = spec.axis % ndim
    if xent:
        _check_targets(opened[1], shape, axis)
    mask = None
    if spec.where is not None:
        where = open_npy(spec.where, "mask")
        if where.array.dtype != np.bool_:
            msg = f"mask {spec.where!r}: dtype {where.array.dtype}, expected bool"
            raise BatchError(msg)
        try:
            broadcast = np.broadcast_shapes(where.array.shape, shape)
        except ValueError:
            broadcast = None
        if broadcast != shape:
            msg = f"mask {spec.where!r} of shape {where.array.shape} does not broadcast to {shape}"
            raise BatchError(msg)
        mask = files.Broadcast(where.array, shape)
        opened.append(where)
    fortran = opened[0].fortran and ndim > 1
    arrays = [o.array for o in opened[: len(names)]]
    if fortran:  # work on the C-ordered transposes
        arrays, axis = [a.T for a in arrays], ndim - 1 - axis
        mask = None if mask is None else mask.T
    return Job(
        spec=spec,
        arrays=tuple(arrays),
        reduced=(False, True) if xent else (False,) * len(arrays),
        mask=mask,
        shape=arrays[0].shape,
        axis=axis,
        fortran=fortran,
        out_dtype=_out_dtype(op, [a.dtype for a in arrays]),
        out_reduced=xent,
        opened=tuple(opened),
    )


def check_streams(job: Job, stdout: bool, dask: bool) -> None:
    """Refuse what stdin (an input ``-``) or stdout (``-o -``) cannot do: they are read and
    written once, in file order, so the blocks must come in that order: the softmax axis must
    be the last of the file's order (the first of a Fortran-ordered file), and a streamed input
    in the memory order of the first input."""
    streamed = [
        (npy, array)
        for npy, array in zip(job.opened, [*job.arrays, job.mask], strict=False)
        if npy.path == files.STDIO
    ]
    names = [npy.array.label for npy, _ in streamed] + ["output '-' (stdout)"] * stdout
    if not names:
        return
    if dask:
        raise BatchError(f"{names[0]}: --dask cannot stream (each worker opens the files)")
    shape = job.shape[::-1] if job.fortran else job.shape
    axis = len(shape) - 1 - job.axis if job.fortran else job.axis
    if len(job.shape) > 1 and job.axis != len(job.shape) - 1:
        last = "first (Fortran order)" if job.fortran else "last"
        msg = (
            f"{names[0]}: cannot be streamed with the softmax axis {axis} of {shape}: its blocks "
            f"are not in file order (the axis must be the {last}); use a file"
        )
        raise BatchError(msg)
    for npy, array in streamed:
        if array.transposed and array.ndim > 1:
            order = "C" if job.fortran else "Fortran"
            msg = (
                f"{npy.array.label}: {order}-ordered while {job.opened[0].array.label} is not: "
                "it cannot be streamed in the order of the blocks; use a file"
            )
            raise BatchError(msg)
    spec = job.spec
    if streamed and spec.reduction == "mean" and spec.ignore_index is not None:
        if streamed[0][0].name == "targets":
            msg = (
                f"{names[0]}: --reduction mean with --ignore-index reads the targets twice; "
                "use a file"
            )
            raise BatchError(msg)


def _check_targets(targets: Npy, shape: tuple[int, ...], axis: int) -> None:
    label = f"targets {targets.path!r}"
    if targets.array.dtype.kind not in "iu":
        msg = f"{label}: dtype {targets.array.dtype}, expected integer class indices"
        raise BatchError(msg)
    if shape[axis] == 0 and math.prod(drop(shape, axis)):
        raise BatchError(f"run cross_entropy: logits of shape {shape} have no class on axis {axis}")
    if targets.array.shape != drop(shape, axis):
        msg = (
            f"{label} has shape {targets.array.shape}, expected {drop(shape, axis)} "
            f"(the logits' shape {shape} without axis {axis})"
        )
        raise BatchError(msg)


def _out_dtype(op: str, dtypes: list[np.dtype]) -> np.dtype:
    """The dtype the function gives for these input dtypes (ints promote to float64)."""
    import xpsoftmax

    if op == "cross_entropy":
        logits, targets = np.zeros((1, 2), dtype=dtypes[0]), np.zeros(1, dtype=dtypes[1])
        probe = xpsoftmax.cross_entropy(logits, targets, reduction="none")
    else:
        probe = getattr(xpsoftmax, op)(*(np.zeros(2, dtype=d) for d in dtypes))
    return probe.dtype.newbyteorder("=")


def compute(job: Job, chunks: list[Any], mask: Any | None, out: Any | None = None) -> Any:
    """``job``'s operation on one block, through the public functions (NumPy or CuPy arrays).

    ``out`` (same namespace, the output's dtype and the block's shape) is used where the
    function takes one; the result is returned either way.
    """
    import xpsoftmax

    if job.spec.op == "cross_entropy":
        logits, targets = chunks
        spec = job.spec
        return xpsoftmax.cross_entropy(
            logits, targets, job.axis, reduction="none", where=mask,
            label_smoothing=spec.label_smoothing, ignore_index=spec.ignore_index,
        )  # fmt: skip
    fn = getattr(xpsoftmax, job.spec.op)
    if out is None:
        return fn(*chunks, axis=job.axis, where=mask)
    return fn(*chunks, axis=job.axis, where=mask, out=out)


class Total:
    """Where the per-row losses go for ``--reduction mean`` or ``sum``: ``total[box] = losses``
    adds them up in float64, in block order (the same order, so the same result, every run);
    :attr:`value` is the sum, or the mean over the rows whose target is not ``ignore_index``
    (NaN when every row is ignored, as in torch), in the output's dtype."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.sum = 0.0
        self.count = 0

    def __setitem__(self, box: Box, losses: np.ndarray) -> None:
        self.sum += float(np.sum(losses, dtype=np.float64))
        spec = self.job.spec
        if spec.ignore_index is None:
            self.count += int(np.size(losses))
        else:  # the targets of the box read again: 1 / n of the logits' bytes
            targets = self.job.arrays[1][box]
            self.count += int(np.count_nonzero(targets != spec.ignore_index))

    @property
    def value(self) -> np.ndarray:
        if self.job.spec.reduction == "sum":
            total = self.sum
        else:
            total = self.sum / self.count if self.count else math.nan
        return np.asarray(total, dtype=self.job.out_dtype)


# --------------------------------------------------------------------------------------------
# blocks


def blocks(shape: tuple[int, ...], axis: int, budget: int) -> Iterator[tuple[Box, int]]:
    """Cover ``shape`` (C order) with boxes of whole softmax lines, ``budget`` elements at most.

    A box is never smaller than one line (the softmax axis is never split). Yields
    ``(box, lines)``: a tuple of ``slice(start, stop)`` and the number of softmax lines in the
    box, in memory order, so that consecutive boxes read consecutive parts of the file. The
    first box is the largest.
    """
    if math.prod(shape) == 0:
        return
    others = [d for d in range(len(shape)) if d != axis]
    step = dict.fromkeys(others, 1)
    size = shape[axis]
    for d in reversed(others):  # innermost first: take whole axes while they fit
        if size * shape[d] > budget:
            step[d] = max(1, budget // size)
            break
        step[d] = shape[d]
        size *= shape[d]
    ranges = [(0,) if d == axis else range(0, shape[d], step[d]) for d in range(len(shape))]
    for starts in itertools.product(*ranges):
        stops = [
            n if d == axis else min(s + step[d], n)
            for d, (s, n) in enumerate(zip(starts, shape, strict=True))
        ]
        box = tuple(slice(s, e) for s, e in zip(starts, stops, strict=True))
        yield box, math.prod(stops[d] - starts[d] for d in others)


def whole(shape: tuple[int, ...]) -> Box:
    """The box that covers ``shape``."""
    return tuple(slice(0, n) for n in shape)


def within(box: Box, axis: int, budget: int) -> Iterator[tuple[Box, int]]:
    """:func:`blocks` of the part of an array that ``box`` covers, as boxes of the array."""
    shape = tuple(s.stop - s.start for s in box)
    for inner, lines in blocks(shape, axis, budget):
        yield (
            tuple(
                slice(b.start + i.start, b.start + i.stop) for b, i in zip(box, inner, strict=True)
            ),
            lines,
        )


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in box)


# --------------------------------------------------------------------------------------------
# devices and the CPU path

CPU_NAME = "CPU (NumPy)"


def pick_device(choice: str) -> Any | None:
    """The ``cupy`` module for ``choice`` ``"gpu"``, or ``"auto"`` with a GPU; None for the CPU."""
    if choice not in devices.CHOICES:
        raise BatchError(f"--device must be auto, cpu or gpu, got {choice!r}")
    try:
        return devices.pick_gpu(choice)
    except devices.NoGPUError as exc:
        raise BatchError(str(exc)) from None


def cpu_budget(job: Job) -> int:
    """Elements of one CPU block: ``--batch-mb`` of output (of logits for cross_entropy)."""
    itemsize = job.arrays[0].dtype.itemsize if job.out_reduced else job.out_dtype.itemsize
    return max(1, job.spec.batch_bytes // max(itemsize, 4))


def run_cpu(job: Job, boxes: Iterable[Box], out: Any, advance: Callable[[int], None]) -> None:
    """Compute ``boxes`` of ``job`` with NumPy into ``out`` (the output's data in C order,
    written box by box: ``out[box] = values``)."""
    budget = cpu_budget(job)
    for box in boxes:
        for index, lines in within(box, job.axis, budget):
            chunks = [a[job.index(index, r)] for a, r in zip(job.arrays, job.reduced, strict=True)]
            mask = None if job.mask is None else job.mask[index]
            out[job.index(index, job.out_reduced)] = compute(job, chunks, mask)
            advance(lines)
