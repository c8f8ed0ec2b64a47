"""Statistics: every counter named, typed and documented, with its unit (xenheap.collect
reads them, and writes the debug dump).

Units are in the names, as jemalloc's are: ``_bytes`` and ``_pages`` are counts of bytes and
of pages (``page_size`` bytes each), ``_seconds`` is a float in seconds; a count says what
it counts (``domains``, ``num_allocations``). The exceptions say their unit below:
``max_memory`` (bytes, pyarrow's name), ``page_size``, ``max_order``, ``free_by_order``, and
the settings ``scrub_mode``, ``scrubber`` and ``debug``. The four allocation figures use the
names of Python's memory pools (pyarrow's ``MemoryPool``) with the same meaning, in bytes of
whole pages: a block of order ``k`` counts ``page_size << k`` bytes, and a numpy slab counts
as its whole block.

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
dirty_pages                  pages waiting to be zeroed (Xen's node_need_scrub, summed):
                             free ones, and those an allocator has just taken and is
                             zeroing (off free_pages already, so the two may cross)
allocated_pages              total_pages - free_pages: the pages in domains' blocks, and any
                             release_unused holds off the free lists for a moment
page_size                    the page size in bytes
max_order                    the largest chunk order
scrub_mode, debug            as given to Heap()
domains                      live domains
released_bytes               bytes given back to the OS by release_unused (cumulative)
process_resident_bytes       the whole process's resident set size (RSS), all memory
                             included; :func:`heap_resident_bytes` is the heap's own part
bad_array_frees              numpy frees and reallocs of memory that is no live array
                             of the domain (ignored)
frame_table_bytes            bytes of per-page metadata (the frame table)
scrub_cpu_seconds            CPU time of the scrubber threads as the OS counts it
                             (time.thread_time), polling and chores included
scrub_idle_cpu_seconds       the part charged to domains by slices run because a CPU was
                             idle (each slice with the thread's time since the charge
                             before it: xenheap.charges)
scrub_deadline_cpu_seconds   the part charged by slices run at normal priority because a
                             node stayed dirty past scrub_deadline (no CPU was idle)
scrub_uncharged_cpu_seconds  the rest: time since each scrubber's last charge (all of a
                             scrubber whose nodes stayed clean), charged to nobody yet
domain_charges               per domain (live, and the last 1,024 destroyed): who paid for
                             cleaning its dirt (xenheap.charges.DomainCharges); their idle
                             and deadline seconds add up to scrub_idle_cpu_seconds and
                             scrub_deadline_cpu_seconds, less those of the destroyed
                             domains the list has let go
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
                             because they were not in RAM (scrubber or allocator; in
                             neither of the two counts above)
released_bytes               bytes given back to the OS by release_unused (cumulative)
scrub_passes                 chunks the scrubber finished and moved to the clean head
aborts                       scrubs stopped because an allocator, a merge or check() claimed
                             the chunk
abort_wait_seconds           total time allocators spent in the abort handshake
abort_wait_max_seconds       the longest such wait
abort_wait_p99_seconds       99th percentile wait (upper edge of its power-of-two bucket)
scrub_seconds                time the scrubber spent cleaning (zeroing, and dropping pages
                             not in RAM)
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
                             whose work found a charge slot (else unattributed, -1)
scrub_idle_cpu_seconds       scrubber CPU time spent on its dirt while a CPU was idle
scrub_deadline_cpu_seconds   scrubber CPU time spent on it past the scrub deadline
scrub_alloc_cpu_seconds      allocators' time zeroing its dirt before reuse (xenheap.charges
                             says how each is measured; release_unused cleans no dirt)
===========================  ===========================================================
"""

from __future__ import annotations

from typing import TypedDict

from native_kernels import check
from xenheap.charges import DomainCharges

__all__ = ["INVARIANTS", "DomainStats", "HeapStats", "NodeStats", "PoolStats"]


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
    scrub_uncharged_cpu_seconds: float
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
    check.DOMAIN_COUNT: "a domain's page or block counter differs from its list, or the "
                        "count of domains waiting to be relinquished is off",
    check.DYING_DOMAIN: "a destroyed domain whose memory was relinquished holds a block no "
                        "numpy array uses, or none; or a domain not destroyed waits for "
                        "relinquishing",
    check.BAD_PARKED: "a domain's stack of parked numpy blocks disagrees with its count or "
                      "bound, holds a block that is not one of the domain's unpinned blocks "
                      "of its order, or outlived the domain's destroy",
}
