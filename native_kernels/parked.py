"""Blocks numpy freed that a domain keeps for its next arrays (numpy's hot path).

numpy allocates and frees array data at a high rate, often the same sizes again and again.
A block that numpy frees goes, up to NUMPY_PARK_MAX per order (emptied slabs of more than a
page up to SLAB_PARK_MAX) and for orders below NUMPY_PARK_ORDERS, onto a per-domain stack
(layout.D_PARKED) instead of back to the heap: the next array of that order takes it back
under the domain's lock alone, without the node's lock, the buddy lists or scrubbing. Only
this domain ever wrote it, so isolation holds; ``arrays.array_alloc`` reports that it may hold old
bytes, and calloc zeroes it.

A parked block stays on the domain's block list, unpinned (owner without OWNER_PINNED), so
it counts against the quota and a destroy frees it like any other. The stack's link lives
in the block's first 8 bytes. Only where the heap reuses blocks (layout.M_REUSE): not with
``reuse_bytes=0``, nor in "sync" mode (a free must zero) or debug mode (a free must
poison, and an allocation check the pattern).
"""

from numba import njit, types

from native_kernels.atomics import (
    add_locked,
    atomic_load,
    atomic_store,
    coarse_monotonic_ns,
    fetch_add,
)
from native_kernels.buddy import node_of, page_address
from native_kernels.domain import free_block, is_alive
from native_kernels.jit import INLINE, INTERNAL, outlined
from native_kernels.layout import (
    D_ID,
    D_LOCK,
    D_NUMPY_PAGES,
    D_PARKED,
    D_PARKED_COUNT,
    D_PARKED_NS,
    D_PARKS,
    D_REUSED,
    D_REUSED_PAGES,
    D_STATE,
    D_UNPARKED,
    DOM_ALIVE,
    M_PARKS,
    M_REUSE,
    M_REUSED,
    M_TOTAL_PAGES,
    M_UNPARKED,
    NIL,
    NUMPY_PARK_ORDERS,
    OWNER_PINNED,
    PG_ORDER,
    PG_OWNER,
    PG_TAG,
    TAG_SLAB,
)
from native_kernels.locks import spin_lock, spin_unlock
from native_kernels.raw import pointer_to

# An emptied slab (native_kernels.small) is parked too, up to layout.SLAB_PARK_MAX per order
# above 0 and NUMPY_PARK_MAX for one page: a burst of small arrays that comes and goes
# (1,000 arrays of 8-1000 bytes empty 33 order-2 slabs) then cycles through the domain's
# own slabs, not through the heap and its scrubbing.

# The kernels numpy's allocations and frees call are compiled with ``_nrt=False``, as
# native_kernels.small explains: no reference-count calls around their array arguments.


@njit(nogil=True, cache=True, _nrt=False, **INTERNAL)
def link_word(nodes, meta, mfn):
    """The first 8 bytes of block ``mfn``: the stack's next link (mfn + 1, or NIL)."""
    return pointer_to(page_address(nodes, node_of(meta, mfn), mfn), types.int64)


@njit(nogil=True, cache=True, _nrt=False, **INTERNAL, **INLINE)
def park_block(ft32, ft8, nodes, doms, meta, slot, dom_id, mfn, limit):
    """Keep block ``mfn``, which numpy just freed, for the domain's next arrays, if its
    order's stack holds fewer than ``limit`` blocks (NUMPY_PARK_MAX for an array's block,
    SLAB_PARK_MAX for an emptied slab of more than a page). The arrays one by one, as
    take_parked.

    True if parked; False if it must be freed instead (not parkable, stack full, or not a
    pinned block of this live domain).
    """
    spin_lock(doms, slot, D_LOCK)
    parked = (is_alive(doms, slot, dom_id)
              and atomic_load(ft32, (PG_OWNER, mfn)) == ((slot + 1) | OWNER_PINNED)
              and atomic_load(ft32, (PG_TAG, mfn)) & TAG_SLAB == 0
              and park_locked(ft32, ft8, nodes, doms, meta, slot, mfn, limit))
    spin_unlock(doms, slot, D_LOCK)
    return parked


@njit(nogil=True, cache=True, _nrt=False, **INTERNAL)
def park_locked(ft32, ft8, nodes, doms, meta, slot, mfn, limit):
    """park_block for a pinned block of the live domain whose lock the caller holds (the
    arrays one by one, as numpy's hot free passes them). True if parked."""
    order = ft8[PG_ORDER, mfn]
    if (meta[M_REUSE] == 0 or order >= NUMPY_PARK_ORDERS
            or doms[slot, D_PARKED_COUNT + order] >= limit):
        return False
    link_word(nodes, meta, mfn)[0] = doms[slot, D_PARKED + order]
    doms[slot, D_PARKED + order] = mfn + 1
    add_locked(doms, (slot, D_PARKED_COUNT + order), 1)  # read without the lock
    atomic_store(ft32, (PG_OWNER, mfn), slot + 1)  # unpinned: a destroy frees it
    # The domain's counters change under its lock only: no locked instruction for them.
    add_locked(doms, (slot, D_NUMPY_PAGES), -(1 << order))
    add_locked(doms, (slot, D_PARKS), 1)
    fetch_add(meta, M_PARKS, 1)
    atomic_store(doms, (slot, D_PARKED_NS), coarse_monotonic_ns())
    return True


