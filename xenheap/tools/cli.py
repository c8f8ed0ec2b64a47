"""The ``xenheap`` command: ``demo`` (destroy a domain with and without background
scrubbing), ``bench`` (the comparisons), ``info`` (the machine).

The command line only parses, checks, prints and plots; every figure comes from
:mod:`xenheap.tools.demo`, :mod:`~xenheap.tools.bench`, :mod:`~xenheap.tools.busy` and
:mod:`~xenheap.tools.machine`, and every table from :mod:`xenheap.tools.report`. Results go
to stdout, and nothing else does: progress and errors go to stderr, so ``xenheap demo --json
> f`` leaves ``f`` pure JSON. Progress is shown when stderr is a terminal, or when
``--progress`` asks for it.

Exit statuses: 0 done; 1 an error the library (XenHeapError) or the OS reported, a plot
that could not be saved after the bench (its figures are printed all the same), or stdout
closed from the start (``xenheap info >&-``); 2 a usage error (bad arguments, or no command
at all: then the help goes to stderr); 130 interrupted; 141 stdout was closed early
(``xenheap demo | head -1``), ended quietly, as a program killed by SIGPIPE would. Every
error is one line on stderr, never a traceback; only a bug does that. With stderr closed or
gone (``2>&-``, ``2>&1 | true``) the error is not said, only its exit status.

The experiments' modules are imported by the commands, inside :func:`main`'s handling of
Ctrl-C, so that an interrupt while they load ends like any other (the ``xenheap`` package
itself, numba above all, loads before this module and so before any handler).
"""

from __future__ import annotations

import argparse
import io
import os
import reprlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import xenheap
from native_kernels.layout import MAX_NODES
from xenheap.errors import InvalidArgument, XenHeapError
from xenheap.sizes import format_size, parse_size

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from xenheap.tools.progress import ScrubProgress

PROG = "xenheap"
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 128 + 13  # as if killed by SIGPIPE, which Python ignores
# Per node, the smallest heap the experiments make sense on (room for their 2 MiB blocks).
MIN_SIZE_PER_NODE = 4 << 20  # 4 MiB
# No machine has this much memory (a 64-bit address space): a larger size is a slip of the
# keyboard, refused before its digits swamp the messages that quote it in bytes.
MAX_SIZE = 1 << 64
PLOT_EXTRA_HINT = "pip install -e '.[plot]'"
MAX_HOGS = 256  # demo --busy: more CPU-bound processes than that is a mistake, not a test


class UsageError(Exception):
    """Bad input on the command line: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is an exception (printed as one line by main), not usage text."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# --- argument types -------------------------------------------------------------------------
def _parse_size(text: str) -> int:
    """:func:`parse_size`, refusing sizes of :data:`MAX_SIZE` bytes or more."""
    nbytes = parse_size(text)
    if nbytes >= MAX_SIZE:
        raise InvalidArgument(f"{reprlib.repr(text)} is 2**64 bytes or more, more than any "
                              "machine has")
    return nbytes


def _size(text: str) -> int:
    try:
        return _parse_size(text)
    except XenHeapError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _node_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"a heap needs at least 1 node, got {count}")
    if count > MAX_NODES:
        raise argparse.ArgumentTypeError(f"a heap has at most {MAX_NODES} nodes, got {count}")
    return count


def _bytes(nbytes: int) -> str:
    """An exact byte count, with its rounded size beside it: ``"4194303 bytes (4.0 MiB)"``.

    Errors about sizes quote bytes: a rounded figure alone may read like the limit it broke.
    """
    return f"{nbytes} bytes" if nbytes < 1024 else f"{nbytes} bytes ({format_size(nbytes)})"


def _check_size(size: int, nodes: int, option: str) -> None:
    """Refuse sizes too small for the experiment or larger than the machine can spare."""
    from xenheap.tools import machine

    smallest = MIN_SIZE_PER_NODE * nodes
    if size < smallest:
        per_node = f", {_bytes(MIN_SIZE_PER_NODE)} per node" if nodes > 1 else ""
        raise UsageError(f"{option} {_bytes(size)}: the experiment needs at least "
                         f"{_bytes(smallest)}{per_node}")
    available = machine.available_memory()
    limit = machine.size_limit(available)
    if size > limit:
        raise UsageError(f"{option} {_bytes(size)}: larger than this machine can spare: "
                         f"at most {_bytes(limit)}, 3/4 of the {_bytes(available)} of "
                         "memory available")


def _check_plot_path(path: str) -> None:
    """Fail before any measuring if the plot could not be written there."""
    if os.path.isdir(path):
        raise UsageError(f"--plot {path}: is a directory")
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise UsageError(f"--plot {path}: cannot write there ({exc.strerror})") from None
    if not existed:
        os.remove(path)


def _check_plot_format(path: str, plt: Any) -> str:
    """The format the plot is written in: the file name's extension (none means PNG), which
    matplotlib must know and be able to write here, as a small figure with text shows."""
    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    fig = plt.figure(figsize=(1, 1))
    try:
        formats = fig.canvas.get_supported_filetypes()
        if suffix and suffix not in formats:
            raise UsageError(f"--plot {path}: matplotlib cannot write .{suffix} files "
                             f"(use one of: {', '.join(sorted(formats))})")
        plot_format = suffix or "png"
        # Text: some formats need more than matplotlib to lay it out (.pgf runs xelatex).
        fig.text(0.5, 0.5, PROG)
        try:
            fig.savefig(io.BytesIO(), format=plot_format)
        except Exception as exc:  # whatever the backend raises: found before the bench runs
            raise UsageError(f"--plot {path}: matplotlib cannot write .{plot_format} files "
                             f"here: {type(exc).__name__}: {exc}") from None
    finally:
        plt.close(fig)
    return plot_format


def _pyplot() -> Any:
    """matplotlib's pyplot on a file-only backend; a usage error naming the extra if absent."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError(f"--plot needs matplotlib: {PLOT_EXTRA_HINT}") from None
    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


