"""Statistics and the debug dump: every counter named, typed and documented, with its unit.

Units are in the names, as jemalloc's are: ``_bytes`` and ``_pages`` are counts of bytes and
of pages (``page_size`` bytes each), ``_seconds`` is a float in seconds. Fields without a
unit are counts. The four allocation figures use the names of Python's memory pools
(pyarrow's ``MemoryPool``) with the same meaning, in bytes of whole pages: a block of order
``k`` counts ``page_size << k`` bytes, and a numpy slab counts as its whole block.

``Heap.stats()`` returns a :class:`HeapStats` (heap-wide fields, then ``nodes``: one
:class:`NodeStats` per node):

===========================  ===========================================================
bytes_allocated              bytes in blocks the domains hold now (numpy's included), not
                             counting cached_bytes
max_memory                   the most the domains ever held at once (cached_bytes included)
total_bytes_allocated        bytes ever allocated to domains (cumulative; freeing does not
                             lower it), parked blocks taken back included (pyarrow's
                             meaning: every allocation counts)
num_allocations              blocks ever allocated (cumulative), parked ones taken back
                             included
num_frees                    blocks ever freed (cumulative): to the heap, or parked
cached_bytes                 bytes in blocks the domains freed (by free() or by numpy)
                             and keep parked for their own reuse (xenheap.reuse,
                             native_kernels.parked); they go back to the heap under
                             pressure, after a while unused, and with their domain
total_pages                  pages in the heap (all nodes)
free_pages                   pages on the free lists, clean or dirty
dirty_pages                  free pages waiting to be zeroed (Xen's node_need_scrub, summed)
allocated_pages              total_pages - free_pages: the pages in domains' blocks, and any
                             release_unused holds off the free lists for a moment
page_size                    the page size in bytes
max_order                    the largest chunk order
scrub_mode, debug            as given to Heap()
domains                      live domains
released_bytes               bytes given back to the OS by release_unused (cumulative)
process_resident_bytes       the whole process's resident set size (RSS), all memory
                             included; :func:`heap_resident_bytes` is the heap's own part
bad_array_frees              numpy frees of memory the heap did not give out (ignored)
frame_table_bytes            bytes of per-page metadata (the frame table)
scrub_cpu_seconds            CPU time of the scrubber threads as the OS counts it
                             (time.thread_time), polling included
scrub_idle_cpu_seconds       the part spent scrubbing because a CPU was idle
scrub_deadline_cpu_seconds   the part spent scrubbing at normal priority because a node
                             stayed dirty past scrub_deadline (no CPU was idle)
domain_charges               per domain (live, and the last 1,024 destroyed): who paid for
                             cleaning its dirt (xenheap.charges.DomainCharges); the
                             scrubbers' share adds up to scrub_cpu_seconds, less their
                             polling since their last slice
nodes                        one NodeStats per node, in node order
===========================  ===========================================================

Per node (:class:`NodeStats`):

===========================  ===========================================================
node, cpus, os_node          index, CPUs, the machine node its arena is bound to (or None)
total_pages                  pages in the node
free_pages, dirty_pages      as above, for this node
free_by_order                {order: free pages in chunks of that order}
num_allocations, num_frees   blocks allocated from / freed to the node (cumulative)
scrubbed_pages               pages zeroed by the background scrubber
alloc_scrubbed_pages         pages zeroed by allocators (scrub-on-allocate)
sync_scrubbed_pages          pages zeroed on the free path in "sync" mode
unmapped_pages               dirty pages made clean with MADV_DONTNEED instead of zeroing,
                             because they were not in RAM (scrubber or allocator)
released_bytes               bytes given back to the OS by release_unused (cumulative)
scrub_passes                 chunks the scrubber finished and moved to the clean head
aborts                       scrubs stopped because an allocator, a merge or check() claimed
                             the chunk
abort_wait_seconds           total time allocators spent in the abort handshake
abort_wait_max_seconds       the longest such wait
abort_wait_p99_seconds       99th percentile wait (upper edge of its power-of-two bucket)
scrub_seconds                time the scrubber spent zeroing
scrub_bytes_per_second       scrubbed_pages * page_size / scrub_seconds (0 before any)
scrubber                     "starting", "scrubbing", "idle", "error", "stopped" or "none"
scrubber_errors              exceptions the scrubber serving this node caught and logged
===========================  ===========================================================

``Domain.stats()`` returns a :class:`DomainStats`. Once the domain is destroyed it keeps
answering: its figures as the destroy left them, updated while numpy arrays still hold some
of its blocks (they free them later), and its last figures for good once its slot goes to
a new domain.

===========================  ===========================================================
bytes_allocated              bytes in blocks the domain holds now, not counting
                             cached_bytes
max_memory                   the most the domain ever held at once (cached_bytes included)
total_bytes_allocated        bytes ever allocated to the domain (cumulative), parked
                             blocks taken back included
num_allocations              blocks ever allocated to the domain (cumulative), likewise
num_frees                    blocks freed by free(), destroy() or numpy: to the heap, or
                             parked
cached_bytes                 bytes in blocks it freed (by free() or by numpy) and keeps
                             parked for its own reuse
pages                        pages held now, counted against the quota:
                             (bytes_allocated + cached_bytes) / page_size
peak_pages                   max_memory / page_size
blocks                       blocks held now
max_pages                    the quota in pages; 0 = none
numpy_pages                  pages in blocks that live numpy arrays use (slabs included);
                             they outlive a destroy until numpy frees them
dirtied_bytes                bytes it gave back dirty (cumulative): its scrub bill
scrubbed_bytes               bytes of its dirt zeroed (or dropped) so far, by anyone
scrub_idle_cpu_seconds       scrubber CPU time spent on its dirt while a CPU was idle
scrub_deadline_cpu_seconds   scrubber CPU time spent on it past the scrub deadline
scrub_alloc_cpu_seconds      allocators' time zeroing its dirt before reuse (xenheap.charges
                             says how each is measured; release_unused cleans no dirt)
===========================  ===========================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict, cast

import numpy as np
import psutil

from native_kernels import check
from native_kernels.counters import snapshot
from native_kernels.domain import domain_row
from native_kernels.layout import (
    ABORT_HIST_BUCKETS,
    D_ALLOCS,
    D_BLOCKS,
    D_DIRTIED_PAGES,
    D_FREES,
    D_ID,
    D_MAX_PAGES,
    D_NUMPY_PAGES,
    D_PAGES,
    D_PARKED_COUNT,
    D_PARKS,
    D_PEAK,
    D_REUSED,
    D_REUSED_PAGES,
    D_STATE,
    D_TOTAL_PAGES,
    D_UNPARKED,
    DOM_ALIVE,
    FRAME_TABLE_BYTES_PER_PAGE,
    L_COUNT,
    M_BAD_ARRAY_FREES,
    M_PARKS,
    M_PEAK_PAGES,
    M_REUSED,
    M_TOTAL_PAGES,
    M_UNPARKED,
    M_USED_PAGES,
    N_ABORT_HIST,
    N_ABORT_WAIT_MAX_NS,
    N_ABORT_WAIT_NS,
    N_ABORTS,
    N_ALLOC_SCRUBBED,
    N_ALLOCS,
    N_FREE,
    N_FREES,
    N_NEED_SCRUB,
    N_PAGES,
    N_RELEASED,
    N_SCRUB_NS,
    N_SCRUB_PASSES,
    N_SCRUBBED,
    N_SYNC_SCRUBBED,
    N_UNMAPPED,
    NUMPY_PARK_ORDERS,
)
from xenheap import prim
from xenheap.charges import DomainCharges

if TYPE_CHECKING:
    from xenheap.domain import Domain
    from xenheap.heap import Heap

__all__ = ["DomainStats", "HeapStats", "NodeStats", "dump", "heap_resident_bytes"]


class NodeStats(TypedDict):
    """One node's counters (see the module docstring for each field)."""

    node: int
    cpus: list[int]
    os_node: int | None
    total_pages: int
    free_pages: int
    dirty_pages: int
    free_by_order: dict[int, int]
    num_allocations: int
    num_frees: int
    scrubbed_pages: int
    alloc_scrubbed_pages: int
    sync_scrubbed_pages: int
    unmapped_pages: int
    released_bytes: int
    scrub_passes: int
    aborts: int
    abort_wait_seconds: float
    abort_wait_max_seconds: float
    abort_wait_p99_seconds: float
    scrub_seconds: float
    scrub_bytes_per_second: float
    scrubber: str
    scrubber_errors: int


