"""``xenheap bench``: destroy latency and time-to-clean against domain size, zeroed buffers
against ``bytearray`` / ``numpy.zeros`` / ``mmap``, scrub throughput against libc memset and
numpy fill(0), and allocation throughput from 1, 2 and 4 threads."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xenheap.heap import Heap
from xenheap.tools.baselines import (
    block_regions,
    buffer_peers,
    coalesce,
    memset_bandwidth,
    numpy_fill_bandwidth,
)
from xenheap.tools.machine import MachineInfo, available_memory, machine_info
from xenheap.tools.workload import (
    GiB,
    MiB,
    destroy_and_clean,
    populated_domain,
    rate,
    warm_kernels,
    warm_up,
    write_pattern,
)
from xenheap.topology import read_topology

if TYPE_CHECKING:
    from xenheap.domain import Domain
    from xenheap.tools.progress import ScrubProgress

MAX_SIZE = 4 * GiB  # enough to show the trend; a 2-core 24 GiB machine does it in seconds
# Buffer sizes compared with numpy and the others: from a page to where pre-zeroed memory
# wins (the quick run keeps the two ends that fit its 64 MiB heap with room to spare).
BUFFER_SIZES = (4096, 64 * 1024, 2 * MiB, 64 * MiB)
QUICK_BUFFER_SIZES = (4096, 2 * MiB)


def default_sizes(quick: bool = False, available: int | None = None) -> list[int]:
    """Domain sizes for the destroy sweep: 64 MiB, x4 each step, up to what memory allows
    (16 and 64 MiB when ``quick``)."""
    if quick:
        return [16 * MiB, 64 * MiB]
    avail = available_memory() if available is None else available
    cap = min(MAX_SIZE, max(64 * MiB, avail // 4))
    sizes = [64 * MiB]
    while sizes[-1] * 4 <= cap:
        sizes.append(sizes[-1] * 4)
    return sizes


def node_layouts() -> list[int | None]:
    """1 node, the machine's own nodes where it has several, and 2 emulated nodes."""
    layouts: list[int | None] = [1]
    if len(read_topology().nodes) > 1:
        layouts.append(None)
    layouts.append(2)
    return layouts


# --- destroy latency against size -------------------------------------------------------------
@dataclass
class DestroyRun:
    destroy_s: float
    clean_s: float


@dataclass
class DestroyRow:
    """One domain size, both modes: medians, and every run (single runs can be far off)."""

    size_bytes: int
    sync_destroy_s: float
    sync_clean_s: float
    sync_runs: list[DestroyRun]
    idle_destroy_s: float
    idle_clean_s: float
    idle_runs: list[DestroyRun]
    destroy_ratio: float | None  # sync / idle destroy time


def destroy_sweep(sizes: Sequence[int], repeats: int = 3, nodes: int | None = None,
                  progress: ScrubProgress | None = None) -> list[DestroyRow]:
    """Destroy latency and time-to-clean against domain size, "sync" vs "idle" (medians)."""
    rows = []
    for size in sizes:
        runs: dict[str, list[DestroyRun]] = {}
        for mode in ("sync", "idle"):
            runs[mode] = []
            with Heap(size, nodes=nodes, scrub=mode) as heap:
                for r in range(repeats):
                    if progress is not None:
                        progress.stage(f"bench: destroy {size // MiB} MiB, {mode} "
                                       f"({r + 1}/{repeats})")
                    guest, _held, _ = populated_domain(heap, "guest")  # kept to the destroy
                    cycle = destroy_and_clean(heap, guest, progress)
                    runs[mode].append(DestroyRun(cycle.destroy_s, cycle.clean_s))
        sync_destroy_s = statistics.median(r.destroy_s for r in runs["sync"])
        idle_destroy_s = statistics.median(r.destroy_s for r in runs["idle"])
        rows.append(DestroyRow(
            size_bytes=size,
            sync_destroy_s=sync_destroy_s,
            sync_clean_s=statistics.median(r.clean_s for r in runs["sync"]),
            sync_runs=runs["sync"],
            idle_destroy_s=idle_destroy_s,
            idle_clean_s=statistics.median(r.clean_s for r in runs["idle"]),
            idle_runs=runs["idle"],
            destroy_ratio=sync_destroy_s / idle_destroy_s if idle_destroy_s > 0 else None))
    return rows


# --- zeroed buffers ---------------------------------------------------------------------------
@dataclass
class BufferRow:
    """One buffer size: median microseconds per buffer for each peer, and the ratios."""

    size_bytes: int
    ops_per_round: int
    rounds: int
    us: dict[str, float]  # by peer, "xenheap" first
    vs_xenheap: dict[str, float]  # peer time / xenheap time: above 1, xenheap is faster


def compare_buffers(dom: Domain, sizes: Sequence[int] = BUFFER_SIZES, rounds: int = 15,
                    budget_s: float = 0.01) -> list[BufferRow]:
    """Per-buffer time of each peer (median over rounds, peers interleaved), and ratios.

    Each round runs every peer for about ``budget_s`` in a rotating order, so that drift of
    the machine hits all peers alike. ``vs_xenheap`` is peer time / xenheap time: above 1,
    xenheap is faster.
    """
    peers = buffer_peers(dom)
    names = list(peers)
    rows = []
    for n in sizes:
        # Calibrate one count per size on the slowest peer, so each round stays short.
        slowest = 0.0
        for op in peers.values():
            start = time.perf_counter()
            op(n)
            slowest = max(slowest, time.perf_counter() - start)
        count = max(3, min(2000, int(budget_s / max(slowest, 1e-7))))
        per_op: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                op = peers[name]
                start = time.perf_counter()
                for _ in range(count):
                    op(n)
                per_op[name].append((time.perf_counter() - start) / count)
        us = {name: statistics.median(times) * 1e6 for name, times in per_op.items()}
        rows.append(BufferRow(size_bytes=n, ops_per_round=count, rounds=rounds, us=us,
                              vs_xenheap={name: us[name] / us["xenheap"]
                                          for name in names if name != "xenheap"}))
    return rows


