"""Blocks live like Python buffers: freed when the last reference (handle or view) goes."""

from __future__ import annotations

import copy
import gc
import pickle
import time

import numpy as np
import pytest

import xenheap
from tests.conftest import run_threads
from xenheap.errors import InvalidFree

PAGE = 4096


@pytest.fixture(params=[0, "1MiB"], ids=["no-reuse", "reuse"])
def dom(request, heap_factory) -> xenheap.Domain:
    heap = heap_factory(8 << 20, nodes=1, reuse_bytes=request.param)
    return heap.create_domain("blocks")


def held(dom: xenheap.Domain) -> int:
    """Bytes the user holds in ``dom`` (parked blocks are not counted)."""
    gc.collect()
    return dom.stats()["bytes_allocated"]


def test_dropped_handles_are_freed(dom) -> None:
    for _ in range(1000):
        dom.alloc(0)
    assert held(dom) == 0
    dom.heap.check()


def test_a_live_handle_is_not_freed(dom) -> None:
    blk = dom.alloc(2)
    assert held(dom) == 4 * PAGE
    blk.free()
    assert held(dom) == 0


@pytest.mark.parametrize("derive", [
    lambda a: a[5:100],
    lambda a: a.view(np.uint32),
    lambda a: np.asarray(a)[::2],
    lambda a: a.reshape(2, -1)[1],
    lambda a: memoryview(a),
    lambda a: memoryview(a)[10:20],
], ids=["slice", "dtype", "asarray", "reshape", "memoryview", "memoryview-slice"])
def test_views_keep_the_block_and_its_bytes(dom, derive) -> None:
    blk = dom.alloc(1)
    blk.array()[:] = 7
    view = derive(blk.array())
    del blk
    assert held(dom) == 2 * PAGE
    # Other allocations (reusing whatever was freed) do not take or write its pages.
    others = [dom.alloc(1) for _ in range(20)]
    for other in others:
        other.array()[:] = 9
    del others, other
    assert held(dom) == 2 * PAGE
    assert set(np.asarray(view).tobytes()) == {7}
    del view
    assert held(dom) == 0
    dom.heap.check()


def test_the_handles_view_method_keeps_it_too(dom) -> None:
    blk = dom.alloc(0)
    mv = blk.view()
    del blk
    assert held(dom) == PAGE
    mv[0] = 1
    del mv
    assert held(dom) == 0


def test_copies_are_the_same_handle(dom) -> None:
    blk = dom.alloc(0)
    assert copy.copy(blk) is blk
    assert copy.deepcopy([blk])[0] is blk
    with pytest.raises(TypeError):
        pickle.dumps(blk)
    assert held(dom) == PAGE


def test_blocks_of_two_heaps_are_never_equal(heap_factory) -> None:
    a = heap_factory(1 << 20, nodes=1).create_domain().alloc(0)
    b = heap_factory(1 << 20, nodes=1).create_domain().alloc(0)
    assert (a.mfn, a.tag) == (b.mfn, b.tag)  # the same numbers in two heaps
    assert a != b and len({a, b}) == 2
    with pytest.raises(InvalidFree, match="another heap"):
        a.domain.free(b)


def test_a_hand_made_handle_never_frees_on_drop(dom) -> None:
    blk = dom.alloc(0)
    xenheap.Block(dom, blk.mfn, blk.order, blk.tag)  # dropped at once
    assert held(dom) == PAGE
    blk.free()
    assert held(dom) == 0


def test_a_handle_whose_block_a_copy_freed_shows_no_bytes(dom) -> None:
    """The block may be another domain's by now: its old handle must not reach it."""
    blk = dom.alloc(0)
    xenheap.Block(dom, blk.mfn, blk.order, blk.tag).free()
    other = dom.heap.create_domain("other")
    holders = [dom.alloc(0)]  # with reuse: the same block, in its next life
    while all(h.mfn != blk.mfn for h in holders):  # without: another domain gets it
        assert len(holders) <= dom.heap.total_pages
        holders.append(other.alloc(0))
    with pytest.raises(InvalidFree, match="stale"):
        blk.array()
    with pytest.raises(InvalidFree, match="stale"):
        blk.view()


@pytest.mark.parametrize("forge", [
    lambda dom, theirs: (dom, theirs.mfn, theirs.order, theirs.tag),  # another domain's
    lambda dom, theirs: (dom, -1, 0, 0),  # would wrap to the arena's last page
    lambda dom, theirs: (dom, 10**12, 0, 0),
    lambda dom, theirs: (dom, 0, 40, 0),
], ids=["foreign", "negative", "past-the-end", "huge-order"])
def test_a_hand_made_handle_sees_only_a_block_it_names_truly(dom, forge) -> None:
    theirs = dom.heap.create_domain("theirs").alloc(0)
    theirs.array()[:] = 0x5A
    with pytest.raises(InvalidFree, match="stale"):
        xenheap.Block(*forge(dom, theirs)).array()
    mine = dom.alloc(0)  # a hand-made copy of a live handle is that handle
    assert xenheap.Block(dom, mine.mfn, mine.order, mine.tag).array().size == PAGE


