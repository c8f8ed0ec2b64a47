"""The buddy allocator, seen through the frame table: split, merge, clean-first, first_dirty,
scrub-on-allocate and node placement. Heaps use scrub="alloc" (or "sync"): no scrubber
threads, so the state only changes when the test changes it."""

from __future__ import annotations

import random

import numpy as np
import pytest
from conftest import MiB, all_cpus_on_node0, assert_zero, pages_read

import xenheap
from native_kernels.layout import (
    INVALID_DIRTY_IDX,
    L_COUNT,
    L_HEAD,
    L_TAIL,
    N_BASE,
    NIL,
    PG_FIRST_DIRTY,
    PG_NEED_SCRUB,
    PG_NEXT,
    PG_ORDER,
    PG_PREV,
    SCRUB_PATTERN,
)

PAGE = 4096


def free_list(heap: xenheap.Heap, node: int, order: int) -> list[tuple[int, int]]:
    """(mfn, first_dirty) of each chunk on free list (node, order), head to tail.

    Also checks the list's own bookkeeping: back links, tail and count.
    """
    s = heap.core.state
    ft32, ft8, lists = s["ft32"], s["ft8"], s["lists"]
    out = []
    prev = NIL
    link = int(lists[node, order, L_HEAD])
    while link != NIL:
        mfn = link - 1
        assert int(ft32[PG_PREV, mfn]) == prev
        assert int(ft8[PG_ORDER, mfn]) == order
        out.append((mfn, int(ft32[PG_FIRST_DIRTY, mfn])))
        prev = link
        link = int(ft32[PG_NEXT, mfn])
        assert len(out) <= heap.total_pages
    assert int(lists[node, order, L_TAIL]) == prev
    assert int(lists[node, order, L_COUNT]) == len(out)
    return out


def all_free_chunks(heap: xenheap.Heap, node: int) -> dict[int, list[tuple[int, int]]]:
    """{order: [(mfn, first_dirty), ...]} for every non-empty free list of ``node``."""
    chunks = {}
    for order in range(heap.max_order + 1):
        lst = free_list(heap, node, order)
        if lst:
            chunks[order] = lst
    return chunks


def need_scrub(heap: xenheap.Heap, lo: int, hi: int) -> list[int]:
    """The mfns in [lo, hi) whose need_scrub is set."""
    flags = heap.core.state["ft8"][PG_NEED_SCRUB, lo:hi]
    return [lo + int(i) for i in np.flatnonzero(flags)]


def node_stat(heap: xenheap.Heap, node: int, key: str) -> int:
    return heap.stats()["nodes"][node][key]


# --- initial state, split, merge -----------------------------------------------------------
def test_fresh_heap_is_one_clean_max_order_chunk_per_node(heap_factory) -> None:
    heap = heap_factory(4 * MiB, nodes=2)
    assert heap.max_order == 9  # 512 pages per node
    for node in range(2):
        base = int(heap.core.state["nodes"][node, N_BASE])
        assert base == node * 512
        assert all_free_chunks(heap, node) == {9: [(base, INVALID_DIRTY_IDX)]}
    assert need_scrub(heap, 0, heap.total_pages) == []
    heap.check()


def test_node_size_not_a_power_of_two_is_tiled_by_aligned_chunks(heap_factory) -> None:
    heap = heap_factory(3 * MiB, nodes=1)  # 768 pages: 512 + 256
    assert heap.max_order == 9
    assert all_free_chunks(heap, 0) == {9: [(0, 0)], 8: [(512, 0)]}
    # The 256-page chunk has no buddy inside the node: freeing a block of it merges no higher.
    dom = heap.create_domain()
    blk = dom.alloc(8)
    assert blk.mfn == 512  # the only order-8 chunk
    blk.free()
    assert all_free_chunks(heap, 0) == {9: [(0, 0)], 8: [(512, 1)]}
    heap.check()


def test_alloc_order0_splits_one_free_chunk_of_each_lower_order(heap_factory) -> None:
    heap = heap_factory(2 * MiB, nodes=1)  # 512 pages, max order 9
    top = heap.total_pages
    dom = heap.create_domain()
    blk = dom.alloc(0)
    assert blk.mfn == top - 1  # the block is the top of the split chunk, as in Xen
    chunks = all_free_chunks(heap, 0)
    assert sorted(chunks) == list(range(heap.max_order))  # one chunk per order below max
    for order in range(heap.max_order):
        # Lower halves go back: the order-k chunk sits just below the order-(k-1) one.
        assert chunks[order] == [(top - (2 << order), INVALID_DIRTY_IDX)]
    assert heap.stats()["free_pages"] == top - 1
    heap.check()


