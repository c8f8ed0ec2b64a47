"""The buddy allocator over the frame table: Xen's alloc_heap_pages / free_heap_pages.

Chunks of 2^order pages are aligned to their size relative to their node's first page and
never cross a node. A free chunk records ``first_dirty``; merging a clean and a dirty buddy
gives one chunk whose first_dirty points into the dirty half, so dirty memory still merges
into high orders (Xen's fix for the original series' downside: high-order allocations
failing while dirty memory waited, unmerged, to be scrubbed).
"""

from numba import njit, types

from native_kernels.atomics import (
    add_locked,
    atomic_cas,
    atomic_load,
    atomic_max,
    atomic_store,
    backoff,
    fetch_add,
    monotonic_ns,
)
from native_kernels.cleaning import zero_dirty_runs
from native_kernels.jit import INTERNAL
from native_kernels.layout import (
    ABORT_HIST_BUCKETS,
    BUDDY_NOT_SCRUBBING,
    BUDDY_SCRUB_ABORT,
    BUDDY_SCRUBBING,
    E_NOMEM,
    INVALID_DIRTY_IDX,
    L_HEAD,
    M_DEBUG,
    M_MAX_ORDER,
    M_NR_NODES,
    M_PAGES_PER_NODE,
    N_ABORT_HIST,
    N_ABORT_WAIT_MAX_NS,
    N_ABORT_WAIT_NS,
    N_ABORTS,
    N_ADDR,
    N_ALLOC_SCRUBBED,
    N_BASE,
    N_DIRTY_SINCE_NS,
    N_FREE,
    N_FREES,
    N_LOCK,
    N_NEED_SCRUB,
    N_PAGES,
    N_TAG,
    NIL,
    PAGE_SHIFT,
    PG_FIRST_DIRTY,
    PG_NEED_SCRUB,
    PG_NEXT,
    PG_ORDER,
    PG_OWNER,
    PG_SCRUB_STATE,
    PG_STATE,
    PG_TAG,
    PGS_FREE,
    PGS_INUSE,
    POISON_PATTERN,
    SCRUB_PATTERN,
    TAG_MASK,
    TAG_MIXED,
)
from native_kernels.locks import spin_lock, spin_unlock
from native_kernels.page_list import page_list_add_scrub, page_list_del
from native_kernels.pages import pages_hold
from native_kernels.raw import fill_row, fill_row32

FREE_BATCH = 64  # blocks a destroy frees per hold of a node's lock
WAKE_DIRTY_PAGES = 256  # dirty pages (1 MiB) at which a free wakes the node's scrubber


@njit(nogil=True, cache=True, **INTERNAL)
def node_of(meta, mfn):
    """The node holding page ``mfn`` (nodes are equal-sized, consecutive mfn ranges); a
    one-node heap skips the division, which costs more than the rest of a small path."""
    return 0 if meta[M_NR_NODES] == 1 else mfn // meta[M_PAGES_PER_NODE]


@njit(nogil=True, cache=True, **INTERNAL)
def page_address(nodes, node, mfn):
    """Virtual address of page ``mfn`` of ``node``."""
    return nodes[node, N_ADDR] + ((mfn - nodes[node, N_BASE]) << PAGE_SHIFT)


@njit(nogil=True, cache=True, **INTERNAL)
def _record_abort_wait(nodes, node, waited_ns):
    fetch_add(nodes, (node, N_ABORTS), 1)
    fetch_add(nodes, (node, N_ABORT_WAIT_NS), waited_ns)
    atomic_max(nodes, (node, N_ABORT_WAIT_MAX_NS), waited_ns)
    bucket = 0
    while bucket < ABORT_HIST_BUCKETS - 1 and (waited_ns >> (bucket + 1)) > 0:
        bucket += 1
    fetch_add(nodes, (node, N_ABORT_HIST + bucket), 1)


@njit(nogil=True, cache=True, **INTERNAL)
def check_and_stop_scrub(ft8, nodes, node, head):
    """Stop a scrub in progress on chunk ``head``; the caller holds the node's lock.

    The handshake: set BUDDY_SCRUB_ABORT and wait until the scrubber, which checks after every
    granule, has recorded its progress in first_dirty and set BUDDY_NOT_SCRUBBING.
    """
    if atomic_load(ft8, (PG_SCRUB_STATE, head)) != BUDDY_SCRUBBING:
        return
    start = monotonic_ns()
    if not atomic_cas(ft8, (PG_SCRUB_STATE, head), BUDDY_SCRUBBING, BUDDY_SCRUB_ABORT):
        return  # the scrubber let go by itself in between
    attempt = 0
    while atomic_load(ft8, (PG_SCRUB_STATE, head)) != BUDDY_NOT_SCRUBBING:
        backoff(attempt)
        attempt += 1
    _record_abort_wait(nodes, node, monotonic_ns() - start)


