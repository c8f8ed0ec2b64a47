"""The background scrubber's kernel: Xen's scrub_free_pages, one bounded step at a time.

Under the node's lock take the dirty chunk at a list tail (highest order first) and mark it
BUDDY_SCRUBBING; drop the lock; zero its dirty pages from first_dirty on, one granule at a
time, checking for BUDDY_SCRUB_ABORT after each. The chunk stays on its free list all the
while, so an allocator can still claim it: it sets BUDDY_SCRUB_ABORT under the lock and waits
for BUDDY_NOT_SCRUBBING (check_and_stop_scrub). Pages already zeroed stay clean whatever
happens: need_scrub and node_need_scrub drop granule by granule, and first_dirty records how
far we got.
"""

from numba import njit, types

from native_kernels.atomics import (
    atomic_cas,
    atomic_load,
    atomic_store,
    fetch_add,
    monotonic_ns,
    usleep,
)
from native_kernels.buddy import page_address
from native_kernels.cleaning import residency, zero_dirty_runs
from native_kernels.jit import INTERNAL
from native_kernels.layout import (
    BUDDY_NOT_SCRUBBING,
    BUDDY_SCRUB_ABORT,
    BUDDY_SCRUBBING,
    E_FAULT,
    FAULT_SCRUB_FAIL,
    FAULT_SCRUB_STALL,
    INVALID_DIRTY_IDX,
    L_TAIL,
    M_CLOSED,
    M_DEBUG,
    M_FAULT,
    M_FAULT_ARG,
    M_MAX_ORDER,
    N_LOCK,
    N_NEED_SCRUB,
    N_SCRUB_NS,
    N_SCRUB_PASSES,
    N_SCRUBBED,
    N_SCRUBBING,
    NIL,
    PAGE_SHIFT,
    PG_FIRST_DIRTY,
    PG_SCRUB_STATE,
    SCRUB_PATTERN,
)
from native_kernels.locks import spin_lock, spin_lock_cond, spin_unlock
from native_kernels.page_list import page_list_add_scrub, page_list_del

NOTHING_DIRTY = -1


@njit(nogil=True, cache=True, **INTERNAL)
def _let_go(ft32, ft8, head, progress, size):
    """Hand the chunk back without the lock, keeping the progress made (release order).

    The chunk stays where it is, among the dirty ones, so first_dirty stays valid even when
    every page is clean: it then names the last page, a lower bound as the field requires.
    Whoever aborted us may not take the chunk (check() only wants it still), and the next
    scrub of it finds nothing to zero and moves it to the clean head.
    """
    atomic_store(ft32, (PG_FIRST_DIRTY, head), min(progress, size - 1) + 1)
    atomic_store(ft8, (PG_SCRUB_STATE, head), BUDDY_NOT_SCRUBBING)


@njit(nogil=True, cache=True)
def scrub_free_pages(hs, node, budget_pages, granule_pages, charges):
    """Scrub up to about ``budget_pages`` of one dirty chunk of ``node``, adding the pages
    cleaned to ``charges`` by the domain that dirtied them (cleaning.charge_pages).

    Returns the pages cleaned (possibly 0), NOTHING_DIRTY when no free list of the node
    has a dirty chunk at its tail or another thread is scrubbing the node, or E_FAULT when
    an injected fault fired.
    """
    # One scrubber per node at a time (Xen's node_scrubbing mask): two would both take the
    # tail chunk, and the loser would zero a block already handed out.
    nodes = hs.nodes
    if not atomic_cas(nodes, (node, N_SCRUBBING), 0, 1):
        return NOTHING_DIRTY
    result = _scrub_one_chunk(hs, node, budget_pages, granule_pages, charges)
    atomic_store(nodes, (node, N_SCRUBBING), 0)
    return result


