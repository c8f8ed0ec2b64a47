"""Measurements shared by ``xenheap demo``, ``xenheap bench``, ``xenheap info`` and bench/.

Every figure the command line prints and every pytest-benchmark case is built from the
functions here, so the two ways of measuring cannot drift apart. Results are plain dicts of
ints, floats, strings, bools and None (JSON as they are); times are seconds, rates
bytes/second. A rate is None, never a made-up number, when nothing was done or the time it
would be computed over is shorter than ``MIN_TIMED_S`` (see :func:`rate`).

The peers a user would otherwise pick for a zeroed buffer are ``bytearray(n)``,
``numpy.zeros(n)`` and ``mmap.mmap(-1, n)``; the zeroing baselines are libc ``memset`` (the
kernel the scrubber uses) and numpy ``fill(0)``, both run on the heap's own memory.
"""

from __future__ import annotations

import logging
import mmap
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import psutil

from xenheap import prim
from xenheap.errors import OutOfMemory, XenHeapError
from xenheap.heap import Heap
from xenheap.progress import rate_over
from xenheap.topology import read_topology

if TYPE_CHECKING:
    from xenheap.domain import Block, Domain
    from xenheap.progress import ScrubProgress

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
# What the first domain writes into every page: the leak check looks for any non-zero byte,
# so the pattern only has to be non-zero; 0xA5 is easy to spot in a hex dump.
PATTERN_BYTE = 0xA5
# What a buffer's user writes once (any non-zero byte; distinct from the pattern).
WRITE_BYTE = 0x5A
# Domains are populated in 2 MiB blocks: a guest's superpages, and runs long enough for
# memset to reach full speed.
FILL_ORDER = 9
DEMO_DEFAULT_SIZE = 2 * GiB
BENCH_MAX_SIZE = 4 * GiB  # enough to show the trend; a 2-core 24 GiB machine does it in seconds
BUFFER_SIZES = (4096, 2 * MiB)
LATENCY_SAMPLES = 10_000
CLEAN_TIMEOUT_S = 600.0
_POLL_S = 0.05  # how often a waiting thread repaints progress while memory is still dirty
# The shortest interval a measured rate is computed over: below it, reading the clock and
# calling into the kernels are a visible part of the time, and the quotient means nothing.
MIN_TIMED_S = 20e-6


def rate(amount: float, seconds: float) -> float | None:
    """``amount / seconds`` (bytes or operations a second), or None when ``amount`` is not
    positive or ``seconds`` is below MIN_TIMED_S: too little was timed to give a rate."""
    return rate_over(amount, seconds, MIN_TIMED_S)


# --- the machine ----------------------------------------------------------------------------
def available_memory() -> int:
    """Bytes of memory available to new allocations now (psutil's ``available``)."""
    return int(psutil.virtual_memory().available)


def size_limit(available: int | None = None) -> int:
    """The largest heap the commands accept: 3/4 of available memory (room for the rest)."""
    avail = available_memory() if available is None else available
    return avail * 3 // 4


def default_demo_size(available: int | None = None) -> int:
    """About 2 GiB, less where a quarter of available memory is less (a multiple of 64 MiB)."""
    avail = available_memory() if available is None else available
    quarter = avail // 4 // (64 * MiB) * (64 * MiB)
    return max(64 * MiB, min(DEMO_DEFAULT_SIZE, quarter))