def test_freeing_everything_merges_back_to_one_chunk_per_node_and_counts_dirt(
        heap_factory) -> None:
    heap = heap_factory(4 * MiB, nodes=2)
    rng = random.Random(1)
    dom = heap.create_domain()
    blocks = []
    for order in (3, 0, 5, 1, 0, 2, 4, 0, 6):  # a mix, then fill up with order 0
        blocks.append(dom.alloc(order))
    while True:
        try:
            blocks.append(dom.alloc(0))
        except xenheap.OutOfMemory:
            break
    assert sum(1 << b.order for b in blocks) == heap.total_pages
    assert heap.stats()["free_pages"] == 0
    for blk in blocks:
        blk.array()[:] = 0x5A
    rng.shuffle(blocks)
    for i, blk in enumerate(blocks):
        blk.free()
        if i % 97 == 0:
            heap.check()
    st = heap.stats()
    assert st["free_pages"] == st["total_pages"] == heap.total_pages
    assert st["dirty_pages"] == heap.total_pages  # every freed page is counted dirty
    for node in range(2):
        base = node * 512
        assert all_free_chunks(heap, node) == {9: [(base, 1)]}
        assert st["nodes"][node]["dirty_pages"] == 512
    assert len(need_scrub(heap, 0, heap.total_pages)) == heap.total_pages
    heap.check()


# --- clean before dirty --------------------------------------------------------------------
def test_clean_chunks_sit_before_dirty_ones_and_are_taken_first(heap_factory) -> None:
    heap = heap_factory(2 * MiB, nodes=1)
    top = heap.total_pages
    dom = heap.create_domain()
    a = dom.alloc(0)
    b = dom.alloc(0)
    assert (a.mfn, b.mfn) == (top - 1, top - 2)
    a.free()  # dirty; its buddy b is in use, so it stays an order-0 chunk
    assert free_list(heap, 0, 0) == [(top - 1, 1)]
    c = dom.alloc(0)
    # Pass 1 prefers a clean chunk of a higher order to the dirty order-0 one.
    assert c.mfn == top - 3
    assert node_stat(heap, 0, "alloc_scrubbed_pages") == 0
    # The split's clean lower half went to the head, before the dirty chunk.
    assert free_list(heap, 0, 0) == [(top - 4, INVALID_DIRTY_IDX), (top - 1, 1)]
    heap.check()
    d = dom.alloc(0)
    assert d.mfn == top - 4  # the clean head
    # Another dirty order-0 chunk goes to the tail, behind the first dirty one.
    d.free()
    assert free_list(heap, 0, 0) == [(top - 1, 1), (top - 4, 1)]
    heap.check()
    c.free()  # merges with d's dirty page into an order-1 chunk
    assert free_list(heap, 0, 0) == [(top - 1, 1)]
    assert free_list(heap, 0, 1) == [(top - 4, 1)]
    heap.check()


def test_a_dirty_chunk_is_used_only_when_no_clean_one_fits(heap_factory) -> None:
    heap = heap_factory(2 * MiB, nodes=1)
    dom = heap.create_domain()
    a = dom.alloc(0)
    _buddy = dom.alloc(0)  # stays in use: a cannot merge into a bigger (dirty) chunk
    a.array()[:] = 0xEE
    a.free()  # the heap's only dirty page, an order-0 chunk of its own
    assert heap.stats()["dirty_pages"] == 1
    assert free_list(heap, 0, 0) == [(a.mfn, 1)]
    got, kept = [], []
    for _ in range(heap.total_pages - 1):
        blk = dom.alloc(0)
        kept.append(blk)
        got.append(blk.mfn)
        assert_zero(blk)
        if blk.mfn != a.mfn:
            assert node_stat(heap, 0, "alloc_scrubbed_pages") == 0
    assert got[-1] == a.mfn  # taken last: every clean page went first
    assert got.count(a.mfn) == 1
    assert node_stat(heap, 0, "alloc_scrubbed_pages") == 1
    assert heap.stats()["dirty_pages"] == 0
    with pytest.raises(xenheap.OutOfMemory):
        dom.alloc(0)
    heap.check()


