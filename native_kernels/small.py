"""Slabs: small objects for numpy arrays (native_kernels.arrays gives larger data a block).

Objects up to SLAB_MAX_OBJECT bytes come from per-domain slabs: a pinned block split into
equal objects of one size class, with a header at its start (layout.SH_*). Slabs with a free
object are listed per class in the domain's row. An emptied slab is parked for the next slab
of its order, within a bound (park_limit), or goes back to the heap (dirty).
"""

from numba import njit, types

from native_kernels.atomics import atomic_load, atomic_store
from native_kernels.buddy import node_of, page_address
from native_kernels.domain import MFN_MASK, alloc_block, free_pinned_block, holds_blocks, is_alive
from native_kernels.domain_life import relinquish_dying
from native_kernels.jit import INLINE, INTERNAL, outlined
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
    NUMPY_PARK_MAX,
    OWNER_PINNED,
    PAGE_SHIFT,
    PAGE_SIZE,
    PG_ORDER,
    PG_OWNER,
    PG_TAG,
    SH_BITMAP,
    SH_CLASS,
    SH_NEXT,
    SH_PREV,
    SH_USED,
    SLAB_BITMAP_WORDS,
    SLAB_CLASSES,
    SLAB_HEADER_BYTES,
    SLAB_MAGIC,
    SLAB_MAX_OBJECT,
    SLAB_MIN_OBJECT,
    SLAB_PARK_MAX,
    TAG_SLAB,
)
from native_kernels.locks import spin_lock, spin_unlock
from native_kernels.parked import flush_every_parked, flush_parked, park_locked, pop_parked
from native_kernels.raw import pointer_to, trailing_zeros

MAX_SLAB_ORDER = SLAB_CLASSES - 5
SLAB_MIN_SHIFT = SLAB_MIN_OBJECT.bit_length() - 1  # objects of class c: 1 << (this + c)

# numpy's hot path (take_small, release_small and the helpers they call) is compiled with
# numba's ``_nrt=False``: otherwise numba brackets every function that takes arrays with
# out-of-line reference-count calls (NRT_incref/NRT_decref, a pair per array, even for
# carrays that own nothing), and on this path they cost more than the work itself (an
# allocation + free of a slab object went from about 260 to 115 ns with them gone and
# fewer arrays passed). Such kernels may take arrays but not make them (no carray), so
# they reach slab headers through raw pointers.


@njit(nogil=True, cache=True, _nrt=False, **INTERNAL)
def size_class(nbytes):
    """The smallest class whose objects hold ``nbytes``."""
    cls = 0
    while (SLAB_MIN_OBJECT << cls) < nbytes:
        cls += 1
    return cls


@njit(nogil=True, cache=True, **INTERNAL)
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


@njit(nogil=True, cache=True, _nrt=False, **INTERNAL)
def slab_order(cls):
    """Order of a class's slab block: one page up to 256-byte objects, then larger."""
    return max(0, cls - 4)


@njit(nogil=True, cache=True, _nrt=False, **INTERNAL)
def slab_capacity(cls):
    """Objects per slab of class ``cls``."""
    return ((PAGE_SIZE << slab_order(cls)) - SLAB_HEADER_BYTES) >> (SLAB_MIN_SHIFT + cls)


@njit(nogil=True, cache=True, _nrt=False, **INTERNAL)
def block_address(nodes, meta, mfn):
    """Address of block ``mfn``."""
    return page_address(nodes, node_of(meta, mfn), mfn)


@njit(nogil=True, cache=True, _nrt=False, **INTERNAL, **INLINE)
def _slab_push(nodes, meta, doms, slot, cls, mfn):
    """Put slab ``mfn`` at the head of its class's list; caller holds the domain lock."""
    head = doms[slot, D_SLABS + cls]
    hdr = pointer_to(block_address(nodes, meta, mfn), types.uint64)
    hdr[SH_NEXT] = head
    hdr[SH_PREV] = NIL
    if head != NIL:
        pointer_to(block_address(nodes, meta, head - 1), types.uint64)[SH_PREV] = mfn + 1
    doms[slot, D_SLABS + cls] = mfn + 1