class PoolStats(TypedDict):
    """What a Python memory pool reports (pyarrow's MemoryPool), for a heap or a domain."""

    bytes_allocated: int
    max_memory: int
    total_bytes_allocated: int
    num_allocations: int
    num_frees: int
    cached_bytes: int


class HeapStats(PoolStats):
    """The heap's counters (see the module docstring for each field)."""

    total_pages: int
    free_pages: int
    dirty_pages: int
    allocated_pages: int
    page_size: int
    max_order: int
    scrub_mode: str
    debug: bool
    domains: int
    frame_table_bytes: int
    released_bytes: int
    process_resident_bytes: int
    bad_array_frees: int
    scrub_cpu_seconds: float
    scrub_idle_cpu_seconds: float
    scrub_deadline_cpu_seconds: float
    domain_charges: list[DomainCharges]
    nodes: list[NodeStats]


class DomainStats(PoolStats):
    """A domain's counters (see the module docstring for each field)."""

    pages: int
    peak_pages: int
    blocks: int
    max_pages: int
    numpy_pages: int
    dirtied_bytes: int
    scrubbed_bytes: int
    scrub_idle_cpu_seconds: float
    scrub_deadline_cpu_seconds: float
    scrub_alloc_cpu_seconds: float


INVARIANTS = {
    check.BAD_LINK: "a list's prev/next/tail links disagree",
    check.BAD_COUNT: "a free list's chunk count differs from its length",
    check.MISALIGNED: "a chunk is not aligned to its order within its node",
    check.BAD_ORDER: "a chunk head's order differs from its free list's",
    check.OVERLAP: "a page is in two chunks or blocks",
    check.LOST_PAGE: "a page is in no free chunk and no live domain's block",
    check.CLEAN_AFTER_DIRTY: "a clean chunk follows a dirty one on a free list",
    check.FIRST_DIRTY_PAST_DIRTY: "a page before first_dirty needs scrubbing",
    check.UNMERGED_BUDDIES: "two free buddies of the same order were not merged",
    check.FREE_COUNT: "a node's free-page counter differs from its free lists",
    check.DIRTY_COUNT: "a node's dirty-page counter (node_need_scrub) differs from its lists",
    check.BAD_STATE: "a page's state disagrees with the list that holds it",
    check.DIRTY_IN_USE: "an allocated page still needs scrubbing",
    check.BAD_OWNER: "a block's owner is not the domain whose list holds it",
    check.DOMAIN_COUNT: "a domain's page or block counter differs from its list",
    check.DYING_DOMAIN: "a destroyed domain holds a block no numpy array uses, or none",
}

