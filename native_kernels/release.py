"""Giving clean free memory back to the OS (MADV_DONTNEED), kept apart from scrubbing.

The OS call happens in Python (xenheap.prim) without any lock, so the chunks are first
claimed off the free lists, then released, then freed back. Memory dropped with
MADV_DONTNEED reads zero when touched again, so the chunks come back clean (dirty in debug
mode, where clean means "holds the scrub pattern").
"""

from numba import njit, types

from native_kernels.atomics import add_locked, atomic_load, fetch_add
from native_kernels.buddy import free_heap_pages
from native_kernels.layout import (
    INVALID_DIRTY_IDX,
    L_HEAD,
    M_DEBUG,
    M_MAX_ORDER,
    N_FREE,
    N_LOCK,
    N_RELEASED,
    NIL,
    PG_FIRST_DIRTY,
    PG_STATE,
    PGS_INUSE,
)
from native_kernels.locks import spin_lock, spin_unlock
from native_kernels.page_list import page_list_del

# Rows of a claim: (mfn, order, given to the OS); order CHUNK_UNUSED ends the rows.
C_MFN = 0
C_ORDER = 1
C_RELEASED = 2
CLAIM_FIELDS = 3
CHUNK_UNUSED = -1


@njit(nogil=True, cache=True)
def claim_clean_chunks(hs, node, max_pages, out):
    """Take clean free chunks of ``node`` off its lists, highest order first.

    Stops at ``max_pages`` pages or ``out.shape[0]`` chunks; fills rows of ``out`` (C_*,
    which must read CHUNK_UNUSED in C_ORDER beforehand) and returns how many. A claimed
    chunk's head is marked in use, so a buddy being freed meanwhile does not try to merge
    with it.
    """
    ft32, ft8, nodes, lists, meta = hs.ft32, hs.ft8, hs.nodes, hs.lists, hs.meta
    taken = 0
    pages = 0
    spin_lock(nodes, node, N_LOCK)
    for order in range(meta[M_MAX_ORDER], -1, -1):
        size = 1 << order
        while taken < out.shape[0] and pages + size <= max_pages:
            link = lists[node, order, L_HEAD]
            if link == NIL or atomic_load(ft32, (PG_FIRST_DIRTY, link - 1)) \
                    != INVALID_DIRTY_IDX:
                break
            mfn = link - 1
            page_list_del(ft32, lists, node, order, mfn)
            ft8[PG_STATE, mfn] = PGS_INUSE
            add_locked(nodes, (node, N_FREE), -size)
            out[taken, C_MFN] = mfn
            out[taken, C_RELEASED] = 0
            out[taken, C_ORDER] = order
            taken += 1
            pages += size
    spin_unlock(nodes, node, N_LOCK)
    return taken


@njit(nogil=True, cache=True)
def return_claimed_chunks(hs, node, chunks, released_pages):
    """Free back every claimed chunk in ``chunks`` and count ``released_pages`` as given
    to the OS. A chunk the OS took reads zero: clean, except in debug mode, where clean
    means "holds the scrub pattern"."""
    nodes, meta = hs.nodes, hs.meta
    debug = meta[M_DEBUG] != 0
    for i in range(chunks.shape[0]):
        if chunks[i, C_ORDER] == CHUNK_UNUSED:
            break
        free_heap_pages(hs, chunks[i, C_MFN], chunks[i, C_ORDER],
                        debug and chunks[i, C_RELEASED] != 0, types.int64(0))
    fetch_add(nodes, (node, N_RELEASED), released_pages)
