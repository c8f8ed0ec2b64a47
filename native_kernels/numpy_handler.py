"""numpy's NEP 49 allocator callbacks as numba cfuncs over the heap's state.

numpy calls ``malloc(ctx, size)``, ``calloc(ctx, nelem, elsize)``, ``realloc(ctx, ptr,
size)`` and ``free(ctx, ptr, size)`` with the ``ctx`` of the handler that was current when
the array was made. Here ``ctx`` points to an int64 record (CTX_* below) naming the state
arrays by address and the domain; the callbacks rebuild the arrays with ``carray`` and call
the nogil kernels of native_kernels.small. A failure returns NULL, which numpy turns into
its usual MemoryError. No Python object is touched, so numpy may call them without the GIL,
but for one call back into Python when the quota or the heap is short (CTX_RECLAIM), which
takes the GIL itself.
"""

from numba import carray, cfunc, njit, types

from native_kernels.arrays import OLD_BYTES, array_alloc, array_realloc
from native_kernels.atomics import atomic_load, fetch_add
from native_kernels.domain import free_pinned_block
from native_kernels.jit import INLINE, INTERNAL
from native_kernels.layout import (
    D_MAX_PAGES,
    DOM_FIELDS,
    E_BAD_FREE,
    E_NOMEM,
    E_QUOTA,
    FT8_FIELDS,
    FT32_FIELDS,
    LIST_FIELDS,
    M_BAD_ARRAY_FREES,
    M_CLOSED,
    M_DEBUG,
    M_FORKED,
    MAX_ORDER_LIMIT,
    META_FIELDS,
    NODE_FIELDS,
    NUMPY_PARK_MAX,
    NUMPY_PARK_ORDERS,
    PAGE_SIZE,
    SLAB_MAX_OBJECT,
    HeapState,
)
from native_kernels.parked import park_block, take_parked
from native_kernels.raw import (
    address_to_voidptr,
    call_function,
    memset_bytes,
    pointer_to,
    voidptr_to_address,
)
from native_kernels.small import order_for_bytes, page_of, release_small, take_small

CTX_FT32 = 0  # addresses of the state arrays
CTX_FT8 = 1
CTX_NODES = 2
CTX_LISTS = 3
CTX_DOMS = 4
CTX_META = 5
CTX_ZONE = 6
CTX_NR_PAGES = 7
CTX_NR_NODES = 8
CTX_MAX_DOMAINS = 9
CTX_SLOT = 10  # the domain
CTX_DOM_ID = 11
CTX_NODE = 12  # preferred node: that of the thread that installed the handler
# Address of a C function (int64) -> int64 (a ctypes callback into Python): it gives back
# the blocks that the Python API parked in reuse caches (xenheap.reuse), which no kernel can
# reach: the domain's, given E_QUOTA, every domain's, given E_NOMEM. Nonzero if any went
# back.
CTX_RECLAIM = 13
CTX_FIELDS = 14

# Arrays of more than a slab object up to this many bytes may find a block the domain
# parked (native_kernels.parked): a short path like the slabs' takes it, and parks it again.
PARKED_MAX_BYTES = PAGE_SIZE << (NUMPY_PARK_ORDERS - 1)

_MALLOC_SIG = types.voidptr(types.voidptr, types.uintp)
_CALLOC_SIG = types.voidptr(types.voidptr, types.uintp, types.uintp)
_REALLOC_SIG = types.voidptr(types.voidptr, types.voidptr, types.uintp)
_FREE_SIG = types.void(types.voidptr, types.voidptr, types.uintp)


@njit(nogil=True, cache=True, **INTERNAL, **INLINE)
def _context(ctx):
    return carray(pointer_to(voidptr_to_address(ctx), types.int64), CTX_FIELDS)


# The state arrays named in context record ``c``, one at a time: the short paths below
# build only those they read.
@njit(nogil=True, cache=True, **INTERNAL, **INLINE)
def _ft32(c):
    return carray(pointer_to(c[CTX_FT32], types.uint32), (FT32_FIELDS, c[CTX_NR_PAGES]))


@njit(nogil=True, cache=True, **INTERNAL, **INLINE)
def _ft8(c):
    return carray(pointer_to(c[CTX_FT8], types.uint8), (FT8_FIELDS, c[CTX_NR_PAGES]))


@njit(nogil=True, cache=True, **INTERNAL, **INLINE)
def _nodes(c):
    return carray(pointer_to(c[CTX_NODES], types.int64), (c[CTX_NR_NODES], NODE_FIELDS))


