"""Domains: who owns which block; the kernels that allocate, populate and free them.

A domain's blocks form a list through the same frame-table links the free lists use (a block
is on exactly one of the two), guarded by the domain's own lock (Xen's page_alloc_lock).
The node lock and a domain lock are never held together: allocation takes the node lock,
drops it, zeroes, then links under the domain lock; free and destroy do the reverse.

Where callers of one kernel differ, a constant argument goes as a run-time value
(``types.boolean(True)``, ``types.int64(0)``, an ft8 byte widened): numba compiles a kernel
once per argument types, a literal constant and a uint8 are types of their own, and each
extra copy of a kernel with a large call tree adds seconds to a first, uncached run.
"""

from numba import njit, types

from native_kernels.atomics import atomic_load, atomic_max, atomic_store, fetch_add
from native_kernels.buddy import (
    alloc_heap_pages,
    disown,
    free_heap_chain,
    free_heap_pages,
    node_of,
    page_address,
    scrub_taken_block,
)
from native_kernels.jit import INTERNAL
from native_kernels.layout import (
    D_ALLOCS,
    D_BLOCKS,
    D_DIRTIED_PAGES,
    D_FREES,
    D_HEAD,
    D_ID,
    D_LOCK,
    D_MAX_PAGES,
    D_NUMPY_PAGES,
    D_PAGES,
    D_PEAK,
    D_RELINQUISH,
    D_STATE,
    D_TAIL,
    D_TOTAL_PAGES,
    DOM_ALIVE,
    DOM_DEAD,
    DOM_DYING,
    E_BAD_FREE,
    E_CORRUPT,
    E_DEAD,
    E_FAULT,
    E_NOMEM,
    E_QUOTA,
    FAULT_POPULATE_FAIL,
    L_COUNT,
    M_DEBUG,
    M_FAULT,
    M_FAULT_ARG,
    M_MAX_ORDER,
    M_MODE,
    M_NR_NODES,
    M_NR_PAGES,
    M_PEAK_PAGES,
    M_TOTAL_PAGES,
    M_USED_PAGES,
    MODE_SYNC,
    N_ALLOCS,
    N_FREES,
    N_SYNC_SCRUBBED,
    NIL,
    OWNER_PINNED,
    PG_NEXT,
    PG_ORDER,
    PG_OWNER,
    PG_PREV,
    PG_TAG,
    POISON_PATTERN,
    SCRUB_PATTERN,
    TAG_SLAB,
)
from native_kernels.links import link_head, unlink
from native_kernels.locks import spin_lock, spin_unlock
from native_kernels.pages import stream_fill_pages

MFN_MASK = 0xFFFFFFFF


@njit(nogil=True, cache=True, **INTERNAL)
def is_alive(doms, slot, dom_id):
    """Domain ``dom_id`` is alive in ``slot``.

    The state is read before the id, the reverse of open_domain's stores (id, then state):
    a reader that sees a new tenant's DOM_ALIVE then sees the new tenant's id too, so a
    stale handle never acts on the slot's next domain.
    """
    alive = atomic_load(doms, (slot, D_STATE)) == DOM_ALIVE
    return alive and atomic_load(doms, (slot, D_ID)) == dom_id


@njit(nogil=True, cache=True, **INTERNAL)
def holds_blocks(doms, slot, dom_id):
    """Alive, or destroyed with blocks still pinned by numpy arrays (state read first, as in
    is_alive)."""
    state = atomic_load(doms, (slot, D_STATE))
    return state in (DOM_ALIVE, DOM_DYING) and atomic_load(doms, (slot, D_ID)) == dom_id


@njit(nogil=True, cache=True, **INTERNAL)
def _over_quota(doms, slot, extra_pages):
    quota = doms[slot, D_MAX_PAGES]
    return quota > 0 and atomic_load(doms, (slot, D_PAGES)) + extra_pages > quota


