"""A domain's reuse of its own freed memory: Python blocks (xenheap.reuse) and numpy's
blocks (native_kernels.parked). Isolation: nothing one domain freed reaches another without
going through the heap, dirty, and being scrubbed."""

from __future__ import annotations

import inspect
import sys
import threading
import time

import numpy as np
import pytest

import xenheap
from native_kernels import api
from native_kernels.layout import D_PARKED_COUNT, PAGE_SIZE
from xenheap import numpy_alloc
from xenheap.giveback import flush_reuse, return_parked
from xenheap.reuse import ReuseCache

MiB = 2**20


def test_a_freed_block_comes_back_to_its_domain_zeroed_or_as_it_was():
    with xenheap.Heap("16MiB", scrub="alloc") as heap:
        dom = heap.create_domain()
        blk = dom.alloc(2)
        blk.array()[:] = 7
        blk.free()
        again = dom.alloc(2)
        assert again.mfn == blk.mfn and not again.array().any()
        again.array()[:] = 9
        again.free()
        kept = dom.alloc(2, zero=False)  # Xen's MEMF_no_scrub: the domain's own old bytes
        assert kept.mfn == blk.mfn and (kept.array() == 9).all()
        with pytest.raises(xenheap.InvalidFree):
            again.free()  # the old handle stays freed
        assert heap.stats()["dirty_pages"] == 0  # nothing went back to the heap
        heap.check()


def test_another_domain_never_gets_a_parked_block():
    with xenheap.Heap("16MiB", scrub="alloc") as heap:
        a, b = heap.create_domain(), heap.create_domain()
        parked = [a.alloc(0) for _ in range(16)]
        for blk in parked:
            blk.array()[:] = 0xAA
            blk.free()
        mfns = {blk.mfn for blk in parked}
        taken = [b.alloc(0, zero=False) for _ in range(heap.stats()["free_pages"])]
        assert not mfns & {blk.mfn for blk in taken}
        assert not any(blk.array().any() for blk in taken)
        heap.check()


def test_parked_blocks_count_against_the_quota_and_go_back_when_it_is_short():
    with xenheap.Heap("16MiB", scrub="alloc") as heap:
        dom = heap.create_domain(max_bytes=64 * PAGE_SIZE)
        blocks = [dom.alloc(0) for _ in range(64)]
        for blk in blocks:
            blk.free()  # all parked: the domain still holds 64 pages
        assert dom.stats()["pages"] == 64
        assert dom.stats()["cached_bytes"] == 64 * PAGE_SIZE
        big = dom.alloc(6)  # no parked block of order 6: the parked ones make room
        assert dom.stats()["pages"] == 64 and dom.stats()["cached_bytes"] == 0
        assert not big.array().any()  # they went back dirty and were scrubbed on allocate
        heap.check()


@pytest.mark.parametrize("refused", [
    lambda dom: dom.alloc(5),  # 32 pages: more than the whole quota
    lambda dom: dom.alloc_many(3, 2),  # 12 pages: the quota less the 56 held is 8
    lambda dom: dom.populate(9 * PAGE_SIZE),
], ids=["alloc", "alloc_many", "populate"])
def test_a_request_the_quota_refuses_anyway_leaves_the_parked_blocks(refused):
    """Giving parked blocks back cannot make room here, so a refused call changes nothing."""
    with xenheap.Heap("16MiB", scrub="alloc") as heap:
        dom = heap.create_domain(max_bytes=64 * PAGE_SIZE)
        _held = [dom.alloc(0) for _ in range(56)]
        for blk in [dom.alloc(0) for _ in range(8)]:
            blk.free()
        before = dom.stats()
        assert before["cached_bytes"] == 8 * PAGE_SIZE
        with pytest.raises(xenheap.OutOfMemory, match=r"quota .* \(262144 bytes, 256 KiB; it "
                                                      r"holds 262144 bytes, parked blocks"):
            refused(dom)
        assert dom.stats() == before
        heap.check()


def test_parked_blocks_go_back_when_the_heap_runs_short():
    with xenheap.Heap("8MiB", scrub="alloc") as heap:
        hoarder, needy = heap.create_domain(), heap.create_domain()
        blocks = [hoarder.alloc(0) for _ in range(256)]  # 1 MiB, parked below
        for blk in blocks:
            blk.free()
        got = needy.populate(heap.total_pages * PAGE_SIZE)  # every page of the heap
        assert got == heap.total_pages and hoarder.stats()["pages"] == 0
        heap.check()


