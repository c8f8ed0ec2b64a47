"""``xenheap demo``: destroy a domain holding all memory, with and without background
scrubbing ("sync" and "idle" mode), and every figure that follows from it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xenheap.heap import Heap
from xenheap.tools.baselines import (
    block_regions,
    coalesce,
    memset_bandwidth,
    numpy_fill_bandwidth,
)
from xenheap.tools.machine import MachineInfo, available_memory, machine_info
from xenheap.tools.workload import (
    GiB,
    LatencySummary,
    LeakCheck,
    MiB,
    alloc_latencies,
    destroy_and_clean,
    fill_domain,
    free_all,
    latency_summary,
    leak_check,
    populated_domain,
    scrub_counters,
    try_alloc,
    views_released_on_error,
    wait_until_clean,
    warm_kernels,
    write_pattern,
)

if TYPE_CHECKING:
    from xenheap.tools.progress import ScrubProgress

DEFAULT_SIZE = 2 * GiB
LATENCY_SAMPLES = 10_000
MODES = ("sync", "idle")


def default_size(available: int | None = None) -> int:
    """About 2 GiB, less where a quarter of available memory is less (a multiple of 64 MiB)."""
    avail = available_memory() if available is None else available
    quarter = avail // 4 // (64 * MiB) * (64 * MiB)
    return max(64 * MiB, min(DEFAULT_SIZE, quarter))


@dataclass
class MaxOrderAlloc:
    """The highest-order allocation, made right after a full-memory destroy."""

    order: int
    bytes: int
    ok: bool
    seconds: float


@dataclass
class DemoMode:
    """Every figure of the experiment in one scrub mode (see :func:`run_mode`)."""

    mode: str
    nodes: int
    heap_bytes: int
    domain_bytes: int
    domain_blocks: int
    first_write_s: float
    memset_bytes_per_s: float | None
    memset_blockwise_bytes_per_s: float | None
    numpy_fill_bytes_per_s: float | None
    # The destroy: its call, and until all memory is clean again (workload.DestroyCycle).
    destroy_s: float
    clean_s: float
    zeroed_bytes: int
    clean_bytes_per_s: float | None
    scrubber_bytes_per_s: float | None
    alloc_idle: LatencySummary
    # While the scrubbers are busy: None without scrubbers ("sync" mode).
    busy_clean_s: float | None
    alloc_busy: LatencySummary | None
    busy_aborts: int | None
    busy_abort_wait_max_us: float | None
    max_order_alloc: MaxOrderAlloc
    leak_check: LeakCheck
    aborts_total: int


@dataclass
class DemoResult:
    """``xenheap demo``: both modes, and how much sooner "idle" returns from the destroy."""

    size_bytes: int
    nodes: int | None  # as asked (None: the machine's)
    machine: MachineInfo
    modes: dict[str, DemoMode]  # "sync", "idle"
    destroy_ratio: float | None  # sync destroy time / idle destroy time


def run_mode(mode: str, size: int, nodes: int | None = None,
             progress: ScrubProgress | None = None,
             latency_samples: int = LATENCY_SAMPLES) -> DemoMode:
    """The experiment in one scrub mode: every figure ``xenheap demo`` prints.

    1. A domain takes all memory and writes a pattern into every page; libc memset and
       numpy fill(0) are timed on that same memory; it is destroyed: the destroy call and the
       time until all memory is clean again.
    2. Allocation latency (order 0) on the clean, idle heap; then, in "idle" mode, while the
       scrubbers are busy after another full-memory destroy, with the aborts it caused.
    3. A third full domain is destroyed and at once a new one asks for the highest order,
       then takes all the rest and checks that every byte it was given reads zero.
    """
    with Heap(size, nodes=nodes, scrub=mode) as heap, views_released_on_error():
        if progress is not None:
            progress.stage(f"demo ({mode}): populating and writing the domain")
        guest, blocks, first_write_s = populated_domain(heap, "guest")
        domain_bytes = sum(blk.nbytes for blk in blocks)
        domain_blocks = len(blocks)
        regions = block_regions(blocks)
        memset_rate = memset_bandwidth(coalesce(regions), repeats=2)
        memset_blockwise_rate = memset_bandwidth(regions, repeats=2)
        del regions
        fill_rate = numpy_fill_bandwidth(blocks, repeats=2)
        write_pattern(blocks)  # the guest's data again, over the zeros just measured
        cycle = destroy_and_clean(heap, guest, progress)

        samples = max(1, min(latency_samples, heap.total_pages // 4))
        probe = heap.create_domain("probe")
        ns, held = alloc_latencies(probe, samples)
        alloc_idle = latency_summary(ns)
        free_all(held)
        wait_until_clean(heap)

        busy_clean_s: float | None = None
        alloc_busy: LatencySummary | None = None
        busy_aborts: int | None = None
        busy_abort_wait_max_us: float | None = None
        if heap.scrubbers:
            if progress is not None:
                progress.stage(f"demo ({mode}): allocating while the scrubber is busy")
            guest, blocks, _ = populated_domain(heap, "guest-2")
            before = scrub_counters(heap)
            start = time.perf_counter()
            guest.destroy()
            ns, held = alloc_latencies(probe, samples,
                                       stop=lambda: heap.stats()["dirty_pages"] == 0)
            wait_until_clean(heap, progress)
            # Time to clean while this thread kept allocating: it holds the GIL between its
            # kernel calls, and the scrubbers need it between theirs.
            busy_clean_s = time.perf_counter() - start
            delta = scrub_counters(heap).since(before)
            alloc_busy = latency_summary(ns)
            busy_aborts = delta.aborts
            busy_abort_wait_max_us = delta.abort_wait_max_seconds * 1e6
            free_all(held)
            wait_until_clean(heap)
        probe.destroy()
        wait_until_clean(heap)

        if progress is not None:
            progress.stage(f"demo ({mode}): highest-order allocation and leak check")
        guest, blocks, _ = populated_domain(heap, "guest-3")
        guest.destroy()
        taker = heap.create_domain("taker")
        big, big_s = try_alloc(taker, heap.max_order)
        max_order = MaxOrderAlloc(order=heap.max_order, bytes=heap.page_size << heap.max_order,
                                  ok=big is not None, seconds=big_s)
        given = ([big] if big is not None else []) + fill_domain(taker)
        leak = leak_check(taker, given)
        del big, given
        taker.destroy()
        result = DemoMode(
            mode=mode, nodes=heap.nodes, heap_bytes=heap.total_pages * heap.page_size,
            domain_bytes=domain_bytes, domain_blocks=domain_blocks, first_write_s=first_write_s,
            memset_bytes_per_s=memset_rate, memset_blockwise_bytes_per_s=memset_blockwise_rate,
            numpy_fill_bytes_per_s=fill_rate,
            destroy_s=cycle.destroy_s, clean_s=cycle.clean_s, zeroed_bytes=cycle.zeroed_bytes,
            clean_bytes_per_s=cycle.clean_bytes_per_s,
            scrubber_bytes_per_s=cycle.scrubber_bytes_per_s,
            alloc_idle=alloc_idle, busy_clean_s=busy_clean_s, alloc_busy=alloc_busy,
            busy_aborts=busy_aborts, busy_abort_wait_max_us=busy_abort_wait_max_us,
            max_order_alloc=max_order, leak_check=leak,
            aborts_total=scrub_counters(heap).aborts)
        if progress is not None:
            progress.end()
    return result


def run(size: int, nodes: int | None = None, progress: ScrubProgress | None = None,
        latency_samples: int = LATENCY_SAMPLES) -> DemoResult:
    """``xenheap demo``: the experiment in "sync" then "idle" mode, and their destroy ratio."""
    warm_kernels()
    modes = {mode: run_mode(mode, size, nodes, progress, latency_samples) for mode in MODES}
    idle_s = modes["idle"].destroy_s
    return DemoResult(
        size_bytes=size,
        nodes=nodes,
        machine=machine_info(),
        modes=modes,
        destroy_ratio=modes["sync"].destroy_s / idle_s if idle_s > 0 else None,
    )
