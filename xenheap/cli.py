"""The ``xenheap`` command: ``demo`` (destroy a domain with and without background
scrubbing), ``bench`` (the comparisons), ``info`` (the machine).

The command line only parses, checks, prints and plots; every figure comes from
:mod:`xenheap.measure`. Results go to stdout, and nothing else does: progress and errors go
to stderr, so ``xenheap demo --json > f`` leaves ``f`` pure JSON. Progress is shown when
stderr is a terminal, or when ``--progress`` asks for it.

Exit statuses: 0 done; 1 an error the library (XenHeapError) or the OS reported; 2 a usage
error (bad arguments, or no command at all: then the help goes to stderr); 130 interrupted;
141 stdout was closed early (``xenheap demo | head -1``), ended quietly, as a program killed
by SIGPIPE would. Every error is one line on stderr, never a traceback; only a bug does that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import numba
import numpy as np

import xenheap
from native_kernels.layout import MAX_NODES
from xenheap import busy, measure, prim
from xenheap.errors import XenHeapError
from xenheap.progress import ScrubProgress, format_rate, format_seconds
from xenheap.sizes import format_size, parse_size
from xenheap.topology import read_topology

PROG = "xenheap"
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 128 + 13  # as if killed by SIGPIPE, which Python ignores
# Per node, the smallest heap the experiments make sense on (room for their 2 MiB blocks).
MIN_SIZE_PER_NODE = 4 * measure.MiB
INFO_MEMSET_BYTES = 256 * measure.MiB
PLOT_EXTRA_HINT = "pip install -e '.[plot]'"
MAX_HOGS = 256  # demo --busy: more CPU-bound processes than that is a mistake, not a test


class UsageError(Exception):
    """Bad input on the command line: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is an exception (printed as one line by main), not usage text."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# --- argument types -------------------------------------------------------------------------
def _size(text: str) -> int:
    try:
        return parse_size(text)
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
    smallest = MIN_SIZE_PER_NODE * nodes
    if size < smallest:
        per_node = f", {_bytes(MIN_SIZE_PER_NODE)} per node" if nodes > 1 else ""
        raise UsageError(f"{option} {_bytes(size)}: the experiment needs at least "
                         f"{_bytes(smallest)}{per_node}")
    available = measure.available_memory()
    limit = measure.size_limit(available)
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


def _check_plot_format(path: str, plt) -> None:
    """The file name's extension must be one matplotlib can write (none means PNG)."""
    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if suffix and suffix not in formats:
        raise UsageError(f"--plot {path}: matplotlib cannot write .{suffix} files "
                         f"(use one of: {', '.join(sorted(formats))})")