def test_destroy_and_idleness_give_parked_blocks_back_to_the_scrubbers():
    with xenheap.Heap("16MiB", reuse_bytes="1MiB") as heap:
        dom = heap.create_domain()
        for blk in [dom.alloc(0) for _ in range(64)]:
            blk.array()[:] = 1
            blk.free()
        assert dom.stats()["pages"] == 64
        deadline = time.monotonic() + 30
        while dom.stats()["pages"]:  # unused for a while: back to the heap
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert heap.wait_clean(30)
        other = heap.create_domain()
        blk = other.alloc(0)
        blk.free()
        other.destroy()  # parked, then freed with the domain
        assert heap.stats()["free_pages"] == heap.total_pages
        heap.check()


@pytest.mark.parametrize("kwargs", [{"scrub": "sync"}, {"debug": True}, {"reuse_bytes": 0}])
def test_no_reuse_where_a_free_must_write_the_memory_or_reuse_is_off(kwargs):
    with xenheap.Heap("8MiB", **kwargs) as heap:
        dom = heap.create_domain()
        blk = dom.alloc(0)
        blk.free()
        assert dom.stats()["pages"] == 0
        heap.check()


def test_alloc_many_returns_distinct_zeroed_blocks_all_or_nothing():
    with xenheap.Heap("8MiB", scrub="alloc", reuse_bytes=0) as heap:
        dom = heap.create_domain()
        blocks = dom.alloc_many(100, order=2)
        assert len({b.mfn for b in blocks}) == 100 and all(b.order == 2 for b in blocks)
        assert not any(b.array().any() for b in blocks)
        for blk in blocks[:10]:
            blk.free()
        before = heap.stats()["free_pages"]
        with pytest.raises(xenheap.OutOfMemory):
            dom.alloc_many(heap.total_pages, order=0)
        assert heap.stats()["free_pages"] == before
        for bad in (0, -1, 1.5, True):
            with pytest.raises(xenheap.InvalidArgument):
                dom.alloc_many(bad)
        heap.check()


def test_numpy_blocks_are_parked_for_the_next_arrays_and_calloc_zeroes_them():
    with xenheap.Heap("16MiB", scrub="alloc") as heap:
        dom = heap.create_domain()
        row = heap.core.state["doms"][dom.slot]
        with dom.numpy_allocator():
            a = np.zeros(512)  # 4 KiB: an order-0 block
            a[:] = 3
            addr = a.ctypes.data
            parked = row[D_PARKED_COUNT]  # emptied one-page slabs share the stack
            del a
            assert row[D_PARKED_COUNT] == parked + 1
            b = np.zeros(512)
            assert b.ctypes.data == addr and not b.any()
            c = np.empty(512)
            assert c.ctypes.data != addr
        del b, c
        heap.check()
        dom.destroy()  # parked blocks go with the domain
        assert heap.stats()["free_pages"] == heap.total_pages
        heap.check()


def test_parked_numpy_blocks_make_room_when_the_quota_is_short():
    with xenheap.Heap("16MiB", scrub="alloc") as heap:
        dom = heap.create_domain(max_bytes=24 * PAGE_SIZE)  # numpy also takes a slab page
        with dom.numpy_allocator():
            arrays = [np.ones(512) for _ in range(16)]
            del arrays  # parked: the domain still holds their 16 pages
            assert dom.stats()["pages"] >= 16
            big = np.ones(16 * 512)  # 64 KiB: needs the parked pages back
            assert big.sum() == 16 * 512
        del big
        heap.check()


def test_idle_parked_numpy_blocks_go_back_to_the_heap():
    with xenheap.Heap("16MiB") as heap:
        dom = heap.create_domain()
        with dom.numpy_allocator():
            arrays = [np.ones(512) for _ in range(8)]
        del arrays
        row = heap.core.state["doms"][dom.slot]
        assert row[D_PARKED_COUNT] >= 8  # and any one-page slab that np.ones emptied
        deadline = time.monotonic() + 30
        while row[D_PARKED_COUNT]:  # the first scrubber gives idle stacks back
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert heap.wait_clean(30)
        heap.check()


def test_a_block_is_a_context_manager_that_frees_it():
    with xenheap.Heap("8MiB", scrub="alloc", reuse_bytes=0) as heap:
        dom = heap.create_domain()
        with dom.alloc(2) as blk:
            blk.array()[:] = 1
            assert dom.stats()["pages"] == 4
        assert dom.stats()["pages"] == 0
        with pytest.raises(xenheap.InvalidFree):
            blk.free()
        with dom.alloc(0) as early:
            early.free()  # freed inside: the exit does nothing more
        doomed = dom.alloc(0)
        with doomed:
            dom.destroy()  # went with its domain: the exit does nothing
        heap.check()


