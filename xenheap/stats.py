"""Statistics and the debug dump: every counter named and documented.

``Heap.stats()`` returns a dict (heap-wide fields, then ``nodes``: one dict per node):

=========================  ===========================================================
total_pages                pages in the heap (all nodes)
free_pages                 pages on the free lists, clean or dirty
dirty_pages                free pages waiting to be zeroed (Xen's node_need_scrub, summed)
allocated_pages            total_pages - free_pages
page_size, max_order       the page size in bytes and the largest chunk order
scrub_mode, debug          as given to Heap()
domains                    live domains
released_bytes             bytes given back to the OS by release_unused (cumulative)
resident_bytes             the process's resident set size (RSS), all memory included
bad_array_frees            numpy frees of memory the heap did not give out (ignored)
frame_table_bytes          bytes of per-page metadata (the frame table)
scrub_cpu_seconds          CPU time of the scrubber threads as the OS counts it
                           (time.thread_time), polling included
scrub_idle_cpu_seconds     the part spent scrubbing because a CPU was idle
scrub_deadline_cpu_seconds the part spent scrubbing at normal priority because a node
                           stayed dirty past scrub_deadline (no CPU was idle)
=========================  ===========================================================

Per node:

=========================  ===========================================================
node, cpus, os_node        index, CPUs, the machine node its arena is bound to (or None)
total_pages                pages in the node
free_pages, dirty_pages    as above, for this node
free_by_order              {order: free pages in chunks of that order}
allocations, frees         blocks allocated from / freed to the node
scrubbed_pages             pages zeroed by the background scrubber
alloc_scrubbed_pages       pages zeroed by allocators (scrub-on-allocate)
sync_scrubbed_pages        pages zeroed on the free path in "sync" mode
unmapped_pages             dirty pages made clean with MADV_DONTNEED instead of zeroing,
                           because they were not in RAM (scrubber or allocator)
released_pages             pages given back to the OS by release_unused (cumulative)
scrub_passes               chunks the scrubber finished and moved to the clean head
aborts                     scrubs stopped because an allocator, a merge or check() claimed
                           the chunk
abort_wait_ns_total        time allocators spent in the abort handshake
abort_wait_ns_max          the longest such wait
abort_wait_ns_p99          99th percentile wait (upper edge of its log2 bucket)
scrub_seconds              time the scrubber spent zeroing
scrub_bytes_per_second     scrubbed_pages * page_size / scrub_seconds (0 before any)
scrubber                   "starting", "scrubbing", "idle", "error", "stopped" or "none"
scrubber_errors            exceptions the scrubber serving this node caught and logged
=========================  ===========================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import psutil

from native_kernels import check
from native_kernels.counters import snapshot
from native_kernels.layout import (
    ABORT_HIST_BUCKETS,
    D_STATE,
    DOM_ALIVE,
    FRAME_TABLE_BYTES_PER_PAGE,
    L_COUNT,
    M_BAD_ARRAY_FREES,
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
)

if TYPE_CHECKING:
    from xenheap.heap import Heap

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


def node_stats(heap: Heap, rows: np.ndarray, counts: np.ndarray) -> list[dict]:
    """Per-node dicts from snapshots of the node rows and the list chunk counts."""
    out = []
    scrubbers = heap.scrubbers
    for node in heap.topology.nodes:
        row = rows[node.id]
        scrub_s = float(row[N_SCRUB_NS]) / 1e9
        scrubber = scrubbers[heap._scrubber_of[node.id]] if scrubbers else None
        out.append({
            "node": node.id,
            "cpus": list(node.cpus),
            "os_node": node.os_node,
            "total_pages": int(row[N_PAGES]),
            "free_pages": int(row[N_FREE]),
            "dirty_pages": int(row[N_NEED_SCRUB]),
            "free_by_order": {order: int(c) << order
                              for order, c in enumerate(counts[node.id]) if c},
            "allocations": int(row[N_ALLOCS]),
            "frees": int(row[N_FREES]),
            "scrubbed_pages": int(row[N_SCRUBBED]),
            "alloc_scrubbed_pages": int(row[N_ALLOC_SCRUBBED]),
            "sync_scrubbed_pages": int(row[N_SYNC_SCRUBBED]),
            "unmapped_pages": int(row[N_UNMAPPED]),
            "released_pages": int(row[N_RELEASED]),
            "scrub_passes": int(row[N_SCRUB_PASSES]),
            "aborts": int(row[N_ABORTS]),
            "abort_wait_ns_total": int(row[N_ABORT_WAIT_NS]),
            "abort_wait_ns_max": int(row[N_ABORT_WAIT_MAX_NS]),
            "abort_wait_ns_p99": _p99_ns(row[N_ABORT_HIST:N_ABORT_HIST + ABORT_HIST_BUCKETS]),
            "scrub_seconds": scrub_s,
            "scrub_bytes_per_second": (int(row[N_SCRUBBED]) * heap.page_size / scrub_s
                                       if scrub_s > 0 else 0.0),
            "scrubber": scrubber.state if scrubber else "none",
            "scrubber_errors": scrubber.errors if scrubber else 0,
        })
    return out


def _snapshots(heap: Heap) -> tuple[np.ndarray, np.ndarray]:
    state = heap._state
    lists = state["lists"]
    counts = snapshot(lists.reshape(-1, lists.shape[2]))[:, L_COUNT].reshape(lists.shape[:2])
    return snapshot(state["nodes"]), counts


def heap_stats(heap: Heap) -> dict:
    """The dict Heap.stats() returns; fields documented in this module's docstring."""
    rows, counts = _snapshots(heap)
    nodes = node_stats(heap, rows, counts)
    free = sum(n["free_pages"] for n in nodes)
    doms = snapshot(heap._state["doms"])
    return {
        "total_pages": heap.total_pages,
        "free_pages": free,
        "dirty_pages": sum(n["dirty_pages"] for n in nodes),
        "allocated_pages": heap.total_pages - free,
        "page_size": heap.page_size,
        "max_order": heap.max_order,
        "scrub_mode": heap.scrub_mode,
        "debug": heap.debug,
        "domains": int(np.count_nonzero(doms[:, D_STATE] == DOM_ALIVE)),
        "frame_table_bytes": heap.total_pages * FRAME_TABLE_BYTES_PER_PAGE,
        "released_bytes": sum(n["released_pages"] for n in nodes) * heap.page_size,
        "resident_bytes": psutil.Process().memory_info().rss,
        "bad_array_frees": int(snapshot(heap._state["meta"].reshape(1, -1))[0, M_BAD_ARRAY_FREES]),
        "scrub_cpu_seconds": sum(s.cpu_seconds for s in heap.scrubbers),
        "scrub_idle_cpu_seconds": sum(s.idle_cpu_seconds for s in heap.scrubbers),
        "scrub_deadline_cpu_seconds": sum(s.deadline_cpu_seconds for s in heap.scrubbers),
        "nodes": nodes,
    }


def dump(heap: Heap) -> str:
    """Xen's 'H' debug key, per order instead of per zone, then unscrubbed pages per node."""
    rows, counts = _snapshots(heap)
    lines = [f"'H' pressed -> dumping heap info ({heap!r})"]
    for node in range(heap.nodes):
        for order in range(heap.max_order + 1):
            chunks = int(counts[node, order])
            if chunks:
                lines.append(f"heap[node={node}][order={order}] -> {chunks} chunks, "
                             f"{chunks << order} pages")
    for node in range(heap.nodes):
        lines.append(f"Node {node} has {int(rows[node, N_NEED_SCRUB])} unscrubbed pages")
    return "\n".join(lines)