@njit(nogil=True, cache=True, **INTERNAL)
def _link_chain(ft32, doms, meta, slot, dom_id, first, last, nblocks, npages, pinned):
    """Splice a chain of blocks (linked first..last) onto the domain's list.

    Returns 0, E_DEAD if the domain died meanwhile or E_QUOTA if the chain no longer fits.
    """
    spin_lock(doms, slot, D_LOCK)
    if not is_alive(doms, slot, dom_id):
        spin_unlock(doms, slot, D_LOCK)
        return E_DEAD
    if _over_quota(doms, slot, npages):
        spin_unlock(doms, slot, D_LOCK)
        return E_QUOTA
    link_head(ft32, doms, (slot, D_HEAD), (slot, D_TAIL), first, last)
    pages = fetch_add(doms, (slot, D_PAGES), npages) + npages
    atomic_max(doms, (slot, D_PEAK), pages)
    fetch_add(doms, (slot, D_TOTAL_PAGES), npages)
    fetch_add(meta, M_TOTAL_PAGES, npages)
    atomic_max(meta, M_PEAK_PAGES, fetch_add(meta, M_USED_PAGES, npages) + npages)
    fetch_add(doms, (slot, D_BLOCKS), nblocks)
    fetch_add(doms, (slot, D_ALLOCS), nblocks)
    if pinned:
        fetch_add(doms, (slot, D_NUMPY_PAGES), npages)
    spin_unlock(doms, slot, D_LOCK)
    return 0


@njit(nogil=True, cache=True, **INTERNAL)
def unlink_block(ft32, doms, meta, slot, mfn, order):
    """Take block ``mfn`` off its domain's list and counters; caller holds the domain lock."""
    unlink(ft32, doms, (slot, D_HEAD), (slot, D_TAIL), mfn)
    fetch_add(doms, (slot, D_PAGES), -(1 << order))
    fetch_add(meta, M_USED_PAGES, -(1 << order))
    fetch_add(doms, (slot, D_BLOCKS), -1)
    fetch_add(doms, (slot, D_FREES), 1)


@njit(nogil=True, cache=True, **INTERNAL)
def _take_block(hs, slot, order, node_pref, exact, pinned):
    """Allocate and zero one block owned by ``slot``; returns (mfn, tag) or (error, 0)."""
    ft32, nodes, meta = hs.ft32, hs.nodes, hs.meta
    packed = alloc_heap_pages(hs, node_pref, order, exact)
    if packed < 0:
        return packed, 0
    mfn = packed & MFN_MASK
    tag = packed >> 32
    if scrub_taken_block(hs, mfn, order) < 0:  # debug mode: written after it was freed
        # Back dirty and poisoned like any freed block, so the next taker does not trip
        # on the same evidence.
        stream_fill_pages(page_address(nodes, node_of(meta, mfn), mfn), 1 << order,
                          POISON_PATTERN)
        free_heap_pages(hs, mfn, order, types.boolean(True), types.int64(0))
        return E_CORRUPT, 0
    fetch_add(nodes, (node_of(meta, mfn), N_ALLOCS), 1)
    atomic_store(ft32, (PG_TAG, mfn), tag)
    atomic_store(ft32, (PG_OWNER, mfn), (slot + 1) | (OWNER_PINNED if pinned else 0))
    return mfn, tag


@njit(nogil=True, cache=True, **INTERNAL)
def charge_dirtied(doms, meta, slot, pages):
    """Bill domain ``slot`` for ``pages`` it gives back dirty (D_DIRTIED_PAGES); none in
    "sync" mode, whose frees zero them. The caller holds the domain lock and has unlinked
    the pages: the bill is in before anyone can see the domain's last block gone and lay
    the slot to rest, which would leave a late add to the slot's next domain."""
    if meta[M_MODE] != MODE_SYNC:
        fetch_add(doms, (slot, D_DIRTIED_PAGES), pages)


@njit(nogil=True, cache=True, **INTERNAL)
def _release_block(hs, dom_id, mfn, order):
    """Free a block that no domain owns any more (its dirtier, ``dom_id``, was billed by
    charge_dirtied); True if a scrubber should wake.

    "sync" mode zeroes it here, before returning (the behaviour the series replaced);
    otherwise it goes back dirty, poisoned first in debug mode, named by PG_TAG of its
    pages as ``dom_id``'s to scrub.
    """
    ft32, nodes, meta = hs.ft32, hs.nodes, hs.meta
    disown(ft32, mfn)
    node = node_of(meta, mfn)
    fetch_add(nodes, (node, N_FREES), 1)
    addr = page_address(nodes, node, mfn)
    debug = meta[M_DEBUG] != 0
    sync = meta[M_MODE] == MODE_SYNC
    if sync:
        stream_fill_pages(addr, 1 << order, SCRUB_PATTERN if debug else 0)
        fetch_add(nodes, (node, N_SYNC_SCRUBBED), 1 << order)
    elif debug:
        stream_fill_pages(addr, 1 << order, POISON_PATTERN)
    return free_heap_pages(hs, mfn, order, not sync, 0 if sync else dom_id)


