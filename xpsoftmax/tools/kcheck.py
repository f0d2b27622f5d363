"""``python -m xpsoftmax kernels --check``: compile every kernel instantiation with ``nvcc``.

For each source in ``SOURCES`` (``backends/cuda/specs.py``) and each architecture, a small
translation unit ``#include``s the source and takes the address of every name expression, which
makes the compiler instantiate exactly the template kernels that NVRTC compiles at run time. ``nvcc
--resource-usage`` then reports registers, spills, stack frame and static shared memory per
kernel; one row is printed per kernel instantiation and architecture. No GPU is needed, only the
CUDA toolkit's ``nvcc``.

Exit status: 0 when everything compiled without spilling, 1 on a compile error (nvcc's messages
name the file in ``kernels/``) or on any spill, 2 for bad arguments or a missing ``nvcc``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TextIO

from ..backends.cuda import loader as _kernels
from ..backends.cuda.specs import SOURCES

DEFAULT_ARCHS = ("sm_80", "sm_90")
# Mirrors what CuPy passes to NVRTC (``-ftz=true`` is CuPy's), so register counts match run time.
NVCC_OPTIONS = ("-std=c++17", "-ftz=true", "--resource-usage")
_JOBS = 2

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_ARCH = re.compile(r"sm_(\d+)[af]?")


@dataclass
class Usage:
    """Resources of one compiled function, as ptxas reports them."""

    mangled: str
    arch: str
    entry: bool = False
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem: int = 0


@dataclass
class _Result:
    filename: str
    arch: str
    returncode: int
    stderr: str
    unit: str
    usages: list[Usage] = field(default_factory=list)


def parse_ptxas(report: str, arch: str) -> list[Usage]:
    """Functions and their resources from the ``ptxas info`` lines of one compile for ``arch``."""
    usages: dict[str, Usage] = {}
    entry: Usage | None = None
    current: Usage | None = None
    for line in report.splitlines():
        if m := _ENTRY.search(line):
            entry = usages.setdefault(m[1], Usage(m[1], m[2]))
            entry.entry = True
        elif m := _PROPERTIES.search(line):
            current = usages.setdefault(m[1], Usage(m[1], arch))
        elif (m := _FRAME.search(line)) and current is not None:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
            current = None
        elif (m := _USED.search(line)) and entry is not None:
            entry.registers = int(m[1])
            smem = _SMEM.search(line)
            entry.smem = int(smem[1]) if smem else 0
    return list(usages.values())


def _demangle(names: Sequence[str]) -> dict[str, str]:
    """Mangled -> demangled names with ``cu++filt`` (or binutils' ``c++filt``); as is without."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    done = subprocess.run(
        [tool], input="\n".join(names) + "\n", capture_output=True, text=True, check=False
    )
    out = done.stdout.splitlines()
    if done.returncode != 0 or len(out) != len(names):
        return {n: n for n in names}
    return dict(zip(names, out, strict=True))


def _template_text(demangled: str) -> str:
    """``void k<float, 4>(float const*, int)`` -> ``k<float, 4>``."""
    text = demangled.replace("(anonymous namespace)::", "")
    depth = 0
    start = 0
    for i, ch in enumerate(text):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0 and ch == " ":
            start = i + 1  # skips the return type
        elif depth == 0 and ch == "(":
            return text[start:i]
    return text


def _normal(expression: str) -> str:
    """Spelling-insensitive form of a name expression: no spaces, no integer suffixes."""
    text = re.sub(r"\s+", "", expression)
    return re.sub(r"\b(\d+)(?:[uU]?(?:ll|LL|l|L)?|(?:ll|LL|l|L)[uU])\b", r"\1", text)


def _label(filename: str) -> str:
    return f"<name expressions of {filename} in xpsoftmax.backends.cuda.specs.SOURCES>"