def default_bench_sizes(quick: bool = False, available: int | None = None) -> list[int]:
    """Domain sizes for the destroy sweep: 64 MiB, x4 each step, up to what memory allows."""
    if quick:
        return [16 * MiB, 64 * MiB]
    avail = available_memory() if available is None else available
    cap = min(BENCH_MAX_SIZE, max(64 * MiB, avail // 4))
    sizes = [64 * MiB]
    while sizes[-1] * 4 <= cap:
        sizes.append(sizes[-1] * 4)
    return sizes


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Which machine the figures come from: CPU model, usable CPUs, memory."""
    return {
        "cpu": _cpu_model(),
        "cpus": len(os.sched_getaffinity(0)),
        "memory_bytes": int(psutil.virtual_memory().total),
        "available_bytes": available_memory(),
    }


# --- populating and writing a domain --------------------------------------------------------
def fill_domain(dom: Domain, order: int = FILL_ORDER) -> list[Block]:
    """Allocate every free page of the heap to ``dom``: blocks of ``order``, then smaller.

    Smaller orders pick up what a size that is not a multiple of the block leaves over, so the
    domain ends up holding all memory. Dirty chunks are taken too (scrubbed on allocation).
    """
    blocks: list[Block] = []
    for k in range(min(order, dom.heap.max_order), -1, -1):
        while True:
            try:
                blocks.append(dom.alloc(k))
            except OutOfMemory:
                break
    return blocks


def write_pattern(blocks: Sequence[Block], byte: int = PATTERN_BYTE) -> float:
    """Fill every byte of ``blocks`` with ``byte``; returns the seconds it took."""
    word = int.from_bytes(bytes([byte]) * 8, "little")
    start = time.perf_counter()
    for blk in blocks:
        blk.array("uint64").fill(word)
    return time.perf_counter() - start


def block_regions(blocks: Sequence[Block]) -> list[tuple[int, int]]:
    """(address, bytes) of each block, for memset. Valid only while the blocks are held."""
    return [(prim.address_of(blk.view()), blk.nbytes) for blk in blocks]


def coalesce(regions: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge address-adjacent regions: memset's best case is one call per contiguous run.

    (glibc switches to non-temporal stores for large calls; here that doubles its speed.)
    """
    runs: list[list[int]] = []
    for addr, nbytes in sorted(regions):
        if runs and runs[-1][0] + runs[-1][1] == addr:
            runs[-1][1] += nbytes
        else:
            runs.append([addr, nbytes])
    return [(addr, nbytes) for addr, nbytes in runs]


def _shares(regions: Sequence[tuple[int, int]], parts: int) -> list[list[tuple[int, int]]]:
    """Cut ``regions`` into ``parts`` lists of about equal bytes (page-aligned cuts)."""
    total = sum(n for _, n in regions)
    quota = -(-total // parts // prim.PAGE_SIZE) * prim.PAGE_SIZE
    shares: list[list[tuple[int, int]]] = [[] for _ in range(parts)]
    index, room = 0, quota
    for addr, nbytes in regions:
        while nbytes:
            take = min(nbytes, room)
            shares[index].append((addr, take))
            addr, nbytes, room = addr + take, nbytes - take, room - take
            if room == 0 and index < parts - 1:
                index, room = index + 1, quota
    return shares


# --- zeroing baselines ----------------------------------------------------------------------
def memset_regions(regions: Sequence[tuple[int, int]], value: int = 0,
                   threads: int = 1) -> None:
    """libc memset over ``regions``, one call per region.

    With ``threads`` > 1 the regions are cut into that many equal shares zeroed at once
    (ctypes drops the GIL around each call, so they really run in parallel).
    """
    def zero(share: Sequence[tuple[int, int]]) -> None:
        for addr, nbytes in share:
            prim.libc_memset(addr, value, nbytes)

    if threads == 1:
        zero(regions)
        return
    workers = [threading.Thread(target=zero, args=(share,))
               for share in _shares(regions, threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def fill_zero(blocks: Sequence[Block]) -> None:
    """numpy ``fill(0)`` over every block (a fresh view each, so none outlives the call)."""
    for blk in blocks:
        blk.array("uint64").fill(0)


def _best_rate(nbytes: int, op: Callable[[], None], repeats: int) -> float | None:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        op()
        best = min(best, time.perf_counter() - start)
    return rate(nbytes, best)


def memset_bandwidth(regions: Sequence[tuple[int, int]], value: int = 0, threads: int = 1,
                     repeats: int = 1) -> float | None:
    """Bytes/s of :func:`memset_regions` (best of ``repeats``; None if too fast to time)."""
    return _best_rate(sum(n for _, n in regions),
                      lambda: memset_regions(regions, value, threads), repeats)


def numpy_fill_bandwidth(blocks: Sequence[Block], repeats: int = 1) -> float | None:
    """Bytes/s of :func:`fill_zero` (best of ``repeats``; None if too fast to time)."""
    return _best_rate(sum(blk.nbytes for blk in blocks), lambda: fill_zero(blocks), repeats)


@contextmanager
def scratch_regions(nbytes: int, chunk: int = 2 * MiB) -> Iterator[list[tuple[int, int]]]:
    """A faulted-in anonymous mapping of ``nbytes``, as (address, bytes) regions of ``chunk``.

    For measuring memset where no heap exists (``xenheap info``).
    """
    mapping = prim.map_anonymous(nbytes)
    try:
        arr = np.frombuffer(mapping, dtype=np.uint8)
        arr.fill(1)  # fault every page in: memset is to be timed, not the page faults
        base = int(arr.ctypes.data)
        del arr
        yield [(base + off, min(chunk, nbytes - off)) for off in range(0, nbytes, chunk)]
    finally:
        mapping.close()


# --- heap counters and waiting ----------------------------------------------------------------
_SUMMED = ("scrubbed_pages", "alloc_scrubbed_pages", "sync_scrubbed_pages", "aborts",
           "abort_wait_ns_total", "scrub_seconds")


def scrub_counters(heap: Heap) -> dict:
    """The scrub counters of ``heap.stats()`` summed over nodes (abort wait: the maximum)."""
    nodes = heap.stats()["nodes"]
    out: dict = {key: sum(n[key] for n in nodes) for key in _SUMMED}
    out["abort_wait_ns_max"] = max(n["abort_wait_ns_max"] for n in nodes)
    return out


def counter_delta(before: dict, after: dict) -> dict:
    """``after - before`` for the summed counters (the maximum is kept as is)."""
    out = {key: after[key] - before[key] for key in _SUMMED}
    out["abort_wait_ns_max"] = after["abort_wait_ns_max"]
    return out


def wait_until_clean(heap: Heap, progress: ScrubProgress | None = None,
                     timeout: float = CLEAN_TIMEOUT_S) -> bool:
    """Wait until no page of ``heap`` is dirty, repainting ``progress`` meanwhile.

    False if ``timeout`` passes first, or nothing is left to clean it (no live scrubber).
    """
    deadline = time.monotonic() + timeout
    if progress is not None:
        progress.begin(heap)
    try:
        while not heap.wait_clean(timeout=_POLL_S):
            if not any(s.is_alive() for s in heap.scrubbers) or time.monotonic() >= deadline:
                return False
            if progress is not None:
                progress.update(heap)
        return True
    finally:
        if progress is not None:
            progress.end()


def destroy_and_clean(heap: Heap, dom: Domain, progress: ScrubProgress | None = None) -> dict:
    """Destroy ``dom``; time the call and the time until all memory is clean again.

    Both are measured from the start of ``destroy()``. Raises XenHeapError if the memory does
    not become clean (a scrubber died and nothing else will clean it).
    """
    before = scrub_counters(heap)
    start = time.perf_counter()
    dom.destroy()
    destroy_s = time.perf_counter() - start
    if not wait_until_clean(heap, progress):
        raise XenHeapError(f"the heap was not clean {CLEAN_TIMEOUT_S:.0f} s after destroy "
                           f"({heap.stats()['dirty_pages']} pages still dirty)")
    clean_s = time.perf_counter() - start
    delta = counter_delta(before, scrub_counters(heap))
    zeroed = (delta["scrubbed_pages"] + delta["alloc_scrubbed_pages"]
              + delta["sync_scrubbed_pages"]) * heap.page_size
    return {
        "destroy_s": destroy_s,
        "clean_s": clean_s,
        "zeroed_bytes": zeroed,
        "clean_bytes_per_s": rate(zeroed, clean_s),
        # The scrubbers' own rate: bytes over the time they spent zeroing (None in sync mode,
        # and when allocators zeroed everything before a scrubber got to it).
        "scrubber_bytes_per_s": rate(delta["scrubbed_pages"] * heap.page_size,
                                     delta["scrub_seconds"]),
    }


def populated_domain(heap: Heap, name: str, byte: int = PATTERN_BYTE
                     ) -> tuple[Domain, list[Block], float]:
    """A domain holding all of ``heap``'s free memory with ``byte`` written into every page.

    Returns the domain, its blocks and the seconds the writing took.
    """
    dom = heap.create_domain(name)
    blocks = fill_domain(dom)
    return dom, blocks, write_pattern(blocks, byte)


def warm_up(heap: Heap) -> None:
    """Fault every page of ``heap`` in and leave it clean: a heap that has served a while."""
    dom, _, _ = populated_domain(heap, "warm-up")
    dom.destroy()
    wait_until_clean(heap)


def warm_kernels() -> None:
    """Run every kernel the measurements use once on a tiny heap in each mode.

    numba loads (or compiles) a kernel at its first call, holding the GIL; that must not be
    timed as the destroy, the scrub or an allocation it happens to fall into.
    """
    for mode in ("sync", "idle"):
        with Heap(4 * MiB, scrub=mode) as heap:
            guest, _, _ = populated_domain(heap, "warm-up")
            guest.destroy()
            taker = heap.create_domain("warm-up-taker")
            fill_domain(taker)  # takes dirty chunks in "idle" mode: scrub on allocation
            taker.destroy()
            wait_until_clean(heap)
            buffer = heap.create_domain("warm-up-buffer")
            buffer.alloc_bytes(4096).free()
            buffer.destroy()
            heap.stats()


# --- allocation latency -----------------------------------------------------------------------
def alloc_latencies(dom: Domain, count: int, order: int = 0,
                    stop: Callable[[], bool] | None = None, check_every: int = 32
                    ) -> tuple[np.ndarray, list[Block]]:
    """Time up to ``count`` allocations of ``order`` (ns each), keeping the blocks.

    Blocks are kept, not freed, so no sample pays for the previous one's free. ``stop`` is
    asked every ``check_every`` samples (it may cost tens of microseconds) and ends the run.
    """
    samples = np.empty(count, dtype=np.int64)
    held: list[Block] = []
    clock = time.perf_counter_ns
    n = 0
    while n < count:
        if stop is not None and n % check_every == 0 and stop():
            break
        t0 = clock()
        blk = dom.alloc(order)
        samples[n] = clock() - t0
        held.append(blk)
        n += 1
    return samples[:n], held


def latency_summary(ns: np.ndarray) -> dict:
    """Sample count and p50 / p99 / max in microseconds (None without samples)."""
    if len(ns) == 0:
        return {"n": 0, "p50_us": None, "p99_us": None, "max_us": None}
    p50, p99 = np.percentile(ns, [50, 99])
    return {"n": len(ns), "p50_us": float(p50) / 1e3, "p99_us": float(p99) / 1e3,
            "max_us": float(ns.max()) / 1e3}


def free_all(blocks: list[Block]) -> None:
    """Free every block of the list and empty it."""
    for blk in blocks:
        blk.free()
    blocks.clear()


def try_alloc(dom: Domain, order: int) -> tuple[Block | None, float]:
    """One allocation of ``order``: the block (None if refused) and the seconds it took."""
    start = time.perf_counter()
    try:
        blk = dom.alloc(order)
    except OutOfMemory:
        blk = None
    return blk, time.perf_counter() - start


def leak_check(blocks: Sequence[Block]) -> dict:
    """Count the non-zero bytes in ``blocks`` (memory a new owner was just given)."""
    nonzero = 0
    checked = 0
    for blk in blocks:
        words = blk.array("uint64")
        if words.any():  # the fast path: a whole block of zero words
            nonzero += int(np.count_nonzero(blk.array()))
        checked += blk.nbytes
        del words
    return {"ok": nonzero == 0, "blocks": len(blocks), "bytes_checked": checked,
            "nonzero_bytes": nonzero}


# --- the demo -------------------------------------------------------------------------------
def demo_mode(mode: str, size: int, nodes: int | None = None,
              progress: ScrubProgress | None = None,
              latency_samples: int = LATENCY_SAMPLES) -> dict:
    """The experiment in one scrub mode: every figure ``xenheap demo`` prints.

    1. A domain takes all memory and writes a pattern into every page; libc memset and
       numpy fill(0) are timed on that same memory; it is destroyed: the destroy call and the
       time until all memory is clean again.
    2. Allocation latency (order 0) on the clean, idle heap; then, in "idle" mode, while the
       scrubbers are busy after another full-memory destroy, with the aborts it caused.
    3. A third full domain is destroyed and at once a new one asks for the highest order,
       then takes all the rest and checks that every byte it was given reads zero.
    """
    with Heap(size, nodes=nodes, scrub=mode) as heap:
        out: dict = {"mode": mode, "nodes": heap.nodes,
                     "heap_bytes": heap.total_pages * heap.page_size}
        if progress is not None:
            progress.stage(f"demo ({mode}): populating and writing the domain")
        guest, blocks, first_write_s = populated_domain(heap, "guest")
        out["domain_bytes"] = sum(blk.nbytes for blk in blocks)
        out["domain_blocks"] = len(blocks)
        out["first_write_s"] = first_write_s
        regions = block_regions(blocks)
        out["memset_bytes_per_s"] = memset_bandwidth(coalesce(regions), repeats=2)
        out["memset_blockwise_bytes_per_s"] = memset_bandwidth(regions, repeats=2)
        del regions
        out["numpy_fill_bytes_per_s"] = numpy_fill_bandwidth(blocks, repeats=2)
        write_pattern(blocks)  # the guest's data again, over the zeros just measured
        del blocks
        out.update(destroy_and_clean(heap, guest, progress))

        samples = max(1, min(latency_samples, heap.total_pages // 4))
        probe = heap.create_domain("probe")
        ns, held = alloc_latencies(probe, samples)
        out["alloc_idle"] = latency_summary(ns)
        free_all(held)
        wait_until_clean(heap)

        if heap.scrubbers:
            if progress is not None:
                progress.stage(f"demo ({mode}): allocating while the scrubber is busy")
            guest, blocks, _ = populated_domain(heap, "guest-2")
            del blocks
            before = scrub_counters(heap)
            start = time.perf_counter()
            guest.destroy()
            ns, held = alloc_latencies(probe, samples,
                                       stop=lambda: heap.stats()["dirty_pages"] == 0)
            wait_until_clean(heap, progress)
            # Time to clean while this thread kept allocating: it holds the GIL between its
            # kernel calls, and the scrubbers need it between theirs.
            out["busy_clean_s"] = time.perf_counter() - start
            delta = counter_delta(before, scrub_counters(heap))
            out["alloc_busy"] = latency_summary(ns)
            out["busy_aborts"] = delta["aborts"]
            out["busy_abort_wait_max_us"] = delta["abort_wait_ns_max"] / 1e3
            free_all(held)
            wait_until_clean(heap)
        else:
            out["alloc_busy"] = None
            out["busy_clean_s"] = None
            out["busy_aborts"] = None
            out["busy_abort_wait_max_us"] = None
        probe.destroy()
        wait_until_clean(heap)

        if progress is not None:
            progress.stage(f"demo ({mode}): highest-order allocation and leak check")
        guest, blocks, _ = populated_domain(heap, "guest-3")
        del blocks
        guest.destroy()
        taker = heap.create_domain("taker")
        big, big_s = try_alloc(taker, heap.max_order)
        out["max_order_alloc"] = {"order": heap.max_order,
                                  "bytes": heap.page_size << heap.max_order,
                                  "ok": big is not None, "seconds": big_s}
        given = ([big] if big is not None else []) + fill_domain(taker)
        leak = leak_check(given)
        leak["all_memory"] = taker.pages == heap.total_pages
        out["leak_check"] = leak
        del big, given
        taker.destroy()
        out["aborts_total"] = scrub_counters(heap)["aborts"]
        if progress is not None:
            progress.end()
    return out


def demo(size: int, nodes: int | None = None, progress: ScrubProgress | None = None,
         latency_samples: int = LATENCY_SAMPLES) -> dict:
    """``xenheap demo``: the experiment in "sync" then "idle" mode, and their destroy ratio."""
    warm_kernels()
    modes = {mode: demo_mode(mode, size, nodes, progress, latency_samples)
             for mode in ("sync", "idle")}
    idle_s = modes["idle"]["destroy_s"]
    return {
        "size_bytes": size,
        "nodes": nodes,
        "machine": machine_info(),
        "modes": modes,
        "destroy_ratio": modes["sync"]["destroy_s"] / idle_s if idle_s > 0 else None,
    }


# --- the bench ------------------------------------------------------------------------------
def destroy_sweep(sizes: Sequence[int], repeats: int = 3, nodes: int | None = None,
                  progress: ScrubProgress | None = None) -> list[dict]:
    """Destroy latency and time-to-clean against domain size, "sync" vs "idle" (medians)."""
    rows = []
    for size in sizes:
        row: dict = {"size_bytes": size}
        for mode in ("sync", "idle"):
            runs = []
            with Heap(size, nodes=nodes, scrub=mode) as heap:
                for r in range(repeats):
                    if progress is not None:
                        progress.stage(f"bench: destroy {size // MiB} MiB, {mode} "
                                       f"({r + 1}/{repeats})")
                    guest, blocks, _ = populated_domain(heap, "guest")
                    del blocks
                    runs.append(destroy_and_clean(heap, guest, progress))
            row[f"{mode}_destroy_s"] = statistics.median(r["destroy_s"] for r in runs)
            row[f"{mode}_clean_s"] = statistics.median(r["clean_s"] for r in runs)
            # Every run too: on a shared or virtual machine single runs can be far off.
            row[f"{mode}_runs"] = [{"destroy_s": r["destroy_s"], "clean_s": r["clean_s"]}
                                   for r in runs]
        row["destroy_ratio"] = (row["sync_destroy_s"] / row["idle_destroy_s"]
                                if row["idle_destroy_s"] > 0 else None)
        rows.append(row)
    return rows


def buffer_peers(dom: Domain) -> dict[str, Callable[[int], None]]:
    """One call each: obtain a zeroed buffer of n bytes, write it once, release it.

    Every peer writes through a numpy uint8 array (its own, or a zero-copy view), so the
    write costs the same and only obtaining and releasing differ.
    """
    def xenheap_buffer(n: int) -> None:
        blk = dom.alloc_bytes(n)
        blk.array()[:n].fill(WRITE_BYTE)
        blk.free()

    def bytearray_buffer(n: int) -> None:
        buf = bytearray(n)
        np.frombuffer(buf, dtype=np.uint8).fill(WRITE_BYTE)

    def numpy_buffer(n: int) -> None:
        np.zeros(n, dtype=np.uint8).fill(WRITE_BYTE)

    def mmap_buffer(n: int) -> None:
        buf = mmap.mmap(-1, n)
        np.frombuffer(buf, dtype=np.uint8).fill(WRITE_BYTE)  # the view dies with the statement
        buf.close()

    return {"xenheap": xenheap_buffer, "bytearray": bytearray_buffer,
            "numpy.zeros": numpy_buffer, "mmap": mmap_buffer}


def compare_buffers(dom: Domain, sizes: Sequence[int] = BUFFER_SIZES, rounds: int = 15,
                    budget_s: float = 0.01) -> list[dict]:
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
        rows.append({"size_bytes": n, "ops_per_round": count, "rounds": rounds, "us": us,
                     "vs_xenheap": {name: us[name] / us["xenheap"]
                                    for name in names if name != "xenheap"}})
    return rows


def scrub_throughput(size: int, node_counts: Sequence[int | None] = (1, 2),
                     progress: ScrubProgress | None = None) -> list[dict]:
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
            row: dict = {
                "nodes": heap.nodes,
                "emulated": heap.topology.emulated,
                "scrubbers": len(heap.scrubbers),
                "size_bytes": heap.total_pages * heap.page_size,
                "memset_bytes_per_s": memset_bandwidth(regions, repeats=3),
                "memset_threads": threads,
                "memset_all_bytes_per_s": memset_bandwidth(regions, threads=threads, repeats=3),
                "numpy_fill_bytes_per_s": numpy_fill_bandwidth(blocks, repeats=3),
            }
            del regions
            write_pattern(blocks)
            del blocks
            cycle = destroy_and_clean(heap, guest, progress)
            row["clean_s"] = cycle["clean_s"]
            row["clean_bytes_per_s"] = cycle["clean_bytes_per_s"]
            row["scrubber_bytes_per_s"] = cycle["scrubber_bytes_per_s"]
            rows.append(row)
    return rows


def alloc_throughput(heap: Heap, threads: int, ops_per_thread: int, order: int = 0) -> dict:
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
    return {"threads": threads, "ops": ops, "seconds": elapsed,
            "ops_per_s": rate(ops, elapsed)}


def bench(sizes: Sequence[int] | None = None, quick: bool = False,
          progress: ScrubProgress | None = None) -> dict:
    """``xenheap bench``: every comparison of the issue, in one run on this machine."""
    sizes = list(sizes) if sizes else default_bench_sizes(quick)
    heap_size = 64 * MiB if quick else 256 * MiB
    out: dict = {"machine": machine_info(), "quick": quick}
    warm_kernels()
    out["destroy"] = destroy_sweep(sizes, repeats=1 if quick else 5, progress=progress)

    with Heap(heap_size, scrub="idle") as heap:
        if progress is not None:
            progress.stage("bench: zeroed buffers, xenheap vs bytearray, numpy.zeros, mmap")
        warm_up(heap)
        dom = heap.create_domain("buffers")
        out["buffers"] = compare_buffers(dom, rounds=3 if quick else 15,
                                         budget_s=0.002 if quick else 0.02)
        dom.destroy()

    scrub_size = 64 * MiB if quick else min(GiB, max(64 * MiB, available_memory() // 4))
    out["scrub"] = scrub_throughput(scrub_size, _node_layouts(), progress)

    with Heap(heap_size, scrub="idle") as heap:
        if progress is not None:
            progress.stage("bench: allocation throughput from 1, 2 and 4 threads")
        ops = 1000 if quick else 20_000
        out["alloc_threads"] = [alloc_throughput(heap, t, ops) for t in (1, 2, 4)]
    if progress is not None:
        progress.end()
    return out


def _node_layouts() -> list[int | None]:
    """1 node, the machine's own nodes where it has several, and 2 emulated nodes."""
    layouts: list[int | None] = [1]
    if len(read_topology().nodes) > 1:
        layouts.append(None)
    layouts.append(2)
    return layouts