def test_reuse_off_parks_no_numpy_block_either():
    with xenheap.Heap("16MiB", scrub="alloc", reuse_bytes=0) as heap:
        dom = heap.create_domain()
        with dom.numpy_allocator():
            a = np.ones(512)
        del a
        assert heap.core.state["doms"][dom.slot, D_PARKED_COUNT] == 0
        assert dom.stats()["cached_bytes"] == 0 and dom.stats()["pages"] == 0
        heap.check()


def test_allocator_charges_reach_the_heap_stats_without_a_scrubber():
    with xenheap.Heap("8MiB", scrub="alloc", reuse_bytes=0) as heap:
        dirty = heap.create_domain("dirty")
        blk = dirty.alloc(4)
        blk.array()[:] = 1
        dirty.destroy()
        heap.create_domain().alloc(heap.max_order)  # zeroes the dirt as it allocates
        charged = {c["name"]: c for c in heap.stats()["domain_charges"]}
        assert charged["dirty"]["scrubbed_bytes"] == 64 * 1024
        assert charged["dirty"]["alloc_cpu_seconds"] > 0


def test_numpy_gets_the_quota_the_python_api_freed():
    with xenheap.Heap("16MiB", scrub="alloc") as heap:
        dom = heap.create_domain(max_bytes="1MiB")
        with dom.numpy_allocator():
            np.ones(8)
        for blk in [dom.alloc(4) for _ in range(15)]:  # 960 KiB, the rest of the quota
            blk.free()  # parked: numpy's callback asks for them when the quota is short
        assert dom.stats()["cached_bytes"] >= 960 * 1024  # and numpy's own parked slab
        with dom.numpy_allocator():
            big = np.ones(60_000)  # 480 KB: a 512 KiB block, half the quota
        assert big.sum() == 60_000 and dom.record.reuse.cached_bytes() == 0
        del big
        heap.check()


def test_a_parked_block_is_one_allocation_and_one_free_wherever_it_goes_next():
    with xenheap.Heap("16MiB", scrub="alloc") as heap:
        dom = heap.create_domain()
        dom.alloc(0).free()  # parked
        assert (dom.stats()["num_allocations"], dom.stats()["num_frees"]) == (1, 1)
        dom.alloc(0).free()  # taken back, parked again
        flush_reuse(heap.core, dom)  # on to the heap: not a second free
        st = dom.stats()
        assert (st["num_allocations"], st["num_frees"]) == (2, 2)
        with dom.numpy_allocator():
            a = np.ones(512)
        del a  # parked in the kernels
        dom.destroy()  # ... and freed with the domain: still one free
        st = dom.stats()
        assert st["num_frees"] == st["num_allocations"]
        hs = heap.stats()
        assert hs["num_frees"] == hs["num_allocations"]
        heap.check()


def test_allocations_and_frees_never_wait_for_a_busy_cache():
    """While another thread holds the reuse cache's lock (as one that lost the GIL inside
    it does), an allocation and a free go to the heap at once instead of waiting, and every
    handle is checked there as well as ever."""
    with xenheap.Heap("16MiB", scrub="alloc") as heap:
        dom = heap.create_domain()
        parked = dom.alloc(0)
        parked.free()
        seen: dict[str, object] = {}

        def use_the_domain() -> None:
            try:
                blk = dom.alloc(0)
                seen["fresh"] = blk.mfn != parked.mfn and not blk.array().any()
                blk.array()[:] = 7
                seen["forged"] = xenheap.Block(dom, blk.mfn, blk.order, blk.tag)  # by hand
                dirty = heap.stats()["dirty_pages"]
                blk.free()
                seen["to_heap"] = heap.stats()["dirty_pages"] == dirty + 1  # not parked
                for handle in (blk, seen["forged"]):  # a double free; the heap refuses
                    with pytest.raises(xenheap.InvalidFree):
                        handle.free()
            except BaseException as exc:  # re-raised below, in the test's thread
                seen["error"] = exc

        lock = dom.record.reuse.lock
        assert lock.acquire(timeout=1)
        try:
            worker = threading.Thread(target=use_the_domain, daemon=True)
            worker.start()
            worker.join(10)
            assert not worker.is_alive(), "waited for the cache's lock"
        finally:
            lock.release()
        if "error" in seen:
            raise seen["error"]
        assert seen["fresh"] and seen["to_heap"]
        again = dom.alloc(0)
        assert again.mfn == parked.mfn  # the cache serves again
        with pytest.raises(xenheap.InvalidFree):
            seen["forged"].free()  # its record went with the free: it cannot be parked
        stats = heap.stats()
        assert (stats["num_allocations"], stats["num_frees"]) == (3, 2)
        heap.check()


