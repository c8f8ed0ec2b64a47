"""The background scrubbers: cleaning, the abort handshake, stress, life cycle, debug mode."""

import gc
import logging
import os
import random
import subprocess
import sys
import threading
import time
import weakref

import pytest
from conftest import read_all_free_memory
from numba import njit

import xenheap
from native_kernels.atomics import atomic_load, atomic_store
from native_kernels.layout import (
    BUDDY_NOT_SCRUBBING,
    BUDDY_SCRUB_ABORT,
    BUDDY_SCRUBBING,
    L_TAIL,
    N_NEED_SCRUB,
    PAGE_SIZE,
    PG_FIRST_DIRTY,
    PG_NEED_SCRUB,
    PG_SCRUB_STATE,
    POISON_PATTERN,
    SCRUB_PATTERN,
)
from xenheap import scrubber as scrubber_module

WAIT_S = 30  # generous bound for wait_clean on a loaded 2-core CI machine


@njit(nogil=True)
def _store(arr, row, col, value):
    atomic_store(arr, (row, col), value)


@njit(nogil=True)
def _load(arr, row, col):
    return atomic_load(arr, (row, col))


def _fill_and_destroy(heap, fraction=1.0, pattern=0x5A):
    """A domain takes ``fraction`` of the heap in max-order blocks, writes, is destroyed."""
    dom = heap.create_domain("victim")
    want = int(heap.total_pages * fraction)
    got = 0
    order = heap.max_order
    held = []  # a dropped handle would be freed and handed out again
    while got < want and order >= 0:
        try:
            blk = dom.alloc(order)
        except xenheap.OutOfMemory:
            order -= 1
            continue
        held.append(blk)
        blk.array()[:] = pattern
        got += 1 << order
    dom.destroy()
    return got


def _node_sum(heap, field):
    return sum(n[field] for n in heap.stats()["nodes"])


def test_destroy_most_of_the_heap_then_wait_clean():
    with xenheap.Heap("64MiB", nodes=2) as heap:
        dirty = _fill_and_destroy(heap, 0.9)
        assert heap.stats()["dirty_pages"] > 0 or _node_sum(heap, "scrubbed_pages") > 0
        assert heap.wait_clean(WAIT_S)
        stats = heap.stats()
        assert stats["dirty_pages"] == 0
        assert _node_sum(heap, "scrubbed_pages") + _node_sum(heap, "alloc_scrubbed_pages") \
            == dirty
        heap.check()
        clean, held = read_all_free_memory(heap)
        assert clean and held == heap.total_pages
        heap.check()


