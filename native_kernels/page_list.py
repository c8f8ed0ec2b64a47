"""Free lists per node and order, linked through the frame table (Xen's page_list_*).

All of these run under the node's heap lock. Links hold ``mfn + 1`` so that zero is the end.
Clean chunks (first_dirty == INVALID_DIRTY_IDX) go to the head, dirty ones to the tail, so
the allocator finds clean memory at the head and the scrubber finds dirty memory at the tail
without scanning (as Xen's scrubbing series does: unscrubbed pages at the end of the page list).
"""

from numba import njit

from native_kernels.atomics import add_locked, atomic_store
from native_kernels.layout import (
    BUDDY_NOT_SCRUBBING,
    INVALID_DIRTY_IDX,
    L_COUNT,
    L_HEAD,
    L_TAIL,
    NIL,
    PG_FIRST_DIRTY,
    PG_NEXT,
    PG_ORDER,
    PG_PREV,
    PG_SCRUB_STATE,
)


@njit(nogil=True, cache=True)
def page_list_add(ft32, lists, node, order, mfn, at_tail):
    """Link chunk ``mfn`` at the head (or tail) of list (node, order)."""
    link = mfn + 1
    if at_tail:
        tail = lists[node, order, L_TAIL]
        ft32[PG_PREV, mfn] = tail
        ft32[PG_NEXT, mfn] = NIL
        if tail == NIL:
            lists[node, order, L_HEAD] = link
        else:
            ft32[PG_NEXT, tail - 1] = link
        lists[node, order, L_TAIL] = link
    else:
        head = lists[node, order, L_HEAD]
        ft32[PG_NEXT, mfn] = head
        ft32[PG_PREV, mfn] = NIL
        if head == NIL:
            lists[node, order, L_TAIL] = link
        else:
            ft32[PG_PREV, head - 1] = link
        lists[node, order, L_HEAD] = link
    add_locked(lists, (node, order, L_COUNT), 1)


@njit(nogil=True, cache=True)
def page_list_del(ft32, lists, node, order, mfn):
    """Unlink chunk ``mfn`` from list (node, order)."""
    nxt = ft32[PG_NEXT, mfn]
    prv = ft32[PG_PREV, mfn]
    if prv == NIL:
        lists[node, order, L_HEAD] = nxt
    else:
        ft32[PG_NEXT, prv - 1] = nxt
    if nxt == NIL:
        lists[node, order, L_TAIL] = prv
    else:
        ft32[PG_PREV, nxt - 1] = prv
    ft32[PG_NEXT, mfn] = NIL
    ft32[PG_PREV, mfn] = NIL
    add_locked(lists, (node, order, L_COUNT), -1)


@njit(nogil=True, cache=True)
def page_list_add_scrub(ft32, ft8, lists, node, order, mfn, first_dirty):
    """Make ``mfn`` a free chunk head of ``order``: clean to the head, dirty to the tail."""
    ft8[PG_ORDER, mfn] = order
    atomic_store(ft32, (PG_FIRST_DIRTY, mfn), first_dirty)
    atomic_store(ft8, (PG_SCRUB_STATE, mfn), BUDDY_NOT_SCRUBBING)
    page_list_add(ft32, lists, node, order, mfn, first_dirty != INVALID_DIRTY_IDX)