def _pyplot():
    """matplotlib's pyplot on a file-only backend; a usage error naming the extra if absent."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError(f"--plot needs matplotlib: {PLOT_EXTRA_HINT}") from None
    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


# --- formatting -----------------------------------------------------------------------------
def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned: the first to the left, the figures to the right."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = []
    for row in (headers, *rows):
        cells = [str(row[0]).ljust(widths[0])]
        cells += [str(cell).rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}x" if value >= 100 else f"{value:.3g}x"


def _seconds(value: float | None) -> str:
    return "-" if value is None else format_seconds(value)


def _rate(value: float | None) -> str:
    return format_rate(value)


def _ops(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _latency(summary: dict | None) -> str:
    if not summary or not summary["n"]:
        return "-"
    return f"{summary['p50_us']:.2f} / {summary['p99_us']:.2f} us"


def _cpulist(cpus: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` as the kernel writes it: ``"0-2,5"``."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and runs[-1][1] == cpu - 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def _machine_line(machine: dict) -> str:
    return (f"{machine['cpu']}, {machine['cpus']} CPUs, "
            f"{format_size(machine['memory_bytes'])} memory")


def format_demo(result: dict) -> str:
    """The demo's one table, as printed."""
    sync, idle = result["modes"]["sync"], result["modes"]["idle"]
    both = (sync, idle)

    def row(label: str, fmt, key: str) -> list[str]:
        return [label, *(fmt(m[key]) for m in both)]

    def max_order(m: dict) -> str:
        got = m["max_order_alloc"]
        return (f"ok, {format_seconds(got['seconds'])}" if got["ok"] else "FAILED")

    def leak(m: dict) -> str:
        check = m["leak_check"]
        if not check["all_memory"]:
            return "did not get all memory"
        return "no byte leaked" if check["ok"] else f"{check['nonzero_bytes']} bytes LEAKED"

    order = sync["max_order_alloc"]
    rows = [
        row("destroy the domain", _seconds, "destroy_s"),
        ["  destroy time sync / idle", "", _ratio(result["destroy_ratio"])],
        row("all memory clean again, from destroy", _seconds, "clean_s"),
        row("zeroing rate, destroy to clean", _rate, "clean_bytes_per_s"),
        row("scrubber's own rate (time zeroing)", _rate, "scrubber_bytes_per_s"),
        row("libc memset, same memory, same run", _rate, "memset_bytes_per_s"),
        row("  the same in 2 MiB calls (per block)", _rate, "memset_blockwise_bytes_per_s"),
        row("numpy fill(0), same memory", _rate, "numpy_fill_bytes_per_s"),
        row("alloc latency p50 / p99, idle heap", _latency, "alloc_idle"),
        row("alloc latency p50 / p99, scrubber busy", _latency, "alloc_busy"),
        row("  allocations made while busy", lambda s: str(s["n"]) if s else "-", "alloc_busy"),
        row("  all clean again while allocating", _seconds, "busy_clean_s"),
        row("  aborts taken (scrubs stopped)", lambda v: "-" if v is None else str(v),
            "busy_aborts"),
        [f"order-{order['order']} alloc ({format_size(order['bytes'])}) right after "
         "destroy", *(max_order(m) for m in both)],
        [f"leak check: a new domain takes all {format_size(sync['heap_bytes'])}",
         *(leak(m) for m in both)],
    ]
    nodes = sync["nodes"]
    title = (f"xenheap demo: destroy a {format_size(sync['domain_bytes'])} domain "
             f"({sync['domain_blocks']} blocks) on {nodes} node{'s' if nodes > 1 else ''}; "
             f"{_machine_line(result['machine'])}")
    return title + "\n\n" + _table(["", 'scrub="sync"', 'scrub="idle"'], rows)


def format_bench(result: dict) -> str:
    """The bench's four tables, as printed."""
    out = [f"xenheap bench on {_machine_line(result['machine'])}"]

    repeats = len(result["destroy"][0]["idle_runs"])
    out.append("\nDestroy latency and time until all memory is clean, by domain size "
               f"(medians of {repeats})")
    out.append(_table(
        ["domain", "sync destroy", "idle destroy", "sync / idle", "idle: clean after"],
        [[format_size(r["size_bytes"]), _seconds(r["sync_destroy_s"]),
          _seconds(r["idle_destroy_s"]), _ratio(r["destroy_ratio"]), _seconds(r["idle_clean_s"])]
         for r in result["destroy"]]))

    out.append("\nZeroed buffer obtained, written once, released: median time per buffer "
               "(peer / xenheap: above 1x, xenheap is faster)")
    peers = list(result["buffers"][0]["us"])
    rows = []
    for r in result["buffers"]:
        cells = [format_size(r["size_bytes"])]
        for name in peers:
            cell = format_seconds(r["us"][name] / 1e6)
            if name != "xenheap":
                cell += f" ({_ratio(r['vs_xenheap'][name])})"
            cells.append(cell)
        rows.append(cells)
    out.append(_table(["buffer", *peers], rows))

    out.append("\nScrub throughput against zeroing by hand, on the same memory")
    out.append(_table(
        ["nodes", "size", "scrubbers", "destroy to clean", "scrubber own", "memset x1",
         "memset xN", "numpy fill(0)"],
        [[f"{r['nodes']}{' emulated' if r['emulated'] else ''}", format_size(r["size_bytes"]),
          str(r["scrubbers"]), _rate(r["clean_bytes_per_s"]), _rate(r["scrubber_bytes_per_s"]),
          _rate(r["memset_bytes_per_s"]),
          f"{_rate(r['memset_all_bytes_per_s'])} (x{r['memset_threads']})",
          _rate(r["numpy_fill_bytes_per_s"])] for r in result["scrub"]]))

    out.append("\nAllocation throughput: alloc + free of 4 KiB in a loop, threads sharing "
               "one domain")
    base = result["alloc_threads"][0]["ops_per_s"]
    out.append(_table(
        ["threads", "ops/s", "vs 1 thread"],
        [[str(r["threads"]), _ops(r["ops_per_s"]),
          _ratio(r["ops_per_s"] / base if base and r["ops_per_s"] else None)]
         for r in result["alloc_threads"]]))
    return "\n".join(out)


