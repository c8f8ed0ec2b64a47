"""Memory for numpy arrays: what numpy's callbacks (native_kernels.numpy_handler) call.

Objects up to SLAB_MAX_OBJECT bytes come from the domain's slabs (native_kernels.small);
larger data gets a pinned block of its own, a parked one (native_kernels.parked) first.
Slab objects are never page-aligned (the slab's header comes first) and blocks always are:
that tells the two apart in free and realloc, where numpy gives no size.
"""

from numba import njit, types

from native_kernels.atomics import atomic_load
from native_kernels.buddy import node_of, page_address
from native_kernels.domain import MFN_MASK, free_pinned_block
from native_kernels.jit import INTERNAL
from native_kernels.layout import (
    D_LOCK,
    E_BAD_FREE,
    E_DEAD,
    E_NOMEM,
    M_CLOSED,
    NUMPY_PARK_MAX,
    OWNER_PINNED,
    PAGE_SIZE,
    PG_ORDER,
    PG_OWNER,
    PG_TAG,
    SLAB_MAX_OBJECT,
    SLAB_MIN_OBJECT,
    TAG_SLAB,
)
from native_kernels.locks import spin_lock, spin_unlock
from native_kernels.parked import park_block_outlined, take_parked_outlined
from native_kernels.raw import memcpy_bytes, pointer_to
from native_kernels.small import (
    alloc_pinned,
    block_address,
    find_slab_outlined,
    order_for_bytes,
    page_of,
    release_small_outlined,
    slab_class,
    small_alloc,
)

OLD_BYTES = 1  # flag in an address from array_alloc: the memory may hold old bytes


@njit(nogil=True, cache=True, **INTERNAL)
def array_alloc(hs, slot, dom_id, nbytes, node_pref):
    """Memory for ``nbytes`` of array data owned by the domain; an address, or an error < 0.

    The address has OLD_BYTES set when the memory may hold the domain's own earlier bytes,
    as malloc's would (a slab object, a parked block); otherwise it comes zeroed.
    """
    nodes, meta = hs.nodes, hs.meta
    if atomic_load(meta, M_CLOSED):
        return E_DEAD
    if nbytes < 0:  # a size_t past int64: more than any heap holds
        return E_NOMEM
    nbytes = max(nbytes, 1)
    if nbytes <= SLAB_MAX_OBJECT:
        addr = small_alloc(hs, slot, dom_id, nbytes, node_pref)
        return addr | OLD_BYTES if addr > 0 else addr
    order = order_for_bytes(meta, nbytes)
    if order < 0:
        return E_NOMEM
    addr = take_parked_outlined(hs.ft32, nodes, hs.doms, meta, slot, dom_id, order)
    if addr:
        return addr | OLD_BYTES
    packed = alloc_pinned(hs, slot, dom_id, order, node_pref)
    if packed < 0:
        return packed
    mfn = packed & MFN_MASK
    return page_address(nodes, node_of(meta, mfn), mfn)


@njit(nogil=True, cache=True, **INTERNAL)
def array_free(hs, slot, dom_id, addr):
    """Give back what array_alloc returned; 1 if a scrubber should wake, else 0 or < 0."""
    ft32, ft8, nodes, doms, meta = hs.ft32, hs.ft8, hs.nodes, hs.doms, hs.meta
    if addr & (PAGE_SIZE - 1):
        head = release_small_outlined(ft32, ft8, nodes, doms, meta, slot, dom_id, addr, 0)
        if head <= 0:
            return head
        return free_pinned_block(hs, slot, dom_id, head - 1)
    page = page_of(nodes, meta, addr)
    if page < 0:
        return E_BAD_FREE
    if park_block_outlined(ft32, ft8, nodes, doms, meta, slot, dom_id, page, NUMPY_PARK_MAX):
        return 0
    return free_pinned_block(hs, slot, dom_id, page)


@njit(nogil=True, cache=True, **INTERNAL)
def array_capacity(hs, slot, dom_id, addr):
    """Bytes usable at ``addr`` (its object's or block's size), or an error < 0."""
    ft32, ft8, nodes, doms, meta = hs.ft32, hs.ft8, hs.nodes, hs.doms, hs.meta
    page = page_of(nodes, meta, addr)
    if page < 0:
        return E_BAD_FREE
    if addr & (PAGE_SIZE - 1) == 0:
        if (atomic_load(ft32, (PG_OWNER, page)) != ((slot + 1) | OWNER_PINNED)
                or atomic_load(ft32, (PG_TAG, page)) & TAG_SLAB):
            return E_BAD_FREE
        return PAGE_SIZE << ft8[PG_ORDER, page]
    spin_lock(doms, slot, D_LOCK)
    head = find_slab_outlined(ft32, ft8, nodes, meta, slot, page, 0)
    size = E_BAD_FREE
    if head >= 0:
        hdr = pointer_to(block_address(nodes, meta, head), types.uint64)
        size = SLAB_MIN_OBJECT << slab_class(hdr)  # find_slab checked it
    spin_unlock(doms, slot, D_LOCK)
    return size


@njit(nogil=True, cache=True, **INTERNAL)
def array_realloc(hs, slot, dom_id, addr, nbytes, node_pref):
    """Resize array data keeping its bytes: in place while the new size fits and uses more
    than half the room; else allocate, copy, free, except that a shrink with no memory to
    move to (the quota or the heap short, the domain destroyed) stays in place. An
    address, or an error < 0."""
    if addr == 0:
        new = array_alloc(hs, slot, dom_id, nbytes, node_pref)
        return new & ~OLD_BYTES if new > 0 else new
    room = array_capacity(hs, slot, dom_id, addr)
    if room < 0:
        return room
    if room // 2 < nbytes <= room:
        return addr
    new = array_alloc(hs, slot, dom_id, nbytes, node_pref)
    if new < 0:
        return addr if nbytes <= room else new
    new &= ~OLD_BYTES
    memcpy_bytes(new, addr, min(room, nbytes))
    array_free(hs, slot, dom_id, addr)
    return new