@njit(nogil=True, cache=True, **INTERNAL, **INLINE)
def _doms(c):
    return carray(pointer_to(c[CTX_DOMS], types.int64), (c[CTX_MAX_DOMAINS], DOM_FIELDS))


@njit(nogil=True, cache=True, **INTERNAL, **INLINE)
def _meta(c):
    return carray(pointer_to(c[CTX_META], types.int64), META_FIELDS)


@njit(nogil=True, cache=True, **INTERNAL)
def _state(c):
    """The heap's state named in context record ``c``."""
    nn = c[CTX_NR_NODES]
    lists = carray(pointer_to(c[CTX_LISTS], types.int64), (nn, MAX_ORDER_LIMIT + 1, LIST_FIELDS))
    zone = carray(pointer_to(c[CTX_ZONE], types.int64), (nn, nn))
    return HeapState(_ft32(c), _ft8(c), _nodes(c), lists, _doms(c), _meta(c), zone)


@njit(nogil=True, cache=True, **INTERNAL, **INLINE)
def _take_small(ctx, nbytes):
    """small.take_small for context record ``ctx``: numpy's hot path builds only the arrays
    it reads (an address, 0 for the full path, or E_DEAD)."""
    c = _context(ctx)
    return take_small(_ft32(c), _nodes(c), _doms(c), _meta(c), c[CTX_SLOT], c[CTX_DOM_ID],
                      nbytes)


@njit(nogil=True, cache=True, **INTERNAL, **INLINE)
def _release_small(c, meta, addr, nbytes):
    """small.release_small for context record ``c``, building only the arrays it reads."""
    return release_small(_ft32(c), _ft8(c), _nodes(c), _doms(c), meta, c[CTX_SLOT],
                         c[CTX_DOM_ID], addr, nbytes)


@njit(nogil=True, cache=True, **INTERNAL, **INLINE)
def _take_parked(ctx, nbytes):
    """parked.take_parked for an array of ``nbytes`` (SLAB_MAX_OBJECT to PARKED_MAX_BYTES),
    building only the arrays it reads: a block's address (holding old bytes), or 0 for
    the full path (none parked, or the heap closed)."""
    c = _context(ctx)
    meta = _meta(c)
    if atomic_load(meta, M_CLOSED):
        return 0
    return take_parked(_ft32(c), _nodes(c), _doms(c), meta, c[CTX_SLOT], c[CTX_DOM_ID],
                       order_for_bytes(meta, nbytes))


@njit(nogil=True, cache=True, **INTERNAL, **INLINE)
def _free_block(c, meta, addr):
    """arrays.array_free for the page-aligned block at ``addr``: parked with only the arrays
    that takes, else freed with the whole state. As array_free, 1 if a scrubber should
    wake, else 0 or < 0."""
    nodes = _nodes(c)
    page = page_of(nodes, meta, addr)
    if page < 0:
        return E_BAD_FREE
    if park_block(_ft32(c), _ft8(c), nodes, _doms(c), meta, c[CTX_SLOT], c[CTX_DOM_ID], page,
                  NUMPY_PARK_MAX):
        return 0
    return free_pinned_block(_state(c), c[CTX_SLOT], c[CTX_DOM_ID], page)


@njit(nogil=True, cache=True, **INTERNAL)
def _array_alloc(ctx, nbytes):
    c = _context(ctx)
    hs = _state(c)
    return array_alloc(hs, c[CTX_SLOT], c[CTX_DOM_ID], nbytes, c[CTX_NODE])


@njit(nogil=True, cache=True, **INTERNAL)
def _reclaimed(ctx, result, nbytes):
    """``result`` of an allocation of ``nbytes`` says the quota or the heap is short: ask
    the Python side to give back the blocks parked in reuse caches (CTX_RECLAIM); True if
    any went back. Not for a request that nothing given back could serve (larger than the
    largest chunk, or than the whole quota): every domain's cache would go for nothing."""
    if result != E_NOMEM and result != E_QUOTA:
        return False
    if nbytes < 0:  # a size_t past int64
        return False
    c = _context(ctx)
    pages = 1  # a slab's page
    if nbytes > SLAB_MAX_OBJECT:
        order = order_for_bytes(_meta(c), nbytes)
        if order < 0:
            return False
        pages = 1 << order
    if result == E_QUOTA and pages > _doms(c)[c[CTX_SLOT], D_MAX_PAGES]:
        return False
    return c[CTX_RECLAIM] != 0 and call_function(c[CTX_RECLAIM], result) != 0