@njit(nogil=True, cache=True, **INTERNAL)
def _undo_take(hs, first):
    """Give back a chain of blocks taken but never handed out: they are zeroed, so they go
    back clean, and the allocation counters are rolled back too."""
    ft32, ft8, nodes, meta = hs.ft32, hs.ft8, hs.nodes, hs.meta
    link = first
    while link != NIL:
        mfn = link - 1
        link = ft32[PG_NEXT, mfn]
        disown(ft32, mfn)
        fetch_add(nodes, (node_of(meta, mfn), N_ALLOCS), -1)
        free_heap_pages(hs, mfn, types.int64(ft8[PG_ORDER, mfn]), types.boolean(False),
                        types.int64(0))


@njit(nogil=True, cache=True, **INTERNAL)
def release_chain(hs, dom_id, first):
    """Release every block of a chain linked through PG_NEXT, which no domain owns any more
    (charge_dirtied billed ``dom_id``); returns the nodes to wake.

    Unless the blocks must be written first ("sync" zeroing, debug poisoning), they go back
    in node-lock batches: a destroy then costs a few atomics per block, not a dozen.
    """
    ft32, ft8, meta = hs.ft32, hs.ft8, hs.meta
    if meta[M_MODE] != MODE_SYNC and meta[M_DEBUG] == 0:
        return free_heap_chain(hs, first, types.boolean(True), dom_id)
    wake = 0
    link = first
    while link != NIL:
        mfn = link - 1
        link = ft32[PG_NEXT, mfn]
        if _release_block(hs, dom_id, mfn, types.int64(ft8[PG_ORDER, mfn])):
            wake |= 1 << node_of(meta, mfn)
    return wake


@njit(nogil=True, cache=True, **INTERNAL)
def alloc_block(hs, slot, dom_id, order, node_pref, exact, pinned):
    """Allocate a zeroed block of 2^order pages to domain ``slot``; ``pinned`` for numpy.

    Returns ``tag << 32 | mfn``, or E_DEAD, E_QUOTA, E_NOMEM, E_CORRUPT.
    """
    ft32, doms, meta = hs.ft32, hs.doms, hs.meta
    if not is_alive(doms, slot, dom_id):
        return E_DEAD
    if _over_quota(doms, slot, 1 << order):
        return E_QUOTA
    mfn, tag = _take_block(hs, slot, order, node_pref, exact, pinned)
    if mfn < 0:
        return mfn
    status = _link_chain(ft32, doms, meta, slot, dom_id, mfn, mfn, types.int64(1), 1 << order,
                         pinned)
    if status < 0:
        ft32[PG_NEXT, mfn] = NIL
        _undo_take(hs, mfn + 1)
        return status
    return (tag << 32) | mfn


@njit(nogil=True, cache=True, **INTERNAL)
def populate(hs, slot, dom_id, count, order, node_pref, exact, out):
    """Allocate ``count`` blocks of 2^order pages in one call, all or nothing.

    Checks the free lists' chunk counts first, so that a request that cannot fit fails
    without touching the heap; if a concurrent allocation still wins the race, every block
    taken so far goes back. Returns ``count`` or a negative error. If ``out`` has rows,
    row i gets (mfn, tag) of the i-th block.
    """
    ft32, lists, doms, meta, zone = hs.ft32, hs.lists, hs.doms, hs.meta, hs.zone
    if not is_alive(doms, slot, dom_id):
        return E_DEAD
    if _over_quota(doms, slot, count << order):
        return E_QUOTA
    capacity = 0
    for k in range(1 if exact else meta[M_NR_NODES]):
        node = node_pref if exact else zone[node_pref, k]
        for j in range(order, meta[M_MAX_ORDER] + 1):
            capacity += atomic_load(lists, (node, j, L_COUNT)) << (j - order)
    if capacity < count:
        return E_NOMEM
    # Typed from the start: numba would also compile _link_chain for a literal -1 first.
    first = types.int64(-1)
    last = types.int64(-1)
    status = 0
    fail_after = atomic_load(meta, M_FAULT_ARG) if atomic_load(meta, M_FAULT) \
        == FAULT_POPULATE_FAIL else count
    for taken in range(count):
        if taken == fail_after:
            status = E_FAULT
            break
        mfn, tag = _take_block(hs, slot, order, node_pref, exact, types.boolean(False))
        if mfn < 0:
            status = mfn
            break
        if taken < out.shape[0]:
            out[taken, 0] = mfn
            out[taken, 1] = tag
        if first < 0:
            ft32[PG_NEXT, mfn] = NIL
            last = mfn
        else:
            ft32[PG_NEXT, mfn] = first + 1
            ft32[PG_PREV, first] = mfn + 1
        first = mfn
    if status == 0 and count > 0:
        status = _link_chain(ft32, doms, meta, slot, dom_id, first, last, count, count << order,
                             types.boolean(False))
    if status < 0:
        if first >= 0:
            _undo_take(hs, first + 1)
        return status
    return count