def test_an_old_handle_never_names_the_blocks_next_life_from_the_cache():
    """The cache hands a block out again with its heap tag; the handle's tag still
    changes, so a handle of its last life (here one made by hand) frees nothing."""
    with xenheap.Heap("16MiB", scrub="alloc") as heap:
        dom = heap.create_domain()
        first = dom.alloc(0)
        old = xenheap.Block(dom, first.mfn, first.order, first.tag)
        first.free()
        second = dom.alloc(0)
        assert second.mfn == first.mfn and second != old
        with pytest.raises(xenheap.InvalidFree):
            old.free()
        second.array()[:] = 3  # still the domain's: nothing was parked or freed
        assert heap.stats()["cached_bytes"] == 0 and heap.stats()["dirty_pages"] == 0
        second.free()
        heap.check()


def test_two_frees_of_one_block_never_both_succeed_whichever_path_each_takes():
    """One free holds the cache's lock, stopped at its first check, while a second free
    of the same block (a handle made by hand) finds the lock busy and goes to the heap:
    exactly one of them frees the block, which is not both parked and free in the heap."""
    source, first_line = inspect.getsourcelines(ReuseCache.give)
    stop_at = first_line + next(i for i, line in enumerate(source) if "if blk.freed" in line)
    stopped, go_on = threading.Event(), threading.Event()

    def tracer(frame, event, arg):
        if frame.f_code is not ReuseCache.give.__code__:
            return None

        def on_line(frame, event, arg):
            if event == "line" and frame.f_lineno == stop_at:
                stopped.set()
                go_on.wait(10)
            return on_line
        return on_line

    with xenheap.Heap("16MiB", scrub="alloc") as heap:
        dom = heap.create_domain()
        blk = dom.alloc(0)
        copy = xenheap.Block(dom, blk.mfn, blk.order, blk.tag)
        outcomes: list[str] = []

        def free(handle: xenheap.Block, traced: bool) -> None:
            if traced:
                sys.settrace(tracer)
            try:
                handle.free()
                outcomes.append("freed")
            except xenheap.InvalidFree:
                outcomes.append("refused")
            finally:
                sys.settrace(None)

        holder = threading.Thread(target=free, args=(blk, True), daemon=True)
        holder.start()
        assert stopped.wait(10)
        free(copy, False)  # the lock is busy: the heap's path
        go_on.set()
        holder.join(10)
        assert not holder.is_alive()
        assert sorted(outcomes) == ["freed", "refused"]
        stats = heap.stats()
        assert stats["num_frees"] == 1 and stats["cached_bytes"] == 0
        assert stats["dirty_pages"] == 1  # the heap's free won; nothing was parked
        heap.check()


def test_check_finds_a_parked_block_that_went_back_to_the_heap_too():
    with xenheap.Heap("16MiB", scrub="alloc") as heap:
        dom = heap.create_domain()
        blk = dom.alloc(0)
        mfn, tag = blk.mfn, blk.tag
        blk.free()  # parked
        heap.check()
        heap.core.call(api.heap_free_short, dom.slot, dom.id, mfn, 0, tag)  # behind its back
        with pytest.raises(xenheap.HeapCorruption, match="parked for reuse"):
            heap.check()


