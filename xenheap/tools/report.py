"""Results as people read them: the tables ``xenheap demo``, ``bench`` and ``info`` print,
and the JSON they print with ``--json`` (``dataclasses.asdict`` of the result)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypeVar

from xenheap.sizes import format_size
from xenheap.tools.progress import format_rate, format_seconds

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from xenheap.tools.bench import BenchResult
    from xenheap.tools.busy import BusyResult, SideSummary
    from xenheap.tools.demo import DemoMode, DemoResult
    from xenheap.tools.machine import Info, MachineInfo
    from xenheap.tools.workload import LatencySummary

T = TypeVar("T")


def as_json(result: DataclassInstance, **extra: Any) -> str:
    """The result as the command's JSON document, with ``extra`` keys added at the end."""
    return json.dumps({**asdict(result), **extra}, indent=2)


# --- cells ----------------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
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


def _ops(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _latency(summary: LatencySummary | None) -> str:
    if not summary or not summary.n:
        return "-"
    return f"{summary.p50_us:.2f} / {summary.p99_us:.2f} us"


def _cpulist(cpus: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` as the kernel writes it: ``"0-2,5"``."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and runs[-1][1] == cpu - 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def machine_line(machine: MachineInfo) -> str:
    """``"AMD EPYC, 2 CPUs, 23.5 GiB memory"``."""
    return f"{machine.cpu}, {machine.cpus} CPUs, {format_size(machine.memory_bytes)} memory"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'s' if count > 1 else ''}"


# --- xenheap demo ---------------------------------------------------------------------------
def format_demo(result: DemoResult) -> str:
    """The demo's one table, as printed."""
    sync, idle = result.modes["sync"], result.modes["idle"]
    both = (sync, idle)

    def row(label: str, fmt: Callable[[T], str], figure: Callable[[DemoMode], T]) -> list[str]:
        return [label, *(fmt(figure(m)) for m in both)]

    def max_order(m: DemoMode) -> str:
        got = m.max_order_alloc
        return f"ok, {format_seconds(got.seconds)}" if got.ok else "FAILED"

    def leak(m: DemoMode) -> str:
        check = m.leak_check
        if not check.all_memory:
            return "did not get all memory"
        return "no byte leaked" if check.ok else f"{check.nonzero_bytes} bytes LEAKED"

    order = sync.max_order_alloc
    rows = [
        row("destroy the domain", _seconds, lambda m: m.destroy_s),
        ["  destroy time sync / idle", "", _ratio(result.destroy_ratio)],
        row("all memory clean again, from destroy", _seconds, lambda m: m.clean_s),
        row("zeroing rate, destroy to clean", format_rate, lambda m: m.clean_bytes_per_s),
        row("scrubber's own rate (time zeroing)", format_rate,
            lambda m: m.scrubber_bytes_per_s),
        row("libc memset, same memory, same run", format_rate, lambda m: m.memset_bytes_per_s),
        row("  the same in 2 MiB calls (per block)", format_rate,
            lambda m: m.memset_blockwise_bytes_per_s),
        row("numpy fill(0), same memory", format_rate, lambda m: m.numpy_fill_bytes_per_s),
        row("alloc latency p50 / p99, idle heap", _latency, lambda m: m.alloc_idle),
        row("alloc latency p50 / p99, scrubber busy", _latency, lambda m: m.alloc_busy),
        row("  allocations made while busy", _count,
            lambda m: m.alloc_busy.n if m.alloc_busy else None),
        row("  all clean again while allocating", _seconds, lambda m: m.busy_clean_s),
        row("  aborts taken (scrubs stopped)", _count, lambda m: m.busy_aborts),
        [f"order-{order.order} alloc ({format_size(order.bytes)}) right after destroy",
         *(max_order(m) for m in both)],
        [f"leak check: a new domain takes all {format_size(sync.heap_bytes)}",
         *(leak(m) for m in both)],
    ]
    title = (f"xenheap demo: destroy a {format_size(sync.domain_bytes)} domain "
             f"({sync.domain_blocks} blocks) on {_plural(sync.nodes, 'node')}; "
             f"{machine_line(result.machine)}")
    return title + "\n\n" + table(["", 'scrub="sync"', 'scrub="idle"'], rows)


# --- xenheap bench --------------------------------------------------------------------------
def format_bench(result: BenchResult) -> str:
    """The bench's four tables, as printed."""
    out = [f"xenheap bench on {machine_line(result.machine)}"]

    repeats = len(result.destroy[0].idle_runs)
    out.append("\nDestroy latency and time until all memory is clean, by domain size "
               f"(medians of {repeats})")
    out.append(table(
        ["domain", "sync destroy", "idle destroy", "sync / idle", "idle: clean after"],
        [[format_size(r.size_bytes), _seconds(r.sync_destroy_s), _seconds(r.idle_destroy_s),
          _ratio(r.destroy_ratio), _seconds(r.idle_clean_s)] for r in result.destroy]))

    out.append("\nZeroed buffer obtained, written once, released: median time per buffer "
               "(peer / xenheap: above 1x, xenheap is faster)")
    peers = list(result.buffers[0].us)
    rows = []
    for b in result.buffers:
        cells = [format_size(b.size_bytes)]
        for name in peers:
            cell = format_seconds(b.us[name] / 1e6)
            if name != "xenheap":
                cell += f" ({_ratio(b.vs_xenheap[name])})"
            cells.append(cell)
        rows.append(cells)
    out.append(table(["buffer", *peers], rows))

    out.append("\nScrub throughput against zeroing by hand, on the same memory")
    out.append(table(
        ["nodes", "size", "scrubbers", "destroy to clean", "scrubber own", "memset x1",
         "memset xN", "numpy fill(0)"],
        [[f"{s.nodes}{' emulated' if s.emulated else ''}", format_size(s.size_bytes),
          str(s.scrubbers), format_rate(s.clean_bytes_per_s),
          format_rate(s.scrubber_bytes_per_s), format_rate(s.memset_bytes_per_s),
          f"{format_rate(s.memset_all_bytes_per_s)} (x{s.memset_threads})",
          format_rate(s.numpy_fill_bytes_per_s)] for s in result.scrub]))

    out.append("\nAllocation throughput: alloc + free of 4 KiB in a loop, threads sharing "
               "one domain")
    base = result.alloc_threads[0].ops_per_s
    out.append(table(
        ["threads", "ops/s", "vs 1 thread"],
        [[str(a.threads), _ops(a.ops_per_s),
          _ratio(a.ops_per_s / base if base and a.ops_per_s else None)]
         for a in result.alloc_threads]))
    return "\n".join(out)


# --- xenheap info ---------------------------------------------------------------------------
def format_info(result: Info) -> str:
    """``xenheap info`` as printed."""
    caps = result.capabilities
    machine = result.machine
    names = {"mbind": "mbind", "madv_hugepage": "MADV_HUGEPAGE", "sched_idle": "SCHED_IDLE"}
    lines = [
        f"xenheap {result.version}: numba {result.numba}, numpy {result.numpy}, "
        f"Python {result.python}",
        f"machine: {machine_line(machine)} ({format_size(machine.available_bytes)} "
        "available)",
        "",
        table(["node", "OS node", "CPUs", "distances"],
              [[str(n.node), _count(n.os_node), _cpulist(n.cpus),
                " ".join(map(str, n.distances))] for n in result.nodes]),
        "",
        "available here: " + ", ".join(f"{label} {'yes' if caps.get(key) else 'no'}"
                                       for key, label in names.items()),
        f"libc memset on {format_size(result.memset_measured_bytes)} of faulted-in memory: "
        f"{format_rate(result.memset_bytes_per_s)} in one call, "
        f"{format_rate(result.memset_2mib_calls_bytes_per_s)} in 2 MiB calls",
    ]
    return "\n".join(lines)


# --- xenheap demo --busy --------------------------------------------------------------------
def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def _busy_cells(side: SideSummary, timeout_s: float) -> list[str]:
    clean = (f"timeout (>{timeout_s:g} s)" if side.clean_after_ms is None
             else _ms(side.clean_after_ms))
    cpu = side.scrub_cpu_s
    return [_ms(side.destroy_ms), clean, _ms(side.abort_wait_max_ms),
            _ms(side.alloc_2mib_max_ms), "-" if cpu is None else f"{cpu:.3f}",
            _ms(side.close_ms), str(side.threads_left),
            "yes" if side.all_zero else "NO", "yes" if side.check_ok else "NO"]


def format_busy(result: BusyResult) -> str:
    """The busy experiment as printed: a title and one table, idle and busy side by side."""
    sides = ("idle", "busy")
    labels = ["destroy ms", "clean-after ms", "longest abort wait ms",
              "longest 2 MiB alloc ms", "scrub CPU s", "close ms", "threads left",
              "all zero", "check ok"]
    columns = [_busy_cells(result.sides[s], result.clean_timeout_s) for s in sides]
    rows = [["", "idle", f"busy ({_plural(result.busy, 'hog')})"],
            *([label, *cells] for label, *cells in zip(labels, *columns, strict=True))]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in
                                                  zip(row[1:], widths[1:], strict=True))])
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    machine = result.machine
    nice = any(result.sides[s].cap_sys_nice for s in sides)
    title = (f"xenheap demo --busy {result.busy}: destroy a {format_size(result.size_bytes)}"
             f" written domain, scrub=\"idle\", {_plural(result.nodes, 'node')}, heap "
             f"{'WITH' if nice else 'without'} CAP_SYS_NICE ({result.launcher} child); "
             f"{machine.cpu}, {machine.cpus} CPUs; "
             f"median of {_plural(result.rounds, 'round')}")
    wait = result.final_clean_timeout_s
    notes = [f"note: the {s} side's heap was still dirty {wait:g} s after the tenant's "
             "destroy; check() ran on it so" for s in sides if not result.sides[s].final_clean]
    return "\n".join([title, "", *lines, *notes])