def plot_bench(result: dict, path: str, plt) -> None:
    """Destroy latency against size (log-log, both modes) and the buffer comparison."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    sizes = [r["size_bytes"] / measure.MiB for r in result["destroy"]]
    left.loglog(sizes, [r["sync_destroy_s"] for r in result["destroy"]], "o-",
                label='destroy, scrub="sync"')
    left.loglog(sizes, [r["idle_destroy_s"] for r in result["destroy"]], "s-",
                label='destroy, scrub="idle"')
    left.loglog(sizes, [r["idle_clean_s"] for r in result["destroy"]], "s--",
                label='all clean again, scrub="idle"')
    left.set_xticks(sizes, [format_size(r["size_bytes"]) for r in result["destroy"]])
    left.set_xticks([], minor=True)  # log axes add unlabelled minor ticks: the sizes suffice
    left.set_xlabel("domain size")
    left.set_ylabel("seconds")
    left.set_title("Destroying a domain")
    left.grid(True, which="both", alpha=0.3)
    left.legend()

    buffers = result["buffers"]
    peers = list(buffers[0]["us"])
    width = 0.8 / len(peers)
    for i, name in enumerate(peers):
        xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(buffers))]
        right.bar(xs, [r["us"][name] for r in buffers], width, label=name)
    right.set_xticks(range(len(buffers)))
    right.set_xticklabels([format_size(r["size_bytes"]) for r in buffers])
    right.set_yscale("log")
    right.set_ylabel("microseconds per buffer (median)")
    right.set_title("Zeroed buffer: obtain, write once, release")
    right.grid(True, axis="y", which="both", alpha=0.3)
    right.legend()
    fig.suptitle(f"xenheap on {_machine_line(result['machine'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the commands ---------------------------------------------------------------------------
def _emit(result: dict, text: str, as_json: bool) -> None:
    print(json.dumps(result, indent=2) if as_json else text)


def _progress(args: argparse.Namespace) -> ScrubProgress:
    """Progress on stderr: when it is a terminal, or as ``--progress/--no-progress`` say."""
    return ScrubProgress(sys.stderr, enabled=args.progress)


def _hog_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= count <= MAX_HOGS:
        raise argparse.ArgumentTypeError(f"needs 1 to {MAX_HOGS} busy processes, got {count}")
    return count


def cmd_demo(args: argparse.Namespace) -> int:
    """Destroy a domain in "sync" and "idle" mode; print the table (or JSON).

    With ``--busy N``: the busy-machine experiment instead (:mod:`xenheap.busy`).
    """
    if args.busy is not None:
        size = args.size if args.size is not None else busy.DEFAULT_SIZE
        _check_size(size, args.nodes or 1, "--size")
        result = busy.run(size, args.busy, args.nodes, progress=_progress(args))
        _emit(result, busy.format_result(result), args.json)
        return 0
    size = args.size if args.size is not None else measure.default_demo_size()
    _check_size(size, args.nodes or 1, "--size")
    result = measure.demo(size, args.nodes, _progress(args))
    _emit(result, format_demo(result), args.json)
    return 0


def _size_list(values: Sequence[str]) -> list[int]:
    sizes = []
    for value in values:
        for part in value.split(","):
            if part.strip():
                try:
                    sizes.append(parse_size(part))
                except XenHeapError as exc:
                    raise UsageError(f"argument --sizes: {exc}") from None
    if not sizes:
        raise UsageError("argument --sizes: no size given")
    return sorted(set(sizes))


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the comparisons; print tables (or JSON) and optionally draw the plot."""
    plt = None
    if args.plot is not None:
        _check_plot_path(args.plot)
        plt = _pyplot()
        _check_plot_format(args.plot, plt)
    sizes = _size_list(args.sizes) if args.sizes else measure.default_bench_sizes(args.quick)
    for size in sizes:
        _check_size(size, 1, "--sizes")
    result = measure.bench(sizes, quick=args.quick, progress=_progress(args))
    if plt is not None:
        plot_bench(result, args.plot, plt)
        result["plot"] = os.path.abspath(args.plot)
    text = format_bench(result)
    if plt is not None:
        text += f"\n\nplot written to {args.plot}"
    _emit(result, text, args.json)
    return 0


