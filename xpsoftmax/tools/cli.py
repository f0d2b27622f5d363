"""The ``xpsoftmax`` command (also ``python -m xpsoftmax``).

Subcommands:

* ``demo``: forward, backward and gradient checks on a real batch on the best device present;
  exit status 0 when every check passes, 1 otherwise.
* ``info``: versions of the package and of the array libraries found, CUDA devices, ``nvcc``,
  the kernel mode and the CPU count.
* ``kernels ...``: the CUDA kernels' compile check (``xpsoftmax.tools.kcheck``); the rest of the
  command line is passed to it unchanged.
* ``run OP INPUT... -o OUTPUT``: softmax, log_softmax, their backward or cross_entropy on
  ``.npy`` files of any size, on the CPU, a GPU or a Dask cluster (``xpsoftmax.tools.batch``).
* ``bench``: a short benchmark table of this machine (``xpsoftmax.tools.bench``).

A user error (a bad option, a missing GPU, a bad file) prints one line on stderr and exits with
status 2, never a traceback; set ``XPSOFTMAX_DEBUG=1`` to see the traceback of an unexpected one.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from typing import NoReturn

from . import devices
from .batch.files import Interrupted
from .batch.job import OPS, BatchError, first_line

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
    ("distributed", "distributed"),
    ("scipy", "scipy"),
    ("numba", "numba"),
)


class CommandError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (a :class:`CommandError`), not usage + exit."""

    def error(self, message: str) -> NoReturn:
        msg = f"{message} (see '{self.prog} --help')"
        raise CommandError(msg)


