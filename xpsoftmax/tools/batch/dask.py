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
import sys
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

__all__ = ["Cluster", "capped", "parse_address", "run", "run_task", "task_boxes"]

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


def capped(cluster: Cluster) -> tuple[Cluster, str | None]:
    """``cluster`` with at most one local worker per usable CPU, and a note when capped."""
    cpus = devices.available_cpus()
    if cluster.address is not None or cluster.workers <= cpus:
        return cluster, None
    note = (
        f"--dask local:{cluster.workers}: this machine has {_plural(cpus, 'usable CPU')}; "
        f"starting {_plural(cpus, 'worker')}"
    )
    return Cluster(None, cpus), note


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


def _start_loop() -> Any:
    """Start distributed's event loop thread with SIGINT held back (blocked) in it.

    Ctrl-C in a terminal reaches the whole process group; the command, not each worker, handles
    it (it cancels the tasks and stops the cluster). The loop thread starts the worker
    processes, and threads and processes inherit a blocked signal, so the workers never see
    it; this process's main thread does, also while the cluster starts.

    multiprocessing's resource tracker, started with the first worker, unblocks SIGINT in the
    thread that starts it (bpo-33613): it is started here first, from this thread.
    """
    from multiprocessing import resource_tracker

    from distributed.utils import LoopRunner

    resource_tracker.ensure_running()
    runner = LoopRunner(asynchronous=False)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        runner.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    return runner


@contextlib.contextmanager
def _quiet_event_loop(verbose: bool) -> Iterator[None]:
    """Keep distributed's log and the event loop's (tornado, asyncio) out of the terminal during
    the run, unless ``verbose``: a failed task is reported once, in one line, by the command.

    On Ctrl-C, distributed's ``sync`` schedules a ``cancel`` callback that can fail inside the
    loop thread (a NameError in distributed 2026.8's ``utils.sync``), which tornado logs with a
    traceback; the command reports the interruption in one line instead. The levels come back
    after a normal run; after an interruption the process is ending, so they stay raised.
    """
    if verbose:
        yield
        return
    names = ("distributed", "tornado.application", "asyncio")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    # Worker processes set up their log on import, from dask's config, before they are told
    # silence_logs (a worker stopped while starting logs at INFO): the config through the
    # environment they inherit.
    variable = "DASK_LOGGING__DISTRIBUTED"
    before = os.environ.get(variable)
    os.environ[variable] = "critical"
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)
    if before is None:
        del os.environ[variable]
    else:
        os.environ[variable] = before


def _quiet_exit_of_half_started_cluster() -> None:
    """Interrupted while the cluster started: the loop stops, so the workers end with this
    process, but distributed's exit hook (``close_clusters``) still tries to close the cluster
    and fails on it (an AssertionError on a worker still starting): keep that traceback out."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if getattr(unraisable.object, "__module__", "") != "distributed.deploy.spec":
            previous(unraisable)

    sys.unraisablehook = hook


def _local_cluster(cls: Any, workers: int, loop: Any, verbose: bool) -> Any:
    return cls(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        # No dashboard; the scheduler's small HTTP server (health checks) on a free port rather
        # than on 8787, which another cluster may hold.
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        # The workers' log ("Compute Failed" and a traceback for a failed task): the command
        # reports the error once, in one line, unless --verbose.
        silence_logs=logging.INFO if verbose else logging.CRITICAL + 1,
        loop=loop,
    )


def run(
    job: Job, part: str, cluster: Cluster, advance: Callable[[int], None], verbose: bool = False
) -> str:
    """Compute ``job`` into ``part`` on ``cluster``; return a description of where it ran.

    ``verbose`` lets distributed's log through to stderr."""
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
        stack.enter_context(_quiet_event_loop(verbose))
        if cluster.address is None:
            runner = _start_loop()
            stack.callback(runner.stop)
            try:
                local = _local_cluster(LocalCluster, cluster.workers, runner.loop, verbose)
            except KeyboardInterrupt:
                _quiet_exit_of_half_started_cluster()
                raise
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
