"""The files of ``xpsoftmax run``: inputs read with ``pread``, the output written with ``pwrite``.

No memory maps: a mapped input that shrinks while it is read, or a mapped output on a full disk,
is a SIGBUS, which kills the process with no message and no clean-up. ``pread`` and ``pwrite``
turn both into an ``OSError``, and the command into one line and exit status 2.

* :class:`FileArray` is the data of a ``.npy`` file as an array that is read (or written) one
  box of C-ordered elements at a time; ``.T`` is its transpose (how Fortran-ordered files are
  handled) and :class:`Broadcast` a broadcast view (the mask). Each remembers the
  :func:`stamp` of its file, so that a change while it was read is found (:func:`changed`).
* :class:`Output` is the temporary file beside the output: one name per output, locked with
  ``flock`` while a run writes it (so a leftover of ``kill -9``, whose lock died with it, is
  reused by the next run and a live twin is refused), its space reserved up front, and
  published without replacing an existing file unless asked to.
* :func:`interruptible` turns the terminating signals into :class:`Interrupted`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import itertools
import math
import os
import signal
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np

__all__ = [
    "SIGNALS",
    "Broadcast",
    "FileArray",
    "BatchError",
    "Interrupted",
    "Output",
    "STDIO",
    "StdoutOutput",
    "Stream",
    "changed",
    "interruptible",
    "part_name",
    "stamp",
]

Box = tuple[slice, ...]

#: The signals whose default action ends the process and that a program can catch: each ends a
#: run like Ctrl-C, removing the temporary file, with exit status 128 + the signal's number.
SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGPIPE",
                 "SIGALRM", "SIGXCPU")
    if hasattr(signal, name)
)  # fmt: skip

#: The suffix of the temporary output file, which says whose it is.
PART = ".xpsoftmax.part"


class BatchError(Exception):
    """A user error (a bad file, option or device): one line on stderr, exit status 2."""


class Interrupted(KeyboardInterrupt):
    """A terminating signal arrived; ``signum`` is its number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Raise :class:`Interrupted` on any of :data:`SIGNALS` (in the main thread only)."""

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {}
    try:
        for sig in SIGNALS:
            previous[sig] = signal.signal(sig, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold :data:`SIGNALS` back (they arrive afterwards) while cleaning up."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


# --------------------------------------------------------------------------------------------
# arrays in files


def stamp(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is replaced, resized or written: device, inode, size, times."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def changed(path: str, before: tuple[int, ...]) -> bool:
    """Whether the file at ``path`` is no longer the one whose :func:`stamp` was ``before``."""
    try:
        return stamp(os.stat(path)) != before
    except OSError:
        return True


class Fd:
    """An open file descriptor, closed when its last user goes (or by :meth:`close`)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.close = weakref.finalize(self, os.close, fd)


def _runs(shape: tuple[int, ...], box: Box) -> Iterator[tuple[int, int]]:
    """``(first element, elements)`` of the contiguous runs of ``box`` in a C-ordered array of
    ``shape``, in order: the dimensions after the last partial one are whole, so each index of
    the dimensions before it is one run."""
    if not shape:
        yield 0, 1
        return
    k = len(shape) - 1
    while k > 0 and box[k].start == 0 and box[k].stop == shape[k]:
        k -= 1
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    length = (box[k].stop - box[k].start) * strides[k]
    base = box[k].start * strides[k]
    for index in itertools.product(*(range(s.start, s.stop) for s in box[:k])):
        yield base + sum(i * s for i, s in zip(index, strides, strict=False)), length


STDIO = "-"  # an input or output path that means stdin or stdout


class Stream:
    """A pipe (stdin or stdout) that a :class:`FileArray` reads or writes in file order only:
    each transfer must start where the last one ended (``position``, bytes from the start)."""

    def __init__(self, fd: int, position: int) -> None:
        self.fd, self.position = fd, position

    def transfer(self, label: str, chunk: memoryview, where: int, *, write: bool) -> None:
        if where != self.position:  # the job checks up front that its blocks come in order
            raise AssertionError(f"{label}: streamed out of order ({where} != {self.position})")
        pos = 0
        while pos < len(chunk):
            part = chunk[pos:]
            done = os.write(self.fd, part) if write else os.readv(self.fd, [part])
            if done == 0:
                msg = (
                    f"{label}: truncated, the stream ended after {self.position + pos} bytes "
                    "(header and data)"
                )
                raise BatchError(msg)
            pos += done
        self.position += pos

    def at_end(self) -> bool:
        """Whether nothing follows what was read (reads one byte more)."""
        return os.read(self.fd, 1) == b""


