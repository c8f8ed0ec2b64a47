"""Cleaning dirty pages, and charging the work to the domain that dirtied them.

A chunk's dirty pages are cleaned run by run (``zero_dirty_runs``): zeroed in place, with
ordinary stores when the memory is used next (scrub-on-allocate) or streaming stores when it
is not (the idle scrubber); runs of RESIDENCY_MIN_PAGES and more are first asked whether
they are in RAM (``mincore``), and the pages that are not are dropped with MADV_DONTNEED
instead of being faulted in to be zeroed. Each freed dirty page names its dirtier in
``PG_TAG``, so the time a run took is charged to that domain: into the caller's table (a
scrubber's) or into the node's allocator charge slots, which xenheap.charges drains.
"""

import numpy as np
from numba import njit

from native_kernels.atomics import (
    atomic_load,
    atomic_store,
    fetch_add,
    monotonic_ns,
)
from native_kernels.jit import INTERNAL
from native_kernels.layout import (
    CH_ID,
    CH_NS,
    CH_PAGES,
    CHARGE_SLOTS,
    CHARGE_WORDS,
    N_CHARGE_LOST_NS,
    N_CHARGE_LOST_PAGES,
    N_CHARGES,
    N_LOCK,
    N_UNMAPPED,
    PAGE_SHIFT,
    PG_NEED_SCRUB,
    PG_TAG,
    TAG_MASK,
    TAG_MIXED,
)
from native_kernels.locks import spin_lock, spin_unlock
from native_kernels.os_calls import MADV_DONTNEED, sys_madvise, sys_mincore
from native_kernels.pages import fill_pages, stream_fill_pages

# Dirty runs from this length up are checked for residency (mincore) before zeroing: a
# system call costs about what zeroing 16 pages does.
RESIDENCY_MIN_PAGES = 16


@njit(nogil=True, cache=True, **INTERNAL)
def zero_dirty_runs(ft32, ft8, nodes, node, addr, head, lo, hi, value, streaming, charges,
                    resident):
    """Fill the dirty pages among pages [lo, hi) of the chunk or block at ``head`` (whose
    memory starts at ``addr``) with ``value``, run by run, and clear their need_scrub.

    Returns (cleared, zeroed): the pages cleared, and those of them zeroed rather than
    dropped (MADV_DONTNEED, counted in N_UNMAPPED). The caller holds the pages alone (a
    scrubber while BUDDY_SCRUBBING, an allocator after taking the block), so need_scrub is
    written with plain stores.
    ``streaming`` bypasses the caches, for memory nobody reads next. The work is charged
    to the domains that dirtied the pages (PG_TAG of a dirty free page): pages into the
    caller's ``charges`` table of (id, pages) rows (a scrubber's, see charge_pages), or,
    when ``charges`` is ``nodes`` itself (an allocator), pages and nanoseconds into the
    node's charge slots. ``resident``: None (runs of RESIDENCY_MIN_PAGES and more are
    asked whether they are in RAM), or the caller's ``residency`` of pages [lo, hi), asked
    once for many calls (the scrubber: a system call per granule cost 15% of its time).
    """
    cleared = 0
    dropped = 0
    shared = charges.shape[1] != 2
    head_tag = atomic_load(ft32, (PG_TAG, head))  # the caller holds the chunk: it stays put
    p = lo
    while p < hi:
        if ft8[PG_NEED_SCRUB, head + p] == 0:
            p += 1
            continue
        q = p
        while q < hi and ft8[PG_NEED_SCRUB, head + q] != 0:
            ft8[PG_NEED_SCRUB, head + q] = 0
            q += 1
        started = monotonic_ns() if shared else 0
        run = addr + (p << PAGE_SHIFT)
        if value == 0 and resident is not None:
            dropped += _zero_resident_runs(nodes, node, run, streaming, resident[p - lo:q - lo])
        elif value == 0 and q - p >= RESIDENCY_MIN_PAGES:
            dropped += _zero_resident_runs(nodes, node, run, streaming, residency(run, q - p))
        elif streaming:
            stream_fill_pages(run, q - p, value)
        else:
            fill_pages(run, q - p, value)
        _charge_run(ft32, nodes, node, head_tag, head + p, q - p,
                    monotonic_ns() - started if shared else 0, charges)
        cleared += q - p
        p = q
    return cleared, cleared - dropped


