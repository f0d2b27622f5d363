"""The machine, as the tools describe it: the CPUs, the GPU CuPy sees, and picking a device.

One place for what ``demo``, ``bench``, ``info`` and ``run`` (and its Dask tasks) all need. The
CPU count is the core's (:func:`xpsoftmax._config.available_cpus`, which the NumPy backend's
thread pool uses too).
"""

from __future__ import annotations

import os
import resource
from typing import Any

from .._compat import cupy_installed
from .._config import available_cpus

__all__ = [
    "NoGPUError",
    "available_cpus",
    "available_memory",
    "cpu_summary",
    "cupy_installed",
    "cupy_with_gpu",
    "device_name",
    "gpu_name",
    "pick_gpu",
]

CHOICES = ("auto", "cpu", "gpu")


class NoGPUError(RuntimeError):
    """``--device gpu`` on a machine where CuPy is missing or sees no GPU."""


def cupy_with_gpu() -> Any | None:
    """The cupy module when it is installed and sees a CUDA device, else None."""
    if not cupy_installed():
        return None
    try:
        import cupy
    except Exception:  # a broken CUDA installation: fall back to the CPU
        return None
    try:
        return cupy if cupy.is_available() else None
    except Exception:
        return None


def pick_gpu(choice: str) -> Any | None:
    """The cupy module for ``choice`` ``"gpu"``, or ``"auto"`` with a GPU; None for the CPU.

    ``choice`` is one of :data:`CHOICES` (the callers check it, with their own messages);
    ``"gpu"`` without a usable GPU raises :class:`NoGPUError`.
    """
    cupy = None if choice == "cpu" else cupy_with_gpu()
    if cupy is None and choice == "gpu":
        msg = "--device gpu: no CUDA device found (CuPy is not installed or sees no GPU)"
        raise NoGPUError(msg)
    return cupy


def device_name(cupy: Any, device: int) -> str:
    """The name of CUDA device ``device`` (as the driver reports it)."""
    name = cupy.cuda.runtime.getDeviceProperties(device)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def gpu_name(cupy: Any) -> str:
    """``GPU <id> (<name>), CuPy <version>`` for the current device."""
    dev = cupy.cuda.Device()
    return f"GPU {dev.id} ({device_name(cupy, dev.id)}), CuPy {cupy.__version__}"


def cpu_summary() -> str:
    """``N usable by this process (of M)``, or ``M`` where the affinity mask is unknown."""
    total = os.cpu_count() or 1
    if not hasattr(os, "sched_getaffinity"):  # not on Linux
        return f"{total}"
    return f"{available_cpus()} usable by this process (of {total})"


def available_memory() -> int | None:
    """Bytes this process can still allocate, about: the least of the kernel's ``MemAvailable``
    (``/proc/meminfo``), the room left under a cgroup v2 limit (``memory.max``) and under the
    address-space limit (``ulimit -v``, ``RLIMIT_AS``); None where none of them is known."""
    found = []
    meminfo = _read_kib("/proc/meminfo", "MemAvailable:")
    if meminfo is not None:
        found.append(meminfo)
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                found.append(int(limit) - int(f.read()))
    except (OSError, ValueError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        used = _read_kib("/proc/self/status", "VmSize:")
        found.append(soft - (used or 0))
    return max(0, min(found)) if found else None


def _read_kib(path: str, field: str) -> int | None:
    """The ``field`` line of a ``/proc`` file given in kB, in bytes; None if unreadable."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