@dataclass(frozen=True)
class FileArray:
    """The array at ``offset`` in an open file, in C order of ``data_shape``; a box of it is
    read with ``pread`` (``array[box]``) or written with ``pwrite`` (``array[box] = values``).

    ``transposed`` views the data as its transpose (``.T``). A box is a tuple of ``slice(start,
    stop)``. A read that ends early (the file shrank) or a failed write raises
    :class:`BatchError`, naming the file by ``label``.
    """

    file: Fd
    path: str
    label: str
    offset: int
    dtype: np.dtype
    data_shape: tuple[int, ...]
    stamp: tuple[int, ...]
    transposed: bool = False
    stream: Stream | None = None  # stdin or stdout: read or written in file order only

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data_shape[::-1] if self.transposed else self.data_shape

    @property
    def ndim(self) -> int:
        return len(self.data_shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.data_shape) * self.dtype.itemsize

    @property
    def T(self) -> FileArray:  # noqa: N802  (as ndarray.T)
        return replace(self, transposed=not self.transposed)

    def __getitem__(self, box: Box) -> np.ndarray:
        if self.transposed:
            return self._read(box[::-1]).T
        return self._read(box)

    def __setitem__(self, box: Box, values: np.ndarray) -> None:
        if self.transposed:
            box, values = box[::-1], np.asarray(values).T
        data = np.asarray(values, dtype=self.dtype, order="C")
        if data.shape != tuple(s.stop - s.start for s in box):
            msg = f"cannot write an array of shape {data.shape} into the box {box}"
            raise ValueError(msg)
        try:
            self._transfer(box, data, write=True)
        except OSError as exc:
            raise BatchError(f"{self.label}: cannot be written ({_describe(exc)})") from None

    def _read(self, box: Box) -> np.ndarray:
        data = np.empty(tuple(s.stop - s.start for s in box), dtype=self.dtype)
        self._transfer(box, data, write=False)
        return data

    def _transfer(self, box: Box, data: np.ndarray, *, write: bool) -> None:
        if data.size == 0:
            return
        flat = memoryview(data.reshape(-1).view(np.uint8))
        size, fd, pos = self.dtype.itemsize, self.file.fd, 0
        for start, count in _runs(self.data_shape, box):
            where, end = self.offset + start * size, pos + count * size
            if self.stream is not None:  # a pipe: in file order, no offsets
                self.stream.transfer(self.label, flat[pos:end], where, write=write)
                pos = end
                continue
            while pos < end:  # a call moves at most about 2 GiB on Linux
                chunk = [flat[pos:end]]
                done = os.pwritev(fd, chunk, where) if write else os.preadv(fd, chunk, where)
                if done == 0:
                    msg = f"{self.label}: input changed while it was read (it became shorter)"
                    raise BatchError(msg)
                pos, where = pos + done, where + done


@dataclass(frozen=True)
class Broadcast:
    """``array`` (a :class:`FileArray`) broadcast to ``shape``; ``.T`` is its transpose."""

    array: FileArray
    to: tuple[int, ...]
    transposed: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return self.to[::-1] if self.transposed else self.to

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def T(self) -> Broadcast:  # noqa: N802
        return replace(self, transposed=not self.transposed)

    def __getitem__(self, box: Box) -> np.ndarray:
        if self.transposed:
            box = box[::-1]
        lead = len(self.to) - self.array.ndim
        own = tuple(
            slice(0, 1) if n == 1 else s for s, n in zip(box[lead:], self.array.shape, strict=True)
        )
        part = np.broadcast_to(self.array[own], tuple(s.stop - s.start for s in box))
        return part.T if self.transposed else part


# --------------------------------------------------------------------------------------------
# the output


def npy_header(dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> bytes:
    """The ``.npy`` header that :func:`numpy.save` writes (version 1.0, or 2.0 when too long)."""
    header = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": fortran,
        "shape": shape,
    }
    buffer = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buffer, header)
    except ValueError:  # a header too long for version 1.0
        buffer = io.BytesIO()
        np.lib.format.write_array_header_2_0(buffer, header)
    return buffer.getvalue()


