"""A destroy only marks the domain (Xen's domain_kill); its memory is relinquished after
(relinquish_memory, native_kernels.domain_life; HeapCore.relinquish): by the first
scrubber's chore, by an allocator that finds the heap short, and before any statistics,
check() or wait_clean() look. A scrubber stalled mid-chunk (fault injection, 3 s) holds
the chore back, so each test sees the memory still waiting; each ends within the stall.
The last test races destroyers against allocators that run short, bounded in count.
"""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest

import xenheap
from native_kernels.domain_life import domain_row
from native_kernels.layout import BUDDY_SCRUBBING, D_STATE, DOM_DEAD, PG_SCRUB_STATE
from xenheap.faults import inject_fault

STALL_US = 3_000_000
MiB = 1 << 20


def stall_the_scrubber(heap: xenheap.Heap) -> xenheap.Block:
    """Park the (only) scrubber mid-chunk for STALL_US, holding a dirty 8 MiB chunk whose
    buddy the returned block keeps from merging; returns once it holds the chunk. Keep the
    block: freed, it would merge with that chunk, and the free wait out the stall."""
    inject_fault(heap, "scrub_stall", STALL_US)
    keeper = heap.create_domain()
    kept, dirty = keeper.alloc_bytes(8 * MiB), keeper.alloc_bytes(8 * MiB)
    dirty.array()[:] = 0xEE
    dirty.free()
    ft8 = heap.core.state["ft8"]
    deadline = time.monotonic() + 30
    while not (ft8[PG_SCRUB_STATE] == BUDDY_SCRUBBING).any():
        assert time.monotonic() < deadline, "the scrubber never took the chunk"
        time.sleep(0.001)
    inject_fault(heap, None)  # this stall goes on; the next chunk would stall again
    return kept


def destroyed_domain(heap: xenheap.Heap, nbytes: int, order: int) -> xenheap.Domain:
    """A domain that held ``nbytes`` in blocks of ``order``, destroyed while the chore
    waits behind the stalled scrubber."""
    dom = heap.create_domain()
    dom.populate(nbytes, order=order)
    dom.destroy()
    assert heap.core.relinquish_pending()
    return dom


def wait_for_the_stall(heap: xenheap.Heap) -> None:
    assert heap.wait_clean(60)
    heap.check()


TAKES = ("populate", "alloc", "numpy")


def take_48_mib(heap: xenheap.Heap, take: str) -> xenheap.Domain:
    """A new domain that takes 48 MiB, by ``take``: populate, alloc or a numpy array (the
    blocks are checked zeroed; those of alloc go back when their handles do)."""
    tenant = heap.create_domain()
    if take == "populate":
        assert tenant.populate(48 * MiB, order=9) == 24
    elif take == "alloc":
        blocks = [tenant.alloc(12) for _ in range(3)]  # 16 MiB blocks
        assert not any(blk.array().any() for blk in blocks)  # dirty before, zeroed for it
    else:
        with tenant.numpy_allocator():
            a = np.zeros(12 * MiB, dtype=np.uint8)  # a 16 MiB block
        assert not a.any()
    return tenant


@pytest.fixture(scope="module", autouse=True)
def compiled() -> None:
    """Compile what these tests run before any scrubber stalls: a first compile can take
    longer than the stall."""
    with xenheap.Heap("64MiB") as heap:
        for take in TAKES:
            dom = heap.create_domain()
            dom.populate(48 * MiB, order=9)
            dom.destroy()
            take_48_mib(heap, take).destroy()
            heap.stats()


def test_destroy_leaves_the_memory_to_the_first_scrubbers_chore() -> None:
    with xenheap.Heap("64MiB") as heap:
        kept = stall_the_scrubber(heap)
        destroyed_domain(heap, 32 * MiB, 0)
        assert len(heap.core.relinquishing) == 1
        slot = heap.core.relinquishing[0][0]
        assert domain_row(heap.core.state["doms"], slot)[D_STATE] != DOM_DEAD
        deadline = time.monotonic() + 30
        while heap.core.relinquish_pending():  # nothing here asks for it: only the chore
            assert time.monotonic() < deadline, "the chore never relinquished the domain"
            time.sleep(0.005)
        assert not heap.core.relinquishing
        assert domain_row(heap.core.state["doms"], slot)[D_STATE] == DOM_DEAD
        assert heap.stats()["bytes_allocated"] == kept.nbytes
        wait_for_the_stall(heap)