def test_freed_then_dropped_is_not_freed_twice(dom) -> None:
    blk = dom.alloc(0)
    blk.free()
    with pytest.raises(InvalidFree):
        blk.free()
    del blk
    assert held(dom) == 0
    dom.heap.check()


def test_dropped_after_destroy_or_close_does_nothing(heap_factory) -> None:
    heap = heap_factory(8 << 20, nodes=1, reuse_bytes="1MiB")
    dom = heap.create_domain()
    blocks = [dom.alloc(0) for _ in range(8)]
    dom.destroy()
    del blocks
    gc.collect()
    assert not dom.record.dropped
    other = heap.create_domain()
    kept = other.alloc(0)
    heap.close()
    del kept
    gc.collect()
    assert not other.record.dropped


def test_a_cycle_collected_by_the_gc_frees_its_block(dom) -> None:
    class Holder:
        pass

    holder = Holder()
    holder.me = holder  # only the cycle collector can free it
    holder.blk = dom.alloc(0)
    del holder
    assert held(dom) == 0


def test_dropped_from_many_threads(dom) -> None:
    def drop(n: int) -> int:
        for _ in range(n):
            dom.alloc(0).array()[0] = 1
        return n

    run_threads(drop, [(300,), (300,)])
    assert held(dom) == 0
    dom.heap.check()


def test_the_scrubbers_chore_frees_dropped_blocks(heap_factory) -> None:
    heap = heap_factory(8 << 20, nodes=1, scrub="idle")
    dom = heap.create_domain()
    for _ in range(10):
        dom.alloc(0)
    gc.collect()
    # No call on the domain: the heap's periodic chore frees them.
    for _ in range(600):  # up to 30 s on a loaded machine; the chore runs every 50 ms
        if not dom.record.dropped:
            break
        time.sleep(0.05)
    assert not dom.record.dropped
    assert dom.stats()["bytes_allocated"] == 0


def test_check_is_exact_while_the_chore_frees_dropped_blocks(heap_factory) -> None:
    """heap.check() holds the heap's periodic chores off: a dropped block the scrubber's
    chore was freeing must never show as a page that belongs to nothing."""
    heap = heap_factory(8 << 20, nodes=1, scrub="idle")
    dom = heap.create_domain()
    deadline = time.monotonic() + 5
    rounds = 0
    while time.monotonic() < deadline and rounds < 300:
        dom.alloc_many(64)  # dropped at once: queued for the chore
        heap.check()
        rounds += 1
    assert rounds > 0
    assert dom.stats()["bytes_allocated"] == 0


def test_an_interrupted_free_of_dropped_blocks_keeps_the_rest_queued(heap_factory,
                                                                      monkeypatch) -> None:
    """A KeyboardInterrupt in the middle of freeing dropped handles: the block it was
    freeing stays queued, and the next call frees it."""
    import xenheap.giveback as giveback

    heap = heap_factory("16MiB", scrub="alloc", nodes=1, reuse_bytes=0)
    dom = heap.create_domain()
    blocks = [dom.alloc(0) for _ in range(3)]
    del blocks
    gc.collect()

    class InterruptedBlock(xenheap.Block):
        __slots__ = ()

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            raise KeyboardInterrupt

    monkeypatch.setattr(giveback, "Block", InterruptedBlock)
    with pytest.raises(KeyboardInterrupt):
        giveback.free_dropped(dom)
    monkeypatch.undo()
    assert dom.stats()["bytes_allocated"] == 0  # stats() frees what is queued
    assert dom.stats()["num_frees"] == 3
    heap.check()


def test_a_caller_waits_for_another_threads_free_of_dropped_blocks(heap_factory,
                                                                   monkeypatch) -> None:
    """While another thread frees the last dropped handle, an allocation at the quota and
    stats() wait for it, rather than find the queue empty and count the block as held."""
    import threading

    import xenheap.giveback as giveback

    paused, resume = threading.Event(), threading.Event()

    class PausingBlock(xenheap.Block):
        __slots__ = ()

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            if threading.current_thread().name == "freer" and not paused.is_set():
                paused.set()
                resume.wait(10)

    heap = heap_factory("16MiB", scrub="alloc", nodes=1, reuse_bytes=0)
    dom = heap.create_domain(max_bytes=4096)  # one page
    blk = dom.alloc(0)
    del blk
    gc.collect()  # dropped: queued for the next call
    freer = threading.Thread(target=giveback.free_dropped, args=(dom,), name="freer")
    monkeypatch.setattr(giveback, "Block", PausingBlock)
    freer.start()
    assert paused.wait(10)  # it took the entry off the queue, and has not freed it yet
    threading.Timer(0.2, resume.set).start()
    again = dom.alloc(0)  # at the quota until the freer is done
    freer.join(10)
    assert again.order == 0 and dom.stats()["pages"] == 1
    paused.clear()
    resume.clear()
    del again
    gc.collect()  # dropped unfreed in turn
    freer = threading.Thread(target=giveback.free_dropped, args=(dom,), name="freer")
    freer.start()
    assert paused.wait(10)
    threading.Timer(0.2, resume.set).start()
    assert dom.stats()["bytes_allocated"] == 0  # waited for the freer
    freer.join(10)
