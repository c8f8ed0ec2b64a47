"""A domain slot's life: opened for a new domain, destroyed (Xen's domain_kill), its memory
relinquished (Xen's relinquish_memory), laid to rest once numpy frees its last pinned block.

The states are in native_kernels.layout ("the life of a domain"). A destroy only marks the
domain, so that it returns in microseconds whatever the domain holds; relinquish_memory
then frees every block no live numpy array uses, dirty, in whichever thread gets there
first (the Python side's chore or an observer, or an allocator that finds the heap short).
The domain stays DOM_DYING while some array uses a block; numpy's last free makes it
DOM_DEAD, and the Python side then hands the slot to a new domain.
"""

import numpy as np
from numba import njit, types

from native_kernels.atomics import (
    SPINS_BEFORE_YIELD,
    YIELDS_BEFORE_SLEEP,
    atomic_load,
    atomic_store,
    backoff,
    fetch_add,
)
from native_kernels.domain import charge_dirtied, is_alive, release_chain, unlink_block
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
    D_PARKED,
    D_PARKED_COUNT,
    D_PARKS,
    D_PEAK,
    D_RELINQUISH,
    D_REUSED,
    D_REUSED_PAGES,
    D_SLABS,
    D_STATE,
    D_TAIL,
    D_TOTAL_PAGES,
    D_UNPARKED,
    DOM_ALIVE,
    DOM_DEAD,
    DOM_DYING,
    E_DEAD,
    M_MAX_DOMAINS,
    M_RELINQUISH,
    M_UNPARKED,
    M_USED_PAGES,
    NIL,
    NUMPY_PARK_ORDERS,
    OWNER_PINNED,
    PG_NEXT,
    PG_ORDER,
    PG_OWNER,
    SLAB_CLASSES,
)
from native_kernels.links import detach_all
from native_kernels.locks import spin_lock, spin_unlock

# An allocator short of memory waits this many back-off steps (spins, yields, then 50 us
# naps: about 10 ms in all) for other threads' relinquish_memory to finish.
RELINQUISH_WAIT_STEPS = SPINS_BEFORE_YIELD + YIELDS_BEFORE_SLEEP + 200


@njit(nogil=True, cache=True, **INTERNAL)
def destroy_domain(doms, meta, slot, dom_id):
    """Xen's domain_kill: the domain stops allocating (DOM_DYING) and forgets its parked
    stacks, under D_LOCK, in a few atomics whatever it holds. Its blocks stay on its list
    for relinquish_memory (D_RELINQUISH); one that holds none is DOM_DEAD at once.
    Returns 0, or E_DEAD if it was destroyed already.
    """
    spin_lock(doms, slot, D_LOCK)
    if not is_alive(doms, slot, dom_id):
        spin_unlock(doms, slot, D_LOCK)
        return E_DEAD
    atomic_store(doms, (slot, D_STATE), DOM_DYING)
    _forget_parked(doms, meta, slot)  # parked blocks are unpinned: relinquished with the rest
    if atomic_load(doms, (slot, D_BLOCKS)) == 0:
        atomic_store(doms, (slot, D_STATE), DOM_DEAD)
    else:
        atomic_store(doms, (slot, D_RELINQUISH), 1)
        fetch_add(meta, M_RELINQUISH, 1)
    spin_unlock(doms, slot, D_LOCK)
    return 0


@njit(nogil=True, cache=True, **INTERNAL)
def relinquish_memory(hs, slot, dom_id):
    """Free a destroyed domain's blocks (dirty, or zeroed in "sync" mode), once: Xen's
    relinquish_memory.

    Blocks pinned by live numpy arrays stay on its list until numpy frees them (the domain
    stays DOM_DYING meanwhile, as Xen keeps a dying domain's referenced pages); the others
    are detached under the domain lock and freed without it. Returns (pages, wake): the
    pages freed, -1 if there was nothing to relinquish (done already, or the slot holds
    another domain), and the bit mask of the nodes whose scrubber should wake. They are
    apart because with 64 nodes the mask's top bit makes it negative.
    """
    ft32, ft8, doms, meta = hs.ft32, hs.ft8, hs.doms, hs.meta
    spin_lock(doms, slot, D_LOCK)
    if atomic_load(doms, (slot, D_ID)) != dom_id or atomic_load(doms, (slot, D_RELINQUISH)) == 0:
        spin_unlock(doms, slot, D_LOCK)
        return -1, 0
    atomic_store(doms, (slot, D_RELINQUISH), 0)
    if atomic_load(doms, (slot, D_NUMPY_PAGES)) == 0:  # nothing pinned: detach it all
        detached_pages = atomic_load(doms, (slot, D_PAGES))
        detached = detach_all(doms, (slot, D_HEAD), (slot, D_TAIL))
        fetch_add(doms, (slot, D_FREES), atomic_load(doms, (slot, D_BLOCKS)))
        fetch_add(meta, M_USED_PAGES, -detached_pages)
        atomic_store(doms, (slot, D_PAGES), 0)
        atomic_store(doms, (slot, D_BLOCKS), 0)
        link = NIL
    else:
        detached_pages = 0
        detached = NIL
        link = doms[slot, D_HEAD]
    while link != NIL:
        mfn = link - 1
        link = ft32[PG_NEXT, mfn]
        if atomic_load(ft32, (PG_OWNER, mfn)) & OWNER_PINNED:
            continue
        unlink_block(ft32, doms, meta, slot, mfn, types.int64(ft8[PG_ORDER, mfn]))
        detached_pages += 1 << ft8[PG_ORDER, mfn]
        ft32[PG_NEXT, mfn] = detached
        detached = mfn + 1
    charge_dirtied(doms, meta, slot, detached_pages)
    pinned = atomic_load(doms, (slot, D_BLOCKS)) != 0
    spin_unlock(doms, slot, D_LOCK)
    wake = release_chain(hs, dom_id, detached)
    if not pinned:
        atomic_store(doms, (slot, D_STATE), DOM_DEAD)
    fetch_add(meta, M_RELINQUISH, -1)  # last: until now its pages were neither held nor dirty
    return detached_pages, wake


