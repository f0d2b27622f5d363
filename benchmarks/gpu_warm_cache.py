"""Compile every kernel instantiation with NVRTC in parallel processes, filling CuPy's disk cache.

The GPU check runs this first so that the tests and benchmarks load compiled kernels from
``CUPY_CACHE_DIR`` instead of compiling them one by one. Prints the count and the seconds taken;
exits 1 (naming the kernel and showing the compiler log) if any instantiation fails to compile.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ProcessPoolExecutor


def _compile(item: tuple[str, str]) -> tuple[str, str, str | None]:
    filename, name = item
    try:
        from xpsoftmax.backends.cuda import loader as _kernels

        _kernels.get_function(filename, name)
    except Exception as exc:  # reported by the parent, with the kernel's name
        return filename, name, f"{type(exc).__name__}: {exc}"
    return filename, name, None


def main() -> int:
    from xpsoftmax.backends.cuda.specs import SOURCES

    items = [(f, n) for f, names in SOURCES.items() for n in names]
    t0 = time.perf_counter()
    failures = []
    with ProcessPoolExecutor(max_workers=12) as pool:
        for filename, name, err in pool.map(_compile, items):
            if err is not None:
                failures.append((filename, name, err))
    dt = time.perf_counter() - t0
    for filename, name, err in failures:
        print(f"FAILED {filename} {name}: {err}", file=sys.stderr)
    print(f"compiled {len(items) - len(failures)}/{len(items)} kernels in {dt:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
