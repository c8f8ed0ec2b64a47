"""Free lists per node and order, linked through the frame table (Xen's page_list_*).

All of these run under the node's heap lock. Links hold ``mfn + 1`` so that zero is the end.
Clean chunks (first_dirty == INVALID_DIRTY_IDX) go to the head, dirty ones to the tail, so
the allocator finds clean memory at the head and the scrubber finds dirty memory at the tail
without scanning (as Xen's scrubbing series does: unscrubbed pages at the end of the page list).
"""

from numba import njit

from native_kernels.atomics import add_locked, atomic_store
from native_kernels.jit import INTERNAL
from native_kernels.layout import (
    BUDDY_NOT_SCRUBBING,
    INVALID_DIRTY_IDX,
    L_COUNT,
    L_HEAD,
    L_TAIL,
    PG_FIRST_DIRTY,
    PG_ORDER,
    PG_SCRUB_STATE,
)
from native_kernels.links import link_head, link_tail, unlink


@njit(nogil=True, cache=True, **INTERNAL)
def page_list_add(ft32, lists, node, order, mfn, at_tail):
    """Link chunk ``mfn`` at the head (or tail) of list (node, order)."""
    head, tail = (node, order, L_HEAD), (node, order, L_TAIL)
    if at_tail:
        link_tail(ft32, lists, head, tail, mfn)
    else:
        link_head(ft32, lists, head, tail, mfn, mfn)
    add_locked(lists, (node, order, L_COUNT), 1)


@njit(nogil=True, cache=True, **INTERNAL)
def page_list_del(ft32, lists, node, order, mfn):
    """Unlink chunk ``mfn`` from list (node, order)."""
    unlink(ft32, lists, (node, order, L_HEAD), (node, order, L_TAIL), mfn)
    add_locked(lists, (node, order, L_COUNT), -1)


@njit(nogil=True, cache=True, **INTERNAL)
def page_list_add_scrub(ft32, ft8, lists, node, order, mfn, first_dirty):
    """Make ``mfn`` a free chunk head of ``order``: clean to the head, dirty to the tail."""
    ft8[PG_ORDER, mfn] = order
    atomic_store(ft32, (PG_FIRST_DIRTY, mfn), first_dirty)
    atomic_store(ft8, (PG_SCRUB_STATE, mfn), BUDDY_NOT_SCRUBBING)
    page_list_add(ft32, lists, node, order, mfn, first_dirty != INVALID_DIRTY_IDX)
