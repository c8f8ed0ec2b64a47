"""The kernels the Python API calls, each inside the heap's in-flight guard.

``close()`` sets M_CLOSED and then waits for M_IN_FLIGHT to drop to zero before it unmaps
the arenas; a call entering afterwards sees the flag and returns E_CLOSED. Both sides use
sequentially consistent read-modify-writes, so either the caller sees the flag or close()
sees the caller (Dekker's handshake), without a Python lock on the hot path.
"""

from numba import carray, njit, types

from native_kernels.atomics import fetch_add, fetch_or
from native_kernels.domain import alloc_block, free_block, populate
from native_kernels.domain_life import destroy_domain, relinquish_dying, relinquish_memory
from native_kernels.jit import INTERNAL
from native_kernels.layout import E_CLOSED, E_NOMEM, M_CLOSED, M_IN_FLIGHT, HeapState
from native_kernels.parked import flush_parked
from native_kernels.raw import pointer_to


@njit(nogil=True, cache=True, **INTERNAL)
def borrowed_state(ft32, ft8, nodes, lists, doms, meta, zone):
    """The arrays Python passed, as a HeapState of views that own nothing (as the numpy
    handler's are): numba counts no references to them as the kernels below pass them on,
    each count an atomic add on a word every thread shares. Python holds the arrays for
    the whole call."""
    return HeapState(
        carray(pointer_to(types.int64(ft32.ctypes.data), types.uint32), ft32.shape),
        carray(pointer_to(types.int64(ft8.ctypes.data), types.uint8), ft8.shape),
        carray(pointer_to(types.int64(nodes.ctypes.data), types.int64), nodes.shape),
        carray(pointer_to(types.int64(lists.ctypes.data), types.int64), lists.shape),
        carray(pointer_to(types.int64(doms.ctypes.data), types.int64), doms.shape),
        carray(pointer_to(types.int64(meta.ctypes.data), types.int64), meta.shape),
        carray(pointer_to(types.int64(zone.ctypes.data), types.int64), zone.shape))


@njit(nogil=True, cache=True)
def enter_heap(meta):
    """Count a call in; False (and not counted) once the heap is closing."""
    fetch_add(meta, M_IN_FLIGHT, 1)
    if fetch_or(meta, M_CLOSED, 0):
        fetch_add(meta, M_IN_FLIGHT, -1)
        return False
    return True


@njit(nogil=True, cache=True)
def leave_heap(meta):
    """Count a call out."""
    fetch_add(meta, M_IN_FLIGHT, -1)


@njit(nogil=True, cache=True)
def close_heap(meta):
    """Refuse new calls; returns the calls still in flight (poll until 0)."""
    fetch_or(meta, M_CLOSED, 1)
    return fetch_add(meta, M_IN_FLIGHT, 0)  # a read-modify-write: Dekker needs seq_cst


# Each entry point comes twice: releasing the GIL, for calls that may zero a lot of memory,
# and holding it, for the short ones. Dropping and retaking the GIL around a 1 us kernel
# costs more than the kernel once threads contend for the GIL: alloc(0) + free pairs from
# 1, 2, 4 threads ran 345k, 254k, 125k pairs/s releasing it and 368k, 437k, 472k holding it
# (2-core development machine). The kernels are the same and thread-safe either way: numba's
# nogil changes only a kernel's Python wrapper, so the GIL-holding twin just calls the other
# one, which is compiled once and serves both (a first compile takes seconds per copy).

@njit(nogil=True, cache=True)
def heap_alloc(ft32, ft8, nodes, lists, doms, meta, zone, slot, dom_id, order, node_pref,
               exact):
    """domain.alloc_block for the Python API (never pinned), without the GIL."""
    if not enter_heap(meta):
        return E_CLOSED
    hs = borrowed_state(ft32, ft8, nodes, lists, doms, meta, zone)
    # pinned as a run-time bool, as numpy's allocations pass it: one compiled alloc_block
    # serves both (see native_kernels.domain).
    result = alloc_block(hs, slot, dom_id, order, node_pref, exact, types.boolean(False))
    if result == E_NOMEM and relinquish_dying(hs):
        result = alloc_block(hs, slot, dom_id, order, node_pref, exact, types.boolean(False))
    leave_heap(meta)
    return result