# --- first_dirty after merges --------------------------------------------------------------
def test_clean_predecessors_merging_with_a_dirty_block_point_first_dirty_at_it(
        heap_factory) -> None:
    heap = heap_factory(2 * MiB, nodes=1)
    top = heap.total_pages
    dom = heap.create_domain()
    a = dom.alloc(0)
    assert a.mfn == top - 1
    a.array()[:] = 0x77
    a.free()
    # Every merge step had a clean predecessor: the dirty page is the chunk's last.
    assert all_free_chunks(heap, 0) == {heap.max_order: [(0, top)]}  # offset top-1, +1
    assert need_scrub(heap, 0, top) == [top - 1]
    assert heap.stats()["dirty_pages"] == 1
    heap.check()


def test_dirty_predecessor_then_clean_ones_keep_the_first_dirty_page(heap_factory) -> None:
    heap = heap_factory(2 * MiB, nodes=1)
    top = heap.total_pages
    dom = heap.create_domain()
    a = dom.alloc(0)
    b = dom.alloc(0)
    b.free()  # dirty order-0 chunk at top-2 (its buddy a is in use)
    assert free_list(heap, 0, 0) == [(top - 2, 1)]
    a.free()  # a's predecessor is dirty: first_dirty is the predecessor's, then shifted up
    assert all_free_chunks(heap, 0) == {heap.max_order: [(0, top - 1)]}  # offset top-2
    assert need_scrub(heap, 0, top) == [top - 2, top - 1]
    heap.check()


def test_first_dirty_merges_in_both_directions_with_clean_frees(heap_factory) -> None:
    """"sync" + debug: frees are clean, untouched memory starts dirty. Exercise a clean chunk
    merging with a dirty successor (first_dirty points into the upper half) and a dirty
    predecessor merging with a clean successor (first_dirty is the predecessor's)."""
    heap = heap_factory(2 * MiB, nodes=1, scrub="sync", debug=True)
    top = heap.total_pages
    dom = heap.create_domain()
    s = dom.alloc(2)
    assert s.mfn == top - 4
    e = dom.alloc(3)
    assert e.mfn == top - 16  # keeps the order-3 buddy below in use: merging stops there
    a = dom.alloc(0)
    assert a.mfn == top - 5  # split of the order-2 chunk at top-8
    c = dom.alloc(1)
    assert c.mfn == top - 8  # its lower order-1 half, whole
    assert free_list(heap, 0, 0) == [(top - 6, 1)]
    for blk in (s, e, a, c):
        assert_zero(blk, debug=True)
    heap.check()

    a.free()  # clean; merges with the dirty page at top-6, the predecessor: its first_dirty
    assert free_list(heap, 0, 0) == []
    assert free_list(heap, 0, 1) == [(top - 6, 1)]
    heap.check()

    c.free()  # clean, at top-8; its successor top-6 is dirty from its first page on
    assert free_list(heap, 0, 2) == [(top - 8, 3)]  # offset 2: into the upper half
    assert need_scrub(heap, top - 8, top) == [top - 6]
    heap.check()

    s.free()  # clean successor; the predecessor's first_dirty (3) carries over unchanged
    assert free_list(heap, 0, 2) == []
    assert free_list(heap, 0, 3) == [(top - 8, 3)]
    assert need_scrub(heap, top - 8, top) == [top - 6]
    assert heap.stats()["nodes"][0]["sync_scrubbed_pages"] == 1 + 2 + 4
    heap.check()


def test_split_cuts_the_block_from_a_clean_bottom(heap_factory) -> None:
    heap = heap_factory(2 * MiB, nodes=1)
    top = heap.total_pages
    dom = heap.create_domain()
    dom.alloc(0).free()  # one chunk, dirty only in its last page
    before = node_stat(heap, 0, "alloc_scrubbed_pages")
    blk = dom.alloc(0)  # clean below its first dirty page: the block is cut from there
    assert blk.mfn == 0
    assert_zero(blk)
    chunks = all_free_chunks(heap, 0)
    # Each split gave its top half back: the highest carries the dirty page (first_dirty is
    # its offset plus one), the others are clean.
    half = 1 << (heap.max_order - 1)
    assert chunks[heap.max_order - 1] == [(top - half, half)]
    for order in range(heap.max_order - 1):
        assert chunks[order] == [(1 << order, INVALID_DIRTY_IDX)]
    assert need_scrub(heap, 0, top) == [top - 1]
    assert node_stat(heap, 0, "alloc_scrubbed_pages") == before  # nothing to zero
    heap.check()


