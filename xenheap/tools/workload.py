"""The steps every experiment is built from: fill a domain with all memory, write it, destroy
it, wait until the heap is clean again, and time allocations.

``xenheap demo``, ``xenheap bench``, ``xenheap info`` and bench/ are all built from these
functions, so the two ways of measuring cannot drift apart. Results are dataclasses of ints,
floats, strings, bools and None (``dataclasses.asdict`` makes them JSON); times are seconds,
rates bytes/second. A rate is None, never a made-up number, when nothing was done or the
time it would be computed over is shorter than ``MIN_TIMED_S`` (see :func:`rate`).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from xenheap.errors import OutOfMemory, XenHeapError
from xenheap.heap import Heap
from xenheap.tools.progress import rate_over

if TYPE_CHECKING:
    from xenheap.domain import Block, Domain
    from xenheap.tools.progress import ScrubProgress

MiB = 1 << 20
GiB = 1 << 30
# What the first domain writes into every page: the leak check looks for any non-zero byte,
# so the pattern only has to be non-zero; 0xA5 is easy to spot in a hex dump.
PATTERN_BYTE = 0xA5
# Domains are populated in 2 MiB blocks: a guest's superpages, and runs long enough for
# memset to reach full speed.
FILL_ORDER = 9
CLEAN_TIMEOUT_S = 600.0
_POLL_S = 0.05  # how often a waiting thread repaints progress while memory is still dirty
# The shortest interval a measured rate is computed over: below it, reading the clock and
# calling into the kernels are a visible part of the time, and the quotient means nothing.
MIN_TIMED_S = 20e-6


def rate(amount: float, seconds: float) -> float | None:
    """``amount / seconds`` (bytes or operations a second), or None when ``amount`` is not
    positive or ``seconds`` is below MIN_TIMED_S: too little was timed to give a rate."""
    return rate_over(amount, seconds, MIN_TIMED_S)


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


def populated_domain(heap: Heap, name: str, byte: int = PATTERN_BYTE
                     ) -> tuple[Domain, list[Block], float]:
    """A domain holding all of ``heap``'s free memory with ``byte`` written into every page.

    Returns the domain, its blocks and the seconds the writing took.
    """
    dom = heap.create_domain(name)
    blocks = fill_domain(dom)
    return dom, blocks, write_pattern(blocks, byte)


@contextmanager
def views_released_on_error() -> Iterator[None]:
    """On an error or an interrupt, clear the locals of the frames it came up through.

    For the body of a ``with Heap(...)``, entered after the heap: those frames (the
    experiment's, numpy's own) may hold views of the heap's memory, and the traceback keeps
    them alive while the heap closes, which then warns that views of it are alive.
    """
    try:
        yield
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # those still running are left as they are
        raise


# --- heap counters and waiting ----------------------------------------------------------------
@dataclass
class ScrubCounters:
    """The scrub counters of ``heap.stats()`` summed over nodes (abort wait: the maximum)."""

    scrubbed_pages: int
    alloc_scrubbed_pages: int
    sync_scrubbed_pages: int
    aborts: int
    abort_wait_seconds: float
    scrub_seconds: float
    abort_wait_max_seconds: float

    def since(self, before: ScrubCounters) -> ScrubCounters:
        """``self - before`` for the summed counters (the maximum is kept as is)."""
        return ScrubCounters(
            scrubbed_pages=self.scrubbed_pages - before.scrubbed_pages,
            alloc_scrubbed_pages=self.alloc_scrubbed_pages - before.alloc_scrubbed_pages,
            sync_scrubbed_pages=self.sync_scrubbed_pages - before.sync_scrubbed_pages,
            aborts=self.aborts - before.aborts,
            abort_wait_seconds=self.abort_wait_seconds - before.abort_wait_seconds,
            scrub_seconds=self.scrub_seconds - before.scrub_seconds,
            abort_wait_max_seconds=self.abort_wait_max_seconds)


def scrub_counters(heap: Heap) -> ScrubCounters:
    """The scrub counters of ``heap.stats()`` summed over nodes (abort wait: the maximum)."""
    nodes = heap.stats()["nodes"]
    return ScrubCounters(
        scrubbed_pages=sum(n["scrubbed_pages"] for n in nodes),
        alloc_scrubbed_pages=sum(n["alloc_scrubbed_pages"] for n in nodes),
        sync_scrubbed_pages=sum(n["sync_scrubbed_pages"] for n in nodes),
        aborts=sum(n["aborts"] for n in nodes),
        abort_wait_seconds=sum(n["abort_wait_seconds"] for n in nodes),
        scrub_seconds=sum(n["scrub_seconds"] for n in nodes),
        abort_wait_max_seconds=max(n["abort_wait_max_seconds"] for n in nodes))


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


@dataclass
class DestroyCycle:
    """One destroy, timed from the start of ``destroy()``: to its return and to all clean."""

    destroy_s: float
    clean_s: float
    zeroed_bytes: int
    clean_bytes_per_s: float | None
    # The scrubbers' own rate: bytes over the time they spent zeroing (None in sync mode,
    # and when allocators zeroed everything before a scrubber got to it).
    scrubber_bytes_per_s: float | None


def destroy_and_clean(heap: Heap, dom: Domain,
                      progress: ScrubProgress | None = None) -> DestroyCycle:
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
    delta = scrub_counters(heap).since(before)
    zeroed = (delta.scrubbed_pages + delta.alloc_scrubbed_pages
              + delta.sync_scrubbed_pages) * heap.page_size
    return DestroyCycle(
        destroy_s=destroy_s,
        clean_s=clean_s,
        zeroed_bytes=zeroed,
        clean_bytes_per_s=rate(zeroed, clean_s),
        scrubber_bytes_per_s=rate(delta.scrubbed_pages * heap.page_size, delta.scrub_seconds))


# --- warming up -------------------------------------------------------------------------------
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


# --- allocations ------------------------------------------------------------------------------
def alloc_latencies(dom: Domain, count: int, order: int = 0,
                    stop: Callable[[], bool] | None = None, check_every: int = 32
                    ) -> tuple[np.ndarray, list[Block]]:
    """Time up to ``count`` allocations of ``order`` (ns each), keeping the blocks.

    Blocks are kept, not freed, so no sample pays for the previous one's free. ``stop`` is
    asked after every ``check_every`` samples (it may cost tens of microseconds) and ends
    the run; the first ``check_every`` are always taken, so that a condition met while the
    first question was being answered (a small heap already clean) still leaves samples.
    """
    samples = np.empty(count, dtype=np.int64)
    held: list[Block] = []
    clock = time.perf_counter_ns
    n = 0
    while n < count:
        if stop is not None and n and n % check_every == 0 and stop():
            break
        t0 = clock()
        blk = dom.alloc(order)
        samples[n] = clock() - t0
        held.append(blk)
        n += 1
    return samples[:n], held


@dataclass
class LatencySummary:
    """Sample count and p50 / p99 / max in microseconds (None without samples)."""

    n: int
    p50_us: float | None
    p99_us: float | None
    max_us: float | None


def latency_summary(ns: np.ndarray) -> LatencySummary:
    """Sample count and p50 / p99 / max in microseconds of ``ns`` (nanosecond samples)."""
    if len(ns) == 0:
        return LatencySummary(n=0, p50_us=None, p99_us=None, max_us=None)
    p50, p99 = np.percentile(ns, [50, 99])
    return LatencySummary(n=len(ns), p50_us=float(p50) / 1e3, p99_us=float(p99) / 1e3,
                          max_us=float(ns.max()) / 1e3)


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


@dataclass
class LeakCheck:
    """What a new owner found in the memory it was just given."""

    ok: bool  # not one non-zero byte
    blocks: int
    bytes_checked: int
    nonzero_bytes: int
    all_memory: bool  # the owner holds every page of the heap


def leak_check(dom: Domain, blocks: Sequence[Block]) -> LeakCheck:
    """Count the non-zero bytes in ``blocks``, memory ``dom`` was just given."""
    nonzero = 0
    checked = 0
    for blk in blocks:
        words = blk.array("uint64")
        if words.any():  # the fast path: a whole block of zero words
            nonzero += int(np.count_nonzero(blk.array()))
        checked += blk.nbytes
        del words
    return LeakCheck(ok=nonzero == 0, blocks=len(blocks), bytes_checked=checked,
                     nonzero_bytes=nonzero, all_memory=dom.pages == dom.heap.total_pages)