@njit(nogil=False, cache=True)
def heap_alloc_short(ft32, ft8, nodes, lists, doms, meta, zone, slot, dom_id, order,
                     node_pref, exact):
    """heap_alloc holding the GIL, for small blocks."""
    return heap_alloc(ft32, ft8, nodes, lists, doms, meta, zone, slot, dom_id, order,
                      node_pref, exact)


@njit(nogil=True, cache=True)
def heap_free(ft32, ft8, nodes, lists, doms, meta, zone, slot, dom_id, mfn, order, tag):
    """domain.free_block for the Python API, without the GIL."""
    if not enter_heap(meta):
        return E_CLOSED
    hs = borrowed_state(ft32, ft8, nodes, lists, doms, meta, zone)
    result = free_block(hs, slot, dom_id, mfn, order, tag)
    leave_heap(meta)
    return result


@njit(nogil=False, cache=True)
def heap_free_short(ft32, ft8, nodes, lists, doms, meta, zone, slot, dom_id, mfn, order, tag):
    """heap_free holding the GIL, for frees that zero or poison nothing large."""
    return heap_free(ft32, ft8, nodes, lists, doms, meta, zone, slot, dom_id, mfn, order,
                     tag)


@njit(nogil=True, cache=True)
def heap_alloc_many(ft32, ft8, nodes, lists, doms, meta, zone, slot, dom_id, count, order,
                    node_pref, exact, out):
    """domain.populate for the Python API, each block's (mfn, tag) written to ``out``
    (``out`` without rows: populate, handles not wanted)."""
    if not enter_heap(meta):
        return E_CLOSED
    hs = borrowed_state(ft32, ft8, nodes, lists, doms, meta, zone)
    result = populate(hs, slot, dom_id, count, order, node_pref, exact, out)
    if result == E_NOMEM and relinquish_dying(hs):
        result = populate(hs, slot, dom_id, count, order, node_pref, exact, out)
    leave_heap(meta)
    return result


@njit(nogil=True, cache=True)
def heap_flush_parked(ft32, ft8, nodes, lists, doms, meta, zone, slot, dom_id):
    """parked.flush_parked for the Python API: the blocks freed."""
    if not enter_heap(meta):
        return E_CLOSED
    hs = borrowed_state(ft32, ft8, nodes, lists, doms, meta, zone)
    result = flush_parked(hs, slot, dom_id)
    leave_heap(meta)
    return result


@njit(nogil=True, cache=True)
def heap_destroy(ft32, ft8, nodes, lists, doms, meta, zone, slot, dom_id, defer):
    """domain_life.destroy_domain for the Python API, then relinquish_memory unless
    ``defer`` (the caller has it done soon after): (status, node mask to wake)."""
    if not enter_heap(meta):
        return E_CLOSED, 0
    hs = borrowed_state(ft32, ft8, nodes, lists, doms, meta, zone)
    status = destroy_domain(doms, meta, slot, dom_id)
    wake = 0
    if status == 0 and not defer:
        wake = relinquish_memory(hs, slot, dom_id)[1]
    leave_heap(meta)
    return status, wake


@njit(nogil=True, cache=True)
def heap_relinquish(ft32, ft8, nodes, lists, doms, meta, zone, slot, dom_id):
    """domain_life.relinquish_memory for the Python API: (pages freed or -1, wake mask)."""
    if not enter_heap(meta):
        return E_CLOSED, 0
    hs = borrowed_state(ft32, ft8, nodes, lists, doms, meta, zone)
    result = relinquish_memory(hs, slot, dom_id)
    leave_heap(meta)
    return result