def test_split_of_a_chunk_dirty_at_its_bottom_keeps_the_top(heap_factory) -> None:
    heap = heap_factory(2 * MiB, nodes=1)
    top = heap.total_pages
    dom = heap.create_domain()
    dom.alloc(0).free()  # dirty in its last page
    low = dom.alloc(0)
    assert low.mfn == 0  # cut from the clean bottom
    low.free()  # dirty in its first page too: no clean bottom left, so Xen's split
    before = node_stat(heap, 0, "alloc_scrubbed_pages")
    blk = dom.alloc(1)
    assert blk.mfn == top - 2
    assert_zero(blk)
    assert node_stat(heap, 0, "alloc_scrubbed_pages") - before == 1
    assert need_scrub(heap, 0, top) == [0]
    heap.check()


# --- scrub-on-allocate ---------------------------------------------------------------------
def test_scrub_on_allocate_zeroes_only_the_dirty_pages(heap_factory) -> None:
    heap = heap_factory(2 * MiB, nodes=1)
    top = heap.total_pages
    dom = heap.create_domain()
    a = dom.alloc(0)
    b = dom.alloc(0)
    a.array()[:] = 0xAB
    b.array()[:] = 0xCD
    a.free()
    b.free()
    assert heap.stats()["dirty_pages"] == 2
    # White-box: mark a clean free page, so we can see whether the allocator rewrote it.
    pages_read(heap, 0, 1)[:] = 0x11
    whole = dom.alloc(heap.max_order)
    assert whole.mfn == 0
    assert node_stat(heap, 0, "alloc_scrubbed_pages") == 2
    assert heap.stats()["dirty_pages"] == 0
    data = whole.array()
    assert not data[(top - 2) * PAGE:].any()  # the two dirty pages were zeroed
    assert (data[:PAGE] == 0x11).all()  # the clean page was not touched
    assert not data[PAGE:(top - 2) * PAGE].any()
    heap.check()


