"""``python -m xpsoftmax kernels --check``: compile every kernel instantiation with ``nvcc``.

For each source in ``SOURCES`` (``backends/cuda/specs.py``) and each architecture, a small
translation unit ``#include``s the source and takes the address of every name expression, which
makes the compiler instantiate exactly the template kernels that NVRTC compiles at run time. ``nvcc
--resource-usage`` then reports registers, spills, stack frame and static shared memory per
kernel; one row is printed per kernel instantiation and architecture. No GPU is needed, only the
CUDA toolkit's ``nvcc``.

The table's header comes at once and its rows as their compiles finish (the name expressions are
compiled in units of ``_CHUNK``, on up to ``_MAX_JOBS`` CPUs); a progress bar goes to stderr when
it is a terminal (``--progress`` / ``--no-progress`` to choose).

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
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TextIO

from tqdm import tqdm

from .. import _config
from ..backends.cuda import loader as _kernels
from ..backends.cuda.specs import SOURCES

DEFAULT_ARCHS = ("sm_80", "sm_90")
# Mirrors what CuPy passes to NVRTC (``-ftz=true`` is CuPy's), so register counts match run time.
NVCC_OPTIONS = ("-std=c++17", "-ftz=true", "--resource-usage")
# Name expressions per translation unit: softmax.cu's 130 in one unit took 22 s for one arch
# (2-core VM, 2026-12-03), 16 took 1.9 s and 1 took 0.3 s, so units of 24 cost little and let
# the rows and the progress bar advance every few seconds.
_CHUNK = 24
_MAX_JOBS = 8  # concurrent nvcc processes, at most the usable CPUs

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


def _translation_unit(path: Path, filename: str, names: Sequence[str], first: int = 1) -> str:
    """Source that includes ``path`` and instantiates every name expression in ``names``.

    ``names`` start at the ``first``-th name expression of ``filename``: nvcc reports an error in
    the k-th name expression of the file at line k of :func:`_label`.
    """
    include = str(path).replace("\\", "\\\\").replace('"', '\\"')
    keep = ",\n".join(f"  (void*)&{name}" for name in names)
    return (
        f'#include "{include}"\n'
        "// Taking each kernel's address instantiates it, as NVRTC's name expressions do.\n"
        "[[maybe_unused]] static void* const xps_kcheck_keep[] = {\n"
        f'#line {first} "{_label(filename)}"\n'
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
    progress: bool | None = None,
) -> int:
    """Compile every name expression of ``sources`` for each arch and print the resource table.

    ``sources`` (file name -> name expressions) defaults to ``SOURCES``, and files are found with
    ``loader.source_path`` unless ``directory`` is given; both exist for the tests. The table's
    header is printed before the first compile and its rows as their translation units finish, in
    the table's order; ``progress`` (default: when ``err`` is a terminal) shows a progress bar on
    ``err``. Returns the exit status described in the module docstring.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    progress = _isatty(err) if progress is None else progress
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
        groups: list[list[_Job]] = []
        for i, (filename, names) in enumerate(sources.items()):
            try:
                if directory is None:
                    path = _kernels.source_path(filename)
                elif not (path := directory / filename).is_file():
                    raise FileNotFoundError(f"kernel source {path} not found")
            except FileNotFoundError as e:
                print(f"xpsoftmax kernels: error: {e}", file=err)
                return 1
            for first in range(0, len(names) or 1, _CHUNK):
                chunk = names[first : first + _CHUNK]
                tu = Path(tmp) / f"tu{i}_{Path(filename).stem}_{first}.cu"
                text = _translation_unit(path.resolve(), filename, chunk, first + 1)
                tu.write_text(text, encoding="utf-8")
                groups.append([_Job(tu, filename, arch, len(chunk)) for arch in archs])
        table = _Table(sources, list(archs), out)
        results = _compile_all(nvcc, groups, table, err, progress)
    elapsed = time.perf_counter() - start
    return _report(results, table, list(archs), out, err, elapsed)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _workers() -> int:
    """Concurrent nvcc processes: the usable CPUs, at most ``_MAX_JOBS``."""
    return max(1, min(_MAX_JOBS, _config.available_cpus()))


@dataclass(frozen=True)
class _Job:
    """One nvcc run: a translation unit of ``count`` name expressions of ``filename``, one arch."""

    tu: Path
    filename: str
    arch: str
    count: int


def _compile_all(
    nvcc: str, groups: list[list[_Job]], table: _Table, err: TextIO, progress: bool
) -> list[_Result]:
    """Run every job; print each group's rows (all archs of one chunk) once all before it are in.

    The progress bar counts kernel instantiations compiled (one per name expression and arch) and
    refreshes every second, so its clock runs during a long compile.
    """
    total = sum(job.count for group in groups for job in group)
    bar = tqdm(total=total, desc="nvcc", unit="kernel", file=err, disable=not progress, leave=False)
    results: list[_Result] = []
    with bar, ThreadPoolExecutor(max_workers=_workers()) as pool:
        futures = [[(pool.submit(_compile, nvcc, *_args(job)), job) for job in g] for g in groups]
        count = {f: job.count for group in futures for f, job in group}
        pending = set(count)
        printed = 0
        while pending:
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for f in done:
                bar.update(count[f])
            if not done:
                bar.refresh()  # the elapsed time
            while printed < len(futures) and all(f.done() for f, _ in futures[printed]):
                group = [f.result() for f, _ in futures[printed]]
                with tqdm.external_write_mode(file=table.out):
                    table.add(group)
                results.extend(group)
                printed += 1
    return results