@njit(nogil=True, cache=True, **INTERNAL)
def _scrub_one_chunk(hs, node, budget_pages, granule_pages, charges):
    ft32, ft8, nodes, lists, meta = hs.ft32, hs.ft8, hs.nodes, hs.lists, hs.meta
    spin_lock(nodes, node, N_LOCK)
    head = -1
    order = 0
    for j in range(meta[M_MAX_ORDER], -1, -1):
        link = lists[node, j, L_TAIL]
        if link != NIL and ft32[PG_FIRST_DIRTY, link - 1] != INVALID_DIRTY_IDX:
            head = link - 1
            order = j
            break
    if head < 0:
        spin_unlock(nodes, node, N_LOCK)
        return NOTHING_DIRTY
    atomic_store(ft8, (PG_SCRUB_STATE, head), BUDDY_SCRUBBING)
    start = ft32[PG_FIRST_DIRTY, head] - 1
    spin_unlock(nodes, node, N_LOCK)

    fault = atomic_load(meta, M_FAULT)
    fault_arg = atomic_load(meta, M_FAULT_ARG)
    started_ns = monotonic_ns()
    value = SCRUB_PATTERN if meta[M_DEBUG] != 0 else 0
    size = 1 << order
    addr = page_address(nodes, node, head)
    # Which pages of this step are in RAM, asked once (none to ask in debug mode, where
    # the pattern is written whatever is resident).
    resident = residency(addr + (start << PAGE_SHIFT),
                         min(size - start, budget_pages + granule_pages) if value == 0 else 0)
    cleaned = 0
    i = start
    while i < size:
        end = min(i + granule_pages, size)
        cleared, zeroed_now = zero_dirty_runs(ft32, ft8, nodes, node, addr, head, i, end,
                                              value, types.boolean(True), charges,
                                              resident[i - start:end - start])
        if cleared:
            fetch_add(nodes, (node, N_NEED_SCRUB), -cleared)
            fetch_add(nodes, (node, N_SCRUBBED), zeroed_now)
            cleaned += cleared
        i = end
        if fault == FAULT_SCRUB_STALL:
            usleep(fault_arg)  # a scrubber preempted while it holds the chunk
            fault = 0
        if fault == FAULT_SCRUB_FAIL and i - start >= fault_arg:
            _let_go(ft32, ft8, head, i, size)
            return E_FAULT
        if i < size and (atomic_load(ft8, (PG_SCRUB_STATE, head)) == BUDDY_SCRUB_ABORT
                         or i - start >= budget_pages):
            _let_go(ft32, ft8, head, i, size)
            fetch_add(nodes, (node, N_SCRUB_NS), monotonic_ns() - started_ns)
            return cleaned

    fetch_add(nodes, (node, N_SCRUB_NS), monotonic_ns() - started_ns)
    if spin_lock_cond(nodes, node, N_LOCK, ft8, (PG_SCRUB_STATE, head), BUDDY_SCRUB_ABORT):
        page_list_del(ft32, lists, node, order, head)
        page_list_add_scrub(ft32, ft8, lists, node, order, head, INVALID_DIRTY_IDX)
        fetch_add(nodes, (node, N_SCRUB_PASSES), 1)
        spin_unlock(nodes, node, N_LOCK)
    else:
        _let_go(ft32, ft8, head, size, size)
    return cleaned


@njit(nogil=True, cache=True)
def scrub_nodes(hs, node_list, stop, budget_pages, granule_pages, until_ns, charges):
    """Scrub the nodes of ``node_list`` in turn, one bounded step each, until none has a
    dirty chunk, ``stop[0]`` is set or CLOCK_MONOTONIC passes ``until_ns``: the scrubber
    thread needs the GIL only between such slices. The pages cleaned go into ``charges``
    by the domain that dirtied them.

    Returns the pages cleaned, or E_FAULT when an injected fault fired.
    """
    meta = hs.meta
    cleaned = 0
    while (atomic_load(stop, 0) == 0 and atomic_load(meta, M_CLOSED) == 0
           and monotonic_ns() < until_ns):
        busy = False
        for node in node_list:
            got = scrub_free_pages(hs, node, budget_pages, granule_pages, charges)
            if got == E_FAULT:
                return E_FAULT
            if got != NOTHING_DIRTY:
                busy = True
                cleaned += got
        if not busy:
            break
    return cleaned
