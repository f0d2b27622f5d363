"""The ``xpsoftmax`` command (also ``python -m xpsoftmax``).

Subcommands:

* ``demo``: forward, backward and gradient checks on a real batch on the best device present;
  exit status 0 when every check passes, 1 otherwise.
* ``info``: versions of the package and of the array libraries found, CUDA devices, ``nvcc``,
  the kernel mode and the CPU count.
* ``kernels ...``: the CUDA kernels' compile check (``xpsoftmax._kcheck``); the rest of the
  command line is passed to it unchanged.
* ``run OP INPUT... -o OUTPUT``: softmax, log_softmax or their backward on ``.npy`` files,
  memory-mapped and streamed in blocks of whole softmax lines, written to a temporary file that
  is renamed to OUTPUT only when complete.

A user error (a bad option, a missing GPU, a bad file) prints one line on stderr and exits with
status 2, never a traceback; set ``XPSOFTMAX_DEBUG=1`` to see the traceback of an unexpected one.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import itertools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NoReturn

import numpy as np

__all__ = ["CommandError", "main"]

PROG = "xpsoftmax"

#: (label, top-level module) of the libraries ``info`` reports; found through their metadata.
_LIBRARIES = (
    ("numpy", "numpy"),
    ("array-api-compat", "array_api_compat"),
    ("array-api-strict", "array_api_strict"),
    ("cupy", "cupy"),
    ("torch", "torch"),
    ("jax", "jax"),
    ("jaxlib", "jaxlib"),
    ("dask", "dask"),
)


class CommandError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (a :class:`CommandError`), not usage + exit."""

    def error(self, message: str) -> NoReturn:
        msg = f"{message} (see '{self.prog} --help')"
        raise CommandError(msg)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        msg = f"expected a positive integer, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if value < 1:
        msg = f"expected a positive integer, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        msg = f"expected a positive number, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not 0 < value < math.inf:
        msg = f"expected a positive number, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


# --------------------------------------------------------------------------------------------
# demo


def _demo(args: argparse.Namespace) -> int:
    from . import _demo

    if args.classes < 2:
        msg = f"demo: --classes must be at least 2, got {args.classes}"
        raise CommandError(msg)
    try:
        ok = _demo.run(
            device=args.device,
            rows=args.rows,
            classes=args.classes,
            dtype=args.dtype,
            repeat=args.repeat,
            seed=args.seed,
        )
    except RuntimeError as exc:  # no GPU for --device gpu
        raise CommandError(f"demo: {exc}") from None
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------
# info


def _versions() -> list[tuple[str, str]]:
    found = importlib.metadata.packages_distributions()
    rows = []
    for label, module in _LIBRARIES:
        dists = sorted(set(found.get(module, [])))
        if not dists:
            rows.append((label, "not installed"))
            continue
        parts = []
        for dist in dists:
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:  # listed, but metadata unreadable
                version = "unknown version"
            parts.append(version if dist.replace("_", "-") == label else f"{version} ({dist})")
        rows.append((label, ", ".join(parts)))
    return rows


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _cuda_devices() -> str:
    """The CUDA devices CuPy sees, without importing CuPy when it is not installed."""
    if "cupy" not in sys.modules and importlib.util.find_spec("cupy") is None:
        return "unknown (CuPy is not installed)"
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        names = []
        for i in range(count):
            name = cupy.cuda.runtime.getDeviceProperties(i)["name"]
            names.append(f"{i}: {name.decode() if isinstance(name, bytes) else name}")
    except Exception as exc:  # no driver, no device, broken installation
        return f"none ({_first_line(exc)})"
    if not names:
        return "none"
    return f"{count} ({'; '.join(names)})"


def _nvcc() -> str:
    path = shutil.which("nvcc")
    if path is None:
        return "not on PATH"
    try:
        done = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{path} (does not run: {_first_line(exc)})"
    release = [line for line in done.stdout.splitlines() if "release" in line]
    if release:
        return f"{path} ({release[-1].split('release', 1)[1].strip(' ,').split(',')[0]})"
    return path


def _kernel_mode() -> str:
    from ._dispatch import _ENV, get_kernels

    source = f"{_ENV}={os.environ[_ENV]!r}" if _ENV in os.environ else f"{_ENV} unset"
    try:
        return f"{get_kernels()} ({source})"
    except ValueError as exc:
        return f"invalid ({exc})"


def _cpus() -> str:
    total = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return f"{total}"
    return f"{usable} usable by this process (of {total})"