# --- the commands ---------------------------------------------------------------------------
def _emit(result: DataclassInstance, text: str, json: bool, **extra: Any) -> None:
    from xenheap.tools.report import as_json

    print(as_json(result, **extra) if json else text)


def _hog_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= count <= MAX_HOGS:
        raise argparse.ArgumentTypeError(f"needs 1 to {MAX_HOGS} busy processes, got {count}")
    return count


def cmd_demo(args: argparse.Namespace, progress: ScrubProgress) -> int:
    """Destroy a domain in "sync" and "idle" mode; print the table (or JSON).

    With ``--busy N``: the busy-machine experiment instead (:mod:`xenheap.tools.busy`).
    """
    from xenheap.tools import busy, demo
    from xenheap.tools.report import format_busy, format_demo

    if args.busy is not None:
        size = args.size if args.size is not None else busy.DEFAULT_SIZE
        _check_size(size, args.nodes or 1, "--size")
        busy_result = busy.run(size, args.busy, args.nodes, progress=progress)
        _emit(busy_result, format_busy(busy_result), args.json)
        return 0
    size = args.size if args.size is not None else demo.default_size()
    _check_size(size, args.nodes or 1, "--size")
    result = demo.run(size, args.nodes, progress)
    _emit(result, format_demo(result), args.json)
    return 0


def _size_list(values: Sequence[str]) -> list[int]:
    sizes = []
    for value in values:
        for part in value.split(","):
            if part.strip():
                try:
                    sizes.append(_parse_size(part))
                except XenHeapError as exc:
                    raise UsageError(f"argument --sizes: {exc}") from None
    if not sizes:
        raise UsageError("argument --sizes: no size given")
    return sorted(set(sizes))


def cmd_bench(args: argparse.Namespace, progress: ScrubProgress) -> int:
    """Run the comparisons; print tables (or JSON) and optionally draw the plot."""
    from xenheap.tools import bench
    from xenheap.tools.plot import plot_bench
    from xenheap.tools.report import format_bench

    plt = None
    plot_format = ""
    if args.plot is not None:
        _check_plot_path(args.plot)
        plt = _pyplot()
        plot_format = _check_plot_format(args.plot, plt)
    sizes = _size_list(args.sizes) if args.sizes else bench.default_sizes(args.quick)
    for size in sizes:
        _check_size(size, 1, "--sizes")
    result = bench.run(sizes, quick=args.quick, progress=progress)
    text = format_bench(result)
    if plt is None:
        _emit(result, text, args.json)
        return 0
    try:
        # In the format checked before the bench, to exactly this path (matplotlib would add
        # ".png" to a name without an extension).
        plot_bench(result, args.plot, plt, plot_format)
    except Exception as exc:  # whatever the backend raises: the figures are printed anyway
        _emit(result, text, args.json)
        return _fail(f"--plot {args.plot}: {type(exc).__name__}: {exc}", EXIT_FAILURE)
    text += f"\n\nplot written to {args.plot}"
    _emit(result, text, args.json, plot=os.path.abspath(args.plot))
    return 0