_NS = 1e-9  # seconds per nanosecond
# mincore in windows of this many bytes, so its vector stays small (64 KiB per window).
_RESIDENT_WINDOW = 256 << 20

_PARK_ORDERS = np.arange(NUMPY_PARK_ORDERS, dtype=np.int64)


def _cached_bytes(dom: Domain) -> int:
    """Bytes of the blocks ``dom`` freed with free() and parked for its own reuse
    (xenheap.reuse)."""
    reuse = dom._reuse
    return reuse.cached_bytes() if reuse is not None else 0


def _python_reuse(heap: Heap) -> tuple[int, int, int, int, int]:
    """(blocks taken back, their pages, blocks parked, parked blocks that went on to the
    heap, bytes parked now) by the Python API's reuse caches of ``heap``: the live domains'
    and, folded in when each was destroyed, the others' (none parked any more)."""
    with heap._lock:  # destroy() moves a domain's counters to the heap's under it
        hits, pages, parks, returned = heap._reuse_retired
        doms = list(heap._domains)
    cached = 0
    for dom in doms:
        if dom._reuse is not None:
            hits += dom._reuse.hits
            pages += dom._reuse.hit_pages
            parks += dom._reuse.parks
            returned += dom._reuse.returned
            cached += dom._reuse.cached_bytes()
    return hits, pages, parks, returned, cached


def _numpy_parked_pages(rows: np.ndarray) -> int:
    """Pages of the blocks numpy freed that domain rows ``rows`` (one, or a 2-D array of
    them) keep parked for their next arrays (native_kernels.parked)."""
    counts = rows[..., D_PARKED_COUNT:D_PARKED_COUNT + NUMPY_PARK_ORDERS]
    return int((counts << _PARK_ORDERS).sum())