def _info(args: argparse.Namespace) -> int:
    from . import __file__ as package_file
    from . import __version__

    rows = [
        ("xpsoftmax", f"{__version__} ({os.path.dirname(package_file)})"),
        ("python", f"{sys.version.split()[0]} ({sys.executable})"),
        *_versions(),
        ("CUDA devices", _cuda_devices()),
        ("nvcc", _nvcc()),
        ("kernel mode", _kernel_mode()),
        ("CPUs", _cpus()),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0


# --------------------------------------------------------------------------------------------
# kernels


def _kernels(argv: list[str]) -> int:
    from . import _kcheck

    status = _kcheck.main(argv)
    return 0 if status is None else int(status)


# --------------------------------------------------------------------------------------------
# run: one operation on .npy files, streamed in blocks of whole softmax lines

#: operation -> the names of its inputs, in order.
_RUN_OPS = {
    "softmax": ("logits",),
    "log_softmax": ("logits",),
    "softmax_backward": ("y", "dy"),
    "log_softmax_backward": ("ly", "dy"),
}
_MIB = 2**20


@dataclass(frozen=True)
class _Npy:
    """A checked, read-only memory-mapped ``.npy`` file."""

    path: str
    name: str
    array: np.ndarray
    fortran: bool


def _open_npy(path: str, name: str) -> _Npy:
    """Memory-map ``path`` after checking its header, dtype and size; never loads a pickle."""
    label = f"{name} {path!r}"
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise CommandError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise CommandError(f"{label}: is a directory, not a .npy file") from None
    except OSError as exc:
        raise CommandError(f"{label}: cannot be read ({exc.strerror})") from None
    with f:
        try:
            version = np.lib.format.read_magic(f)
        except ValueError:
            raise CommandError(f"{label}: not a .npy file (bad magic string)") from None
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise CommandError(f"{label}: unsupported .npy format version {version}")
        try:
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except Exception as exc:  # numpy raises ValueError, SyntaxError, TypeError, ...
            raise CommandError(f"{label}: corrupt .npy header ({_first_line(exc)})") from None
        offset = f.tell()
        size = os.fstat(f.fileno()).st_size
    if dtype.hasobject:
        msg = f"{label}: holds Python objects (a pickled array); pickles are never loaded"
        raise CommandError(msg)
    if dtype.names is not None or dtype.subdtype is not None:
        raise CommandError(f"{label}: structured dtype {dtype} is not supported")
    if dtype.kind == "c":
        raise CommandError(f"{label}: complex dtype {dtype}; softmax needs real numbers")
    if dtype.kind not in "fiub":
        raise CommandError(f"{label}: dtype {dtype} is not a real numeric dtype")
    nbytes = math.prod(shape) * dtype.itemsize
    if size < offset + nbytes:
        msg = f"{label}: truncated, {size - offset} bytes of data where its header says {nbytes}"
        raise CommandError(msg)
    if size > offset + nbytes:
        msg = f"{label}: corrupt, {size - offset - nbytes} unexpected bytes after the data"
        raise CommandError(msg)
    if nbytes == 0:
        array = np.empty(shape, dtype=dtype)  # nothing to map
    else:
        order = "F" if fortran else "C"
        array = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)
    return _Npy(path, name, array, bool(fortran))


def _check_output(output: str, sources: list[str], overwrite: bool) -> str:
    """The absolute output path, after refusing an input, a directory or an unwanted overwrite."""
    target = os.path.abspath(output)
    directory = os.path.dirname(target)
    for source in sources:
        same = os.path.realpath(source) == os.path.realpath(target)
        if not same and os.path.exists(source) and os.path.exists(target):
            same = os.path.samefile(source, target)
        if same:
            raise CommandError(f"output {output!r} is the input {source!r}; write another file")
    if not os.path.isdir(directory):
        raise CommandError(f"output {output!r}: directory {directory!r} does not exist")
    if os.path.isdir(target):
        raise CommandError(f"output {output!r} is a directory")
    if os.path.lexists(target) and not overwrite:
        raise CommandError(f"output {output!r} exists; pass --overwrite to replace it")
    return target