@njit(nogil=True, cache=True, _nrt=False, **INTERNAL, **INLINE)
def _slab_remove(nodes, meta, doms, slot, cls, mfn):
    """Take slab ``mfn`` off its class's list; caller holds the domain lock."""
    hdr = pointer_to(block_address(nodes, meta, mfn), types.uint64)
    nxt = hdr[SH_NEXT]
    prv = hdr[SH_PREV]
    if prv == NIL:
        doms[slot, D_SLABS + cls] = nxt
    else:
        pointer_to(block_address(nodes, meta, prv - 1), types.uint64)[SH_NEXT] = nxt
    if nxt != NIL:
        pointer_to(block_address(nodes, meta, nxt - 1), types.uint64)[SH_PREV] = prv
    hdr[SH_NEXT] = NIL
    hdr[SH_PREV] = NIL


@njit(nogil=True, cache=True, _nrt=False, **INTERNAL, **INLINE)
def _take_object(nodes, meta, doms, slot, cls):
    """An object from the first slab of the class with room, or 0; under the domain lock."""
    link = doms[slot, D_SLABS + cls]
    if link == NIL:
        return 0
    mfn = link - 1
    hdr = pointer_to(block_address(nodes, meta, mfn), types.uint64)
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
        return block_address(nodes, meta, mfn) + SLAB_HEADER_BYTES + (i << (SLAB_MIN_SHIFT + cls))
    return 0