@njit(nogil=True, cache=True, **INTERNAL)
def _get_free_buddy(ft32, ft8, lists, node, order, max_order, use_dirty, use_busy):
    """Head of the first usable chunk of ``order`` or above on ``node``, and its order.

    Clean chunks sit at a list's head, so one look per order decides whether the list has
    one; without ``use_dirty``, a head that is clean below its first dirty page for the
    block's size counts too. With ``use_dirty``, a chunk no scrubber holds; the one a
    scrubber is working on only with ``use_busy`` too, as the last resort.
    """
    busy_head = -1
    busy_order = -1
    for j in range(order, max_order + 1):
        link = lists[node, j, L_HEAD]
        if link == NIL:
            continue
        head = link - 1
        # A scrubber letting go of a chunk stores first_dirty without the lock.
        if not use_dirty:
            # Clean, or clean below its first dirty page for at least the block's size
            # (_take_chunk cuts the block from there) and held by no scrubber.
            first_dirty = atomic_load(ft32, (PG_FIRST_DIRTY, head))
            if first_dirty == INVALID_DIRTY_IDX or (
                    first_dirty - 1 >= (1 << order)
                    and atomic_load(ft8, (PG_SCRUB_STATE, head)) == BUDDY_NOT_SCRUBBING):
                return head, j
            continue
        # Prefer a chunk no scrubber holds: taking that one means waiting for a thread the
        # OS may have descheduled. At most one chunk per node is being scrubbed, so the
        # next one on the list (or a higher order) never is.
        if atomic_load(ft8, (PG_SCRUB_STATE, head)) == BUDDY_NOT_SCRUBBING:
            return head, j
        nxt = ft32[PG_NEXT, head]
        if nxt != NIL:
            return nxt - 1, j
        if busy_head < 0 and use_busy:
            busy_head = head
            busy_order = j
    return busy_head, busy_order


@njit(nogil=True, cache=True, **INTERNAL)
def _take_chunk(hs, node, head, j, order):
    """Unlink chunk (head, j) and give back all but 2^order pages; returns (mfn, tag).

    As in Xen, each split gives the lower half back carrying first_dirty and the block goes
    on in the top half; except that when the chunk is clean below its first dirty page for
    at least 2^order pages, the splits give the top halves back and the block is cut from
    that clean bottom, so a chunk whose top was just freed dirty still hands out clean
    memory. Caller holds the node's lock.
    """
    ft32, ft8, nodes, lists = hs.ft32, hs.ft8, hs.nodes, hs.lists
    check_and_stop_scrub(ft8, nodes, node, head)
    first_dirty = atomic_load(ft32, (PG_FIRST_DIRTY, head))
    page_list_del(ft32, lists, node, j, head)
    chunk_tag = atomic_load(ft32, (PG_TAG, head))
    pg = head
    # The clean part below first_dirty holds the block: cut it from there.
    go_low = first_dirty != INVALID_DIRTY_IDX and first_dirty - 1 >= (1 << order)
    while j > order:
        j -= 1
        half = 1 << j
        if first_dirty == INVALID_DIRTY_IDX:
            lower_dirty = upper_dirty = INVALID_DIRTY_IDX
        elif first_dirty - 1 >= half:
            lower_dirty, upper_dirty = INVALID_DIRTY_IDX, first_dirty - half
        else:  # past a dirty page the top half is dirty as far as anyone knows (Xen's 1)
            lower_dirty, upper_dirty = first_dirty, 1
        if go_low:
            _split_tag(ft32, chunk_tag, pg + half)  # the top half: a head now
            page_list_add_scrub(ft32, ft8, lists, node, j, pg + half, upper_dirty)
            first_dirty = lower_dirty
            continue
        page_list_add_scrub(ft32, ft8, lists, node, j, pg, lower_dirty)
        pg += half
        _split_tag(ft32, chunk_tag, pg)  # the next part's head: the block's, at the end
        first_dirty = upper_dirty
    fill_row(ft8, PG_STATE, pg, 1 << order, PGS_INUSE)
    ft8[PG_ORDER, pg] = order
    ft32[PG_FIRST_DIRTY, pg] = INVALID_DIRTY_IDX
    add_locked(nodes, (node, N_FREE), -(1 << order))
    tag = (nodes[node, N_TAG] + 1) & TAG_MASK
    nodes[node, N_TAG] = tag
    return pg, tag