def part_name(target: str) -> str:
    """The temporary file of ``target``: hidden, beside it, and never too long a name.

    The same output always gets the same name, so that a run finds what a killed one left.
    """
    directory, base = os.path.split(target)
    name = f".{base}{PART}"
    try:
        limit = os.pathconf(directory or ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(os.fsencode(name)) > limit:  # keep the start of the name, add a hash of all of it
        tag = f"~{hashlib.sha256(os.fsencode(base)).hexdigest()[:16]}{PART}"
        room = limit - 1 - len(tag)
        start = os.fsencode(base)[:room].decode(errors="ignore")
        name = f".{start}{tag}"
    return os.path.join(directory, name)


def _describe(exc: OSError) -> str:
    """How a failed write is told to the user."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
    if exc.errno == errno.EFBIG:
        return "file too large for the file system or the file size limit, ulimit -f"
    return exc.strerror or str(exc)


@dataclass
class Output:
    """The temporary file ``part`` of the output ``target`` while a run writes it.

    :meth:`create` opens it (reusing one left by a killed run, refusing one that a live run
    holds), writes the ``.npy`` header and reserves the data's space, so that a full disk is
    an error before anything is computed; ``array`` writes boxes of the data. :meth:`publish`
    makes it ``target`` (``os.link``, which never replaces a file, unless ``overwrite``);
    :meth:`discard` removes it. Errors raise :class:`BatchError`.
    """

    target: str
    label: str
    overwrite: bool
    part: str = ""
    array: FileArray | None = None
    _fd: Fd | None = field(default=None, repr=False)

    @classmethod
    def create(
        cls,
        target: str,
        label: str,
        dtype: np.dtype,
        shape: tuple[int, ...],
        fortran: bool,
        *,
        overwrite: bool,
    ) -> Output:
        out = cls(target, label, overwrite, part_name(target))
        try:
            out._lock()
            if not overwrite and os.path.lexists(target):
                raise BatchError(f"{label} exists; pass --overwrite to replace it")
            out.array = out._reserve(dtype, shape, fortran)
        except OSError as exc:
            out.discard()
            size = math.prod(shape) * dtype.itemsize
            msg = f"{label}: cannot be written ({_describe(exc)}; it needs {size / 1e6:.3g} MB)"
            raise BatchError(msg) from None
        except BaseException:
            out.discard()
            raise
        return out

    def _lock(self) -> None:
        """Open and lock ``part``; it is ours when the path still names the inode locked."""
        while True:
            fd = os.open(self.part, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                msg = (
                    f"{self.label} is being written by another run (its temporary file "
                    f"{self.part!r} is locked)"
                )
                raise BatchError(msg) from None
            try:
                ours = os.path.samestat(os.fstat(fd), os.lstat(self.part))
            except FileNotFoundError:
                ours = False
            if not ours:  # removed or replaced by the run that held it: open it again
                os.close(fd)
                continue
            self._fd = Fd(fd)
            return

    def _reserve(self, dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> FileArray:
        fd = self._fd.fd
        os.ftruncate(fd, 0)  # a killed run's leftover is started over
        header = npy_header(dtype, shape, fortran)
        with open(os.dup(fd), "r+b") as f:
            f.write(header)
        offset = len(header)
        size = offset + math.prod(shape) * dtype.itemsize
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:  # a file system that cannot reserve space: written as it goes
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        os.ftruncate(fd, size)
        data_shape = shape[::-1] if fortran else shape
        return FileArray(
            self._fd, self.part, self.label, offset, dtype, data_shape, stamp(os.fstat(fd))
        )

    def __setitem__(self, box: Box, values: np.ndarray) -> None:
        """Write ``values`` into ``box`` of the data (C order of the data)."""
        self.array[box] = values

    def publish(self) -> None:
        """Flush ``part`` to disk and make it ``target``; then ``part`` is gone."""
        fd = self._fd.fd
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # the usual mode, as a new file would get
            os.fsync(fd)
            if self.overwrite:
                os.replace(self.part, self.target)
            else:
                self._link()
        except OSError as exc:
            raise BatchError(f"{self.label}: cannot be written ({_describe(exc)})") from None
        _fsync_directory(os.path.dirname(self.target))
        self._fd.close()

    def _link(self) -> None:
        """``part`` as ``target``, failing if ``target`` exists, even if made a moment ago."""
        try:
            os.link(self.part, self.target, follow_symlinks=False)
        except FileExistsError:
            raise BatchError(f"{self.label} exists; pass --overwrite to replace it") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # A file system without hard links (FAT, some FUSE): check, then rename.
            if os.path.lexists(self.target):
                raise BatchError(f"{self.label} exists; pass --overwrite to replace it") from None
            os.rename(self.part, self.target)
            return
        os.unlink(self.part)

    def discard(self) -> None:
        """Remove ``part`` if this run holds it (safe to call more than once)."""
        with _signals_held():
            if self._fd is None or not self._fd.close.alive:
                return
            with contextlib.suppress(OSError):
                if os.path.samestat(os.fstat(self._fd.fd), os.lstat(self.part)):
                    os.unlink(self.part)
            self._fd.close()

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


@dataclass
class StdoutOutput:
    """The output ``-``: the ``.npy`` header and then the data written to stdout in file order
    (as ``numpy.save`` writes them), for :func:`numpy.load` or a pipe. There is no temporary
    file: an error midway leaves a short stream, and the exit status says so."""

    label: str
    array: FileArray | None = None
    part: None = None

    @classmethod
    def create(
        cls, label: str, dtype: np.dtype, shape: tuple[int, ...], fortran: bool
    ) -> StdoutOutput:
        header = npy_header(dtype, shape, fortran)
        out = cls(label)
        fd = sys.stdout.fileno()
        sys.stdout.flush()
        stream = Stream(fd, 0)
        data_shape = shape[::-1] if fortran else shape
        out.array = FileArray(
            Fd(os.dup(fd)), STDIO, label, len(header), dtype, data_shape, (), stream=stream
        )
        try:
            stream.transfer(label, memoryview(header), 0, write=True)
        except OSError as exc:
            raise BatchError(f"{label}: cannot be written ({_describe(exc)})") from None
        return out

    def __setitem__(self, box: Box, values: np.ndarray) -> None:
        self.array[box] = values

    def publish(self) -> None:
        pass

    def __enter__(self) -> StdoutOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