def _args(job: _Job) -> tuple[Path, str, str]:
    return job.tu, job.filename, job.arch


class _Table:
    """The resource table, printed a group of rows at a time in columns fixed up front.

    The kernel column is as wide as the longest name expression; a row labelled with a longer
    demangled name (see the note in :func:`_report`) shifts its line's later columns.
    """

    HEAD = ("file", "kernel", "arch", "regs", "spill st", "spill ld", "stack", "smem")
    # Numeric columns: at least as wide as the header, and smem as wide as 48 KiB (49152).
    _MIN = (0, 0, 0, 4, 8, 8, 5, 5)

    def __init__(self, sources: Mapping[str, Sequence[str]], archs: list[str], out: TextIO):
        self.sources, self.archs, self.out = sources, archs, out
        labels = [name for names in sources.values() for name in names]
        first = (list(sources), labels, archs)
        self.widths = [
            max([len(self.HEAD[c]), self._MIN[c], *(len(v) for v in (first[c] if c < 3 else ()))])
            for c in range(len(self.HEAD))
        ]
        self.rows: list[tuple[str, str, Usage]] = []  # (file, label, usage), in print order
        self.spills: list[str] = []
        self.unmatched: dict[tuple[str, str], None] = {}
        self._found: dict[str, set[str]] = {}
        self._compiled: set[str] = set()
        self._line(self.HEAD)

    def _line(self, row: Sequence[object]) -> None:
        cells = [
            str(v).ljust(w) if c < 3 else str(v).rjust(w)
            for c, (v, w) in enumerate(zip(row, self.widths, strict=True))
        ]
        print("  ".join(cells).rstrip(), file=self.out, flush=True)

    def add(self, results: list[_Result]) -> None:
        """Print the rows of ``results`` (one chunk of one file, every arch), kernel by kernel."""
        demangled = _demangle(sorted({u.mangled for r in results for u in r.usages}))
        order = {_normal(n): (i, n) for i, n in enumerate(self.sources[results[0].filename])}
        rows: list[tuple[int, str, int, str, Usage]] = []
        for r in results:
            found = self._found.setdefault(r.filename, set())
            if r.returncode == 0:
                self._compiled.add(r.filename)
            for u in r.usages:
                text = _template_text(demangled[u.mangled])
                if u.spill_stores or u.spill_loads:
                    self.spills.append(
                        f"{text} in {r.filename} spills on {r.arch}: "
                        f"{u.spill_stores} bytes stored, {u.spill_loads} bytes loaded"
                    )
                if u.entry:
                    index, label = order.get(_normal(text), (len(order), text))
                    found.add(label)
                    arch = self.archs.index(u.arch) if u.arch in self.archs else len(self.archs)
                    rows.append((index, label, arch, r.filename, u))
        rows.sort(key=lambda row: row[:3])
        for _, label, _, filename, u in rows:
            self.rows.append((filename, label, u))
            values = (u.registers, u.spill_stores, u.spill_loads, u.stack, u.smem)
            self._line((filename, label, u.arch, *values))

    def finish(self) -> None:
        """The name expressions of compiled files that no row is labelled with."""
        for filename in self.sources:
            if filename in self._compiled:
                found = self._found.get(filename, set())
                names = self.sources[filename]
                self.unmatched.update({(filename, n): None for n in names if n not in found})


def _report(
    results: list[_Result],
    table: _Table,
    archs: list[str],
    out: TextIO,
    err: TextIO,
    elapsed: float,
) -> int:
    """nvcc's errors and warnings (each once per file and arch), the notes and the summary line."""
    failed: dict[tuple[str, str], dict[str, None]] = {}
    said: dict[tuple[str, str], dict[str, None]] = {}
    for r in results:
        if r.returncode != 0:
            failed.setdefault((r.filename, r.arch), {})[_readable(r)] = None
        elif _diagnostics(r.stderr):
            said.setdefault((r.filename, r.arch), {})[_readable(r)] = None
    for (filename, arch), texts in failed.items():
        print(f"xpsoftmax kernels: {filename} failed to compile for {arch}:", file=err)
        print("\n\n".join(texts), file=err)
    for (filename, arch), texts in said.items():
        print(f"xpsoftmax kernels: nvcc said for {filename} ({arch}):", file=err)
        print("\n\n".join(texts), file=err)

    table.finish()
    for filename, name in table.unmatched:
        print(
            f"xpsoftmax kernels: note: no row is labelled {name} ({filename}); its kernel is "
            "listed under the name the demangler gives",
            file=err,
        )
    for line in table.spills:
        print(f"xpsoftmax kernels: spill: {line}", file=err)
    kernels = len({(filename, label) for filename, label, _ in table.rows})
    status = "FAILED" if failed or table.spills else "ok"
    print(
        f"{status}: {kernels} kernels x {len(archs)} archs ({','.join(archs)}), "
        f"{len(failed)} compile errors, {len(table.spills)} spilling functions ({elapsed:.1f} s)",
        file=out,
    )
    return 1 if failed or table.spills else 0


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
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar on stderr (default: when stderr is a terminal)",
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
    return check(archs, progress=args.progress)