def test_statistics_and_check_see_a_destroyed_domains_memory_back_in_the_heap() -> None:
    with xenheap.Heap("64MiB") as heap:
        kept = stall_the_scrubber(heap)
        dom = destroyed_domain(heap, 32 * MiB, 9)
        stats = heap.stats()
        assert stats["bytes_allocated"] == kept.nbytes
        assert stats["dirty_pages"] >= (32 * MiB) // heap.page_size
        assert not heap.core.relinquish_pending()
        assert dom.stats()["pages"] == 0
        assert dom.stats()["num_frees"] == 16
        heap.check()
        wait_for_the_stall(heap)


def test_an_allocator_short_of_memory_relinquishes_a_destroyed_domain_itself() -> None:
    with xenheap.Heap("64MiB") as heap:
        kept = stall_the_scrubber(heap)
        # 48 MiB are free besides the stalled chunk: one domain takes them all, is destroyed,
        # and the next tenants need them while the chore still waits.
        for take in TAKES:
            destroyed_domain(heap, 48 * MiB, 9)
            tenant = take_48_mib(heap, take)
            assert heap.core.relinquishing, take  # the chore never got to the destroyed domain
            assert not heap.core.relinquish_pending()
            tenant.destroy()
            # relinquishes the tenant, for the next round: only the keeper's block is held
            assert heap.stats()["bytes_allocated"] == kept.nbytes
        wait_for_the_stall(heap)


def test_a_new_domain_gets_a_slot_a_destroyed_domain_still_held() -> None:
    with xenheap.Heap("64MiB", max_domains=3) as heap:
        kept = stall_the_scrubber(heap)  # its keeper takes one slot
        for _ in range(5):
            destroyed_domain(heap, 4 * MiB, 0)  # the third takes the first one's slot
        assert heap.stats()["bytes_allocated"] == kept.nbytes
        wait_for_the_stall(heap)


def test_threads_destroying_while_others_run_short_lose_no_page() -> None:
    # Destroyers hand their domains to the chore while takers fill the heap and so
    # relinquish them themselves: each domain is relinquished once, whoever gets there.
    # Any populate may find the heap short for a moment (a taker holds 40 MiB while it
    # fills or gives back), so both kinds try again.
    with xenheap.Heap("64MiB") as heap:
        errors: list[BaseException] = []
        stop = threading.Event()
        populated = []

        def destroyer() -> None:
            try:
                for _ in range(40):
                    destroyed = heap.create_domain()
                    for _attempt in range(50):
                        try:
                            populated.append(destroyed.populate(8 * MiB, order=0))
                            break
                        except xenheap.OutOfMemory:
                            time.sleep(0.001)
                    destroyed.destroy()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        def taker() -> None:
            try:
                while not stop.is_set():
                    tenant = heap.create_domain()
                    with contextlib.suppress(xenheap.OutOfMemory):
                        tenant.populate(40 * MiB, order=9)
                    tenant.destroy()
            except BaseException as exc:
                errors.append(exc)

        destroyers = [threading.Thread(target=destroyer) for _ in range(2)]
        takers = [threading.Thread(target=taker) for _ in range(2)]
        for thread in destroyers + takers:
            thread.start()
        for thread in destroyers:
            thread.join(120)
        stop.set()
        for thread in takers:
            thread.join(120)
        assert not any(t.is_alive() for t in destroyers + takers)
        assert errors == []
        assert len(populated) >= 40  # most destroyed domains held memory
        assert heap.wait_clean(60)
        heap.check()
        stats = heap.stats()
        assert stats["bytes_allocated"] == 0 and stats["domains"] == 0
        assert stats["free_pages"] == heap.total_pages
        assert not heap.core.relinquish_pending()


def test_a_new_domain_waits_for_the_slot_another_thread_is_still_relinquishing():
    """With one slot, a domain created right after a destroy gets the slot once the
    first scrubber's chore has freed the old domain's memory, even when the chore took
    the domain off the queue before the creation looked at it."""
    with xenheap.Heap("512MiB", max_domains=1) as heap:
        for _ in range(20):
            dom = heap.create_domain()
            dom.populate("128MiB", order=0)  # milliseconds to relinquish
            dom.destroy()
            time.sleep(0.0002)  # the chore has begun
        assert heap.wait_clean(30)
        heap.check()