def cmd_info(args: argparse.Namespace, progress: ScrubProgress) -> int:
    """Print the machine's nodes, what the OS offers, versions and memset bandwidth."""
    from xenheap.tools import machine
    from xenheap.tools.report import format_info

    result = machine.info()
    _emit(result, format_info(result), args.json)
    return 0


# --- entry point ----------------------------------------------------------------------------
def _add_progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show scrub progress on stderr (default: only when stderr is a "
                        "terminal)")


def build_parser() -> argparse.ArgumentParser:
    """The ``xenheap`` argument parser with its three subcommands."""
    parser = _Parser(prog=PROG, description="xenheap: a page allocator that scrubs freed "
                     "memory from idle threads. Its experiment, benchmarks and a look at "
                     "the machine.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {xenheap.__version__}")
    # Not required: with no command, main() prints the help (the list of commands) itself.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo_cmd = sub.add_parser("demo", help="destroy a domain in sync and idle scrub modes and "
                              "compare")
    demo_cmd.add_argument("--size", type=_size, default=None,
                          help="domain size, e.g. 2GiB: at least "
                          f"{_bytes(MIN_SIZE_PER_NODE)} per node, at most 3/4 of available "
                          "memory (default: about 2 GiB, at most a quarter of it)")
    demo_cmd.add_argument("--nodes", type=_node_count, default=None,
                          help=f"emulate this many NUMA nodes, 1 to {MAX_NODES} (default: the "
                          "machine's)")
    demo_cmd.add_argument("--busy", type=_hog_count, default=None, metavar="N",
                          help="instead: the busy-machine experiment, idle-scrub heap (default "
                          "--size 1GiB) on an idle machine and beside N CPU-bound processes")
    demo_cmd.add_argument("--json", action="store_true", help="print the figures as JSON")
    _add_progress_option(demo_cmd)
    demo_cmd.set_defaults(func=cmd_demo)

    bench_cmd = sub.add_parser("bench", help="destroy latency vs size, zeroed buffers vs "
                               "bytearray/numpy/mmap, scrub and allocation throughput")
    bench_cmd.add_argument("--sizes", nargs="+", metavar="SIZE",
                           help="domain sizes for the destroy sweep, e.g. 64MiB 1GiB "
                           "(default: 64 MiB, x4, up to 4 GiB or a quarter of memory; "
                           "16 and 64 MiB with --quick)")
    bench_cmd.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench_cmd.add_argument("--plot", metavar="FILE.png",
                           help=f"draw the destroy sweep and the buffer comparison "
                           f"(needs matplotlib: {PLOT_EXTRA_HINT})")
    bench_cmd.add_argument("--quick", action="store_true", help="a small, fast run")
    _add_progress_option(bench_cmd)
    bench_cmd.set_defaults(func=cmd_bench)

    info_cmd = sub.add_parser("info", help="nodes, CPUs, distances, OS features, memset speed")
    info_cmd.add_argument("--json", action="store_true", help="print the figures as JSON")
    info_cmd.set_defaults(func=cmd_info)
    return parser


def _fail(message: str, status: int) -> int:
    stream = sys.stderr
    if stream is None:  # closed from the start (2>&-): the status says it all
        return status
    try:
        # One line, whatever the message carried (an OSError's text may hold newlines).
        print(f"{PROG}: error: {' '.join(str(message).split())}", file=stream, flush=True)
    except OSError:  # "2>&1 | true": the reader went away; end quietly, with the status
        _silence(stream)
    return status


def _silence(stream: TextIO) -> None:
    """Point ``stream`` (stdout or stderr) at /dev/null: what is still buffered for a closed
    pipe then goes nowhere at exit, instead of failing again in the interpreter's final
    flush."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's StringIO)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    if sys.stdout is None:  # started with it closed (">&-"): no command has anywhere to print
        return _fail("stdout is closed: nowhere to print", EXIT_FAILURE)
    try:
        from xenheap.tools.progress import ScrubProgress

        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help and --version: printed, and done
            sys.stdout.flush()
            return int(exc.code or 0)
        if args.command is None:  # bare "xenheap": say what there is to run
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        # Progress on stderr: when it is a terminal, or as --progress/--no-progress say.
        progress = ScrubProgress(sys.stderr, enabled=getattr(args, "progress", None))
        try:
            status = args.func(args, progress)
        finally:
            progress.end()  # erased first: an error must not land on the tail of its line
        sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
        return status
    except BrokenPipeError:  # "xenheap demo | head -1": the reader has all it wanted
        _silence(sys.stdout)
        return EXIT_BROKEN_PIPE
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except XenHeapError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    except (OSError, MemoryError) as exc:
        return _fail(f"{type(exc).__name__}: {exc}", EXIT_FAILURE)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