@njit(nogil=True, cache=True, _nrt=False, **INTERNAL)
def pop_parked(ft32, nodes, doms, meta, slot, order, pin):
    """Take the top of the order's stack (caller holds the domain lock); its mfn or -1.
    ``pin``: for numpy again, counted as an allocation (count_reuse). The arrays one by
    one: numpy's hot allocation (small.take_small) builds only those it reads."""
    link = doms[slot, D_PARKED + order]
    if link == NIL:
        return -1
    mfn = link - 1
    doms[slot, D_PARKED + order] = link_word(nodes, meta, mfn)[0]
    add_locked(doms, (slot, D_PARKED_COUNT + order), -1)
    if pin:
        atomic_store(ft32, (PG_OWNER, mfn), (slot + 1) | OWNER_PINNED)
        add_locked(doms, (slot, D_NUMPY_PAGES), 1 << order)
        count_reuse(doms, meta, slot, order)
    return mfn


@njit(nogil=True, cache=True, _nrt=False, **INTERNAL, **INLINE)
def take_parked(ft32, nodes, doms, meta, slot, dom_id, order):
    """A parked block of ``order`` pinned for a new array: its address, or 0 if none. The
    arrays one by one: numpy's hot path for arrays of a few pages builds only these."""
    if order < 0 or order >= NUMPY_PARK_ORDERS:  # -1: larger than any block of the heap
        return 0
    spin_lock(doms, slot, D_LOCK)
    mfn = pop_parked(ft32, nodes, doms, meta, slot, order, types.boolean(True)) \
        if is_alive(doms, slot, dom_id) else -1
    spin_unlock(doms, slot, D_LOCK)
    if mfn < 0:
        return 0
    return page_address(nodes, node_of(meta, mfn), mfn)


# The slow paths' copies (jit.outlined).
park_block_outlined = outlined(park_block)
take_parked_outlined = outlined(take_parked)


@njit(nogil=True, cache=True, _nrt=False, **INTERNAL)
def count_reuse(doms, meta, slot, order):
    """Count a parked block taken back as an allocation, for the statistics (pyarrow's
    num_allocations and total bytes); caller holds the domain lock."""
    add_locked(doms, (slot, D_REUSED), 1)
    add_locked(doms, (slot, D_REUSED_PAGES), 1 << order)
    fetch_add(meta, M_REUSED, 1)
    fetch_add(meta, M_TOTAL_PAGES, 1 << order)


@njit(nogil=True, cache=True, **INTERNAL)
def flush_parked(hs, slot, dom_id):
    """Give every parked block of the domain back to the heap, dirty (an allocation found
    the quota or the heap short, or the stacks sat idle). Returns the blocks freed.

    Every block taken off a stack counts as unparked, also one whose free finds the domain
    destroyed meanwhile: it stays on the dying domain's list, whose relinquish frees it and
    counts that free, as free_block would have.
    """
    ft32, doms, meta = hs.ft32, hs.doms, hs.meta
    freed = 0
    unparked = 0
    for order in range(NUMPY_PARK_ORDERS):
        while True:
            spin_lock(doms, slot, D_LOCK)
            mfn = pop_parked(ft32, hs.nodes, doms, meta, slot, order, types.boolean(False)) \
                if is_alive(doms, slot, dom_id) else -1
            if mfn >= 0:  # under the lock: the slot may go to another domain once it is out
                add_locked(doms, (slot, D_UNPARKED), 1)
            spin_unlock(doms, slot, D_LOCK)
            if mfn < 0:
                break
            unparked += 1
            if free_block(hs, slot, dom_id, mfn, order,
                          types.int64(atomic_load(ft32, (PG_TAG, mfn)))) >= 0:
                freed += 1
    fetch_add(meta, M_UNPARKED, unparked)
    return freed


@njit(nogil=True, cache=True, **INTERNAL)
def flush_every_parked(hs):
    """flush_parked for every live domain that has blocks parked (a numpy allocation found
    the heap short; the Python API gives every domain's back then too). The blocks freed."""
    doms = hs.doms
    freed = 0
    for slot in range(doms.shape[0]):
        if atomic_load(doms, (slot, D_STATE)) != DOM_ALIVE:
            continue
        parked = 0
        for order in range(NUMPY_PARK_ORDERS):
            parked += atomic_load(doms, (slot, D_PARKED_COUNT + order))
        if parked:
            freed += flush_parked(hs, slot, atomic_load(doms, (slot, D_ID)))
    return freed
