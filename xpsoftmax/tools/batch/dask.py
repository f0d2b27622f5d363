"""``xpsoftmax run --dask``: a job's rows as Dask tasks that write their own part of the output.

The main process checks the inputs and creates the temporary output file (header and size);
then each task, on a worker, opens the inputs and the temporary file again (``files.py``: read
and written with ``pread``/``pwrite``), computes its box of whole softmax lines and writes it
there. Boxes are disjoint, so no locking is needed; the main process checks that no input
changed and publishes the file when every task is done (``files.Output``). A worker computes
on its GPU when it has one (with ``--device auto``; one worker per GPU, as dask-cuda sets up),
with NumPy otherwise.

The paths must mean the same file on every worker: the local disk for ``--dask local[:N]``, a
shared file system for a remote scheduler.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .. import devices
from . import gpu as batch_gpu
from . import job as job_
from .job import (
    CPU_NAME,
    BatchError,
    Box,
    Job,
    Spec,
    blocks,
    cpu_budget,
    first_line,
    open_job,
    open_npy,
    run_cpu,
)

__all__ = ["Cluster", "parse_address", "run", "run_task", "task_boxes"]

#: At least this many tasks per worker thread, so that a slow worker does not hold up the end.
TASKS_PER_THREAD = 4
#: At most this many CPU blocks (``--batch-mb`` each) per task, so that progress is visible.
MAX_BLOCKS_PER_TASK = 16


@dataclass(frozen=True)
class Cluster:
    """Where to run: a scheduler's ``address``, or a LocalCluster of ``workers`` processes."""

    address: str | None
    workers: int | None = None

    def __str__(self) -> str:
        return self.address or f"local:{self.workers}"


def parse_address(text: str) -> Cluster:
    """``--dask``'s value: ``local`` (one worker per usable CPU), ``local:N`` or an address."""
    if text == "local" or text.startswith("local:"):
        count = text.partition(":")[2]
        if not count:
            return Cluster(None, devices.available_cpus())
        if count.isdigit() and int(count) > 0:
            return Cluster(None, int(count))
        msg = f"--dask {text!r}: expected local:N with N a positive number of workers"
        raise BatchError(msg)
    if not text.strip():
        raise BatchError("--dask: expected a scheduler address, 'local' or 'local:N'")
    return Cluster(text)


def task_boxes(job: Job, threads: int) -> list[Box]:
    """The boxes of ``job`` to hand out: about :data:`TASKS_PER_THREAD` per worker thread, each
    of one to :data:`MAX_BLOCKS_PER_TASK` CPU blocks."""
    budget = cpu_budget(job)
    share = math.ceil(math.prod(job.shape) / (TASKS_PER_THREAD * max(threads, 1)))
    per_task = max(budget, min(share, MAX_BLOCKS_PER_TASK * budget))
    return [box for box, _ in blocks(job.shape, job.axis, per_task)]


def run_task(spec: Spec, part: str, box: Box) -> tuple[int, str]:
    """On a worker: compute ``box`` of ``spec`` into the temporary output file ``part``.

    Returns the number of softmax lines written and the device that computed them.
    """
    job = open_job(spec)
    out = open_npy(part, "output", write=True)
    expected = job.out_shape[::-1] if job.fortran else job.out_shape
    if out.array.shape != expected or out.array.dtype != job.out_dtype:  # replaced meanwhile
        found = f"{out.array.shape} {out.array.dtype}"
        msg = f"{part!r}: expected a {expected} {job.out_dtype} array, found {found}"
        raise BatchError(msg)
    view = out.array.T if out.fortran else out.array  # the data in C order
    done = 0

    def advance(lines: int) -> None:
        nonlocal done
        done += lines

    cupy = job_.pick_device(spec.device)
    if cupy is not None:
        batch_gpu.run(job, cupy, [box], view, advance)
        device = devices.gpu_name(cupy)
    else:
        run_cpu(job, [box], view, advance)
        device = CPU_NAME
    return done, device


@contextlib.contextmanager
def _workers_ignore_sigint() -> Iterator[None]:
    """Start processes that ignore SIGINT: Ctrl-C in a terminal reaches the whole process group,
    and the command, not each worker, handles it (it cancels the tasks and stops the cluster).
    The processes inherit the ignored signal; this process ignores it only while they start."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _quiet_event_loop() -> Iterator[None]:
    """Keep the event loop's error log (tornado, asyncio) out of the terminal during the run.

    On Ctrl-C, distributed's ``sync`` schedules a ``cancel`` callback that can fail inside the
    loop thread (a NameError in distributed 2026.8's ``utils.sync``), which tornado logs with a
    traceback; the command reports the interruption in one line instead. The levels come back
    after a normal run; after an interruption the process is ending, so they stay raised.
    """
    loggers = [logging.getLogger(name) for name in ("tornado.application", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


def _local_cluster(cls: Any, workers: int) -> Any:
    return cls(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        # No dashboard; the scheduler's small HTTP server (health checks) on a free port rather
        # than on 8787, which another cluster may hold.
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        silence_logs=logging.ERROR,  # a failed task is reported once, by the command
    )


def run(job: Job, part: str, cluster: Cluster, advance: Callable[[int], None]) -> str:
    """Compute ``job`` into ``part`` on ``cluster``; return a description of where it ran."""
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        msg = "--dask needs dask.distributed (pip install distributed)"
        raise BatchError(msg) from None
    # Workers open the files again: give them absolute paths.
    inputs = tuple(os.path.abspath(p) for p in job.spec.inputs)
    where = None if job.spec.where is None else os.path.abspath(job.spec.where)
    spec = dataclasses.replace(job.spec, inputs=inputs, where=where)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet_event_loop())
        if cluster.address is None:
            with _workers_ignore_sigint():
                local = _local_cluster(LocalCluster, cluster.workers)
            stack.enter_context(local)
            client = stack.enter_context(Client(local))
        else:
            try:
                client = stack.enter_context(Client(cluster.address))
            except (OSError, TimeoutError, ValueError) as exc:
                msg = f"--dask {cluster.address}: cannot connect ({first_line(exc)})"
                raise BatchError(msg) from None
        threads = sum(client.nthreads().values())
        if threads == 0:
            raise BatchError(f"--dask {cluster}: the scheduler has no workers")
        boxes = task_boxes(job, threads)
        futures = [client.submit(run_task, spec, part, box, pure=False) for box in boxes]
        devices: collections.Counter[str] = collections.Counter()
        try:
            for future in as_completed(futures):
                lines, device = future.result()
                devices[device] += 1
                advance(lines)
        except BaseException:
            client.cancel(futures)
            raise
        workers = len(client.nthreads())
    used = ", ".join(f"{count} on {device}" for device, count in sorted(devices.items()))
    return f"Dask {cluster} ({_plural(workers, 'worker')}; {_plural(len(boxes), 'task')}: {used})"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"