@njit(nogil=True, cache=True, **INTERNAL)
def relinquish_dying(hs):
    """An allocator found the heap short: relinquish every destroyed domain's memory now
    rather than wait for the scrubber's chore, and wait for those another thread (the chore,
    another allocator) is relinquishing meanwhile, as their memory is on its way back: at
    most RELINQUISH_WAIT_STEPS back-off steps (about 10 ms), so that a descheduled
    relinquisher cannot hold the allocator for long. True if trying again may succeed.
    The scrubbers are not woken: the allocator zeroes what it takes, and they look at the
    nodes again within their idle wait."""
    doms, meta = hs.doms, hs.meta
    if atomic_load(meta, M_RELINQUISH) == 0:
        return False
    freed = 0
    for attempt in range(RELINQUISH_WAIT_STEPS):
        for slot in range(meta[M_MAX_DOMAINS]):
            if atomic_load(doms, (slot, D_RELINQUISH)) != 0:
                pages, _wake = relinquish_memory(hs, slot, atomic_load(doms, (slot, D_ID)))
                freed += max(pages, 0)
        if atomic_load(meta, M_RELINQUISH) == 0:
            return True
        backoff(attempt)
    return freed > 0


@njit(nogil=True, cache=True, **INTERNAL)
def _forget_parked(doms, meta, slot):
    """Empty the domain's stacks of parked numpy blocks (native_kernels.parked) without
    touching the blocks, which a destroy frees (counted as D_UNPARKED); caller holds the
    domain lock or owns the slot."""
    parked = 0
    for order in range(NUMPY_PARK_ORDERS):
        parked += doms[slot, D_PARKED_COUNT + order]
    fetch_add(doms, (slot, D_UNPARKED), parked)
    fetch_add(meta, M_UNPARKED, parked)
    _empty_parked(doms, slot)


@njit(nogil=True, cache=True, **INTERNAL)
def _empty_parked(doms, slot):
    """Empty the parked-block stacks of slot ``slot``."""
    for order in range(NUMPY_PARK_ORDERS):
        doms[slot, D_PARKED + order] = NIL
        atomic_store(doms, (slot, D_PARKED_COUNT + order), 0)  # read without the lock


@njit(nogil=True, cache=True)
def open_domain(doms, slot, dom_id, max_pages):
    """Start a new domain in a free (or dead) slot; alive only once every field is set."""
    for field in (D_PAGES, D_BLOCKS, D_PEAK, D_ALLOCS, D_FREES, D_NUMPY_PAGES, D_TOTAL_PAGES,
                  D_REUSED, D_REUSED_PAGES, D_PARKS, D_DIRTIED_PAGES, D_UNPARKED):
        atomic_store(doms, (slot, field), 0)
    for cls in range(SLAB_CLASSES):
        doms[slot, D_SLABS + cls] = NIL
    _empty_parked(doms, slot)  # the old tenant's stacks are gone
    doms[slot, D_HEAD] = NIL
    doms[slot, D_TAIL] = NIL
    doms[slot, D_MAX_PAGES] = max_pages
    atomic_store(doms, (slot, D_ID), dom_id)
    atomic_store(doms, (slot, D_STATE), DOM_ALIVE)


@njit(nogil=True, cache=True)
def domain_row(doms, slot):
    """A copy of a domain's row, each field read atomically (for statistics)."""
    out = np.empty(doms.shape[1], dtype=np.int64)
    for field in range(doms.shape[1]):
        out[field] = atomic_load(doms, (slot, field))
    return out