@njit(nogil=True, cache=True, **INTERNAL)
def _split_tag(ft32, chunk_tag, pg):
    """Give ``pg``, a new head inside a chunk whose PG_TAG was ``chunk_tag``, its share of
    it: the same dirtier, or, in a mixed chunk, the mark on its page's own."""
    if chunk_tag & TAG_MIXED:
        atomic_store(ft32, (PG_TAG, pg), (ft32[PG_TAG, pg] & TAG_MASK) | TAG_MIXED)
    else:
        atomic_store(ft32, (PG_TAG, pg), chunk_tag)


@njit(nogil=True, cache=True, **INTERNAL)
def alloc_heap_pages(hs, node_pref, order, exact):
    """Take a block of 2^order pages; returns ``tag << 32 | mfn`` or E_NOMEM.

    Pass 1 takes only clean memory (a clean chunk, or a dirty one's clean bottom), on the
    preferred node and then the others by distance (``exact``: that node only); pass 2
    accepts dirty memory that no scrubber holds; pass 3 also a chunk a scrubber holds,
    waiting for it to let go (check_and_stop_scrub), which may take as long as the OS keeps
    that thread off its CPU, so any other node's memory comes first. The block's dirty
    pages are zeroed by the caller after the lock is dropped (scrub_taken_block).
    """
    ft32, ft8, nodes, lists, meta, zone = hs.ft32, hs.ft8, hs.nodes, hs.lists, hs.meta, hs.zone
    max_order = meta[M_MAX_ORDER]
    nr_nodes = 1 if exact else meta[M_NR_NODES]
    for phase in range(3):
        use_dirty = phase > 0
        use_busy = phase == 2
        for k in range(nr_nodes):
            node = node_pref if exact else zone[node_pref, k]
            if atomic_load(nodes, (node, N_FREE)) < (1 << order):
                continue
            spin_lock(nodes, node, N_LOCK)
            head, j = _get_free_buddy(ft32, ft8, lists, node, order, max_order, use_dirty,
                                      use_busy)
            if head >= 0:
                mfn, tag = _take_chunk(hs, node, head, j, order)
                spin_unlock(nodes, node, N_LOCK)
                return (tag << 32) | mfn
            spin_unlock(nodes, node, N_LOCK)
    return E_NOMEM


@njit(nogil=True, cache=True, **INTERNAL)
def _dirty_pages_hold_poison(ft8, mfn, addr, npages):
    """Debug mode: every dirty page of the block at ``mfn`` still holds what its free left
    there, POISON_PATTERN (or zeros: a page release_unused gave back reads zero), so none
    was written after it was freed; scrubbing it would erase the evidence."""
    for i in range(npages):
        if ft8[PG_NEED_SCRUB, mfn + i] != 0:
            page = addr + (i << PAGE_SHIFT)
            if not (pages_hold(page, 1, POISON_PATTERN) or pages_hold(page, 1, 0)):
                return False
    return True


@njit(nogil=True, cache=True, **INTERNAL)
def scrub_taken_block(hs, mfn, order):
    """Zero the dirty pages of a block just taken (scrub-on-allocate), without the lock.

    Returns the pages cleaned (zeroed, or dropped if not in RAM), or -1 if debug mode found
    a page written after it was freed: a dirty page without the poison its free wrote, or
    a clean one without the scrub pattern (the pages just scrubbed hold it too).
    """
    ft32, ft8, nodes, meta = hs.ft32, hs.ft8, hs.nodes, hs.meta
    node = node_of(meta, mfn)
    debug = meta[M_DEBUG] != 0
    addr = page_address(nodes, node, mfn)
    n = 1 << order
    written = debug and not _dirty_pages_hold_poison(ft8, mfn, addr, n)  # before scrubbing
    # Cached stores: the caller touches the block next.
    cleared, zeroed = zero_dirty_runs(ft32, ft8, nodes, node, addr, mfn, types.int64(0), n,
                                      SCRUB_PATTERN if debug else 0, types.boolean(False),
                                      nodes, None)
    if cleared:
        fetch_add(nodes, (node, N_NEED_SCRUB), -cleared)
        fetch_add(nodes, (node, N_ALLOC_SCRUBBED), zeroed)
    if written or (debug and not pages_hold(addr, n, SCRUB_PATTERN)):
        return -1
    return cleared