def test_numpy_takes_back_the_blocks_other_domains_parked_through_the_python_api():
    """No kernel can reach the Python API's reuse caches: a numpy allocation that finds the
    heap short asks the Python side to give them back (the handler's reclaim callback)."""
    with xenheap.Heap("8MiB", scrub="alloc", nodes=1) as heap:
        parker, user = heap.create_domain("parker"), heap.create_domain("user")
        for blk in [parker.alloc(0) for _ in range(heap.total_pages)]:  # the whole heap
            blk.free()
        assert parker.stats()["cached_bytes"] == 4 * MiB  # reuse_bytes: the rest went back
        with user.numpy_allocator():
            big = np.ones(4 * MiB // 8)  # the free half
            more = np.ones(2 * MiB // 8)  # only there once the cache is back
        assert parker.stats()["cached_bytes"] == 0
        assert big.sum() == 4 * MiB // 8 and more.sum() == 2 * MiB // 8
        del big, more
        heap.check()


def _return_paused_midway(monkeypatch, dom, blocks: int
                          ) -> tuple[threading.Thread, threading.Event]:
    """Park ``blocks`` pages of ``dom`` and start a thread returning them, stopped right
    after it drained the cache (the blocks taken out, not freed yet): (thread, resume)."""
    paused, resume = threading.Event(), threading.Event()
    drain = ReuseCache.drain

    def pausing_drain(self, close=False):
        out = drain(self, close)
        if threading.current_thread().name == "returner":
            paused.set()
            resume.wait(10)
        return out

    monkeypatch.setattr(ReuseCache, "drain", pausing_drain)
    for blk in [dom.alloc(0) for _ in range(blocks)]:
        blk.free()
    del blk
    returner = threading.Thread(target=return_parked, args=(dom.heap.core, dom.record),
                                name="returner")
    returner.start()
    assert paused.wait(10)
    return returner, resume


def test_a_destroy_waits_for_parked_blocks_on_their_way_back(monkeypatch):
    """A return of parked blocks in flight (the idle chore, an allocation short of room)
    finishes before a destroy retires the cache: else the destroy freed them again, and
    the statistics counted them freed twice."""
    with xenheap.Heap("16MiB", scrub="alloc", nodes=1) as heap:
        dom = heap.create_domain()
        returner, resume = _return_paused_midway(monkeypatch, dom, 8)
        destroyer = threading.Thread(target=dom.destroy)
        destroyer.start()
        time.sleep(0.2)  # the destroy waits for the returner: the domain still counts
        during = heap.stats()
        assert (during["num_allocations"], during["num_frees"]) == (8, 8)
        resume.set()
        returner.join(10)
        destroyer.join(10)
        assert not returner.is_alive() and not destroyer.is_alive() and not dom.alive
        for st in (dom.stats(), heap.stats()):
            assert (st["num_allocations"], st["num_frees"]) == (8, 8)
        heap.check()


def test_an_allocation_that_fits_waits_for_parked_blocks_on_their_way_back(monkeypatch):
    """A return in flight has taken its blocks out of the cache but not freed them yet: an
    allocation the quota takes once they are back waits for them instead of being refused
    (they are not held by the user, and not in the cache either)."""
    with xenheap.Heap("16MiB", scrub="alloc", nodes=1) as heap:
        dom = heap.create_domain(max_bytes=16 * PAGE_SIZE)
        returner, resume = _return_paused_midway(monkeypatch, dom, 12)
        threading.Timer(0.2, resume.set).start()
        big = dom.alloc(3)  # 8 pages: the quota of 16 holds them once the 12 parked are back
        returner.join(10)
        assert not returner.is_alive() and resume.is_set()
        assert dom.stats()["pages"] == 8
        big.free()
        heap.check()


def test_a_collected_domain_is_destroyed_and_its_parked_memory_comes_back():
    """A domain nothing refers to any more (nor to its blocks) goes as a dropped block does:
    destroyed at the heap's next statistics call or chore, its parked blocks with it, and
    its reuse counters stay in the heap's."""
    with xenheap.Heap("8MiB", scrub="alloc", nodes=1) as heap:
        dom = heap.create_domain()
        for blk in [dom.alloc(0) for _ in range(64)]:
            blk.free()
        del blk
        kept = dom.alloc(2)
        kept.array()[:] = 1
        before = heap.stats()
        assert before["cached_bytes"] > 0 and before["domains"] == 1
        del dom, kept
        after = heap.stats()
        assert after["domains"] == 0 and after["cached_bytes"] == 0
        assert after["bytes_allocated"] == 0 and after["free_pages"] == heap.total_pages
        assert after["num_allocations"] == before["num_allocations"]
        assert after["num_frees"] == before["num_frees"] + 1
        heap.check()


def test_close_unmaps_the_memory_of_a_domain_collected_just_before():
    """A domain collected and not yet destroyed when the heap closes: its cache's views
    and its numpy handler go with the heap, and the arenas are unmapped."""
    heap = xenheap.Heap("8MiB", scrub="alloc", nodes=1)
    dom = heap.create_domain()
    for _ in range(2):
        blk = dom.alloc(0)  # the second one is the first, taken back: the cache keeps a view
        blk.array()[:] = 1
        blk.free()
    with dom.numpy_allocator():
        np.ones(10)  # made and freed: only the domain holds its handler
    del blk, dom
    assert len(heap.core.orphans) == 1
    heap.close()
    assert all(arena.closed for arena in heap.core.arenas)
    assert not heap.core.orphans


def test_a_close_waits_for_a_destroy_under_way():
    """close() lands inside a destroy, after it found the heap open and before its kernel
    call: the close waits, the destroy is whole (its parked blocks counted freed once, the
    numpy handler dropped), then the arenas go."""
    heap = xenheap.Heap("8MiB", scrub="alloc", nodes=1)
    dom = heap.create_domain()
    with dom.numpy_allocator():
        np.ones(10)
    for blk in [dom.alloc(0) for _ in range(4)]:
        blk.free()
    del blk
    defers = heap.core.defers_relinquish  # called right before the destroy's kernel call
    closer = threading.Thread(target=heap.close)

    def close_meanwhile() -> bool:
        closer.start()
        time.sleep(0.2)  # the close has begun, and waits for this destroy
        assert closer.is_alive()
        return defers()

    heap.core.defers_relinquish = close_meanwhile
    dom.destroy()
    closer.join(10)
    assert not closer.is_alive() and heap.closed
    assert dom.record.capsule is None and dom.record.destroyed and not dom.alive
    st = dom.stats()
    assert st["num_frees"] == st["num_allocations"] >= 5  # numpy's, and the 4 parked
    assert st["bytes_allocated"] == st["cached_bytes"] == 0
    assert all(arena.closed for arena in heap.core.arenas)


def test_a_destroy_refused_by_close_changes_nothing(monkeypatch):
    """close() lands as a destroy takes the domain's ``returning`` lock: the destroy,
    refused, leaves the closed heap's last figures (its parked blocks still counted)."""
    heap = xenheap.Heap("8MiB", scrub="alloc", nodes=1)
    dom = heap.create_domain()
    for blk in [dom.alloc(0) for _ in range(4)]:
        blk.free()
    del blk
    lock = dom.record.returning

    class ClosingFirst:  # close()'s own use of the lock goes straight to it
        acquire, release, locked = lock.acquire, lock.release, lock.locked

        def __enter__(self):
            heap.close()
            return lock.__enter__()

        def __exit__(self, *exc_info):
            return lock.__exit__(*exc_info)

    dom.record.returning = ClosingFirst()
    with pytest.raises(xenheap.HeapClosed):
        dom.destroy()
    assert dom.stats()["cached_bytes"] == 4 * PAGE_SIZE


def test_a_numpy_handler_made_as_the_heap_closes_is_not_kept(monkeypatch):
    """numpy_allocator() checks the heap, then makes the domain's handler: a close() in
    between must not leave the new handler on the domain, where it would hold the memory."""
    heap = xenheap.Heap("8MiB", scrub="alloc", nodes=1)
    dom = heap.create_domain()
    make_handler = numpy_alloc.make_handler

    def closed_meanwhile(d):
        handler = make_handler(d)
        heap.close()
        return handler

    monkeypatch.setattr(numpy_alloc, "make_handler", closed_meanwhile)
    with pytest.raises(xenheap.HeapClosed), dom.numpy_allocator():
        pass
    assert dom.record.capsule is None
    assert all(arena.closed for arena in heap.core.arenas)


def test_a_free_that_meets_close_says_the_heap_closed(monkeypatch):
    """close() lands in a free after it found the heap open: the cache has forgotten the
    block by then, and the error names the close, not a stale handle."""
    heap = xenheap.Heap("8MiB", scrub="alloc", nodes=1)
    blk = heap.create_domain().alloc(0)
    give = ReuseCache.give

    def closed_meanwhile(cache, b):
        heap.close()
        return give(cache, b)

    monkeypatch.setattr(ReuseCache, "give", closed_meanwhile)
    with pytest.raises(xenheap.HeapClosed):
        blk.free()


def test_numpy_gets_the_memory_of_a_collected_domain():
    """numpy's callbacks cannot destroy a collected domain (they wait for no lock), so
    entering a numpy_allocator() does it first."""
    with xenheap.Heap("16MiB", scrub="alloc", nodes=1) as heap:
        user, dropped = heap.create_domain(), heap.create_domain()
        dropped.populate("14MiB")
        del dropped  # collected, not destroyed yet: it still holds 14 MiB
        with user.numpy_allocator():
            big = np.ones(6 * MiB // 8)
        assert big.sum() == 6 * MiB // 8
        del big
        assert heap.stats()["domains"] == 1
        heap.check()