def _translation_unit(path: Path, filename: str, names: Sequence[str]) -> str:
    """Source that includes ``path`` and instantiates every name expression in ``names``.

    nvcc reports an error in the k-th name expression at line k of :func:`_label`.
    """
    include = str(path).replace("\\", "\\\\").replace('"', '\\"')
    keep = ",\n".join(f"  (void*)&{name}" for name in names)
    return (
        f'#include "{include}"\n'
        "// Taking each kernel's address instantiates it, as NVRTC's name expressions do.\n"
        "[[maybe_unused]] static void* const xps_kcheck_keep[] = {\n"
        f'#line 1 "{_label(filename)}"\n'
        f"{keep}\n}};\n"
    )


def _compile(nvcc: str, tu: Path, filename: str, arch: str) -> _Result:
    cubin = tu.with_name(f"{tu.stem}.{arch}.cubin")
    cmd = [nvcc, *NVCC_OPTIONS, f"-arch={arch}", "-cubin", str(tu), "-o", str(cubin)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    report = done.stdout + done.stderr
    result = _Result(filename, arch, done.returncode, done.stderr, str(tu))
    if done.returncode == 0:
        result.usages = parse_ptxas(report, arch)
    return result


def _diagnostics(stderr: str) -> str:
    """nvcc's messages other than the ptxas resource report (warnings, errors)."""
    lines = stderr.splitlines()
    keep: list[str] = []
    skip_next = False
    for line in lines:
        if skip_next:
            skip_next = False
            continue
        if line.startswith("ptxas info"):
            skip_next = "Function properties" in line
            continue
        keep.append(line)
    return "\n".join(keep).strip()


def _readable(r: _Result) -> str:
    """nvcc's messages for ``r``, with the generated translation unit named for what it holds.

    When the source itself has errors, the follow-on errors in the name expressions are left out.
    """
    text = (_diagnostics(r.stderr) or r.stderr.strip()).replace(r.unit, _label(r.filename))
    blocks = re.split(r"\n\s*\n", text)
    ours = [b.startswith(_label(r.filename)) for b in blocks]
    if any(": error" in b and not mine for b, mine in zip(blocks, ours, strict=True)):
        blocks = [b for b, mine in zip(blocks, ours, strict=True) if not mine]
    return "\n\n".join(blocks)


def _supported_archs(nvcc: str) -> set[str] | None:
    done = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return None
    return set(done.stdout.split())


def check(
    archs: Sequence[str] = DEFAULT_ARCHS,
    *,
    sources: Mapping[str, Sequence[str]] | None = None,
    directory: Path | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Compile every name expression of ``sources`` for each arch and print the resource table.

    ``sources`` (file name -> name expressions) defaults to ``SOURCES``, and files are found with
    ``loader.source_path`` unless ``directory`` is given; both exist for the tests. Returns
    the exit status described in the module docstring.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    sources = SOURCES if sources is None else sources
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print(
            "xpsoftmax kernels: error: nvcc not found on PATH (install the CUDA toolkit)", file=err
        )
        return 2
    supported = _supported_archs(nvcc)
    for arch in archs:
        m = _ARCH.fullmatch(arch)
        if m is None or (supported is not None and f"sm_{m[1]}" not in supported):
            known = ",".join(sorted(supported or (), key=lambda a: int(a[3:])))
            msg = f"xpsoftmax kernels: error: --arch {arch!r} is not an architecture this nvcc "
            print(msg + f"compiles for ({known})", file=err)
            return 2

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xpsoftmax-kcheck-") as tmp:
        jobs = []
        for i, (filename, names) in enumerate(sources.items()):
            try:
                if directory is None:
                    path = _kernels.source_path(filename)
                elif not (path := directory / filename).is_file():
                    raise FileNotFoundError(f"kernel source {path} not found")
            except FileNotFoundError as e:
                print(f"xpsoftmax kernels: error: {e}", file=err)
                return 1
            tu = Path(tmp) / f"tu{i}_{Path(filename).stem}.cu"
            tu.write_text(_translation_unit(path.resolve(), filename, names), encoding="utf-8")
            jobs.extend((tu, filename, arch) for arch in archs)
        with ThreadPoolExecutor(max_workers=_JOBS) as pool:
            results = list(pool.map(lambda job: _compile(nvcc, *job), jobs))
    elapsed = time.perf_counter() - start
    return _report(results, sources, list(archs), out, err, elapsed)


def _report(
    results: list[_Result],
    sources: Mapping[str, Sequence[str]],
    archs: list[str],
    out: TextIO,
    err: TextIO,
    elapsed: float,
) -> int:
    failed = [r for r in results if r.returncode != 0]
    for r in failed:
        print(f"xpsoftmax kernels: {r.filename} failed to compile for {r.arch}:", file=err)
        print(_readable(r), file=err)
    for r in results:
        if r.returncode == 0 and _diagnostics(r.stderr):
            print(f"xpsoftmax kernels: nvcc said for {r.filename} ({r.arch}):", file=err)
            print(_readable(r), file=err)

    demangled = _demangle(sorted({u.mangled for r in results for u in r.usages}))
    files = {filename: i for i, filename in enumerate(sources)}
    rows: list[tuple[int, int, str, int, str, Usage]] = []
    spills: list[str] = []
    unmatched: dict[tuple[str, str], None] = {}
    for r in results:
        order = {_normal(name): (i, name) for i, name in enumerate(sources[r.filename])}
        found = set()
        for u in r.usages:
            text = _template_text(demangled[u.mangled])
            if u.spill_stores or u.spill_loads:
                spills.append(
                    f"{text} in {r.filename} spills on {r.arch}: "
                    f"{u.spill_stores} bytes stored, {u.spill_loads} bytes loaded"
                )
            if u.entry:
                index, label = order.get(_normal(text), (len(order), text))
                found.add(label)
                arch = archs.index(u.arch) if u.arch in archs else len(archs)
                rows.append((files[r.filename], index, label, arch, r.filename, u))
        if r.returncode == 0:
            unmatched.update({(r.filename, n): None for n in sources[r.filename] if n not in found})
    rows.sort(key=lambda row: row[:4])
    for filename, name in unmatched:
        print(
            f"xpsoftmax kernels: note: no row is labelled {name} ({filename}); its kernel is "
            "listed under the name the demangler gives",
            file=err,
        )

    head = ("file", "kernel", "arch", "regs", "spill st", "spill ld", "stack", "smem")
    table = [head] + [
        (f, label, u.arch, u.registers, u.spill_stores, u.spill_loads, u.stack, u.smem)
        for _, _, label, _, f, u in rows
    ]
    widths = [max(len(str(row[c])) for row in table) for c in range(len(head))]
    for row in table:
        cells = [
            str(v).ljust(w) if c < 3 else str(v).rjust(w)
            for c, (v, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip(), file=out)

    for line in spills:
        print(f"xpsoftmax kernels: spill: {line}", file=err)
    kernels = len({(row[0], row[2]) for row in rows})
    status = "FAILED" if failed or spills else "ok"
    print(
        f"{status}: {kernels} kernels x {len(archs)} archs ({','.join(archs)}), "
        f"{len(failed)} compile errors, {len(spills)} spilling functions ({elapsed:.1f} s)",
        file=out,
    )
    return 1 if failed or spills else 0


class _UsageError(Exception):
    """A bad command line: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        msg = f"{message} (see '{self.prog} --help')"
        raise _UsageError(msg)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="xpsoftmax kernels",
        description="Compile-check the CUDA kernels with nvcc (no GPU needed).",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="compile every kernel instantiation for each architecture and print registers, "
        "spills, stack frame and static shared memory; exit 1 on a compile error or a spill",
    )
    parser.add_argument(
        "--arch",
        default=",".join(DEFAULT_ARCHS),
        help="comma-separated GPU architectures (default: %(default)s)",
    )
    return parser


def main(argv: list[str]) -> int:
    """Run ``xpsoftmax kernels`` with the arguments that follow ``kernels``; return the status.

    Examples
    --------
    >>> from xpsoftmax.tools import kcheck
    >>> kcheck.main(["--check", "--arch", "sm_80,sm_90"])  # doctest: +SKIP
    0
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if not args.check:
            parser.error("nothing to do; pass --check")
        archs = list(dict.fromkeys(a.strip() for a in args.arch.split(",") if a.strip()))
        if not archs:
            parser.error(f"--arch needs at least one architecture, got {args.arch!r}")
    except _UsageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    return check(archs)