@njit(nogil=True, cache=True, **INTERNAL)
def disown(ft32, mfn):
    """Clear a block head's owner and tag as it stops being any domain's."""
    atomic_store(ft32, (PG_OWNER, mfn), 0)
    atomic_store(ft32, (PG_TAG, mfn), 0)


@njit(nogil=True, cache=True, **INTERNAL)
def _merge_free(hs, node, mfn, order, need_scrub, dirtier):
    """Put block (mfn, order) on the free lists, merging with free buddies of either
    cleanliness; the caller holds the node's lock and updates its counters. Dirty pages
    record ``dirtier`` (a domain id, 0 for none) in PG_TAG: whoever scrubs them charges
    the work to it."""
    ft32, ft8, nodes, lists, meta = hs.ft32, hs.ft8, hs.nodes, hs.lists, hs.meta
    base = nodes[node, N_BASE]
    npages = nodes[node, N_PAGES]
    max_order = meta[M_MAX_ORDER]
    fill_row(ft8, PG_STATE, mfn, 1 << order, PGS_FREE)
    if need_scrub:
        fill_row(ft8, PG_NEED_SCRUB, mfn, 1 << order, 1)
    tag = dirtier if need_scrub else 0  # the chunk's PG_TAG (layout): written at the end
    first_dirty = 1 if need_scrub else INVALID_DIRTY_IDX
    rel = mfn - base
    while order < max_order:
        half = 1 << order
        buddy_rel = rel ^ half
        if buddy_rel + half > npages:
            break
        buddy = base + buddy_rel
        # Alignment makes any free page at buddy's position the head of a chunk.
        if ft8[PG_STATE, buddy] != PGS_FREE or ft8[PG_ORDER, buddy] != order:
            break
        check_and_stop_scrub(ft8, nodes, node, buddy)
        buddy_dirty = atomic_load(ft32, (PG_FIRST_DIRTY, buddy))
        tag = _merged_tag(ft32, tag, first_dirty != INVALID_DIRTY_IDX, base + rel, buddy,
                          half, buddy_dirty != INVALID_DIRTY_IDX)
        page_list_del(ft32, lists, node, order, buddy)
        if buddy_rel < rel:  # buddy is the predecessor: its first_dirty comes first
            if buddy_dirty != INVALID_DIRTY_IDX:
                first_dirty = buddy_dirty
            elif first_dirty != INVALID_DIRTY_IDX:
                first_dirty += half
            rel = buddy_rel
        elif first_dirty == INVALID_DIRTY_IDX and buddy_dirty != INVALID_DIRTY_IDX:
            first_dirty = buddy_dirty + half
        order += 1
    page_list_add_scrub(ft32, ft8, lists, node, order, base + rel, first_dirty)
    if tag & TAG_MIXED:  # the head word keeps the head page's own dirtier
        tag = TAG_MIXED | (ft32[PG_TAG, base + rel] & TAG_MASK)
    atomic_store(ft32, (PG_TAG, base + rel), tag)


@njit(nogil=True, cache=True, **INTERNAL)
def _merged_tag(ft32, tag, dirty, head, buddy, half, buddy_dirty):
    """PG_TAG of the chunk that merging chunk ``head`` (tag ``tag``) with its free buddy
    makes, both of ``half`` pages; caller holds the node's lock."""
    buddy_tag = atomic_load(ft32, (PG_TAG, buddy))
    if not buddy_dirty:
        return tag
    if not dirty:
        return buddy_tag
    if tag == buddy_tag and not tag & TAG_MIXED:
        return tag
    # Dirt of two domains in one chunk: each dirty page names its own from now on.
    if not tag & TAG_MIXED:
        fill_row32(ft32, PG_TAG, head, half, tag)
    if not buddy_tag & TAG_MIXED:
        fill_row32(ft32, PG_TAG, buddy, half, buddy_tag)
    return TAG_MIXED