def _positive(text: str, kind: type, what: str) -> int | float:
    """``text`` as a positive ``kind`` (finite), or argparse's error naming ``what`` it expected."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < math.inf:
        shown = value if kind is int and value is not None else repr(text)
        msg = f"expected a positive {what}, got {shown}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive_int(text: str) -> int:
    return int(_positive(text, int, "integer"))


def _positive_float(text: str) -> float:
    return float(_positive(text, float, "number"))


# --------------------------------------------------------------------------------------------
# demo


def _demo(args: argparse.Namespace) -> int:
    from . import demo as _demo

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
    except (RuntimeError, MemoryError) as exc:  # no GPU for --device gpu; a batch too large
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


def _cuda_devices() -> str:
    """The CUDA devices CuPy sees, without importing CuPy when it is not installed."""
    if not devices.cupy_installed():
        return "unknown (CuPy is not installed)"
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        names = [f"{i}: {devices.device_name(cupy, i)}" for i in range(count)]
    except Exception as exc:  # no driver, no device, broken installation
        return f"none ({first_line(exc)})"
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
        return f"{path} (does not run: {first_line(exc)})"
    release = [line for line in done.stdout.splitlines() if "release" in line]
    if release:
        return f"{path} ({release[-1].split('release', 1)[1].strip(' ,').split(',')[0]})"
    return path


def _kernel_mode() -> str:
    from .._config import KERNELS_ENV as env
    from .._config import get_kernels

    source = f"{env}={os.environ[env]!r}" if env in os.environ else f"{env} unset"
    try:
        return f"{get_kernels()} ({source})"
    except ValueError as exc:
        return f"invalid ({exc})"


def _cpu_path() -> str:
    """Which code NumPy arrays take, as the NumPy backend decides (``_config``); imports numba."""
    from .._config import num_threads, numpy_fast
    from ..backends.numpy import active_path

    try:
        if not numpy_fast():
            return "generic array-API code (XPSOFTMAX_NUMPY_FAST=0)"
        threads = num_threads()
        path, why = active_path()
    except ValueError as exc:
        return f"invalid ({exc})"
    name = "compiled kernels" if path == "compiled" else "numpy (blocked)"
    return f"{name}, {threads} thread{'s' if threads > 1 else ''}; {why}"


def _info(args: argparse.Namespace) -> int:
    from .. import __file__ as package_file
    from .. import __version__

    rows = [
        ("xpsoftmax", f"{__version__} ({os.path.dirname(package_file)})"),
        ("python", f"{sys.version.split()[0]} ({sys.executable})"),
        *_versions(),
        ("CUDA devices", _cuda_devices()),
        ("nvcc", _nvcc()),
        ("kernel mode", _kernel_mode()),
        ("CPU path", _cpu_path()),
        ("CPUs", devices.cpu_summary()),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0


# --------------------------------------------------------------------------------------------
# kernels


def _kernels(argv: list[str]) -> int:
    from . import kcheck

    status = kcheck.main(argv)
    return 0 if status is None else int(status)


# --------------------------------------------------------------------------------------------
# run and bench


def _run(args: argparse.Namespace) -> int:
    from .batch import job, run

    spec = job.Spec(
        op=args.op,
        inputs=tuple(args.inputs),
        where=args.where,
        axis=args.axis,
        batch_bytes=max(1, int(args.batch_mb * job.MIB)),
        device=args.device,
        reduction=args.reduction,
        label_smoothing=args.label_smoothing,
        ignore_index=args.ignore_index,
    )
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    summary = run.run(
        spec,
        args.output,
        overwrite=args.overwrite,
        progress=progress,
        dask=args.dask,
        verbose=args.verbose,
    )
    print(summary, file=sys.stderr if args.output == "-" else sys.stdout)  # -o -: the data
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.elements < bench.MIN_ELEMENTS:
        msg = f"bench: --elements must be at least {bench.MIN_ELEMENTS}, got {args.elements}"
        raise CommandError(msg)
    try:
        ok = bench.run(elements=args.elements, repeat=args.repeat, device=args.device)
    except RuntimeError as exc:  # no GPU for --device gpu
        raise CommandError(f"bench: {exc}") from None
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------
# the parser and main


def _device_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--device", choices=devices.CHOICES, default="auto", help=help)


def _command(
    sub, name: str, help: str, *description: str, examples: Sequence[str] = ()
) -> argparse.ArgumentParser:
    """A subcommand: ``help`` for the command list, ``description`` (joined, wrapped) and
    ``examples`` (``(comment, command)`` lines, kept as written) for its --help."""
    parser = sub.add_parser(
        name,
        help=help,
        description=textwrap.fill("".join(description), _help_width()),
        epilog="examples:\n" + "\n".join(f"  {line}" for line in examples) if examples else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _help_width() -> int:
    """argparse's width: the terminal's, less a margin."""
    return max(shutil.get_terminal_size().columns - 2, 40)


def _parser() -> argparse.ArgumentParser:
    from .. import __version__
    from .demo import DTYPES

    parser = _Parser(
        prog=PROG,
        description="Softmax and log-softmax, their gradients and fused CUDA kernels.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = _command(
        sub,
        "demo",
        "forward, backward and gradient checks on a real batch on the best device",
        "Run softmax and log_softmax forward and backward on a (rows, classes) batch of "
        "classifier logits on the best device present, compare with a float64 reference, "
        "check the gradients with finite differences and time each function. "
        "Exit status 0 when every check passes, 1 otherwise.",
        examples=(
            "xpsoftmax demo                                  # 4096 x 1000 float32, best device",
            "xpsoftmax demo --device cpu --dtype float64 --rows 256",
            "xpsoftmax demo --rows 65536 --classes 32768 --repeat 10",
        ),
    )
    _device_option(demo, "auto (default): CuPy's GPU when one is present, else NumPy on the CPU")
    demo.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="default float32")
    demo.add_argument("--rows", type=_positive_int, default=4096, help="default 4096")
    demo.add_argument("--classes", type=_positive_int, default=1000, help="default 1000")
    demo.add_argument("--repeat", type=_positive_int, default=5, help="timed runs (default 5)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    demo.set_defaults(func=_demo)

    run = _command(
        sub,
        "run",
        "softmax, log_softmax, their backward or cross_entropy on .npy files, in bounded "
        "memory, on the CPU, a GPU or a Dask cluster",
        "Apply OP to .npy files and write the result to OUTPUT (.npy). Inputs are "
        "read in blocks of whole softmax lines, so memory stays bounded whatever the file "
        "size. The output is written to a temporary file beside OUTPUT and published when "
        "complete: an error or a signal never leaves a partial OUTPUT.",
        examples=(
            "xpsoftmax run log_softmax logits.npy -o logprobs.npy --progress",
            "xpsoftmax run softmax_backward y.npy dy.npy -o dx.npy --batch-mb 64",
            "xpsoftmax run cross_entropy logits.npy targets.npy -o loss.npy --reduction mean "
            "--ignore-index -100",
        ),
    )
    run.add_argument(
        "op",
        choices=tuple(OPS),
        metavar="OP",
        help="softmax or log_softmax (input: logits), softmax_backward (inputs: y dy), "
        "log_softmax_backward (inputs: ly dy) or cross_entropy (inputs: logits, integer "
        "targets; output: the loss of each row)",
    )
    run.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="input .npy files; one may be - (stdin)"
    )
    run.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUTPUT",
        help="output .npy file, or - for stdout (the summary then goes to stderr)",
    )
    run.add_argument("--axis", type=int, default=-1, help="the softmax axis (default -1)")
    run.add_argument(
        "--where", metavar="MASK", help="boolean .npy mask, broadcastable to the inputs"
    )
    xent = run.add_argument_group("cross_entropy", "as in torch.nn.functional.cross_entropy")
    xent.add_argument(
        "--reduction",
        choices=("none", "mean", "sum"),
        default="none",
        help="none (default): the loss of each row; sum or mean: one number (a 0-d .npy), the "
        "mean over the rows whose target is not --ignore-index",
    )
    xent.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        metavar="EPS",
        help="in [0, 1] (default 0): the target distribution mixed with the uniform one",
    )
    xent.add_argument(
        "--ignore-index",
        type=int,
        metavar="CLASS",
        help="rows whose target is CLASS have loss 0 and are left out of the mean (default: "
        "none; torch's default is -100)",
    )
    _device_option(run, "auto (default): CuPy's GPU when one is present, else NumPy on the CPU")
    run.add_argument(
        "--batch-mb",
        type=_positive_float,
        default=32.0,
        metavar="N",
        help="CPU: MiB of output per block (default 32; at least one softmax line), peak "
        "memory a few times this; GPU: the device buffers of the two blocks in flight fit in it",
    )
    run.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="run the blocks as tasks on the Dask scheduler at ADDRESS, or on a LocalCluster "
        "of N worker processes with local:N ('local': one per CPU, and at most that); each "
        "worker uses its GPU when it has one",
    )
    run.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    run.add_argument(
        "--verbose",
        action="store_true",
        help="with --dask: let the log of Dask's scheduler and workers through to stderr",
    )
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    run.set_defaults(func=_run)

    bench = _command(
        sub,
        "bench",
        "a short benchmark of softmax and its backward on this machine",
        "Time softmax and softmax_backward (float32, last axis) at two shapes against the "
        "plain formula and scipy.special.softmax (when installed) with NumPy, and against "
        "the formula with CuPy when a GPU is present; check every result against float64. "
        "Exit status 1 when a result is wrong.",
        examples=(
            "xpsoftmax bench                                 # CPU, and the GPU when present",
            "xpsoftmax bench --device cpu --elements 1048576 --repeat 3",
        ),
    )
    bench.add_argument(
        "--elements",
        type=_positive_int,
        default=2**22,
        metavar="N",
        help="elements of each input array (default 4194304, 16 MiB of float32)",
    )
    bench.add_argument("--repeat", type=_positive_int, default=5, help="timed runs (default 5)")
    _device_option(bench, "auto (default): the CPU, and the GPU when one is present")
    bench.set_defaults(func=_bench)

    info = _command(
        sub,
        "info",
        "versions, CUDA devices, nvcc, kernel mode, CPUs",
        "Print the package version, the versions of the array libraries installed (found "
        "from their metadata, without importing them), the CUDA devices CuPy sees, whether "
        "nvcc is on PATH, the kernel mode, the CPU path NumPy arrays take and the CPU count.",
        examples=(
            "xpsoftmax info",
            "XPSOFTMAX_KERNELS=never xpsoftmax info          # the kernel mode it would run in",
        ),
    )
    info.set_defaults(func=_info)

    # Listed for --help only: main() hands "kernels ..." to kcheck before parsing.
    sub.add_parser(
        "kernels",
        help="compile check of the CUDA kernels (see 'xpsoftmax kernels --help')",
        add_help=False,
    )
    return parser


def _fail(message: str) -> None:
    with contextlib.suppress(OSError):  # stderr may be gone (a closed terminal: SIGHUP)
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
        stderr), 128 + the signal's number when interrupted (130 for Ctrl-C, 143 for SIGTERM).

    Examples
    --------
    >>> from xpsoftmax.tools.cli import main
    >>> main(["no-such-command"])
    2
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["kernels"]:
            return _kernels(args[1:])
        namespace = _parser().parse_args(args)
        return namespace.func(namespace)
    except (CommandError, BatchError) as exc:
        _fail(str(exc))
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or another terminating signal during a run
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        _fail("interrupted" if signum == signal.SIGINT else f"interrupted by {exc}")
        return 128 + signum
    except Exception as exc:
        if os.environ.get("XPSOFTMAX_DEBUG"):
            raise
        _fail(first_line(exc))
        return 2