@njit(nogil=True, cache=True, **INTERNAL)
def _null_or(addr):
    return address_to_voidptr(addr if addr > 0 else 0)


@cfunc(_MALLOC_SIG, nopython=True, cache=True)
def numpy_malloc(ctx, size):
    nbytes = types.int64(size)
    if 0 < nbytes <= SLAB_MAX_OBJECT:  # the hot path; 0: no slab of the class has room
        addr = _take_small(ctx, nbytes)
        if addr != 0:
            return _null_or(addr)
    elif SLAB_MAX_OBJECT < nbytes <= PARKED_MAX_BYTES:  # a few pages: the next hot path
        addr = _take_parked(ctx, nbytes)
        if addr != 0:
            return _null_or(addr)
    addr = _array_alloc(ctx, nbytes)
    if _reclaimed(ctx, addr, nbytes):
        addr = _array_alloc(ctx, nbytes)
    return _null_or(addr & ~OLD_BYTES if addr > 0 else addr)


@cfunc(_CALLOC_SIG, nopython=True, cache=True)
def numpy_calloc(ctx, nelem, elsize):
    nbytes = types.int64(nelem) * types.int64(elsize)
    if elsize != 0 and nbytes // types.int64(elsize) != types.int64(nelem):
        return _null_or(0)  # overflow
    if 0 < nbytes <= SLAB_MAX_OBJECT:  # the hot path: a slab object, zeroed here
        addr = _take_small(ctx, nbytes)
        if addr > 0:
            memset_bytes(addr, 0, nbytes)
        if addr != 0:
            return _null_or(addr)
    elif SLAB_MAX_OBJECT < nbytes <= PARKED_MAX_BYTES:  # as numpy_malloc; old bytes zeroed
        addr = _take_parked(ctx, nbytes)
        if addr != 0:
            memset_bytes(addr, 0, nbytes)
            return _null_or(addr)
    addr = _array_alloc(ctx, nbytes)
    if _reclaimed(ctx, addr, nbytes):
        addr = _array_alloc(ctx, nbytes)
    if addr > 0:
        c = _context(ctx)
        meta = _meta(c)
        # Fresh blocks come zeroed, so clean memory is not zeroed twice; a slab object or a
        # parked block may hold the domain's earlier bytes, and debug mode hands out the
        # scrub pattern.
        if addr & OLD_BYTES or meta[M_DEBUG] != 0:
            addr &= ~OLD_BYTES
            memset_bytes(addr, 0, nbytes)
    return _null_or(addr)


@cfunc(_REALLOC_SIG, nopython=True, cache=True)
def numpy_realloc(ctx, ptr, size):
    c = _context(ctx)
    hs = _state(c)
    if atomic_load(hs.meta, M_FORKED):
        return _null_or(0)  # as numpy_free: the old data's locks may never be released
    addr = array_realloc(hs, c[CTX_SLOT], c[CTX_DOM_ID], voidptr_to_address(ptr),
                         types.int64(size), c[CTX_NODE])
    if _reclaimed(ctx, addr, types.int64(size)):
        addr = array_realloc(hs, c[CTX_SLOT], c[CTX_DOM_ID], voidptr_to_address(ptr),
                             types.int64(size), c[CTX_NODE])
    if addr == E_BAD_FREE:  # not a live array of the domain: as numpy_free, counted
        fetch_add(hs.meta, M_BAD_ARRAY_FREES, 1)
    return _null_or(addr)


@cfunc(_FREE_SIG, nopython=True, cache=True)
def numpy_free(ctx, ptr, size):
    addr = voidptr_to_address(ptr)
    if addr == 0:
        return
    c = _context(ctx)
    meta = _meta(c)
    if atomic_load(meta, M_FORKED):
        return  # an inherited array in a forked child: its locks may never be released
    if addr & (PAGE_SIZE - 1):  # a slab object: the hot path, then its slab if emptied
        status = _release_small(c, meta, addr, types.int64(size))  # and not parked
        if status > 0:
            hs = _state(c)
            status = free_pinned_block(hs, c[CTX_SLOT], c[CTX_DOM_ID], status - 1)
    else:
        status = _free_block(c, meta, addr)
    if status < 0:
        fetch_add(meta, M_BAD_ARRAY_FREES, 1)  # nothing freed; Heap.stats() reports it

