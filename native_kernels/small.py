"""Memory for numpy arrays: whole pinned blocks for large data, slabs for small objects.

Objects up to SLAB_MAX_OBJECT bytes come from per-domain slabs: a pinned block split into
equal objects of one size class, with a header at its start (layout.SH_*). Slabs with a free
object are listed per class in the domain's row; a slab goes back to the heap (dirty) when
its last object is freed. Larger data gets a pinned block of its own. Slab objects are never
page-aligned (the header comes first) and blocks always are: that tells the two apart in
free and realloc, where numpy gives no size.
"""

from numba import carray, njit, types

from native_kernels.atomics import atomic_load
from native_kernels.buddy import node_of, page_address
from native_kernels.domain import MFN_MASK, alloc_block, free_pinned_block, holds_blocks, is_alive
from native_kernels.layout import (
    D_LOCK,
    D_SLABS,
    E_BAD_FREE,
    E_DEAD,
    E_NOMEM,
    E_QUOTA,
    M_CLOSED,
    M_MAX_ORDER,
    M_NR_NODES,
    N_ADDR,
    N_BASE,
    N_PAGES,
    NIL,
    OWNER_PINNED,
    PAGE_SHIFT,
    PAGE_SIZE,
    PG_ORDER,
    PG_OWNER,
    SH_BITMAP,
    SH_CLASS,
    SH_NEXT,
    SH_PREV,
    SH_USED,
    SLAB_BITMAP_WORDS,
    SLAB_CLASSES,
    SLAB_HEADER_BYTES,
    SLAB_MAX_OBJECT,
    SLAB_MIN_OBJECT,
)
from native_kernels.locks import spin_lock, spin_unlock
from native_kernels.parked import flush_parked, park_block, take_parked
from native_kernels.raw import memcpy_bytes, pointer_to, trailing_zeros

MAX_SLAB_ORDER = SLAB_CLASSES - 5
OLD_BYTES = 1  # flag in an address from array_alloc: the memory may hold old bytes


@njit(nogil=True, cache=True)
def size_class(nbytes):
    """The smallest class whose objects hold ``nbytes``."""
    cls = 0
    while (SLAB_MIN_OBJECT << cls) < nbytes:
        cls += 1
    return cls


@njit(nogil=True, cache=True)
def order_for_bytes(meta, nbytes):
    """The smallest order whose block holds ``nbytes`` (> 0), or -1 past the largest chunk.

    The bound comes first: shifting up to any int64 ``nbytes`` would wrap and never end.
    """
    if nbytes > (PAGE_SIZE << meta[M_MAX_ORDER]):
        return -1
    order = 0
    while (PAGE_SIZE << order) < nbytes:
        order += 1
    return order


@njit(nogil=True, cache=True)
def slab_order(cls):
    """Order of a class's slab block: one page up to 256-byte objects, then larger."""
    return max(0, cls - 4)


@njit(nogil=True, cache=True)
def slab_capacity(cls):
    """Objects per slab of class ``cls``."""
    return ((PAGE_SIZE << slab_order(cls)) - SLAB_HEADER_BYTES) // (SLAB_MIN_OBJECT << cls)