@njit(nogil=True, cache=True, **INTERNAL)
def _charge_run(ft32, nodes, node, head_tag, first, npages, ns, charges):
    """Charge zeroing pages [first, first + npages) of a chunk whose PG_TAG is ``head_tag``,
    which took ``ns``, to whoever dirtied them: the chunk's one dirtier, or, in a mixed
    chunk, each stretch of pages with the same dirtier in turn (see layout.PG_TAG)."""
    if not head_tag & TAG_MIXED:
        _charge(nodes, node, head_tag, npages, ns, charges)
        return
    i = 0
    while i < npages:
        dirtier = ft32[PG_TAG, first + i] & TAG_MASK
        j = i + 1
        while j < npages and ft32[PG_TAG, first + j] & TAG_MASK == dirtier:
            j += 1
        _charge(nodes, node, dirtier, j - i, ns * (j - i) // npages, charges)
        i = j


@njit(nogil=True, cache=True, **INTERNAL)
def _charge(nodes, node, dirtier, pages, ns, charges):
    """``pages`` of ``dirtier``'s, zeroed in ``ns``: into a scrubber's own table of (id,
    pages) rows, or, when ``charges`` is ``nodes`` itself (an allocator), the node's slots."""
    if charges.shape[1] != 2:
        record_alloc_charge(nodes, node, dirtier, pages, ns)
    else:
        charge_pages(charges, dirtier, pages)


@njit(nogil=True, cache=True, **INTERNAL)
def charge_pages(charges, dirtier, pages):
    """Add ``pages`` for domain ``dirtier`` to a thread's own table of (id, pages) rows; the
    last row takes what finds no room, and dirt of no domain (dirtier 0), as id -1, as
    record_alloc_charge does."""
    if dirtier <= 0:
        dirtier = -1
    last = charges.shape[0] - 1
    for r in range(last):
        if charges[r, 1] == 0 or charges[r, 0] == dirtier:
            charges[r, 0] = dirtier
            charges[r, 1] += pages
            return
    charges[last, 0] = -1
    charges[last, 1] += pages


@njit(nogil=True, cache=True)  # not INTERNAL: a test's kernels race it against drains
def record_alloc_charge(nodes, node, dirtier, pages, ns):
    """Add an allocator's scrub work for domain ``dirtier`` to the node's charge slots
    (layout.N_CHARGES), claiming a free one; without a slot (or a domain), to
    N_CHARGE_LOST_*. Under the node's lock, which the caller does not hold: drain_charges
    frees a slot it finds empty, and between an allocator's look at the owner and its add
    the slot could go to another domain, and the work with it."""
    spin_lock(nodes, node, N_LOCK)
    if dirtier > 0:
        for k in range(CHARGE_SLOTS):
            slot = N_CHARGES + ((dirtier + k) % CHARGE_SLOTS) * CHARGE_WORDS
            owner = nodes[node, slot + CH_ID]
            if owner == 0:
                atomic_store(nodes, (node, slot + CH_ID), dirtier)
                owner = dirtier
            if owner == dirtier:
                fetch_add(nodes, (node, slot + CH_PAGES), pages)
                fetch_add(nodes, (node, slot + CH_NS), ns)
                spin_unlock(nodes, node, N_LOCK)
                return
    fetch_add(nodes, (node, N_CHARGE_LOST_PAGES), pages)
    fetch_add(nodes, (node, N_CHARGE_LOST_NS), ns)
    spin_unlock(nodes, node, N_LOCK)


@njit(nogil=True, cache=True)
def drain_charges(nodes, node, out):
    """Move the node's allocator charges into ``out`` rows (id, pages, ns), CHARGE_SLOTS + 1
    of them (the last for work no slot took, id -1); returns the rows.

    Under the node's lock (see record_alloc_charge); a slot that had nothing since the last
    drain is freed for another domain.
    """
    spin_lock(nodes, node, N_LOCK)
    rows = 0
    for k in range(CHARGE_SLOTS):
        slot = N_CHARGES + k * CHARGE_WORDS
        owner = atomic_load(nodes, (node, slot + CH_ID))
        if owner == 0:
            continue
        pages = atomic_load(nodes, (node, slot + CH_PAGES))
        ns = atomic_load(nodes, (node, slot + CH_NS))
        if pages == 0 and ns == 0:
            atomic_store(nodes, (node, slot + CH_ID), 0)
            continue
        fetch_add(nodes, (node, slot + CH_PAGES), -pages)
        fetch_add(nodes, (node, slot + CH_NS), -ns)
        out[rows, 0] = owner
        out[rows, 1] = pages
        out[rows, 2] = ns
        rows += 1
    pages = atomic_load(nodes, (node, N_CHARGE_LOST_PAGES))
    ns = atomic_load(nodes, (node, N_CHARGE_LOST_NS))
    if pages or ns:  # work no slot could take: the last row, as id -1
        fetch_add(nodes, (node, N_CHARGE_LOST_PAGES), -pages)
        fetch_add(nodes, (node, N_CHARGE_LOST_NS), -ns)
        out[rows, 0] = -1
        out[rows, 1] = pages
        out[rows, 2] = ns
        rows += 1
    spin_unlock(nodes, node, N_LOCK)
    return rows


@njit(nogil=True, cache=True, **INTERNAL)
def residency(addr, npages):
    """mincore's vector for ``npages`` pages from ``addr``: bit 0 of byte i is set if page i
    is in RAM (every bit, if the kernel cannot tell: then it is all zeroed)."""
    vector = np.empty(npages, dtype=np.uint8)
    if sys_mincore(addr, npages << PAGE_SHIFT, vector.ctypes.data) != 0:
        vector[:] = 1
    return vector


@njit(nogil=True, cache=True, **INTERNAL)
def _zero_resident_runs(nodes, node, addr, streaming, vector):
    """Zero the pages of a run that ``vector`` (its residency) says are in RAM; drop the
    others with MADV_DONTNEED. Returns how many were dropped.

    Writing a page that is not in RAM would fault it in (and add to the process's RSS) only
    to zero it; dropping it makes it read zero for the price of a page-table walk, also
    when it was swapped out (it would read its old bytes back). A free page's residency
    cannot change while its chunk is held but by the OS swapping it out, so a vector asked
    a little earlier is still right, or errs towards zeroing.
    """
    npages = vector.shape[0]
    dropped = 0
    p = 0
    while p < npages:
        resident = vector[p] & 1
        q = p + 1
        while q < npages and (vector[q] & 1) == resident:
            q += 1
        start = addr + (p << PAGE_SHIFT)
        if resident == 0 and sys_madvise(start, (q - p) << PAGE_SHIFT, MADV_DONTNEED) == 0:
            fetch_add(nodes, (node, N_UNMAPPED), q - p)
            dropped += q - p
        elif streaming:
            stream_fill_pages(start, q - p, 0)
        else:
            fill_pages(start, q - p, 0)
        p = q
    return dropped