# --- scrub throughput -------------------------------------------------------------------------
@dataclass
class ScrubRow:
    """One node layout: the scrubbers' rate against zeroing the same memory by hand."""

    nodes: int
    emulated: bool
    scrubbers: int
    size_bytes: int
    memset_bytes_per_s: float | None
    memset_threads: int
    memset_all_bytes_per_s: float | None  # memset from ``memset_threads`` threads at once
    numpy_fill_bytes_per_s: float | None
    clean_s: float
    clean_bytes_per_s: float | None
    scrubber_bytes_per_s: float | None


def scrub_throughput(size: int, node_counts: Sequence[int | None] = (1, 2),
                     progress: ScrubProgress | None = None) -> list[ScrubRow]:
    """Scrubber rate vs libc memset and numpy fill(0) on the same memory, per node layout.

    memset runs with 1 thread and with one thread per scrubber, the fair comparison for
    several nodes scrubbing at once.
    """
    rows = []
    for nodes in node_counts:
        with Heap(size, nodes=nodes, scrub="idle") as heap:
            if progress is not None:
                progress.stage(f"bench: scrub throughput, {heap.nodes} node(s)")
            guest, blocks, _ = populated_domain(heap, "guest")
            regions = coalesce(block_regions(blocks))
            threads = max(1, len(heap.scrubbers))
            memset_rate = memset_bandwidth(regions, repeats=3)
            memset_all_rate = memset_bandwidth(regions, threads=threads, repeats=3)
            fill_rate = numpy_fill_bandwidth(blocks, repeats=3)
            del regions
            write_pattern(blocks)
            cycle = destroy_and_clean(heap, guest, progress)
            rows.append(ScrubRow(
                nodes=heap.nodes, emulated=heap.topology.emulated,
                scrubbers=len(heap.scrubbers), size_bytes=heap.total_pages * heap.page_size,
                memset_bytes_per_s=memset_rate, memset_threads=threads,
                memset_all_bytes_per_s=memset_all_rate, numpy_fill_bytes_per_s=fill_rate,
                clean_s=cycle.clean_s, clean_bytes_per_s=cycle.clean_bytes_per_s,
                scrubber_bytes_per_s=cycle.scrubber_bytes_per_s))
    return rows


# --- allocation throughput --------------------------------------------------------------------
@dataclass
class AllocThroughput:
    """Allocations + frees from ``threads`` threads sharing one domain."""

    threads: int
    ops: int
    seconds: float
    ops_per_s: float | None


def alloc_throughput(heap: Heap, threads: int, ops_per_thread: int,
                     order: int = 0) -> AllocThroughput:
    """Allocations + frees per second from ``threads`` threads sharing one domain."""
    dom = heap.create_domain(f"threads-{threads}")
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            for _ in range(ops_per_thread):
                dom.alloc(order).free()
        except BaseException as exc:  # reported by the caller, in its own thread
            errors.append(exc)

    workers = [threading.Thread(target=worker, name=f"xenheap-bench-{i}")
               for i in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    dom.destroy()
    if errors:
        raise errors[0]
    ops = threads * ops_per_thread
    return AllocThroughput(threads=threads, ops=ops, seconds=elapsed,
                           ops_per_s=rate(ops, elapsed))


# --- the whole bench --------------------------------------------------------------------------
@dataclass
class BenchResult:
    """``xenheap bench``: every comparison, in one run on this machine."""

    machine: MachineInfo
    quick: bool
    destroy: list[DestroyRow]
    buffers: list[BufferRow]
    scrub: list[ScrubRow]
    alloc_threads: list[AllocThroughput]


def run(sizes: Sequence[int] | None = None, quick: bool = False,
        progress: ScrubProgress | None = None) -> BenchResult:
    """``xenheap bench``: every comparison it knows (its sections), in one run on this machine."""
    sizes = list(sizes) if sizes else default_sizes(quick)
    heap_size = 64 * MiB if quick else 256 * MiB
    machine = machine_info()
    warm_kernels()
    destroy = destroy_sweep(sizes, repeats=1 if quick else 5, progress=progress)

    with Heap(heap_size, scrub="idle") as heap:
        if progress is not None:
            progress.stage("bench: zeroed buffers, xenheap vs bytearray, numpy.zeros, mmap")
        warm_up(heap)
        dom = heap.create_domain("buffers")
        buffers = compare_buffers(dom, QUICK_BUFFER_SIZES if quick else BUFFER_SIZES,
                                  rounds=3 if quick else 15,
                                  budget_s=0.002 if quick else 0.02)
        dom.destroy()

    scrub_size = 64 * MiB if quick else min(GiB, max(64 * MiB, available_memory() // 4))
    scrub = scrub_throughput(scrub_size, node_layouts(), progress)

    with Heap(heap_size, scrub="idle") as heap:
        if progress is not None:
            progress.stage("bench: allocation throughput from 1, 2 and 4 threads")
        ops = 1000 if quick else 20_000
        alloc_threads = [alloc_throughput(heap, t, ops) for t in (1, 2, 4)]
    if progress is not None:
        progress.end()
    return BenchResult(machine=machine, quick=quick, destroy=destroy, buffers=buffers,
                       scrub=scrub, alloc_threads=alloc_threads)
