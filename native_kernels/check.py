"""The invariant checker (docs/design.md, "Invariants"), for tests and Heap.check().

It takes every node's lock, stops any scrub in progress (so need_scrub and the counters hold
still), walks every free list and every live domain's block list, and returns the first
broken invariant as (code, mfn); (OK, -1) if all hold. Exact when no other call changes the
heap meanwhile (a block in flight is in no list); scrubbers may run.
"""

import numpy as np
from numba import njit

from native_kernels.atomics import atomic_load
from native_kernels.buddy import check_and_stop_scrub
from native_kernels.jit import INTERNAL
from native_kernels.layout import (
    D_BLOCKS,
    D_HEAD,
    D_NUMPY_PAGES,
    D_PAGES,
    D_PARKED,
    D_PARKED_COUNT,
    D_RELINQUISH,
    D_STATE,
    D_TAIL,
    DOM_ALIVE,
    DOM_DYING,
    INVALID_DIRTY_IDX,
    L_COUNT,
    L_HEAD,
    L_TAIL,
    M_MAX_DOMAINS,
    M_MAX_ORDER,
    M_NR_NODES,
    M_NR_PAGES,
    M_RELINQUISH,
    N_BASE,
    N_FREE,
    N_LOCK,
    N_NEED_SCRUB,
    N_PAGES,
    NIL,
    NUMPY_PARK_MAX,
    NUMPY_PARK_ORDERS,
    OWNER_PINNED,
    PG_FIRST_DIRTY,
    PG_NEED_SCRUB,
    PG_NEXT,
    PG_ORDER,
    PG_OWNER,
    PG_PREV,
    PG_STATE,
    PGS_FREE,
    PGS_INUSE,
    SLAB_PARK_MAX,
)
from native_kernels.locks import spin_lock, spin_unlock
from native_kernels.parked import link_word

OK = 0
BAD_LINK = 1  # a list's prev/next/tail links disagree
BAD_COUNT = 2  # a list's chunk count differs from its length
MISALIGNED = 3  # a chunk is not aligned to its order within its node, or crosses the node
BAD_ORDER = 4  # a chunk head's order differs from its list's
OVERLAP = 5  # a page is in two chunks/blocks
LOST_PAGE = 6  # a page is in no free chunk and no live domain's block
CLEAN_AFTER_DIRTY = 7  # a clean chunk follows a dirty one on a free list
FIRST_DIRTY_PAST_DIRTY = 8  # a page before first_dirty has need_scrub set
UNMERGED_BUDDIES = 9  # two free buddies of the same order both sit on free lists
FREE_COUNT = 10  # a node's free-page counter differs from its lists
DIRTY_COUNT = 11  # a node's dirty-page counter differs from its lists
BAD_STATE = 12  # a page's state disagrees with where it is
DIRTY_IN_USE = 13  # an allocated page has need_scrub set
BAD_OWNER = 14  # a block's owner is not the domain whose list holds it
DOMAIN_COUNT = 15  # a domain's page or block counter differs from its list, or M_RELINQUISH
#                   from the domains waiting for relinquish_memory (check_heap is exact
#                   only while no call changes the heap, relinquish_memory included)
DYING_DOMAIN = 16  # a destroyed domain whose memory was relinquished holds a block no numpy
#                   array pins, or none at all; or a live or dead one waits for relinquishing
BAD_PARKED = 17  # a domain's stack of parked numpy blocks (native_kernels.parked) is longer or
#                  shorter than its count or past its bound, holds a block that is not one of
#                  the domain's unpinned blocks of the stack's order, or outlived its destroy


@njit(nogil=True, cache=True, **INTERNAL)
def _mark(seen, mfn, n):
    for p in range(mfn, mfn + n):
        if seen[p]:
            return p
        seen[p] = 1
    return -1