def _p99_ns(hist: np.ndarray) -> int:
    total = int(hist.sum())
    if total == 0:
        return 0
    rank = -(-total * 99 // 100)
    seen = 0
    for bucket, count in enumerate(hist):
        seen += int(count)
        if seen >= rank:
            return (1 << (bucket + 1)) - 1
    return (1 << ABORT_HIST_BUCKETS) - 1


def node_stats(heap: Heap, rows: np.ndarray, counts: np.ndarray) -> list[NodeStats]:
    """Per-node stats from snapshots of the node rows and the list chunk counts."""
    out = []
    scrubbers = heap.scrubbers
    page_size = heap.page_size
    for node in heap.topology.nodes:
        row = rows[node.id]
        scrub_s = float(row[N_SCRUB_NS]) * _NS
        scrubber = scrubbers[heap._scrubber_of[node.id]] if scrubbers else None
        out.append(NodeStats(
            node=node.id,
            cpus=list(node.cpus),
            os_node=node.os_node,
            total_pages=int(row[N_PAGES]),
            free_pages=int(row[N_FREE]),
            dirty_pages=int(row[N_NEED_SCRUB]),
            free_by_order={order: int(c) << order
                           for order, c in enumerate(counts[node.id]) if c},
            num_allocations=int(row[N_ALLOCS]),
            num_frees=int(row[N_FREES]),
            scrubbed_pages=int(row[N_SCRUBBED]),
            alloc_scrubbed_pages=int(row[N_ALLOC_SCRUBBED]),
            sync_scrubbed_pages=int(row[N_SYNC_SCRUBBED]),
            unmapped_pages=int(row[N_UNMAPPED]),
            released_bytes=int(row[N_RELEASED]) * page_size,
            scrub_passes=int(row[N_SCRUB_PASSES]),
            aborts=int(row[N_ABORTS]),
            abort_wait_seconds=int(row[N_ABORT_WAIT_NS]) * _NS,
            abort_wait_max_seconds=int(row[N_ABORT_WAIT_MAX_NS]) * _NS,
            abort_wait_p99_seconds=_p99_ns(
                row[N_ABORT_HIST:N_ABORT_HIST + ABORT_HIST_BUCKETS]) * _NS,
            scrub_seconds=scrub_s,
            scrub_bytes_per_second=(int(row[N_SCRUBBED]) * page_size / scrub_s
                                    if scrub_s > 0 else 0.0),
            scrubber=scrubber.state if scrubber else "none",
            scrubber_errors=scrubber.errors if scrubber else 0,
        ))
    return out


def _snapshots(heap: Heap) -> tuple[np.ndarray, np.ndarray]:
    state = heap._state
    lists = state["lists"]
    counts = snapshot(lists.reshape(-1, lists.shape[2]))[:, L_COUNT].reshape(lists.shape[:2])
    return snapshot(state["nodes"]), counts


def _domain_charges(heap: Heap) -> list[DomainCharges]:
    """The charge book, with the allocators' latest work drained into it first."""
    heap._charges.drain_allocators(heap._state["nodes"], heap.nodes)
    return heap._charges.all()


def heap_stats(heap: Heap) -> HeapStats:
    """What Heap.stats() returns; fields documented in this module's docstring."""
    page_size = heap.page_size
    hits, hit_pages, parks, returned, cached = _python_reuse(heap)
    rows, counts = _snapshots(heap)
    nodes = node_stats(heap, rows, counts)
    free = sum(n["free_pages"] for n in nodes)
    doms = snapshot(heap._state["doms"])
    alive = doms[:, D_STATE] == DOM_ALIVE
    cached += _numpy_parked_pages(doms[alive]) * page_size
    meta = snapshot(heap._state["meta"].reshape(1, -1))[0]
    return HeapStats(
        # Read apart, so a block parked or taken back meanwhile could make it dip below 0.
        bytes_allocated=max(0, int(meta[M_USED_PAGES]) * page_size - cached),
        max_memory=int(meta[M_PEAK_PAGES]) * page_size,
        total_bytes_allocated=(int(meta[M_TOTAL_PAGES]) + hit_pages) * page_size,
        num_allocations=sum(n["num_allocations"] for n in nodes) + int(meta[M_REUSED]) + hits,
        # A parked block is freed (by the user) once; the heap counts it again when it goes
        # on to the free lists.
        num_frees=(sum(n["num_frees"] for n in nodes) + int(meta[M_PARKS]) + parks
                   - int(meta[M_UNPARKED]) - returned),
        cached_bytes=cached,
        total_pages=heap.total_pages,
        free_pages=free,
        dirty_pages=sum(n["dirty_pages"] for n in nodes),
        allocated_pages=heap.total_pages - free,
        page_size=page_size,
        max_order=heap.max_order,
        scrub_mode=heap.scrub_mode,
        debug=heap.debug,
        domains=int(np.count_nonzero(alive)),
        frame_table_bytes=heap.total_pages * FRAME_TABLE_BYTES_PER_PAGE,
        released_bytes=sum(n["released_bytes"] for n in nodes),
        process_resident_bytes=psutil.Process().memory_info().rss,
        bad_array_frees=int(meta[M_BAD_ARRAY_FREES]),
        scrub_cpu_seconds=sum((s.cpu_seconds for s in heap.scrubbers), 0.0),
        scrub_idle_cpu_seconds=sum((s.idle_cpu_seconds for s in heap.scrubbers), 0.0),
        scrub_deadline_cpu_seconds=sum((s.deadline_cpu_seconds for s in heap.scrubbers), 0.0),
        domain_charges=_domain_charges(heap),
        nodes=nodes,
    )


def domain_stats(dom: Domain) -> DomainStats:
    """What Domain.stats() returns; fields documented in this module's docstring."""
    heap = dom.heap
    heap._refuse_if_forked()
    heap._charges.drain_allocators(heap._state["nodes"], heap.nodes)
    charges = heap._charges.of(dom.id)  # scrubbing goes on after a destroy: always fresh
    billed: dict[str, float] = {
        "scrubbed_bytes": charges["scrubbed_bytes"],
        "scrub_idle_cpu_seconds": charges["idle_cpu_seconds"],
        "scrub_deadline_cpu_seconds": charges["deadline_cpu_seconds"],
        "scrub_alloc_cpu_seconds": charges["alloc_cpu_seconds"],
    }
    row = domain_row(heap._state["doms"], dom._slot)
    if row[D_ID] != dom.id:  # the slot went to another domain after this one died
        return cast(DomainStats, {**(dom._final_stats or _EMPTY_DOMAIN), **billed})
    page_size = heap.page_size
    cached = _cached_bytes(dom) + _numpy_parked_pages(row) * page_size
    reuse = dom._reuse
    hits, hit_pages, parks, returned = ((reuse.hits, reuse.hit_pages, reuse.parks,
                                         reuse.returned) if reuse else (0, 0, 0, 0))
    out = DomainStats(
        bytes_allocated=max(0, int(row[D_PAGES]) * page_size - cached),
        max_memory=int(row[D_PEAK]) * page_size,
        total_bytes_allocated=(int(row[D_TOTAL_PAGES]) + int(row[D_REUSED_PAGES])
                               + hit_pages) * page_size,
        num_allocations=int(row[D_ALLOCS]) + int(row[D_REUSED]) + hits,
        num_frees=(int(row[D_FREES]) + int(row[D_PARKS]) + parks - int(row[D_UNPARKED])
                   - returned),
        cached_bytes=cached,
        pages=int(row[D_PAGES]),
        peak_pages=int(row[D_PEAK]),
        blocks=int(row[D_BLOCKS]),
        max_pages=int(row[D_MAX_PAGES]),
        numpy_pages=int(row[D_NUMPY_PAGES]),
        dirtied_bytes=int(row[D_DIRTIED_PAGES]) * page_size,
        scrubbed_bytes=charges["scrubbed_bytes"],
        scrub_idle_cpu_seconds=charges["idle_cpu_seconds"],
        scrub_deadline_cpu_seconds=charges["deadline_cpu_seconds"],
        scrub_alloc_cpu_seconds=charges["alloc_cpu_seconds"],
    )
    return out


_EMPTY_DOMAIN = DomainStats(bytes_allocated=0, max_memory=0, total_bytes_allocated=0,
                            num_allocations=0, num_frees=0, cached_bytes=0, pages=0,
                            peak_pages=0, blocks=0, max_pages=0, numpy_pages=0,
                            dirtied_bytes=0, scrubbed_bytes=0, scrub_idle_cpu_seconds=0.0,
                            scrub_deadline_cpu_seconds=0.0, scrub_alloc_cpu_seconds=0.0)


def heap_resident_bytes(heap: Heap) -> int:
    """Bytes of the heap's arenas in RAM now (mincore over every arena).

    Not part of ``stats()``, which progress lines poll many times a second: this walks the
    whole heap, about 2 ms per GiB. 0 for the arenas of a closed heap.
    """
    heap._refuse_if_forked()
    pages = 0
    for arena in heap._arenas:
        for offset in range(0, arena.nbytes, _RESIDENT_WINDOW):
            if arena.closed:
                break
            try:
                pages += prim.resident_pages(arena.address + offset,
                                             min(_RESIDENT_WINDOW, arena.nbytes - offset))
            except OSError:  # unmapped meanwhile by close()
                break
    return pages * prim.PAGE_SIZE


def dump(heap: Heap) -> str:
    """Free chunks per node and order, then unscrubbed pages per node (after Xen's 'H'
    debug key, per order instead of per zone)."""
    rows, counts = _snapshots(heap)
    lines = [f"xenheap: heap info ({heap!r})"]
    for node in range(heap.nodes):
        for order in range(heap.max_order + 1):
            chunks = int(counts[node, order])
            if chunks:
                lines.append(f"heap[node={node}][order={order}] -> {chunks} chunks, "
                             f"{chunks << order} pages")
    for node in range(heap.nodes):
        lines.append(f"Node {node} has {int(rows[node, N_NEED_SCRUB])} unscrubbed pages")
    return "\n".join(lines)