@njit(nogil=True, cache=True, **INTERNAL)
def free_block(hs, slot, dom_id, mfn, order, tag):
    """Free block (mfn, order, tag) of domain ``slot``.

    Returns 1 if a scrubber should wake, 0 if not, E_DEAD if the domain is no longer alive,
    E_BAD_FREE if the block is not a live block of this domain (double free, foreign, stale).
    """
    ft32, ft8, doms, meta = hs.ft32, hs.ft8, hs.doms, hs.meta
    if mfn < 0 or mfn >= meta[M_NR_PAGES] or order < 0 or order > meta[M_MAX_ORDER]:
        return E_BAD_FREE
    spin_lock(doms, slot, D_LOCK)
    if not is_alive(doms, slot, dom_id):
        spin_unlock(doms, slot, D_LOCK)
        return E_DEAD
    # Owner, order and tag together name a block on our list: one still in flight to us has
    # its owner set before it is linked but carries a newer tag, and a destroy marks the
    # domain dying (checked above) before it clears owners.
    if (atomic_load(ft32, (PG_OWNER, mfn)) != slot + 1 or ft8[PG_ORDER, mfn] != order
            or atomic_load(ft32, (PG_TAG, mfn)) != tag):
        spin_unlock(doms, slot, D_LOCK)
        return E_BAD_FREE
    unlink_block(ft32, doms, meta, slot, mfn, order)
    charge_dirtied(doms, meta, slot, 1 << order)
    # Clear ownership before dropping the lock: a racing free of the same handle must fail.
    atomic_store(ft32, (PG_OWNER, mfn), 0)
    spin_unlock(doms, slot, D_LOCK)
    return 1 if _release_block(hs, dom_id, mfn, order) else 0


@njit(nogil=True, cache=True, **INTERNAL)
def free_pinned_block(hs, slot, dom_id, mfn):
    """Free a block numpy no longer uses, also after its domain was destroyed.

    Returns 1 if a scrubber should wake, 0 if not, E_BAD_FREE if it is not such a block.
    The last pinned block of a destroyed domain whose other blocks were relinquished lays
    the domain to rest (DOM_DEAD).
    """
    ft32, ft8, doms, meta = hs.ft32, hs.ft8, hs.doms, hs.meta
    spin_lock(doms, slot, D_LOCK)
    if (not holds_blocks(doms, slot, dom_id)
            or atomic_load(ft32, (PG_OWNER, mfn)) != ((slot + 1) | OWNER_PINNED)
            or atomic_load(ft32, (PG_TAG, mfn)) & TAG_SLAB):  # a slab goes once emptied
        spin_unlock(doms, slot, D_LOCK)
        return E_BAD_FREE
    order = types.int64(ft8[PG_ORDER, mfn])
    unlink_block(ft32, doms, meta, slot, mfn, order)
    charge_dirtied(doms, meta, slot, 1 << order)
    fetch_add(doms, (slot, D_NUMPY_PAGES), -(1 << order))
    atomic_store(ft32, (PG_OWNER, mfn), 0)
    if (atomic_load(doms, (slot, D_STATE)) == DOM_DYING
            and atomic_load(doms, (slot, D_BLOCKS)) == 0
            and atomic_load(doms, (slot, D_RELINQUISH)) == 0):
        atomic_store(doms, (slot, D_STATE), DOM_DEAD)
    spin_unlock(doms, slot, D_LOCK)
    return 1 if _release_block(hs, dom_id, mfn, order) else 0
