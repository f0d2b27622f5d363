"""The GPU path of ``xpsoftmax run``: blocks stream host -> device -> host on two CUDA streams.

Each of two slots owns a CUDA stream, pinned host buffers and device buffers for one block (its
inputs, its mask, its output). Block ``k`` goes to slot ``k % 2``:

1. wait for the slot's previous block (an event recorded after its last copy) and copy that
   block's result from the slot's pinned output buffer into the output file;
2. read block ``k`` of the inputs into the slot's pinned input buffers;
3. on the slot's stream: copy the pinned buffers to the device, run the public function on
   CuPy views of the device buffers (the fused kernels), copy the result into the pinned
   output buffer, record the slot's event.

So while the GPU works on block ``k`` on one stream, the host reads block ``k + 1`` and queues
it on the other; the copies of one stream overlap the kernels of the other. The device buffers
of both slots fit in ``--batch-mb`` (:func:`plan`); computations that are not a single fused
kernel (integer inputs, the generic CuPy path) allocate temporaries on top.

Only the kernels' launches and the copies need a GPU: the tests drive this loop on the CPU with
a stand-in for CuPy that defers the copies until their event is waited on, so reading a result
too early or overwriting a buffer still in flight fails there.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .job import MIB, BatchError, Box, Job, box_shape, compute, within

__all__ = ["SLOTS", "Plan", "plan", "run"]

#: Blocks in flight: one computing while the next is copied.
SLOTS = 2


@dataclass(frozen=True)
class Plan:
    """How a job streams through the GPU.

    ``lines`` softmax lines per block (``budget`` elements of the softmax-shaped arrays);
    ``slots`` blocks in flight, each with ``buffers`` device buffers (inputs, mask, output) of
    ``slot_bytes`` together, and as many pinned host buffers of the same sizes.
    """

    lines: int
    budget: int
    slots: int
    buffers: int
    slot_bytes: int

    @property
    def device_bytes(self) -> int:
        return self.slots * self.slot_bytes


def _line_bytes(job: Job) -> int:
    """Device bytes per softmax line: inputs, mask and output (the function's result for
    cross_entropy, which takes no ``out=``)."""
    n = job.n
    total = sum(
        a.dtype.itemsize * (1 if r else n) for a, r in zip(job.arrays, job.reduced, strict=True)
    )
    if job.mask is not None:
        total += n  # bool
    return total + job.out_dtype.itemsize * (1 if job.out_reduced else n)


def plan(job: Job) -> Plan:
    """The block size for ``job``: the largest whose :data:`SLOTS` slots fit in ``--batch-mb``.

    Raises :class:`BatchError` when not even one softmax line fits.
    """
    per_line = _line_bytes(job)
    lines = job.spec.batch_bytes // (SLOTS * per_line) if per_line else job.lines
    if lines < 1:
        need = SLOTS * per_line / MIB
        msg = (
            f"--batch-mb {job.spec.batch_bytes / MIB:g}: one softmax line of {job.n} elements "
            f"needs {need:.3g} MiB on the GPU ({SLOTS} blocks in flight); raise --batch-mb"
        )
        raise BatchError(msg)
    lines = max(1, min(lines, job.lines))
    buffers = len(job.arrays) + (job.mask is not None) + 1
    return Plan(lines, lines * job.n, SLOTS, buffers, lines * per_line)


def _pinned(cupy: Any, dtype: np.dtype, size: int) -> np.ndarray:
    """A flat NumPy array of ``size`` elements in pinned (page-locked) host memory."""
    memory = cupy.cuda.alloc_pinned_memory(max(size, 1) * dtype.itemsize)
    return np.frombuffer(memory, dtype=dtype, count=size)


def _view(flat: Any, shape: tuple[int, ...]) -> Any:
    return flat[: math.prod(shape)].reshape(shape)


class _Slot:
    """A stream, its pinned and device buffers, and the block in flight on it."""

    def __init__(self, cupy: Any, dtypes: list[np.dtype], sizes: list[int], out: Any) -> None:
        out_dtype, out_size, on_device = out
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.host = [_pinned(cupy, d, s) for d, s in zip(dtypes, sizes, strict=True)]
        self.device = [cupy.empty(s, dtype=d) for d, s in zip(dtypes, sizes, strict=True)]
        self.host_out = _pinned(cupy, out_dtype, out_size)
        self.device_out = cupy.empty(out_size, dtype=out_dtype) if on_device else None
        self.pending: tuple | None = None

    def finish(self, out: Any, advance: Callable[[int], None]) -> None:
        """Wait for the block in flight and write its result into ``out``."""
        _, index, lines, host_out, event, _ = self.pending
        event.synchronize()
        out[index] = host_out
        self.pending = None
        advance(lines)


def run(
    job: Job, cupy: Any, boxes: Iterable[Box], out: Any, advance: Callable[[int], None]
) -> None:
    """Compute ``boxes`` of ``job`` on the current GPU into ``out`` (the output's data in C
    order, written box by box: ``out[box] = values``)."""
    p = plan(job)
    sources = [*job.arrays, *([job.mask] if job.mask is not None else [])]
    reduced = [*job.reduced, *([False] if job.mask is not None else [])]
    dtypes = [a.dtype.newbyteorder("=") for a in sources]
    sizes = [p.lines * (1 if r else job.n) for r in reduced]
    out_size = p.lines * (1 if job.out_reduced else job.n)
    slots = [
        _Slot(cupy, dtypes, sizes, (job.out_dtype, out_size, not job.out_reduced))
        for _ in range(p.slots)
    ]
    count = len(job.arrays)
    try:
        k = 0
        for box in boxes:
            for index, lines in within(box, job.axis, p.budget):
                slot = slots[k % len(slots)]
                if slot.pending is not None:  # its previous block, the oldest in flight
                    slot.finish(out, advance)
                shapes = [box_shape(job.index(index, r)) for r in reduced]
                host = [_view(h, s) for h, s in zip(slot.host, shapes, strict=True)]
                for h, a, r in zip(host, sources, reduced, strict=True):
                    np.copyto(h, a[job.index(index, r)])
                out_index = job.index(index, job.out_reduced)
                out_shape = box_shape(out_index)
                host_out = _view(slot.host_out, out_shape)
                with slot.stream:
                    dev = [_view(d, s) for d, s in zip(slot.device, shapes, strict=True)]
                    for d, h in zip(dev, host, strict=True):
                        d.set(h, stream=slot.stream)
                    mask = dev[count] if job.mask is not None else None
                    dout = None if job.out_reduced else _view(slot.device_out, out_shape)
                    result = compute(job, dev[:count], mask, out=dout)
                    cupy.asnumpy(result, stream=slot.stream, out=host_out, blocking=False)
                    event = slot.stream.record()
                # ``result`` (allocated by cross_entropy) is kept until the event has passed.
                slot.pending = (k, out_index, lines, host_out, event, result)
                k += 1
        for slot in sorted((s for s in slots if s.pending), key=lambda s: s.pending[0]):
            slot.finish(out, advance)
    except BaseException:
        # Never free pinned buffers with copies in flight (after an error or Ctrl-C).
        for slot in slots:
            with contextlib.suppress(Exception):
                slot.stream.synchronize()
        raise