@njit(nogil=True, cache=True, **INTERNAL)
def _check_free_lists(hs, seen, head_order):
    ft32, ft8, nodes, lists, meta = hs.ft32, hs.ft8, hs.nodes, hs.lists, hs.meta
    max_order = meta[M_MAX_ORDER]
    for node in range(meta[M_NR_NODES]):
        base = nodes[node, N_BASE]
        npages = nodes[node, N_PAGES]
        free = 0
        dirty = 0
        for order in range(max_order + 1):
            size = 1 << order
            count = 0
            prev = NIL
            seen_dirty = False
            link = lists[node, order, L_HEAD]
            while link != NIL:
                mfn = link - 1
                count += 1
                if count > npages or ft32[PG_PREV, mfn] != prev:
                    return BAD_LINK, mfn
                rel = mfn - base
                if rel < 0 or (rel & (size - 1)) != 0 or rel + size > npages:
                    return MISALIGNED, mfn
                if ft8[PG_ORDER, mfn] != order:
                    return BAD_ORDER, mfn
                overlap = _mark(seen, mfn, size)
                if overlap >= 0:
                    return OVERLAP, overlap
                head_order[mfn] = order
                first_dirty = atomic_load(ft32, (PG_FIRST_DIRTY, mfn))
                if first_dirty == INVALID_DIRTY_IDX:
                    if seen_dirty:
                        return CLEAN_AFTER_DIRTY, mfn
                    clean_until = size
                else:
                    seen_dirty = True
                    clean_until = first_dirty - 1
                for i in range(size):
                    p = mfn + i
                    if ft8[PG_STATE, p] != PGS_FREE:
                        return BAD_STATE, p
                    if ft8[PG_NEED_SCRUB, p]:
                        if i < clean_until:
                            return FIRST_DIRTY_PAST_DIRTY, p
                        dirty += 1
                free += size
                prev = link
                link = ft32[PG_NEXT, mfn]
            if lists[node, order, L_TAIL] != prev:
                return BAD_LINK, prev - 1
            if atomic_load(lists, (node, order, L_COUNT)) != count:
                return BAD_COUNT, base
        if atomic_load(nodes, (node, N_FREE)) != free:
            return FREE_COUNT, base
        if atomic_load(nodes, (node, N_NEED_SCRUB)) != dirty:
            return DIRTY_COUNT, base
    return OK, -1


@njit(nogil=True, cache=True, **INTERNAL)
def _check_buddies(nodes, meta, head_order):
    pages_per_node = nodes[0, N_PAGES]
    for mfn in range(head_order.shape[0]):
        order = head_order[mfn]
        if order < 0 or order >= meta[M_MAX_ORDER]:
            continue
        node = mfn // pages_per_node
        base = nodes[node, N_BASE]
        buddy = base + ((mfn - base) ^ (1 << order))
        if buddy < base + pages_per_node and head_order[buddy] == order:
            return UNMERGED_BUDDIES, mfn
    return OK, -1


@njit(nogil=True, cache=True, **INTERNAL)
def _check_domains(hs, seen):
    ft32, ft8, doms, meta = hs.ft32, hs.ft8, hs.doms, hs.meta
    nr_pages = meta[M_NR_PAGES]
    waiting = 0  # domains whose memory waits for relinquish_memory
    for slot in range(meta[M_MAX_DOMAINS]):
        state = atomic_load(doms, (slot, D_STATE))
        relinquish = atomic_load(doms, (slot, D_RELINQUISH)) != 0
        if relinquish:
            waiting += 1
            if state != DOM_DYING:
                return DYING_DOMAIN, -1
        if state not in (DOM_ALIVE, DOM_DYING):
            continue
        pages = 0
        pinned_pages = 0
        blocks = 0
        prev = NIL
        link = doms[slot, D_HEAD]
        while link != NIL:
            mfn = link - 1
            blocks += 1
            if blocks > nr_pages or ft32[PG_PREV, mfn] != prev:
                return BAD_LINK, mfn
            owner = atomic_load(ft32, (PG_OWNER, mfn))
            if owner & ~OWNER_PINNED != slot + 1:
                return BAD_OWNER, mfn
            size = 1 << ft8[PG_ORDER, mfn]
            if owner & OWNER_PINNED:
                pinned_pages += size
            elif state == DOM_DYING and not relinquish:
                return DYING_DOMAIN, mfn
            overlap = _mark(seen, mfn, size)
            if overlap >= 0:
                return OVERLAP, overlap
            for p in range(mfn, mfn + size):
                if ft8[PG_STATE, p] != PGS_INUSE:
                    return BAD_STATE, p
                if ft8[PG_NEED_SCRUB, p]:
                    return DIRTY_IN_USE, p
            pages += size
            prev = link
            link = ft32[PG_NEXT, mfn]
        if doms[slot, D_TAIL] != prev:
            return BAD_LINK, prev - 1
        if (atomic_load(doms, (slot, D_PAGES)) != pages
                or atomic_load(doms, (slot, D_BLOCKS)) != blocks
                or atomic_load(doms, (slot, D_NUMPY_PAGES)) != pinned_pages):
            return DOMAIN_COUNT, -1
        if state == DOM_DYING and blocks == 0 and not relinquish:
            return DYING_DOMAIN, -1
        code, mfn = _check_parked(hs, slot, state == DOM_ALIVE)
        if code != OK:
            return code, mfn
    if atomic_load(meta, M_RELINQUISH) != waiting:
        return DOMAIN_COUNT, -1
    return OK, -1