def info() -> dict:
    """What ``xenheap info`` reports, as a dict."""
    topology = read_topology()
    with measure.scratch_regions(INFO_MEMSET_BYTES) as regions:
        memset_rate = measure.memset_bandwidth(measure.coalesce(regions), repeats=3)
        memset_2mib_rate = measure.memset_bandwidth(regions, repeats=3)
    return {
        "version": xenheap.__version__,
        "numba": numba.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "machine": measure.machine_info(),
        "nodes": [{"node": n.id, "os_node": n.os_node, "cpus": list(n.cpus),
                   "distances": list(n.distances)} for n in topology.nodes],
        "capabilities": prim.capabilities(),
        "memset_bytes_per_s": memset_rate,
        "memset_2mib_calls_bytes_per_s": memset_2mib_rate,
        "memset_measured_bytes": INFO_MEMSET_BYTES,
    }


def format_info(result: dict) -> str:
    """``xenheap info`` as printed."""
    caps = result["capabilities"]
    machine = result["machine"]
    names = {"mbind": "mbind", "madv_hugepage": "MADV_HUGEPAGE", "sched_idle": "SCHED_IDLE"}
    lines = [
        f"xenheap {result['version']}: numba {result['numba']}, numpy {result['numpy']}, "
        f"Python {result['python']}",
        f"machine: {_machine_line(machine)} ({format_size(machine['available_bytes'])} "
        "available)",
        "",
        _table(["node", "OS node", "CPUs", "distances"],
               [[str(n["node"]), "-" if n["os_node"] is None else str(n["os_node"]),
                 _cpulist(n["cpus"]), " ".join(map(str, n["distances"]))]
                for n in result["nodes"]]),
        "",
        "available here: " + ", ".join(f"{label} {'yes' if caps.get(key) else 'no'}"
                                       for key, label in names.items()),
        f"libc memset on {format_size(result['memset_measured_bytes'])} of faulted-in memory: "
        f"{format_rate(result['memset_bytes_per_s'])} in one call, "
        f"{format_rate(result['memset_2mib_calls_bytes_per_s'])} in 2 MiB calls",
    ]
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    """Print the machine's nodes, what the OS offers, versions and memset bandwidth."""
    result = info()
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

    demo = sub.add_parser("demo", help="destroy a domain in sync and idle scrub modes and "
                          "compare")
    demo.add_argument("--size", type=_size, default=None,
                      help="domain size, e.g. 2GiB (default: about 2 GiB, at most a quarter "
                      "of available memory)")
    demo.add_argument("--nodes", type=_node_count, default=None,
                      help=f"emulate this many NUMA nodes, 1 to {MAX_NODES} (default: the "
                      "machine's)")
    demo.add_argument("--busy", type=_hog_count, default=None, metavar="N",
                      help="instead: the busy-machine experiment, idle-scrub heap (default "
                      "--size 1GiB) on an idle machine and beside N CPU-bound processes")
    demo.add_argument("--json", action="store_true", help="print the figures as JSON")
    _add_progress_option(demo)
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="destroy latency vs size, zeroed buffers vs "
                           "bytearray/numpy/mmap, scrub and allocation throughput")
    bench.add_argument("--sizes", nargs="+", metavar="SIZE",
                       help="domain sizes for the destroy sweep, e.g. 64MiB 1GiB "
                       "(default: 64 MiB, x4, up to 4 GiB or a quarter of memory)")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench.add_argument("--plot", metavar="FILE.png",
                       help=f"draw the destroy sweep and the buffer comparison "
                       f"(needs matplotlib: {PLOT_EXTRA_HINT})")
    bench.add_argument("--quick", action="store_true", help="a small, fast run")
    _add_progress_option(bench)
    bench.set_defaults(func=cmd_bench)

    info_cmd = sub.add_parser("info", help="nodes, CPUs, distances, OS features, memset speed")
    info_cmd.add_argument("--json", action="store_true", help="print the figures as JSON")
    info_cmd.set_defaults(func=cmd_info)
    return parser


def _fail(message: str, status: int) -> int:
    # One line, whatever the message carried (an OSError's text may hold newlines).
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return status


def _silence_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered for a closed pipe then goes
    nowhere at exit, instead of failing again in the interpreter's final flush."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's StringIO)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help and --version: printed, and done
            sys.stdout.flush()
            return int(exc.code or 0)
        if args.command is None:  # bare "xenheap": say what there is to run
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        status = args.func(args)
        sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
        return status
    except BrokenPipeError:  # "xenheap demo | head -1": the reader has all it wanted
        _silence_stdout()
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