def test_nodes_without_cpus_are_scrubbed_too():
    with xenheap.Heap("48MiB", nodes=[[0], [], [1], []]) as heap:
        # Two scrubbers, each also serving the CPU-less node nearest to it.
        assert sorted(s.nodes for s in heap.scrubbers) == [(0, 1), (2, 3)]
        for node in range(heap.nodes):
            dom = heap.create_domain()
            dom.populate(heap.total_pages // heap.nodes * PAGE_SIZE, node=node)
            dom.destroy()
        assert heap.wait_clean(WAIT_S)
        for node in heap.stats()["nodes"]:
            assert node["dirty_pages"] == 0
            # Populated, never written: cleaned by dropping the pages, not zeroing them.
            assert node["scrubbed_pages"] + node["unmapped_pages"] > 0, node
        heap.check()


def test_high_order_allocation_right_after_destroying_everything():
    with xenheap.Heap("32MiB") as heap:
        dom = heap.create_domain()
        dom.populate(heap.total_pages * PAGE_SIZE)  # every page, as order-0 blocks
        dom.destroy()
        blk = heap.create_domain().alloc(heap.max_order)  # dirty and clean buddies merged
        assert (blk.array() == 0).all()
        heap.check()


def _first_tail_chunk(heap, node=0):
    lists = heap.core.state["lists"]
    for order in range(heap.max_order, -1, -1):
        link = lists[node, order, L_TAIL]
        if link:
            return link - 1, order
    raise AssertionError("no free chunk")


def test_abort_handshake_hands_the_chunk_over_with_progress_kept():
    """Play the scrubber by hand: the allocator must wait for it, then use its progress."""
    with xenheap.Heap("8MiB", scrub="alloc") as heap:
        _fill_and_destroy(heap, 1.0)
        head, order = _first_tail_chunk(heap)
        ft32, ft8 = heap.core.state["ft32"], heap.core.state["ft8"]
        assert order == heap.max_order and ft32[PG_FIRST_DIRTY, head] == 1
        half = 1 << (order - 1)
        # "Scrub" the lower half the way the scrubber does: zero it, clear need_scrub.
        heap.core.arenas[0].array[:half * PAGE_SIZE] = 0
        ft8[PG_NEED_SCRUB, head:head + half] = 0
        heap.core.state["nodes"][0, N_NEED_SCRUB] -= half  # as the scrubber's granules do
        _store(ft8, PG_SCRUB_STATE, head, BUDDY_SCRUBBING)

        result = {}

        def allocate():
            result["blk"] = heap.create_domain().alloc(order)

        allocator = threading.Thread(target=allocate)
        allocator.start()
        deadline = time.monotonic() + WAIT_S
        while _load(ft8, PG_SCRUB_STATE, head) != BUDDY_SCRUB_ABORT:
            assert time.monotonic() < deadline, "the allocator never asked for the chunk"
            time.sleep(0.0005)
        assert allocator.is_alive()  # it waits for us, holding the node lock
        _store(ft32, PG_FIRST_DIRTY, head, half + 1)  # progress: the lower half
        _store(ft8, PG_SCRUB_STATE, head, BUDDY_NOT_SCRUBBING)
        allocator.join(WAIT_S)
        blk = result["blk"]
        assert (blk.array() == 0).all()
        node = heap.stats()["nodes"][0]
        assert node["aborts"] == 1
        assert node["alloc_scrubbed_pages"] == half  # only the half we had not zeroed
        heap.check()


@pytest.mark.parametrize("seed", range(3))
def test_allocations_abort_the_real_scrubber_and_no_page_is_zeroed_twice(seed):
    rng = random.Random(seed)
    with xenheap.Heap("256MiB") as heap:
        dirty = 0
        for _ in range(12):
            dirty += _fill_and_destroy(heap, 1.0, pattern=rng.randrange(1, 256))
            time.sleep(rng.uniform(0, 0.004))  # land somewhere in the middle of a scrub
            dom = heap.create_domain()
            blk = dom.alloc(heap.max_order)
            assert (blk.array() == 0).all()
            dom.destroy()
            dirty += 1 << heap.max_order
        assert heap.wait_clean(WAIT_S)
        scrubbed = _node_sum(heap, "scrubbed_pages")
        on_alloc = _node_sum(heap, "alloc_scrubbed_pages")
        assert scrubbed + on_alloc == dirty  # each dirty page zeroed exactly once
        heap.check()


def test_aborts_happen_under_randomised_timing():
    """Over many tries at random moments, allocators do catch the scrubber mid-chunk."""
    rng = random.Random(7)
    with xenheap.Heap("256MiB") as heap:
        for _ in range(40):
            _fill_and_destroy(heap, 1.0)
            # On a loaded machine the scrubber starts only at the deadline: wait for it.
            started = time.monotonic()
            while heap.scrubbers[0].state != "scrubbing" and time.monotonic() - started < 3:
                time.sleep(0.0005)
            time.sleep(rng.uniform(0, 0.002))
            dom = heap.create_domain()
            assert (dom.alloc(heap.max_order).array() == 0).all()
            dom.destroy()
            if _node_sum(heap, "aborts"):
                break
        assert _node_sum(heap, "aborts") > 0
        assert heap.stats()["nodes"][0]["abort_wait_max_seconds"] > 0
        heap.check()


@pytest.mark.parametrize("debug", [False, True], ids=["normal", "debug"])
def test_stress_threads_with_scrubbers(debug):
    expect = SCRUB_PATTERN if debug else 0
    threads_per_core = 4
    nthreads = threads_per_core * 2
    errors = []
    with xenheap.Heap("32MiB", nodes=[[0], [1], []], debug=debug) as heap:

        def worker(seed):
            rng = random.Random(seed)
            dom = heap.create_domain()
            held = []
            deadline = time.monotonic() + 2.0
            ops = 0
            try:
                while time.monotonic() < deadline and ops < 20000:
                    ops += 1
                    roll = rng.random()
                    if roll < 0.5:
                        try:
                            blk = dom.alloc(rng.randrange(0, 8))
                        except xenheap.OutOfMemory:
                            continue
                        arr = blk.array()
                        if not (arr == expect).all():
                            errors.append(f"non-clean block {blk}")
                        arr[:] = rng.randrange(1, 256)
                        held.append(blk)
                    elif roll < 0.95 and held:
                        held.pop(rng.randrange(len(held))).free()
                    elif roll >= 0.95:
                        dom.destroy()
                        dom = heap.create_domain()
                        held = []
                dom.destroy()
            except Exception as exc:  # reported below; the thread must not die silently
                errors.append(repr(exc))

        workers = [threading.Thread(target=worker, args=(i,)) for i in range(nthreads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(60)
        assert not any(t.is_alive() for t in workers), "deadlock"
        assert errors == []
        stats = heap.stats()
        assert stats["free_pages"] == stats["total_pages"]
        heap.check()
        assert heap.wait_clean(WAIT_S)
        clean, held = read_all_free_memory(heap, expect)
        assert clean and held == heap.total_pages


def test_close_stops_scrubbers_in_the_middle_of_a_big_scrub():
    heap = xenheap.Heap("2GiB")
    _fill_and_destroy(heap, 1.0)
    assert heap.stats()["dirty_pages"] > 0  # still scrubbing
    heap.close()
    assert not any(s.is_alive() for s in heap.scrubbers)
    assert all(s.state == "stopped" for s in heap.scrubbers)
    with pytest.raises(xenheap.HeapClosed):
        heap.create_domain()


def test_interpreter_exit_with_an_open_heap_does_not_hang():
    code = ("import xenheap\n"
            "h = xenheap.Heap('512MiB')\n"
            "d = h.create_domain(); d.populate('500MiB', order=9)\n"
            "d.destroy()\n")
    done = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()


def test_a_failing_scrubber_is_logged_counted_and_the_heap_still_serves_clean_memory(
        monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("injected scrubber failure")

    monkeypatch.setattr(scrubber_module, "scrub_nodes", broken)
    with caplog.at_level(logging.ERROR, logger="xenheap.scrubber"), \
            xenheap.Heap("16MiB") as heap:
        _fill_and_destroy(heap, 1.0)
        deadline = time.monotonic() + WAIT_S
        while heap.stats()["nodes"][0]["scrubber_errors"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert heap.stats()["dirty_pages"] > 0  # nobody scrubbed in the background
        assert read_all_free_memory(heap)[0]  # scrub-on-allocate did
        heap.check()
    assert any("injected scrubber failure" in r.getMessage() or r.exc_info
               for r in caplog.records)


def test_debug_mode_scrubs_with_the_pattern_and_catches_a_write_after_free():
    with xenheap.Heap("8MiB", debug=True) as heap:
        dom = heap.create_domain()
        blk = dom.alloc(3)
        assert (blk.array() == SCRUB_PATTERN).all()
        view = blk.array()
        blk.free()
        assert heap.wait_clean(WAIT_S)
        assert (view == SCRUB_PATTERN).all()  # freed (poisoned), then scrubbed to the pattern
        view[100] = 0x11  # a write after free into a now-clean page
        with pytest.raises(xenheap.HeapCorruption):
            read_all_free_memory(heap, SCRUB_PATTERN)


def test_debug_mode_catches_a_write_after_free_into_a_page_still_dirty():
    """An allocation that takes a freed page before anyone scrubbed it finds the write in
    the poison its free left, instead of scrubbing over it; the next taker of that page
    is not refused for it again."""
    with xenheap.Heap("4MiB", debug=True, scrub="alloc", nodes=1) as heap:
        dom = heap.create_domain()
        blk = dom.alloc(0)
        view = blk.array()
        blk.free()
        assert view[0] == POISON_PATTERN
        view[0] = 7  # a write after free: the page is still dirty
        with pytest.raises(xenheap.HeapCorruption):
            for _ in range(heap.total_pages):  # each goes back: soon the allocator takes it
                dom.alloc(0)
        assert view[0] == POISON_PATTERN  # poisoned again on the way back
        again = dom.alloc(0)
        assert (again.array() == SCRUB_PATTERN).all()
        heap.check()


def test_stats_report_scrub_rate_and_dump_shows_unscrubbed_pages():
    with xenheap.Heap("64MiB") as heap:
        _fill_and_destroy(heap, 1.0)
        assert "unscrubbed pages" in heap.dump()
        assert heap.wait_clean(WAIT_S)
        node = heap.stats()["nodes"][0]
        assert node["scrubbed_pages"] > 0
        assert node["scrub_seconds"] > 0
        assert node["scrub_bytes_per_second"] == pytest.approx(
            node["scrubbed_pages"] * PAGE_SIZE / node["scrub_seconds"])
        assert node["scrubber"] in ("idle", "scrubbing")
        assert "Node 0 has 0 unscrubbed pages" in heap.dump()


def test_sync_and_alloc_modes_start_no_scrubber():
    for mode in ("sync", "alloc"):
        with xenheap.Heap("4MiB", scrub=mode) as heap:
            assert heap.scrubbers == []
            assert heap.stats()["nodes"][0]["scrubber"] == "none"


def test_scrubbers_judge_idleness_against_the_process_cpus_not_their_own():
    """Each scrubber pins itself to its node's CPUs, so its own affinity is not what the
    process may use: asked there, two emulated nodes on two CPUs would count one CPU,
    never see one idle, and leave every destroy dirty until the deadline."""
    with xenheap.Heap("64MiB", nodes=2) as heap:
        usable = len(os.sched_getaffinity(0))
        deadline = time.monotonic() + WAIT_S
        while any(s.state == "starting" for s in heap.scrubbers):  # pinned, once past it
            assert time.monotonic() < deadline, "scrubbers never started"
            time.sleep(0.001)
        assert [s.usable_cpus for s in heap.scrubbers] == [usable] * len(heap.scrubbers)
        if usable > 1:  # the case the bug needed: a scrubber may use fewer CPUs
            assert any(len(s.cpus) < usable for s in heap.scrubbers)


def test_a_heap_dropped_unclosed_is_collected_and_its_scrubbers_stop():
    def use_and_drop() -> tuple[weakref.ref, list]:
        heap = xenheap.Heap("16MiB")
        dom = heap.create_domain()
        dom.alloc(1).array()[:] = 1
        dom.destroy()
        return weakref.ref(heap), list(heap.scrubbers)

    ref, scrubbers = use_and_drop()
    assert scrubbers
    gc.collect()
    assert ref() is None  # the first scrubber's chores hold it weakly
    for scrubber in scrubbers:
        scrubber.join(WAIT_S)
        assert not scrubber.is_alive()
