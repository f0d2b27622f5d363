"""The one loader of the CUDA sources in ``kernels/``: locate, ``#line``, compile, memoize.

A wheel ships the sources inside the package (``xpsoftmax/kernels/``); an editable checkout reads
them from the top-level ``kernels/`` folder. Each source is compiled whole, once per CUDA device,
with NVRTC through :class:`cupy.RawModule`, instantiating the template kernels listed for it in
``specs.SOURCES``. The text is prefixed with ``#line 1 "<path>"`` so that compiler errors
name the real file. Compile errors propagate as CuPy's ``CompileException``; nothing is printed
and nothing falls back silently.

The module imports CuPy only inside the functions that need a device, so it imports (and
:func:`source_path`, :func:`source` work) on machines without CuPy or without a GPU.

Besides the loader, three helpers size launches on the current device:
:func:`max_dynamic_smem` (the opt-in shared-memory limit per block), :func:`set_max_dynamic_smem`
(opt a kernel into it) and :func:`occupancy_grid` (a grid of SMs x resident blocks per SM, for
grid-stride loops).
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

from .specs import SOURCES

__all__ = [
    "get_function",
    "max_dynamic_smem",
    "occupancy_grid",
    "set_max_dynamic_smem",
    "source",
    "source_path",
]

#: Options for every NVRTC compile (CuPy adds ``-ftz=true`` and the ``-arch`` of the device).
OPTIONS: tuple[str, ...] = ("-std=c++17",)

# xpsoftmax/ (this file is xpsoftmax/backends/cuda/loader.py)
_PACKAGE_DIR = Path(__file__).resolve().parents[2]

_lock = threading.Lock()
# (device id, file name) -> cupy.RawModule; (device id, file name, name expression) -> RawKernel.
_modules: dict[tuple[int, str, str], Any] = {}
_functions: dict[tuple[int, str, str], Any] = {}
# (device id, kernel) -> the largest dynamic shared memory size the kernel was opted into.
_smem_opt_in: dict[tuple[int, Any], int] = {}
# (device id, kernel, block, dynamic shared memory) -> number of blocks in the grid.
_grids: dict[tuple[int, Any, int, int], int] = {}


def _candidates(filename: str) -> list[Path]:
    """Where ``filename`` may be: inside the installed package, then in the checkout."""
    places = [_PACKAGE_DIR / "kernels" / filename]
    checkout = _PACKAGE_DIR.parent
    # Only a source checkout (with its pyproject.toml) counts, never a stray site-packages/kernels.
    if (checkout / "pyproject.toml").is_file():
        places.append(checkout / "kernels" / filename)
    return places


def source_path(filename: str) -> Path:
    """Absolute path of the kernel source ``filename`` (such as ``"softmax.cu"``).

    Looks inside the installed package first (``xpsoftmax/kernels/``, where a wheel puts the
    sources), then in the ``kernels/`` folder of a source checkout (an editable install).

    Parameters
    ----------
    filename : str
        Bare file name of a source in ``kernels/``, without any directory.

    Returns
    -------
    pathlib.Path
        The absolute path of the file.

    Raises
    ------
    ValueError
        If ``filename`` is not a bare file name.
    FileNotFoundError
        If the file is in none of the places looked in; the message lists them.

    Examples
    --------
    >>> from xpsoftmax.backends.cuda import loader as _kernels
    >>> _kernels.source_path("softmax.cu").name
    'softmax.cu'
    """
    if not isinstance(filename, str) or not filename or Path(filename).name != filename:
        msg = f"filename must be the bare name of a file in kernels/, got {filename!r}"
        raise ValueError(msg)
    places = _candidates(filename)
    for place in places:
        if place.is_file():
            return place
    looked = ", ".join(str(p) for p in places)
    msg = f"kernel source {filename!r} not found; looked in: {looked}"
    raise FileNotFoundError(msg)


@functools.cache
def source(filename: str) -> str:
    """Text of the kernel source ``filename``, prefixed with ``#line 1 "<absolute path>"``.

    The ``#line`` directive makes NVRTC's error messages name the real file instead of the
    temporary one CuPy compiles. The text is read once and cached.

    Parameters
    ----------
    filename : str
        Bare file name of a source in ``kernels/``.

    Returns
    -------
    str
        The source text, starting with the ``#line`` directive.

    Examples
    --------
    >>> from xpsoftmax.backends.cuda import loader as _kernels
    >>> _kernels.source("softmax.cu").startswith('#line 1 "')
    True
    """
    path = source_path(filename)
    quoted = str(path).replace("\\", "\\\\").replace('"', '\\"')
    return f'#line 1 "{quoted}"\n' + path.read_text(encoding="utf-8")


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as e:
        msg = "the CUDA kernels need CuPy; install xpsoftmax with the cuda12 or cuda13 extra"
        raise ImportError(msg) from e
    return cupy


def _device_id(cupy: Any, what: str) -> int:
    """The current CUDA device, or a RuntimeError saying that ``what`` needs one."""
    try:
        return int(cupy.cuda.runtime.getDevice())
    except cupy.cuda.runtime.CUDARuntimeError as e:
        msg = f"{what} needs a CUDA device, and none is usable: {e}"
        raise RuntimeError(msg) from e


def get_function(filename: str, name: str) -> Any:
    """The compiled kernel ``name`` of the source ``filename`` on the current CUDA device.

    Each kernel is compiled on first use on each device with
    ``cupy.RawModule(code=source(filename), options=..., name_expressions=[name])`` and memoized
    per (device, file, name); CuPy's disk cache keeps the binaries across processes.
    Safe to call from several threads.

    Parameters
    ----------
    filename : str
        A source listed in ``specs.SOURCES``, such as ``"softmax.cu"``.
    name : str
        One of the name expressions listed for it, such as ``"xps_fwd_block<float, 256>"``.

    Returns
    -------
    cupy.RawKernel
        The kernel, ready to launch on the current device.

    Raises
    ------
    ValueError
        If ``filename`` is not in ``SOURCES`` or ``name`` is not one of its name expressions
        (checked before anything is compiled).
    ImportError
        If CuPy is not installed.
    RuntimeError
        If there is no usable CUDA device.
    cupy.cuda.compiler.CompileException
        If NVRTC rejects the source; the log names the file in ``kernels/``.

    Examples
    --------
    >>> from xpsoftmax.backends.cuda import loader as _kernels
    >>> scale = _kernels.get_function("softmax.cu", "xps_fwd_block<float, 256>")  # doctest: +SKIP
    """
    names = SOURCES.get(filename)
    if names is None:
        msg = f"filename must be one of {sorted(SOURCES)}, got {filename!r}"
        raise ValueError(msg)
    if name not in names:
        msg = (
            f"name {name!r} is not a name expression of kernels/{filename}; expected one of {names}"
        )
        raise ValueError(msg)
    cupy = _cupy()
    device = _device_id(cupy, f"compiling kernels/{filename}")
    key = (device, filename, name)
    kernel = _functions.get(key)
    if kernel is not None:
        return kernel
    with _lock:
        kernel = _functions.get(key)
        if kernel is None:
            # One module per name expression: a call compiles only the kernels it launches
            # (softmax.cu holds over a hundred instantiations), and CuPy's disk cache keeps them.
            options = (*OPTIONS, f"-I{source_path(filename).parent}")
            module = cupy.RawModule(
                code=source(filename),
                options=options,
                name_expressions=[name],
            )
            _modules[key] = module
            kernel = module.get_function(name)
            _functions[key] = kernel
    return kernel


@functools.cache
def _device_attribute(attribute: int, device: int) -> int:
    import cupy

    return int(cupy.cuda.runtime.deviceGetAttribute(attribute, device))


def max_dynamic_smem(device: int | None = None) -> int:
    """Largest dynamic shared memory per block a kernel can opt into on ``device``, in bytes.

    This is ``cudaDevAttrMaxSharedMemoryPerBlockOptin`` (227 KiB on H100, 163 KiB on A100),
    larger than the 48 KiB a kernel gets without opting in; see :func:`set_max_dynamic_smem`.
    Memoized per device.

    Parameters
    ----------
    device : int, optional
        CUDA device id; the current device if omitted.

    Returns
    -------
    int
        The limit in bytes (static and dynamic shared memory of one block together).

    Examples
    --------
    >>> from xpsoftmax.backends.cuda import loader as _kernels
    >>> _kernels.max_dynamic_smem() >= 48 * 1024  # doctest: +SKIP
    True
    """
    cupy = _cupy()
    if device is None:
        device = _device_id(cupy, "max_dynamic_smem")
    attribute = cupy.cuda.runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin
    return _device_attribute(attribute, int(device))


def _check_count(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        msg = f"{name} must be an integer >= {low}, got {value!r}"
        raise ValueError(msg)
    return value


def set_max_dynamic_smem(kernel: Any, nbytes: int) -> None:
    """Allow ``kernel`` to launch with ``nbytes`` of dynamic shared memory on the current device.

    Beyond 48 KiB per block, CUDA requires each kernel to opt in by raising its
    ``CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`` (``RawKernel.max_dynamic_shared_size_bytes``
    in CuPy). The attribute is set only when ``nbytes`` exceeds what this kernel was already
    opted into on this device, so calling this before every launch is cheap.

    Parameters
    ----------
    kernel : cupy.RawKernel
        A kernel from :func:`get_function`.
    nbytes : int
        Dynamic shared memory per block, in bytes.

    Raises
    ------
    ValueError
        If ``nbytes`` is negative or, with the kernel's static shared memory, exceeds
        :func:`max_dynamic_smem`.

    Examples
    --------
    >>> from xpsoftmax.backends.cuda import loader as _kernels
    >>> k = _kernels.get_function("softmax.cu", "xps_fwd_block<float, 256>")  # doctest: +SKIP
    >>> _kernels.set_max_dynamic_smem(k, 100 * 1024)  # doctest: +SKIP
    """
    nbytes = _check_count(nbytes, "nbytes", 0)
    cupy = _cupy()
    device = _device_id(cupy, "set_max_dynamic_smem")
    key = (device, kernel)
    if nbytes <= _smem_opt_in.get(key, 0):
        return
    limit = max_dynamic_smem(device)
    static = int(kernel.shared_size_bytes)
    if nbytes + static > limit:
        msg = (
            f"nbytes={nbytes} of dynamic shared memory plus the kernel's {static} static bytes "
            f"exceed the {limit} bytes per block that device {device} allows"
        )
        raise ValueError(msg)
    kernel.max_dynamic_shared_size_bytes = nbytes
    _smem_opt_in[key] = nbytes


def occupancy_grid(kernel: Any, block: int, smem: int = 0) -> int:
    """Number of blocks that fill the current device once: SMs x resident blocks per SM.

    Uses the occupancy API (``cuOccupancyMaxActiveBlocksPerMultiprocessor``) for ``kernel``
    launched with ``block`` threads and ``smem`` bytes of dynamic shared memory; kernels then
    cover all rows with a grid-stride loop. Memoized per (device, kernel, block, smem). Call
    :func:`set_max_dynamic_smem` first when ``smem`` exceeds 48 KiB.

    Parameters
    ----------
    kernel : cupy.RawKernel
        A kernel from :func:`get_function`.
    block : int
        Threads per block.
    smem : int, optional
        Dynamic shared memory per block, in bytes.

    Returns
    -------
    int
        The grid size, at least the number of SMs.

    Raises
    ------
    ValueError
        If ``block`` or ``smem`` are not valid counts, or the kernel cannot run even one block
        per SM with them (too many registers, threads or shared memory).

    Examples
    --------
    >>> from xpsoftmax.backends.cuda import loader as _kernels
    >>> k = _kernels.get_function("softmax.cu", "xps_fwd_block<float, 256>")  # doctest: +SKIP
    >>> _kernels.occupancy_grid(k, 256) % 132  # on an H100 SXM  # doctest: +SKIP
    0
    """
    block = _check_count(block, "block", 1)
    smem = _check_count(smem, "smem", 0)
    cupy = _cupy()
    device = _device_id(cupy, "occupancy_grid")
    key = (device, kernel, block, smem)
    grid = _grids.get(key)
    if grid is not None:
        return grid
    per_sm = int(
        cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.kernel.ptr, block, smem)
    )
    if per_sm < 1:
        msg = (
            f"kernel {kernel.name} cannot run with block={block} threads and smem={smem} bytes "
            f"on device {device}: no block fits on a multiprocessor"
        )
        raise ValueError(msg)
    sms = _device_attribute(cupy.cuda.runtime.cudaDevAttrMultiProcessorCount, device)
    grid = sms * per_sm
    _grids[key] = grid
    return grid
