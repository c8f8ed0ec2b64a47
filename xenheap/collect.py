"""Collecting the statistics: the heap's counters read (atomically, one row at a time) into
the shapes xenheap.stats defines and documents, and the debug dump."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from native_kernels.counters import snapshot
from native_kernels.domain_life import domain_row
from native_kernels.layout import (
    ABORT_HIST_BUCKETS,
    D_ALLOCS,
    D_BLOCKS,
    D_DIRTIED_PAGES,
    D_FREES,
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
from xenheap.stats import DomainStats, HeapStats, NodeStats

if TYPE_CHECKING:
    from xenheap.domain import Domain
    from xenheap.heap import Heap

__all__ = ["domain_stats", "dump", "heap_resident_bytes", "heap_stats"]

_NS = 1e-9  # seconds per nanosecond
# mincore in windows of this many bytes, so its vector stays small (64 KiB per window).
_RESIDENT_WINDOW = 256 << 20

_PARK_ORDERS = np.arange(NUMPY_PARK_ORDERS, dtype=np.int64)


def _cached_bytes(dom: Domain) -> int:
    """Bytes of the blocks ``dom`` freed with free() and parked for its own reuse
    (xenheap.reuse)."""
    reuse = dom.record.reuse
    return reuse.cached_bytes() if reuse is not None else 0


def _python_reuse(heap: Heap) -> tuple[int, int, int, int, int]:
    """(blocks taken back, their pages, blocks parked, parked blocks that went on to the
    heap, bytes parked now) by the Python API's reuse caches of ``heap``: the live domains'
    and, folded in when each was destroyed, the others' (none parked any more)."""
    core = heap.core
    with core.lock:  # a destroy moves a domain's counters to the heap's under it
        hits, pages, parks, returned = core.reuse_retired
        caches = [dom.record.reuse for dom in core.domains]
        # Collected, not yet destroyed; copied in one step: a finalizer may append meanwhile.
        caches += [rec.reuse for rec in list(core.orphans)]
    cached = 0
    for reuse in caches:
        if reuse is not None:
            hits += reuse.hits
            pages += reuse.hit_pages
            parks += reuse.parks
            returned += reuse.returned
            cached += reuse.cached_bytes()
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
    scrubbers, scrubber_of = heap.scrubbers, heap.core.scrubber_of
    page_size = heap.page_size
    for node in heap.topology.nodes:
        row = rows[node.id]
        scrub_s = float(row[N_SCRUB_NS]) * _NS
        scrubber = scrubbers[scrubber_of[node.id]] if scrubbers else None
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
    state = heap.core.state
    lists = state["lists"]
    counts = snapshot(lists.reshape(-1, lists.shape[2]))[:, L_COUNT].reshape(lists.shape[:2])
    return snapshot(state["nodes"]), counts


def _domain_charges(heap: Heap) -> list[DomainCharges]:
    """The charge book, with the allocators' latest work drained into it first."""
    charges = heap.core.charges
    charges.drain_allocators(heap.core.state["nodes"], heap.nodes)
    return charges.all()


def heap_stats(heap: Heap) -> HeapStats:
    """What Heap.stats() returns; fields documented in this module's docstring."""
    page_size = heap.page_size
    hits, hit_pages, parks, returned, cached = _python_reuse(heap)
    rows, counts = _snapshots(heap)
    nodes = node_stats(heap, rows, counts)
    free = sum(n["free_pages"] for n in nodes)
    doms = snapshot(heap.core.state["doms"])
    alive = doms[:, D_STATE] == DOM_ALIVE
    cached += _numpy_parked_pages(doms[alive]) * page_size
    meta = snapshot(heap.core.state["meta"].reshape(1, -1))[0]
    # Each scrubber's three figures from one moment: they add up.
    figures = [s.cpu_figures for s in heap.scrubbers]
    cpu = sum((f.cpu_seconds for f in figures), 0.0)
    idle = sum((f.idle_cpu_seconds for f in figures), 0.0)
    deadline = sum((f.deadline_cpu_seconds for f in figures), 0.0)
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
        process_resident_bytes=prim.resident_set_bytes(),
        bad_array_frees=int(meta[M_BAD_ARRAY_FREES]),
        scrub_cpu_seconds=cpu,
        scrub_idle_cpu_seconds=idle,
        scrub_deadline_cpu_seconds=deadline,
        scrub_uncharged_cpu_seconds=cpu - idle - deadline,
        domain_charges=_domain_charges(heap),
        nodes=nodes,
    )


def domain_stats(dom: Domain) -> DomainStats:
    """What Domain.stats() returns; fields documented in this module's docstring."""
    heap, core = dom.heap, dom.core
    core.refuse_if_forked()
    core.charges.drain_allocators(core.state["nodes"], heap.nodes)
    # Scrubbing goes on after a destroy: always fresh, and its own entry, which the book
    # lets go HISTORY destroys later.
    charges = core.charges.copy(dom.record.charges)
    row = domain_row(core.state["doms"], dom.slot)
    # Laid to rest: its last row, read before its slot could go to another domain (whose
    # open_domain may have been zeroing the slot while the line above read it).
    if dom.record.final_row is not None:
        row = dom.record.final_row
    page_size = heap.page_size
    cached = _cached_bytes(dom) + _numpy_parked_pages(row) * page_size
    reuse = dom.record.reuse
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



def heap_resident_bytes(heap: Heap) -> int:
    """Bytes of the heap's arenas in RAM now (mincore over every arena).

    Not part of ``stats()``, which progress lines poll many times a second: this walks the
    whole heap, about 2 ms per GiB. 0 for the arenas of a closed heap.
    """
    heap.core.refuse_if_forked()
    pages = 0
    for arena in heap.core.arenas:
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