@njit(nogil=True, cache=True, _nrt=False, **INTERNAL)
def _init_slab(ft32, nodes, meta, mfn, cls):
    """Write the header of a new, empty slab of class ``cls`` at block ``mfn``, and mark the
    block a slab (TAG_SLAB): the block may hold the debug pattern, or a parked block's link
    and its domain's old bytes."""
    hdr = pointer_to(block_address(nodes, meta, mfn), types.uint64)
    for word in range(SLAB_HEADER_BYTES // 8):
        hdr[word] = 0
    hdr[SH_CLASS] = (types.uint64(SLAB_MAGIC) << types.uint64(8)) | types.uint64(cls + 1)
    atomic_store(ft32, (PG_TAG, mfn), atomic_load(ft32, (PG_TAG, mfn)) | TAG_SLAB)


@njit(nogil=True, cache=True, _nrt=False, **INTERNAL)
def _unmark_slab(ft32, mfn):
    """Clear block ``mfn``'s TAG_SLAB: it stops being a slab (emptied, or never listed), so
    a free of the whole block may name it, and an object's free no longer may."""
    atomic_store(ft32, (PG_TAG, mfn), atomic_load(ft32, (PG_TAG, mfn)) & ~TAG_SLAB)


@njit(nogil=True, cache=True, _nrt=False, **INTERNAL)
def slab_class(hdr):
    """The size class a slab header names, or -1 if the block holds no slab header."""
    word = hdr[SH_CLASS]
    cls = types.int64(word & types.uint64(0xFF)) - 1
    if word >> types.uint64(8) != types.uint64(SLAB_MAGIC) or not 0 <= cls < SLAB_CLASSES:
        return -1
    return cls


@njit(nogil=True, cache=True, _nrt=False, **INTERNAL, **INLINE)
def take_small(ft32, nodes, doms, meta, slot, dom_id, nbytes):
    """numpy's hot path for ``nbytes`` (1 to SLAB_MAX_OBJECT): an object of the first listed
    slab of its class, else of a slab the domain emptied and parked (native_kernels.parked),
    under the domain lock alone. Its address; 0 if neither is there (small_alloc then
    makes a slab); E_DEAD.

    The parked slab comes back under the same lock as the miss: a burst of arrays after
    an earlier one empties its slabs takes one per slab. And only four state arrays, and
    no call below it that takes more: numba passes every array as its seven or more
    words, so a call that takes all seven arrays costs more than this whole path.
    """
    if atomic_load(meta, M_CLOSED):
        return E_DEAD
    cls = size_class(nbytes)
    spin_lock(doms, slot, D_LOCK)
    if not is_alive(doms, slot, dom_id):
        spin_unlock(doms, slot, D_LOCK)
        return E_DEAD
    addr = _take_object(nodes, meta, doms, slot, cls)
    if addr == 0:
        # Its header is written before the lock goes, so no free finds it pinned without.
        mfn = pop_parked(ft32, nodes, doms, meta, slot, slab_order(cls), types.boolean(True))
        if mfn >= 0:
            _init_slab(ft32, nodes, meta, mfn, cls)
            _slab_push(nodes, meta, doms, slot, cls, mfn)
            addr = _take_object(nodes, meta, doms, slot, cls)
    spin_unlock(doms, slot, D_LOCK)
    return addr


# The slow paths' copies of the hot path's inlined kernels (jit.outlined).
take_small_outlined = outlined(take_small)
_slab_push_outlined = outlined(_slab_push)
_take_object_outlined = outlined(_take_object)


@njit(nogil=True, cache=True, **INTERNAL)
def alloc_pinned(hs, slot, dom_id, order, node_pref):
    """A block pinned for numpy (alloc_block); if the quota or the heap is short, the
    domain's parked blocks go back to the heap first (and, the heap short, destroyed
    domains' memory and every domain's parked blocks) and it tries once more."""
    packed = alloc_block(hs, slot, dom_id, order, node_pref, types.boolean(False),
                         types.boolean(True))
    if packed not in (E_QUOTA, E_NOMEM):
        return packed
    room = flush_parked(hs, slot, dom_id) > 0
    if packed == E_NOMEM:
        if relinquish_dying(hs):
            room = True
        if flush_every_parked(hs) > 0:
            room = True
    if room:
        packed = alloc_block(hs, slot, dom_id, order, node_pref, types.boolean(False),
                             types.boolean(True))
    return packed


@njit(nogil=True, cache=True, **INTERNAL)
def small_alloc(hs, slot, dom_id, nbytes, node_pref):
    nodes, doms, meta = hs.nodes, hs.doms, hs.meta
    addr = take_small_outlined(hs.ft32, nodes, doms, meta, slot, dom_id, nbytes)
    if addr != 0:
        return addr
    cls = size_class(nbytes)
    packed = alloc_pinned(hs, slot, dom_id, slab_order(cls), node_pref)
    if packed < 0:
        return packed
    mfn = packed & MFN_MASK
    _init_slab(hs.ft32, nodes, meta, mfn, cls)
    spin_lock(doms, slot, D_LOCK)
    if not is_alive(doms, slot, dom_id):
        spin_unlock(doms, slot, D_LOCK)
        _unmark_slab(hs.ft32, mfn)  # never listed: a block again, freed
        free_pinned_block(hs, slot, dom_id, mfn)
        return E_DEAD
    _slab_push_outlined(nodes, meta, doms, slot, cls, mfn)  # another thread's may be listed too
    addr = _take_object_outlined(nodes, meta, doms, slot, cls)
    spin_unlock(doms, slot, D_LOCK)
    return addr


@njit(nogil=True, cache=True, _nrt=False, **INTERNAL)
def page_of(nodes, meta, addr):
    """The mfn holding address ``addr``, or -1 if no arena holds it."""
    for node in range(meta[M_NR_NODES]):
        offset = addr - nodes[node, N_ADDR]
        if 0 <= offset < (nodes[node, N_PAGES] << PAGE_SHIFT):
            return nodes[node, N_BASE] + (offset >> PAGE_SHIFT)
    return -1


@njit(nogil=True, cache=True, _nrt=False, **INTERNAL, **INLINE)
def find_slab(ft32, ft8, nodes, meta, slot, page, nbytes):
    """The head of the slab of ``slot`` holding page ``page``, or -1; under the domain lock.
    Its arrays one by one: numpy's hot free (release_small) builds only those it reads.

    ``nbytes``, the object's size as numpy gives it to free (0: unknown), names the order
    to try first (a slab's block is aligned to its order): one try where numpy is right.
    The others follow, as the check is the same for each.
    """
    base = nodes[node_of(meta, page), N_BASE]
    first = slab_order(size_class(nbytes)) if 0 < nbytes <= SLAB_MAX_OBJECT else 0
    for k in range(MAX_SLAB_ORDER + 1):
        order = (first + k) % (MAX_SLAB_ORDER + 1)
        head = base + ((page - base) & ~((1 << order) - 1))
        if (atomic_load(ft32, (PG_OWNER, head)) == ((slot + 1) | OWNER_PINNED)
                and ft8[PG_ORDER, head] == order
                and atomic_load(ft32, (PG_TAG, head)) & TAG_SLAB):
            cls = slab_class(pointer_to(block_address(nodes, meta, head), types.uint64))
            if cls >= 0 and slab_order(cls) == order:
                return head
    return -1


@njit(nogil=True, cache=True, _nrt=False, **INTERNAL, **INLINE)
def release_small(ft32, ft8, nodes, doms, meta, slot, dom_id, addr, nbytes):
    """numpy's hot path for freeing slab object ``addr`` (``nbytes``: as find_slab), under
    the domain lock alone (few arrays, as take_small). 0 if done; E_BAD_FREE if it is no
    object of this domain in use; head + 1 of its slab if that slab is now empty and
    could not be parked (park_limit), off every list, for the caller to free."""
    page = page_of(nodes, meta, addr)
    if page < 0:
        return E_BAD_FREE
    spin_lock(doms, slot, D_LOCK)
    head = find_slab(ft32, ft8, nodes, meta, slot, page, nbytes) \
        if holds_blocks(doms, slot, dom_id) else -1
    if head < 0:
        spin_unlock(doms, slot, D_LOCK)
        return E_BAD_FREE
    start = block_address(nodes, meta, head)
    hdr = pointer_to(start, types.uint64)
    cls = slab_class(hdr)  # find_slab checked it
    offset = addr - start - SLAB_HEADER_BYTES
    shift = SLAB_MIN_SHIFT + cls  # objects are 1 << shift bytes: no division
    i = offset >> shift
    word = SH_BITMAP + (i >> 6)
    bit = types.uint64(1) << types.uint64(i & 63)
    if offset < 0 or offset & ((1 << shift) - 1) or hdr[word] & bit == 0:
        spin_unlock(doms, slot, D_LOCK)
        return E_BAD_FREE
    hdr[word] &= ~bit
    hdr[SH_USED] -= 1
    if hdr[SH_USED] == slab_capacity(cls) - 1:
        _slab_push(nodes, meta, doms, slot, cls, head)
    empty = hdr[SH_USED] == 0
    if empty:
        _slab_remove(nodes, meta, doms, slot, cls, head)
        _unmark_slab(ft32, head)  # a block again, parked or freed
        # Parked under the same lock: a burst of arrays empties its slabs by the dozen.
        empty = not (is_alive(doms, slot, dom_id)
                     and park_locked(ft32, ft8, nodes, doms, meta, slot, head,
                                     park_limit(ft8, head)))
    spin_unlock(doms, slot, D_LOCK)
    return head + 1 if empty else 0


release_small_outlined = outlined(release_small)
find_slab_outlined = outlined(find_slab)


@njit(nogil=True, cache=True, _nrt=False, **INTERNAL)
def park_limit(ft8, head):
    """How many emptied slabs of slab ``head``'s order its domain keeps (parked).

    Slabs of more than a page hold 15 objects of 512 bytes and up, so a burst of arrays
    empties them by the dozen (51 of the 66 slabs that 1,000 arrays of 8-1000 bytes use):
    up to SLAB_PARK_MAX. A one-page slab is kept as a 4 KiB array's block is, on the
    same stack and within its bound of NUMPY_PARK_MAX (the two kinds share it), so that
    stack never grows past it; else one small array made and freed in a loop takes a page
    from the heap and gives it back dirty every time (about 1 us per array).
    """
    return SLAB_PARK_MAX if ft8[PG_ORDER, head] > 0 else NUMPY_PARK_MAX