@njit(nogil=True, cache=True, **INTERNAL)
def _check_parked(hs, slot, alive):
    """Domain ``slot``'s stacks of parked numpy blocks: as long as their counts, within
    their bounds (NUMPY_PARK_MAX at order 0, which one-page slabs share; SLAB_PARK_MAX
    above), holding only its unpinned blocks of the stack's order; empty once it is dying
    (destroy forgets them, and the blocks go with the domain)."""
    ft32, ft8, nodes, doms, meta = hs.ft32, hs.ft8, hs.nodes, hs.doms, hs.meta
    for order in range(NUMPY_PARK_ORDERS):
        count = doms[slot, D_PARKED_COUNT + order]
        bound = NUMPY_PARK_MAX if order == 0 else SLAB_PARK_MAX
        if count < 0 or count > bound or (count and not alive):
            return BAD_PARKED, -1
        length = 0
        link = doms[slot, D_PARKED + order]
        while link != NIL:
            mfn = link - 1
            length += 1
            if (length > count or not 0 <= mfn < meta[M_NR_PAGES]
                    or atomic_load(ft32, (PG_OWNER, mfn)) != slot + 1
                    or ft8[PG_ORDER, mfn] != order):
                return BAD_PARKED, mfn
            link = link_word(nodes, meta, mfn)[0]
        if length != count:
            return BAD_PARKED, -1
    return OK, -1


@njit(nogil=True, cache=True, **INTERNAL)
def _stop_scrubs(hs):
    ft32, ft8, nodes, lists, meta = hs.ft32, hs.ft8, hs.nodes, hs.lists, hs.meta
    for node in range(meta[M_NR_NODES]):
        for order in range(meta[M_MAX_ORDER] + 1):
            link = lists[node, order, L_HEAD]
            while link != NIL:
                check_and_stop_scrub(ft8, nodes, node, link - 1)
                link = ft32[PG_NEXT, link - 1]


@njit(nogil=True, cache=True)
def check_heap(hs):
    """Check every invariant; returns (code, mfn) of the first broken one, or (OK, -1)."""
    nodes, meta = hs.nodes, hs.meta
    nr_nodes = meta[M_NR_NODES]
    # Before the locks: a MemoryError raised with them held would leave them held.
    seen = np.zeros(meta[M_NR_PAGES], dtype=np.uint8)
    head_order = np.full(meta[M_NR_PAGES], -1, dtype=np.int8)
    for node in range(nr_nodes):
        spin_lock(nodes, node, N_LOCK)
    _stop_scrubs(hs)
    code, mfn = _check_free_lists(hs, seen, head_order)
    if code == OK:
        code, mfn = _check_buddies(nodes, meta, head_order)
    if code == OK:
        code, mfn = _check_domains(hs, seen)
    if code == OK:
        for p in range(meta[M_NR_PAGES]):
            if not seen[p]:
                code, mfn = LOST_PAGE, p
                break
    for node in range(nr_nodes - 1, -1, -1):
        spin_unlock(nodes, node, N_LOCK)
    return code, mfn