@njit(nogil=True, cache=True)
def _header(nodes, meta, mfn):
    return carray(pointer_to(page_address(nodes, node_of(meta, mfn), mfn), types.uint64),
                  SLAB_HEADER_BYTES // 8)


@njit(nogil=True, cache=True)
def _slab_push(nodes, meta, doms, slot, cls, mfn):
    """Put slab ``mfn`` at the head of its class's list; caller holds the domain lock."""
    head = doms[slot, D_SLABS + cls]
    hdr = _header(nodes, meta, mfn)
    hdr[SH_NEXT] = head
    hdr[SH_PREV] = NIL
    if head != NIL:
        _header(nodes, meta, head - 1)[SH_PREV] = mfn + 1
    doms[slot, D_SLABS + cls] = mfn + 1


@njit(nogil=True, cache=True)
def _slab_remove(nodes, meta, doms, slot, cls, mfn):
    """Take slab ``mfn`` off its class's list; caller holds the domain lock."""
    hdr = _header(nodes, meta, mfn)
    nxt = hdr[SH_NEXT]
    prv = hdr[SH_PREV]
    if prv == NIL:
        doms[slot, D_SLABS + cls] = nxt
    else:
        _header(nodes, meta, prv - 1)[SH_NEXT] = nxt
    if nxt != NIL:
        _header(nodes, meta, nxt - 1)[SH_PREV] = prv
    hdr[SH_NEXT] = NIL
    hdr[SH_PREV] = NIL


@njit(nogil=True, cache=True)
def _take_object(nodes, meta, doms, slot, cls):
    """An object from the first slab of the class with room, or 0; under the domain lock."""
    link = doms[slot, D_SLABS + cls]
    if link == NIL:
        return 0
    mfn = link - 1
    hdr = _header(nodes, meta, mfn)
    capacity = slab_capacity(cls)
    # A listed slab has room, so its lowest clear bit is below its capacity.
    for word in range(SH_BITMAP, SH_BITMAP + SLAB_BITMAP_WORDS):
        free = ~hdr[word]
        if free == 0:
            continue
        bit = trailing_zeros(free)
        hdr[word] |= types.uint64(1) << types.uint64(bit)
        hdr[SH_USED] += 1
        if hdr[SH_USED] == capacity:
            _slab_remove(nodes, meta, doms, slot, cls, mfn)
        i = (word - SH_BITMAP) * 64 + bit
        return (page_address(nodes, node_of(meta, mfn), mfn) + SLAB_HEADER_BYTES
                + i * (SLAB_MIN_OBJECT << cls))
    return 0


@njit(nogil=True, cache=True)
def _small_alloc(ft32, ft8, nodes, lists, doms, meta, zone, slot, dom_id, nbytes, node_pref):
    cls = size_class(nbytes)
    spin_lock(doms, slot, D_LOCK)
    if not is_alive(doms, slot, dom_id):
        spin_unlock(doms, slot, D_LOCK)
        return E_DEAD
    addr = _take_object(nodes, meta, doms, slot, cls)
    spin_unlock(doms, slot, D_LOCK)
    if addr:
        return addr
    packed = alloc_block(ft32, ft8, nodes, lists, doms, meta, zone, slot, dom_id,
                         slab_order(cls), node_pref, types.boolean(False), types.boolean(True))
    if packed < 0:
        return packed
    mfn = packed & MFN_MASK
    hdr = _header(nodes, meta, mfn)
    for word in range(SLAB_HEADER_BYTES // 8):
        hdr[word] = 0  # the block may hold the debug pattern rather than zeros
    hdr[SH_CLASS] = cls + 1
    spin_lock(doms, slot, D_LOCK)
    if not is_alive(doms, slot, dom_id):
        spin_unlock(doms, slot, D_LOCK)
        free_pinned_block(ft32, ft8, nodes, lists, doms, meta, slot, dom_id, mfn)
        return E_DEAD
    _slab_push(nodes, meta, doms, slot, cls, mfn)
    addr = _take_object(nodes, meta, doms, slot, cls)
    spin_unlock(doms, slot, D_LOCK)
    return addr


@njit(nogil=True, cache=True)
def _page_of(nodes, meta, addr):
    """The mfn holding address ``addr``, or -1 if no arena holds it."""
    for node in range(meta[M_NR_NODES]):
        offset = addr - nodes[node, N_ADDR]
        if 0 <= offset < (nodes[node, N_PAGES] << PAGE_SHIFT):
            return nodes[node, N_BASE] + (offset >> PAGE_SHIFT)
    return -1


@njit(nogil=True, cache=True)
def _find_slab(ft32, ft8, nodes, meta, slot, page):
    """The head of the slab of ``slot`` holding page ``page``, or -1; under the domain lock."""
    base = nodes[node_of(meta, page), N_BASE]
    for order in range(MAX_SLAB_ORDER + 1):
        head = base + ((page - base) & ~((1 << order) - 1))
        if (atomic_load(ft32, (PG_OWNER, head)) == ((slot + 1) | OWNER_PINNED)
                and ft8[PG_ORDER, head] == order):
            cls = _header(nodes, meta, head)[SH_CLASS]
            if cls != 0 and slab_order(cls - 1) == order:
                return head
    return -1


@njit(nogil=True, cache=True)
def _small_free(ft32, ft8, nodes, lists, doms, meta, slot, dom_id, addr):
    page = _page_of(nodes, meta, addr)
    if page < 0:
        return E_BAD_FREE
    spin_lock(doms, slot, D_LOCK)
    head = _find_slab(ft32, ft8, nodes, meta, slot, page) \
        if holds_blocks(doms, slot, dom_id) else -1
    if head < 0:
        spin_unlock(doms, slot, D_LOCK)
        return E_BAD_FREE
    hdr = _header(nodes, meta, head)
    cls = hdr[SH_CLASS] - 1
    size = SLAB_MIN_OBJECT << cls
    offset = addr - page_address(nodes, node_of(meta, head), head) - SLAB_HEADER_BYTES
    i = offset // size
    word = SH_BITMAP + (i >> 6)
    bit = types.uint64(1) << types.uint64(i & 63)
    if offset < 0 or offset % size != 0 or hdr[word] & bit == 0:
        spin_unlock(doms, slot, D_LOCK)
        return E_BAD_FREE
    hdr[word] &= ~bit
    hdr[SH_USED] -= 1
    if hdr[SH_USED] == slab_capacity(cls) - 1:
        _slab_push(nodes, meta, doms, slot, cls, head)
    empty = hdr[SH_USED] == 0
    if empty:
        _slab_remove(nodes, meta, doms, slot, cls, head)
    spin_unlock(doms, slot, D_LOCK)
    if empty:
        return free_pinned_block(ft32, ft8, nodes, lists, doms, meta, slot, dom_id, head)
    return 0


@njit(nogil=True, cache=True)
def array_alloc(ft32, ft8, nodes, lists, doms, meta, zone, slot, dom_id, nbytes, node_pref):
    """Memory for ``nbytes`` of array data owned by the domain; an address, or an error < 0.

    The address has OLD_BYTES set when the memory may hold the domain's own earlier bytes,
    as malloc's would (a slab object, a parked block); otherwise it comes zeroed.
    """
    if atomic_load(meta, M_CLOSED):
        return E_DEAD
    if nbytes < 0:  # a size_t past int64: more than any heap holds
        return E_NOMEM
    nbytes = max(nbytes, 1)
    if nbytes <= SLAB_MAX_OBJECT:
        addr = _small_alloc(ft32, ft8, nodes, lists, doms, meta, zone, slot, dom_id, nbytes,
                            node_pref)
        return addr | OLD_BYTES if addr > 0 else addr
    order = order_for_bytes(meta, nbytes)
    if order < 0:
        return E_NOMEM
    addr = take_parked(ft32, nodes, doms, meta, slot, dom_id, order)
    if addr:
        return addr | OLD_BYTES
    packed = alloc_block(ft32, ft8, nodes, lists, doms, meta, zone, slot, dom_id, order,
                         node_pref, types.boolean(False), types.boolean(True))
    if packed in (E_QUOTA, E_NOMEM) and flush_parked(
            ft32, ft8, nodes, lists, doms, meta, slot, dom_id):
        packed = alloc_block(ft32, ft8, nodes, lists, doms, meta, zone, slot, dom_id, order,
                             node_pref, types.boolean(False), types.boolean(True))
    if packed < 0:
        return packed
    mfn = packed & MFN_MASK
    return page_address(nodes, node_of(meta, mfn), mfn)


@njit(nogil=True, cache=True)
def array_free(ft32, ft8, nodes, lists, doms, meta, slot, dom_id, addr):
    """Give back what array_alloc returned; 1 if a scrubber should wake, else 0 or < 0."""
    if addr & (PAGE_SIZE - 1):
        return _small_free(ft32, ft8, nodes, lists, doms, meta, slot, dom_id, addr)
    page = _page_of(nodes, meta, addr)
    if page < 0:
        return E_BAD_FREE
    if park_block(ft32, ft8, nodes, doms, meta, slot, dom_id, page):
        return 0
    return free_pinned_block(ft32, ft8, nodes, lists, doms, meta, slot, dom_id, page)


@njit(nogil=True, cache=True)
def array_capacity(ft32, ft8, nodes, doms, meta, slot, dom_id, addr):
    """Bytes usable at ``addr`` (its object's or block's size), or an error < 0."""
    page = _page_of(nodes, meta, addr)
    if page < 0:
        return E_BAD_FREE
    if addr & (PAGE_SIZE - 1) == 0:
        if atomic_load(ft32, (PG_OWNER, page)) != ((slot + 1) | OWNER_PINNED):
            return E_BAD_FREE
        return PAGE_SIZE << ft8[PG_ORDER, page]
    spin_lock(doms, slot, D_LOCK)
    head = _find_slab(ft32, ft8, nodes, meta, slot, page)
    size = E_BAD_FREE
    if head >= 0:
        size = SLAB_MIN_OBJECT << (_header(nodes, meta, head)[SH_CLASS] - 1)
    spin_unlock(doms, slot, D_LOCK)
    return size


@njit(nogil=True, cache=True)
def array_realloc(ft32, ft8, nodes, lists, doms, meta, zone, slot, dom_id, addr, nbytes,
                  node_pref):
    """Resize array data keeping its bytes: in place while the new size fits and uses more
    than half the room; else allocate, copy, free. An address, or an error < 0."""
    if addr == 0:
        new = array_alloc(ft32, ft8, nodes, lists, doms, meta, zone, slot, dom_id, nbytes,
                          node_pref)
        return new & ~OLD_BYTES if new > 0 else new
    room = array_capacity(ft32, ft8, nodes, doms, meta, slot, dom_id, addr)
    if room < 0:
        return room
    if room // 2 < nbytes <= room:
        return addr
    new = array_alloc(ft32, ft8, nodes, lists, doms, meta, zone, slot, dom_id, nbytes,
                      node_pref)
    if new < 0:
        return new
    new &= ~OLD_BYTES
    memcpy_bytes(new, addr, min(room, nbytes))
    array_free(ft32, ft8, nodes, lists, doms, meta, slot, dom_id, addr)
    return new