@njit(nogil=True, cache=True, **INTERNAL)
def _count_freed(nodes, node, pages, need_scrub):
    """Counters for pages just freed to ``node``, under its lock.

    True if this free took the node's dirty pages to WAKE_DIRTY_PAGES or past: its scrubber
    should wake. Waking it for every small free would cost a thread wake-up per free in an
    alloc/free loop; a few dirty pages wait for its periodic look or an allocator.
    """
    add_locked(nodes, (node, N_FREE), pages)
    if not need_scrub:
        return False
    # The dirty count also drops without the lock (scrubbers): a real read-modify-write.
    before = fetch_add(nodes, (node, N_NEED_SCRUB), pages)
    if before == 0:
        atomic_store(nodes, (node, N_DIRTY_SINCE_NS), monotonic_ns())
    return before < WAKE_DIRTY_PAGES <= before + pages


@njit(nogil=True, cache=True, **INTERNAL)
def free_heap_pages(hs, mfn, order, need_scrub, dirtier):
    """Return one block to the free lists (Xen's free_heap_pages); dirty ones are charged
    to domain ``dirtier`` when scrubbed.

    Returns True if the node's scrubber should wake up (see _count_freed).
    """
    nodes, meta = hs.nodes, hs.meta
    node = node_of(meta, mfn)
    spin_lock(nodes, node, N_LOCK)
    _merge_free(hs, node, mfn, order, need_scrub, dirtier)
    woke = _count_freed(nodes, node, 1 << order, need_scrub)
    spin_unlock(nodes, node, N_LOCK)
    return woke


@njit(nogil=True, cache=True, **INTERNAL)
def free_heap_chain(hs, first, need_scrub, dirtier):
    """Free every block of a chain linked through PG_NEXT, owner and all, without writing
    their memory: a destroy. Each node's lock is taken once per FREE_BATCH blocks, not per
    block. Returns the bit mask of nodes whose scrubber should wake up."""
    ft32, ft8, nodes, meta = hs.ft32, hs.ft8, hs.nodes, hs.meta
    wake = 0
    link = first
    while link != NIL:
        node = node_of(meta, link - 1)
        pages = 0
        blocks = 0
        spin_lock(nodes, node, N_LOCK)
        while link != NIL and blocks < FREE_BATCH and node_of(meta, link - 1) == node:
            mfn = link - 1
            link = ft32[PG_NEXT, mfn]
            order = types.int64(ft8[PG_ORDER, mfn])  # as free_heap_pages passes it
            disown(ft32, mfn)
            _merge_free(hs, node, mfn, order, need_scrub, dirtier)
            pages += 1 << order
            blocks += 1
        if _count_freed(nodes, node, pages, need_scrub):
            wake |= 1 << node
        fetch_add(nodes, (node, N_FREES), blocks)
        spin_unlock(nodes, node, N_LOCK)
    return wake


@njit(nogil=True, cache=True)
def init_heap(hs):
    """Link every node's pages into aligned chunks of the highest order that fits.

    Fresh anonymous memory reads zero, so pages start clean (Xen must scrub at boot; we need
    not); in debug mode they start dirty, so that scrubbing lays down the pattern.
    """
    ft32, ft8, nodes, lists, meta = hs.ft32, hs.ft8, hs.nodes, hs.lists, hs.meta
    max_order = meta[M_MAX_ORDER]
    debug = meta[M_DEBUG] != 0
    for node in range(meta[M_NR_NODES]):
        base = nodes[node, N_BASE]
        npages = nodes[node, N_PAGES]
        rel = 0
        while rel < npages:
            order = max_order
            while (rel & ((1 << order) - 1)) != 0 or rel + (1 << order) > npages:
                order -= 1
            page_list_add_scrub(ft32, ft8, lists, node, order, base + rel,
                                1 if debug else INVALID_DIRTY_IDX)
            rel += 1 << order
        if debug:
            ft8[PG_NEED_SCRUB, base:base + npages] = 1
            # Dirty from now, as a free would stamp it: else the node would look overdue
            # since the clock's zero, and be scrubbed as deadline work at once.
            atomic_store(nodes, (node, N_DIRTY_SINCE_NS), monotonic_ns())
            atomic_store(nodes, (node, N_NEED_SCRUB), npages)
        atomic_store(nodes, (node, N_FREE), npages)