@pytest.mark.parametrize("debug", [False, True])
def test_every_block_reads_zero_after_a_previous_owner_wrote_into_it(
        heap_factory, debug: bool) -> None:
    heap = heap_factory(4 * MiB, nodes=2, debug=debug)
    rng = random.Random(7)
    for round_ in range(4):
        dom = heap.create_domain(f"round{round_}")
        blocks = []
        while True:
            order = rng.choice((0, 0, 1, 2, 3, 5, 7))
            try:
                blk = dom.alloc(order)
            except xenheap.OutOfMemory:
                if order == 0:
                    break
                continue
            assert_zero(blk, debug=debug)
            blk.array()[:] = 0xF0 | round_
            blocks.append(blk)
        assert dom.pages == heap.total_pages
        # Free half one by one, destroy the rest with the domain.
        rng.shuffle(blocks)
        for blk in blocks[: len(blocks) // 2]:
            blk.free()
        dom.destroy()
        heap.check()
        assert heap.stats()["dirty_pages"] == heap.total_pages


# --- nodes -----------------------------------------------------------------------------------
def test_exact_node_allocations_come_from_that_node_only(heap_factory) -> None:
    heap = heap_factory(4 * MiB, nodes=2)
    per_node = heap.total_pages // 2
    dom = heap.create_domain()
    for order in (0, 3, 1, 5):
        blk = dom.alloc(order, node=1)
        assert blk.node == 1
        assert per_node <= blk.mfn and blk.mfn + (1 << order) <= 2 * per_node
    assert dom.populate(heap.stats()["nodes"][1]["free_pages"] * PAGE, node=1) > 0
    assert heap.stats()["nodes"][1]["free_pages"] == 0
    before = heap.stats()
    with pytest.raises(xenheap.OutOfMemory):
        dom.alloc(0, node=1)  # node 0 has plenty, but exact means exact
    with pytest.raises(xenheap.OutOfMemory):
        dom.populate(PAGE, node=1)
    assert heap.stats() == before
    assert heap.stats()["nodes"][0]["free_pages"] == per_node
    blk = dom.alloc(0, node=0)
    assert blk.node == 0 and blk.mfn < per_node
    heap.check()


def test_any_node_prefers_the_local_node_then_falls_back_by_distance(heap_factory) -> None:
    heap = heap_factory(6 * MiB, nodes=all_cpus_on_node0(3))  # we always run on node 0
    per_node = heap.total_pages // 3
    dom = heap.create_domain()
    first = dom.alloc(0)
    assert first.node == 0
    dom.populate(heap.stats()["nodes"][0]["free_pages"] * PAGE, node=0)
    second = dom.alloc(2)
    assert second.node == 1  # node 1 (distance 20) before node 2 (distance 30)
    dom.populate(heap.stats()["nodes"][1]["free_pages"] * PAGE, node=1)
    third = dom.alloc(2)
    assert third.node == 2
    assert 2 * per_node <= third.mfn < 3 * per_node
    dom.populate(heap.stats()["nodes"][2]["free_pages"] * PAGE)  # node=None: the rest
    assert heap.stats()["free_pages"] == 0
    with pytest.raises(xenheap.OutOfMemory):
        dom.alloc(0)
    heap.check()


def test_clean_memory_on_another_node_is_taken_before_dirty_local_memory(
        heap_factory) -> None:
    heap = heap_factory(4 * MiB, nodes=all_cpus_on_node0(2))
    dom = heap.create_domain()
    victim = heap.create_domain()
    victim.populate(heap.total_pages // 2 * PAGE, node=0)  # all of node 0
    victim.destroy()  # node 0 is now all dirty, node 1 all clean
    assert heap.stats()["nodes"][0]["dirty_pages"] == heap.total_pages // 2
    blk = dom.alloc(3)
    assert blk.node == 1  # pass 1 (clean only) covers every node before pass 2
    assert heap.stats()["nodes"][0]["alloc_scrubbed_pages"] == 0
    blk = dom.alloc(3, node=0)  # asked for node 0 exactly: dirty, scrubbed on allocation
    assert blk.node == 0
    assert_zero(blk)
    assert heap.stats()["nodes"][0]["alloc_scrubbed_pages"] == 8
    heap.check()


def test_high_order_allocation_right_after_destroying_a_domain_that_held_everything(
        heap_factory) -> None:
    heap = heap_factory(4 * MiB, nodes=2)
    dom = heap.create_domain()
    assert dom.populate(heap.total_pages * PAGE) == heap.total_pages  # every page, order 0
    for mfn in range(0, heap.total_pages, 64):
        pages_read(heap, mfn, 1)[:8] = 0x99  # "the guest wrote here"
    dom.destroy()
    assert heap.stats()["dirty_pages"] == heap.total_pages
    for node in range(2):
        assert all_free_chunks(heap, node) == {heap.max_order: [(node * 512, 1)]}
    other = heap.create_domain()
    taken = [other.alloc(heap.max_order, node=node) for node in range(2)]
    for node, blk in enumerate(taken):
        assert blk.mfn == node * 512
        assert_zero(blk)
    assert heap.stats()["dirty_pages"] == 0
    assert sum(n["alloc_scrubbed_pages"] for n in heap.stats()["nodes"]) == heap.total_pages
    heap.check()


def test_sync_mode_frees_come_back_clean_and_merge(heap_factory) -> None:
    heap = heap_factory(2 * MiB, nodes=1, scrub="sync")
    dom = heap.create_domain()
    blocks = [dom.alloc(o) for o in (0, 4, 2, 0, 7)]
    for blk in blocks:
        blk.array()[:] = 0x42
    for blk in blocks:
        blk.free()
    assert all_free_chunks(heap, 0) == {heap.max_order: [(0, INVALID_DIRTY_IDX)]}
    assert heap.stats()["dirty_pages"] == 0
    assert node_stat(heap, 0, "sync_scrubbed_pages") == 1 + 16 + 4 + 1 + 128
    assert not pages_read(heap, 0, heap.total_pages).any()
    heap.check()


def test_debug_mode_starts_dirty_and_hands_out_the_pattern(heap_factory) -> None:
    heap = heap_factory(2 * MiB, nodes=1, debug=True)
    assert heap.stats()["dirty_pages"] == heap.total_pages
    assert all_free_chunks(heap, 0) == {heap.max_order: [(0, 1)]}
    dom = heap.create_domain()
    blk = dom.alloc(3)
    assert (blk.array() == SCRUB_PATTERN).all()
    blk.free()  # poisoned, dirty
    assert heap.stats()["dirty_pages"] == heap.total_pages
    heap.check()
