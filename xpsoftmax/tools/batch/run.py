"""The driver of ``xpsoftmax run``: check, pick the CPU, a GPU or a Dask cluster, write, report."""

from __future__ import annotations

import sys
import time

from .. import devices
from . import dask as batch_dask
from . import files
from . import gpu as batch_gpu
from . import job as job_
from .job import (
    CPU_NAME,
    OPS,
    BatchError,
    Spec,
    check_output,
    open_job,
    run_cpu,
    whole,
)

__all__ = ["run"]


def _progress_bar(enabled: bool, lines: int):
    """A tqdm bar on stderr counting softmax lines, or None when disabled."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=lines, unit="row", unit_scale=True, file=sys.stderr, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# the command

REDUCTIONS = ("none", "mean", "sum")


def _check_options(spec: Spec, dask: str | None) -> None:
    """cross_entropy's options: only for cross_entropy, valid values, totals not on Dask."""
    given = [
        option
        for option, default in (
            ("--reduction", spec.reduction == "none"),
            ("--label-smoothing", spec.label_smoothing == 0.0),
            ("--ignore-index", spec.ignore_index is None),
        )
        if not default
    ]
    if given and spec.op != "cross_entropy":
        raise BatchError(f"run {spec.op}: {', '.join(given)}: an option of cross_entropy only")
    if spec.reduction not in REDUCTIONS:
        msg = f"--reduction must be one of {', '.join(REDUCTIONS)}, got {spec.reduction!r}"
        raise BatchError(msg)
    if not 0.0 <= spec.label_smoothing <= 1.0:  # False for NaN
        raise BatchError(f"--label-smoothing must be in [0, 1], got {spec.label_smoothing}")
    if dask is not None and spec.reduction != "none":
        msg = (
            f"--reduction {spec.reduction} with --dask is not supported (the workers write "
            "rows of the output); use --reduction none and reduce the losses"
        )
        raise BatchError(msg)


def run(
    spec: Spec,
    output: str,
    *,
    overwrite: bool = False,
    progress: bool = False,
    dask: str | None = None,
    verbose: bool = False,
) -> str:
    """Run ``spec`` into the ``.npy`` file ``output``; return the one-line summary.

    ``dask`` is ``--dask``'s address (with ``verbose``, distributed's log reaches stderr).

    Raises :class:`BatchError` for a bad file, option or device, before anything is written.
    """
    names = OPS[spec.op]
    if len(spec.inputs) != len(names):
        msg = (
            f"run {spec.op}: takes {len(names)} input{'s' if len(names) > 1 else ''} "
            f"({', '.join(names)}), got {len(spec.inputs)}"
        )
        raise BatchError(msg)
    _check_options(spec, dask)
    if spec.inputs.count(files.STDIO) > 1:
        raise BatchError("only one input can be '-' (stdin), which is read once")
    if spec.where == files.STDIO:
        raise BatchError("--where -: the mask cannot be stdin (it may be read more than once)")
    sources = [*spec.inputs, *([spec.where] if spec.where is not None else [])]
    stdout = output == files.STDIO
    if stdout and sys.stdout.isatty():
        raise BatchError("output '-' (stdout): stdout is a terminal; redirect it to a file or pipe")
    target = output if stdout else check_output(output, sources, overwrite)
    job = open_job(spec)
    job_.check_streams(job, stdout, dask is not None)
    if dask is not None:
        cluster = batch_dask.parse_address(dask)  # checked before anything is written
        cluster, note = batch_dask.capped(cluster)
        if note is not None:
            print(f"xpsoftmax: note: {note}", file=sys.stderr, flush=True)
        cupy = None
    else:
        cupy = job_.pick_device(spec.device)
        if cupy is not None:
            batch_gpu.plan(job)  # a line that does not fit in --batch-mb: an error now
    start = time.perf_counter()
    bar = _progress_bar(progress, job.lines)
    device = CPU_NAME

    def advance(count: int) -> None:
        if bar is not None:
            done = job.moved * (bar.n + count) / max(job.lines, 1)
            rate = done / max(time.perf_counter() - start, 1e-9) / 1e9
            bar.set_postfix_str(f"{rate:.2f} GB/s", refresh=False)
            bar.update(count)

    try:
        with files.interruptible():
            shape = job.out_shape[::-1] if job.fortran else job.out_shape
            total = job_.Total(job) if spec.reduction != "none" else None
            if total is not None:
                shape = ()
            fortran = job.out_fortran and total is None
            if stdout:
                opened = files.StdoutOutput.create(
                    "output '-' (stdout)", job.out_dtype, shape, fortran
                )
            else:
                opened = files.Output.create(
                    target, f"output {output!r}", job.out_dtype, shape, fortran,
                    overwrite=overwrite,
                )  # fmt: skip
            with opened as out:
                into = out if total is None else total
                if dask is not None:
                    device = batch_dask.run(job, out.part, cluster, advance, verbose)
                elif cupy is not None:
                    batch_gpu.run(job, cupy, [whole(job.shape)], into, advance)
                    device = devices.gpu_name(cupy)
                else:
                    run_cpu(job, [whole(job.shape)], into, advance)
                if total is not None:
                    out[()] = total.value
                job.check_unchanged()
                out.publish()
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    shape = job.shape[::-1] if job.fortran else job.shape
    axis = len(shape) - 1 - job.axis if job.fortran else job.axis
    return (
        f"{spec.op}: {job.lines} rows of {job.n} {job.out_dtype} "
        f"(axis {axis} of {shape}), {job.moved / 1e9:.3g} GB read and written in "
        f"{seconds:.3g} s, {job.moved / max(seconds, 1e-9) / 1e9:.3g} GB/s, {device} -> {output}"
    )