def _blocks(
    shape: tuple[int, ...], axis: int, fortran: bool, budget: int
) -> Iterator[tuple[tuple[slice, ...], int]]:
    """Cover ``shape`` with blocks that hold whole softmax lines, ``budget`` elements at most.

    A block is never smaller than one line (the softmax axis is never split). Yields
    ``(index, lines)``: a tuple of slices and the number of softmax lines in the block, in the
    array's memory order, so that consecutive blocks read consecutive parts of the file.
    """
    if math.prod(shape) == 0:
        return
    order = list(range(len(shape)))[::-1] if fortran else list(range(len(shape)))  # outer first
    others = [d for d in order if d != axis]
    step = dict.fromkeys(others, 1)
    size = shape[axis]
    for d in reversed(others):  # innermost first: take whole axes while they fit
        if size * shape[d] > budget:
            step[d] = max(1, budget // size)
            break
        step[d] = shape[d]
        size *= shape[d]
    ranges = [(0,) if d == axis else range(0, shape[d], step[d]) for d in order]
    for starts in itertools.product(*ranges):
        start = dict(zip(order, starts, strict=True))
        stop = {d: min(start[d] + step[d], shape[d]) for d in others}
        index = tuple(
            slice(None) if d == axis else slice(start[d], stop[d]) for d in range(len(shape))
        )
        yield index, math.prod(stop[d] - start[d] for d in others)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while writing, so the temporary file is removed."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _run(args: argparse.Namespace) -> int:
    import xpsoftmax

    op, names = args.op, _RUN_OPS[args.op]
    if len(args.inputs) != len(names):
        msg = (
            f"run {op}: takes {len(names)} input{'s' if len(names) > 1 else ''} "
            f"({', '.join(names)}), got {len(args.inputs)}"
        )
        raise CommandError(msg)
    sources = [*args.inputs, *([args.where] if args.where is not None else [])]
    target = _check_output(args.output, sources, args.overwrite)
    inputs = [_open_npy(path, name) for path, name in zip(args.inputs, names, strict=True)]
    shape = inputs[0].array.shape
    for other in inputs[1:]:
        if other.array.shape != shape:
            msg = (
                f"run {op}: {names[0]} has shape {shape} but {other.name} has shape "
                f"{other.array.shape}; they must match"
            )
            raise CommandError(msg)
    ndim = len(shape)
    if not -ndim <= args.axis < ndim:
        msg = f"--axis {args.axis} is out of range for inputs of shape {shape}"
        raise CommandError(msg)
    axis = args.axis % ndim
    mask = None
    if args.where is not None:
        where = _open_npy(args.where, "mask")
        if where.array.dtype != np.bool_:
            msg = f"mask {args.where!r}: dtype {where.array.dtype}, expected bool"
            raise CommandError(msg)
        try:
            broadcast = np.broadcast_shapes(where.array.shape, shape)
        except ValueError:
            broadcast = None
        if broadcast != shape:
            msg = f"mask {args.where!r} of shape {where.array.shape} does not broadcast to {shape}"
            raise CommandError(msg)
        mask = np.broadcast_to(where.array, shape)
    fn = getattr(xpsoftmax, op)
    # The output dtype is what the function gives for these input dtypes (ints promote to float64).
    dtype = fn(*(np.zeros(2, dtype=i.array.dtype) for i in inputs)).dtype.newbyteorder("=")
    fortran = inputs[0].fortran and ndim > 1
    budget = max(1, int(args.batch_mb * _MIB) // max(dtype.itemsize, 4))
    lines = math.prod(shape) // shape[axis] if shape[axis] else 0
    moved = math.prod(shape) * (sum(i.array.dtype.itemsize for i in inputs) + dtype.itemsize)
    progress = sys.stderr.isatty() if args.progress is None else args.progress

    start = time.perf_counter()

    def fill(out: np.ndarray) -> None:
        bar = _progress_bar(progress, lines)
        try:
            for index, count in _blocks(shape, axis, fortran, budget):
                chunks = [np.asarray(i.array[index]) for i in inputs]
                chunk_mask = None if mask is None else np.asarray(mask[index])
                out[index] = fn(*chunks, axis=axis, where=chunk_mask)
                if bar is not None:
                    done = moved * (bar.n + count) / lines
                    rate = done / max(time.perf_counter() - start, 1e-9) / 1e9
                    bar.set_postfix_str(f"{rate:.2f} GB/s", refresh=False)
                    bar.update(count)
        finally:
            if bar is not None:
                bar.close()

    _write_npy_atomically(target, dtype, shape, fortran, fill)
    seconds = time.perf_counter() - start
    print(
        f"{op}: {lines} rows of {shape[axis]} {dtype} (axis {axis} of {shape}), "
        f"{moved / 1e9:.3g} GB read and written in {seconds:.3g} s, "
        f"{moved / max(seconds, 1e-9) / 1e9:.3g} GB/s, CPU (NumPy) -> {args.output}"
    )
    return 0


def _write_npy_atomically(
    target: str,
    dtype: np.dtype,
    shape: tuple[int, ...],
    fortran: bool,
    fill: Callable[[np.ndarray], None],
) -> None:
    """Make the .npy file ``target`` with ``fill(out)``; never leave a partial file under its name.

    ``out`` is a memory map of a temporary file beside ``target``; when ``fill`` returns, the
    file is flushed to disk and renamed to ``target`` (replacing it). On any error, Ctrl-C or
    SIGTERM the temporary file is removed and ``target`` is left as it was.
    """
    directory = os.path.dirname(target)
    part = None
    with _terminate_as_interrupt():
        try:
            fd, part = tempfile.mkstemp(
                prefix=f".{os.path.basename(target)}.", suffix=".part", dir=directory
            )
            os.close(fd)
            out = np.lib.format.open_memmap(
                part, mode="w+", dtype=dtype, shape=shape, fortran_order=fortran
            )
            fill(out)
            out.flush()
            del out
            umask = os.umask(0)  # mkstemp makes the file private; give it the usual mode
            os.umask(umask)
            os.chmod(part, 0o666 & ~umask)
            with open(part, "rb") as f:
                os.fsync(f.fileno())
            os.replace(part, target)
        except BaseException:
            if part is not None:
                with contextlib.suppress(OSError):
                    os.unlink(part)
            raise
    _fsync_directory(directory)


def _progress_bar(enabled: bool, lines: int):
    """A tqdm bar on stderr counting softmax lines, or None when disabled."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=lines, unit="row", unit_scale=True, file=sys.stderr, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# the parser and main


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    from ._demo import DTYPES

    parser = _Parser(
        prog=PROG,
        description="Softmax and log-softmax, their gradients and fused CUDA kernels.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="forward, backward and gradient checks on a real batch on the best device",
        description=(
            "Run softmax and log_softmax forward and backward on a (rows, classes) batch of "
            "classifier logits on the best device present, compare with a float64 reference, "
            "check the gradients with finite differences and time each function. "
            "Exit status 0 when every check passes, 1 otherwise."
        ),
    )
    demo.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="auto (default): CuPy's GPU when one is present, else NumPy on the CPU",
    )
    demo.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="default float32")
    demo.add_argument("--rows", type=_positive_int, default=4096, help="default 4096")
    demo.add_argument("--classes", type=_positive_int, default=1000, help="default 1000")
    demo.add_argument("--repeat", type=_positive_int, default=5, help="timed runs (default 5)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    demo.set_defaults(func=_demo)

    run = sub.add_parser(
        "run",
        help="softmax, log_softmax or their backward on .npy files, in bounded memory",
        description=(
            "Apply OP to .npy files and write the result to OUTPUT (.npy). Inputs are "
            "memory-mapped and processed in blocks of whole softmax lines, so memory stays "
            "bounded whatever the file size. The output is written to a temporary file beside "
            "OUTPUT and renamed when complete: an error or Ctrl-C never leaves a partial OUTPUT."
        ),
    )
    run.add_argument(
        "op",
        choices=tuple(_RUN_OPS),
        metavar="OP",
        help="softmax or log_softmax (input: logits), softmax_backward (inputs: y dy) or "
        "log_softmax_backward (inputs: ly dy)",
    )
    run.add_argument("inputs", nargs="+", metavar="INPUT", help="input .npy files")
    run.add_argument("-o", "--output", required=True, metavar="OUTPUT", help="output .npy file")
    run.add_argument("--axis", type=int, default=-1, help="the softmax axis (default -1)")
    run.add_argument(
        "--where", metavar="MASK", help="boolean .npy mask, broadcastable to the inputs"
    )
    run.add_argument(
        "--batch-mb",
        type=_positive_float,
        default=32.0,
        metavar="N",
        help="size of one block in MiB of output (default 32; at least one softmax line); "
        "peak memory is a few times this",
    )
    run.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    run.set_defaults(func=_run)

    info = sub.add_parser(
        "info",
        help="versions, CUDA devices, nvcc, kernel mode, CPUs",
        description=(
            "Print the package version, the versions of the array libraries installed (found "
            "from their metadata, without importing them), the CUDA devices CuPy sees, whether "
            "nvcc is on PATH, the kernel mode and the CPU count."
        ),
    )
    info.set_defaults(func=_info)

    # Listed for --help only: main() hands "kernels ..." to _kcheck before parsing.
    sub.add_parser(
        "kernels",
        help="compile check of the CUDA kernels (see 'xpsoftmax kernels --help')",
        add_help=False,
    )
    return parser


def _fail(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``xpsoftmax`` command with ``argv`` (default ``sys.argv[1:]``); return its status.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name.

    Returns
    -------
    int
        0 on success, 1 when ``demo`` finds a failed check, 2 for a user error (one line on
        stderr), 130 when interrupted.

    Examples
    --------
    >>> from xpsoftmax.cli import main
    >>> main(["no-such-command"])
    2
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["kernels"]:
            return _kernels(args[1:])
        namespace = _parser().parse_args(args)
        return namespace.func(namespace)
    except CommandError as exc:
        _fail(str(exc))
        return 2
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except Exception as exc:
        if os.environ.get("XPSOFTMAX_DEBUG"):
            raise
        _fail(_first_line(exc))
        return 2
