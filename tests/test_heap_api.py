"""The public API: Heap, Domain, Block, errors, stats, dump, close; every misuse refused with
the right exception and nothing changed."""

from __future__ import annotations

import copy
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import MiB, assert_zero, stats_snapshot, three_nodes_one_cpuless
from numba import njit

import xenheap
from native_kernels import api
from native_kernels.atomics import atomic_load
from native_kernels.check import check_heap
from native_kernels.layout import (
    BUDDY_SCRUBBING,
    M_NR_PAGES,
    N_LOCK,
    N_SCRUB_PASSES,
    PG_NEED_SCRUB,
    PG_SCRUB_STATE,
)
from native_kernels.scrub import NOTHING_DIRTY, scrub_free_pages
from xenheap import (
    DomainDead,
    HeapClosed,
    HeapCorruption,
    InvalidArgument,
    InvalidFree,
    OutOfMemory,
    XenHeapError,
)
from xenheap.faults import inject_fault
from xenheap.heap import CLOSE_IN_FLIGHT_S

PAGE = 4096


@njit(nogil=True, cache=True)
def load(arr, row, col):
    return atomic_load(arr, (row, col))


# --- errors ----------------------------------------------------------------------------------
def test_exception_hierarchy() -> None:
    for exc in (OutOfMemory, InvalidArgument, InvalidFree, DomainDead, HeapClosed,
                HeapCorruption):
        assert issubclass(exc, XenHeapError)
    assert issubclass(OutOfMemory, MemoryError)
    assert issubclass(InvalidArgument, ValueError)
    assert issubclass(InvalidFree, ValueError)
    assert xenheap.XenHeapError is XenHeapError
    assert set(xenheap.__all__) >= {"Heap", "Domain", "Block", "XenHeapError", "OutOfMemory",
                                    "InvalidArgument", "InvalidFree", "DomainDead",
                                    "HeapClosed", "HeapCorruption"}


def test_raised_errors_are_caught_by_their_builtin_bases(heap) -> None:
    dom = heap.create_domain()
    with pytest.raises(ValueError):
        dom.alloc(-1)
    blk = dom.alloc(0)
    blk.free()
    with pytest.raises(ValueError):
        blk.free()
    dom.populate(heap.stats()["free_pages"] * PAGE)
    with pytest.raises(MemoryError):
        dom.alloc(0)
    with pytest.raises(XenHeapError):
        dom.alloc(0)
    heap.check()


# --- Heap construction -----------------------------------------------------------------------
def test_heap_attributes(heap_factory) -> None:
    heap = heap_factory(8 * MiB, nodes=2)
    assert heap.page_size == PAGE
    assert heap.nodes == 2
    assert heap.total_pages == 2048
    assert heap.max_order == 10  # 1024 pages per node
    assert heap.scrub_mode == "alloc"
    assert heap.debug is False
    assert heap.closed is False
    assert heap.scrubbers == []
    assert "2048 pages" in repr(heap) and "2 node" in repr(heap)


def test_heap_size_is_split_evenly_and_rounded_down(heap_factory) -> None:
    heap = heap_factory(8 * MiB + 3 * PAGE + 100, nodes=2)
    assert heap.total_pages == 2 * 1025
    heap3 = heap_factory("8MiB", nodes=three_nodes_one_cpuless())
    assert heap3.nodes == 3
    assert heap3.total_pages == 3 * (2048 // 3)
    assert heap3.max_order == 9  # 682 pages per node: largest chunk 512
    st = heap3.stats()
    assert [n["total_pages"] for n in st["nodes"]] == [682] * 3
    assert st["free_pages"] == heap3.total_pages
    heap3.check()


def test_heap_with_machine_topology_and_idle_scrubbers(heap_factory) -> None:
    heap = heap_factory("4MiB", scrub="idle")
    assert heap.nodes >= 1
    assert heap.scrubbers  # background threads in the default mode
    dom = heap.create_domain()
    assert_zero(dom.alloc(3))
    heap.check()


@pytest.mark.parametrize("kwargs", [
    {"scrub": "bogus"},
    {"scrub": None},
    {"scrub": "IDLE"},
    {"scrub": ["idle"]},  # unhashable: refused as a bad value, not a TypeError
    {"size": -1},
    {"size": 0},
    {"size": 100},  # less than a page
    {"size": "abc"},
    {"size": 1.5},
    {"size": True},
    {"size": "16TiB"},  # more frames than 32 bits hold
    {"nodes": "x"},
    {"nodes": 0},
    {"nodes": -1},
    {"nodes": True},
    {"nodes": 2.5},
    {"nodes": []},
    {"nodes": [[999_999]]},
    {"nodes": [[0], [0]]},
    {"nodes": ["ab"]},
    {"nodes": [[0.5]]},
    {"nodes": 10**7},  # refused at once, not after building 10**7 nodes
    {"size": 4 * PAGE, "nodes": 8},  # less than one page per node
    {"debug": "yes"},
    {"max_domains": 0},
    {"max_domains": 2**31 + 2},  # slot + 1 would reach the owner word's pinned bit
], ids=repr)
def test_heap_rejects_bad_arguments(kwargs: dict) -> None:
    kwargs = {"size": "1MiB", "scrub": "alloc", **kwargs}
    with pytest.raises(InvalidArgument):
        xenheap.Heap(**kwargs)


# --- domains and blocks ----------------------------------------------------------------------
def test_domain_attributes_and_ids(heap) -> None:
    a = heap.create_domain("tenant")
    b = heap.create_domain()
    assert a.name == "tenant"
    assert b.name == f"d{b.id}"
    assert a.id != b.id and a.id > 0 and b.id > 0
    assert a.alive and b.alive
    assert a.pages == 0
    assert a.heap is heap
    assert a.max_bytes is None
    assert "tenant" in repr(a) and "alive" in repr(a)
    assert heap.stats()["domains"] == 2
    a.destroy()
    assert not a.alive
    assert "destroyed" in repr(a)
    assert heap.stats()["domains"] == 1
    c = heap.create_domain()
    assert c.id not in (a.id, b.id)  # ids are never reused, slots are


def test_block_attributes(heap_factory) -> None:
    heap = heap_factory(8 * MiB, nodes=2)
    dom = heap.create_domain()
    for order in (0, 1, 4, heap.max_order):
        blk = dom.alloc(order, node=1)
        assert blk.order == order
        assert blk.nbytes == PAGE << order
        assert blk.node == 1
        assert blk.domain is dom
        assert blk.mfn % (1 << order) == 0  # aligned to its size
        assert 1024 <= blk.mfn < 2048
        assert_zero(blk)
        blk.free()
    heap.check()


@pytest.mark.parametrize(("nbytes", "order"), [
    (1, 0), (PAGE, 0), (PAGE + 1, 1), (2 * PAGE, 1), (2 * PAGE + 1, 2), ("64KiB", 4),
    ("1MiB", 8), ("1.5MiB", 9), (4 * MiB, 10),
])
def test_alloc_bytes_takes_the_smallest_order_that_fits(heap, nbytes, order: int) -> None:
    dom = heap.create_domain()
    blk = dom.alloc_bytes(nbytes)
    assert blk.order == order
    assert dom.order_for(nbytes) == order
    assert dom.pages == 1 << order
    assert_zero(blk)


def test_alloc_every_order(heap) -> None:
    dom = heap.create_domain()
    total = 0
    blocks = []
    for order in range(heap.max_order):  # 1 + 2 + ... + 2**(max-1): all but one page
        blk = dom.alloc(order)
        assert blk.order == order
        assert_zero(blk)
        blocks.append(blk)
        total += 1 << order
        assert dom.pages == total
    st = heap.stats()
    assert st["allocated_pages"] == total == heap.total_pages - 1
    assert st["free_pages"] + st["allocated_pages"] == st["total_pages"]
    heap.check()
    for blk in blocks:
        blk.free()
    whole = dom.alloc(heap.max_order)
    assert whole.mfn == 0 and whole.nbytes == heap.total_pages * PAGE
    assert_zero(whole)
    heap.check()


def test_populate_returns_the_block_count(heap) -> None:
    dom = heap.create_domain()
    assert dom.populate("1MiB", order=2) == 64
    assert dom.pages == 256
    assert dom.populate(PAGE + 1) == 2  # order 0: rounded up to whole blocks
    assert dom.pages == 258
    assert dom.populate(3 * PAGE, order=1) == 2
    assert dom.pages == 262
    assert dom.stats()["blocks"] == 64 + 2 + 2
    st = heap.stats()
    assert st["allocated_pages"] == 262
    heap.check()
    dom.destroy()
    assert heap.stats()["allocated_pages"] == 0
    heap.check()


def test_populate_is_all_or_nothing(heap_factory) -> None:
    heap = heap_factory(8 * MiB, nodes=2)
    dom = heap.create_domain()
    keep = [dom.alloc(0) for _ in range(5)]
    before = stats_snapshot(heap)
    dom_before = dom.stats()
    free = before["free_pages"]
    with pytest.raises(OutOfMemory):
        dom.populate((free + 1) * PAGE)  # one page too many
    with pytest.raises(OutOfMemory):
        dom.populate(2 * 1024 * PAGE, order=10)  # needs two order-10 chunks: one is split
    with pytest.raises(OutOfMemory):
        dom.populate((1024 + 1) * PAGE, node=1)  # more than node 1 holds
    assert stats_snapshot(heap) == before
    assert dom.stats() == dom_before
    heap.check()
    assert dom.populate(free * PAGE) == free  # exactly what is left fits
    assert heap.stats()["free_pages"] == 0
    for blk in keep:
        blk.free()
    heap.check()


def test_view_and_array_are_zero_copy(heap) -> None:
    dom = heap.create_domain()
    blk = dom.alloc(2)
    other = dom.alloc(2)
    arr = blk.array("uint64")
    assert arr.shape == (blk.nbytes // 8,)
    assert arr.dtype == np.uint64
    assert arr.flags.writeable
    arr[:] = 0x0102030405060708
    view = blk.view()
    assert isinstance(view, memoryview)
    assert len(view) == blk.nbytes and not view.readonly
    assert bytes(view[:8]) == (0x0102030405060708).to_bytes(8, "little")
    view[blk.nbytes - 1] = 0xFF
    assert blk.array("uint8")[-1] == 0xFF
    assert blk.array("uint32").shape == (blk.nbytes // 4,)
    assert blk.array(np.float64).shape == (blk.nbytes // 8,)
    assert blk.array("V4096").shape == (4,)
    assert blk.array().dtype == np.uint8  # default dtype
    # Views of the same block share memory; other blocks are untouched.
    assert np.shares_memory(blk.array(), blk.array("uint64"))
    assert not np.shares_memory(blk.array(), other.array())
    assert_zero(other)


def test_free_and_destroy_bookkeeping(heap) -> None:
    dom = heap.create_domain()
    a = dom.alloc(3)
    b = dom.alloc(0)
    assert dom.pages == 9
    assert dom.stats()["blocks"] == 2
    a.free()
    assert dom.pages == 1
    dom.free(b)
    assert dom.pages == 0
    st = dom.stats()
    assert st["num_allocations"] == 2 and st["num_frees"] == 2 and st["peak_pages"] == 9
    _held = dom.alloc(1)  # freed by the destroy, not as a dropped handle
    dom.destroy()
    assert dom.pages == 0
    assert dom.stats()["num_frees"] == 3
    assert not dom.alive
    assert heap.stats()["allocated_pages"] == 0
    heap.check()


@pytest.mark.parametrize("mode", ["sync", "alloc", "idle"])
def test_destroy_in_each_scrub_mode(heap_factory, mode: str) -> None:
    heap = heap_factory(8 * MiB, nodes=2, scrub=mode)
    dom = heap.create_domain()
    blocks = [dom.alloc(o) for o in (0, 3, 5, 7)]
    dom.populate(256 * PAGE)
    held = dom.pages
    assert held == 1 + 8 + 32 + 128 + 256
    for blk in blocks:
        blk.array()[:] = 0xA5
    dom.destroy()
    st = heap.stats()
    assert st["allocated_pages"] == 0
    if mode == "sync":
        assert st["dirty_pages"] == 0  # zeroed before destroy returned
        assert sum(n["sync_scrubbed_pages"] for n in st["nodes"]) == held
    elif mode == "alloc":
        assert st["dirty_pages"] == held  # left dirty, nothing zeroes it in the background
        assert heap.wait_clean(5) is False  # no scrubber: answers at once
    else:
        assert heap.wait_clean(30) is True
        assert heap.stats()["dirty_pages"] == 0
    heap.check()
    # Whatever the mode, the memory comes back zero.
    again = heap.create_domain()
    for order in (7, 5, 3, 0):
        assert_zero(again.alloc(order))
    heap.check()


def test_context_managers(heap_factory) -> None:
    with xenheap.Heap(size="4MiB", nodes=1, scrub="alloc") as heap:
        with heap.create_domain("ctx") as dom:
            dom.alloc(2)
            assert dom.alive
        assert not dom.alive
        assert heap.stats()["allocated_pages"] == 0
        # A domain destroyed inside its with-block is not destroyed twice on exit.
        with heap.create_domain() as dom2:
            dom2.destroy()
        heap.check()
    assert heap.closed
    with pytest.raises(HeapClosed):
        heap.create_domain()


def test_stats_fields_and_consistency(heap_factory) -> None:
    heap = heap_factory(8 * MiB, nodes=three_nodes_one_cpuless())
    dom = heap.create_domain()
    blocks = [dom.alloc(o, node=n) for o, n in ((0, 0), (4, 1), (2, 2), (6, 2))]
    blocks[1].free()
    st = heap.stats()
    for key in ("total_pages", "free_pages", "dirty_pages", "allocated_pages", "page_size",
                "max_order", "scrub_mode", "debug", "domains", "frame_table_bytes", "nodes"):
        assert key in st
    assert st["total_pages"] == heap.total_pages
    assert st["free_pages"] + st["allocated_pages"] == st["total_pages"]
    assert st["allocated_pages"] == 1 + 4 + 64
    assert st["dirty_pages"] == 16
    assert st["page_size"] == PAGE and st["max_order"] == heap.max_order
    assert st["scrub_mode"] == "alloc" and st["debug"] is False
    assert st["domains"] == 1
    assert 0 < st["frame_table_bytes"] <= 32 * heap.total_pages  # Xen's page_info is 32 B
    assert len(st["nodes"]) == 3
    for i, node in enumerate(st["nodes"]):
        assert node["node"] == i
        for key in ("cpus", "os_node", "total_pages", "free_pages", "dirty_pages",
                    "free_by_order", "num_allocations", "num_frees", "scrubbed_pages",
                    "alloc_scrubbed_pages", "sync_scrubbed_pages", "scrub_passes", "aborts",
                    "abort_wait_seconds", "abort_wait_max_seconds", "abort_wait_p99_seconds",
                    "scrub_seconds", "scrub_bytes_per_second", "scrubber", "scrubber_errors"):
            assert key in node, key
        assert sum(node["free_by_order"].values()) == node["free_pages"]
        assert node["dirty_pages"] <= node["free_pages"] <= node["total_pages"]
        assert node["scrubber"] == "none"
    assert st["nodes"][2]["cpus"] == []
    assert sum(n["free_pages"] for n in st["nodes"]) == st["free_pages"]
    assert sum(n["dirty_pages"] for n in st["nodes"]) == st["dirty_pages"]
    assert sum(n["total_pages"] for n in st["nodes"]) == st["total_pages"]
    assert [n["num_allocations"] for n in st["nodes"]] == [1, 1, 2]
    assert [n["num_frees"] for n in st["nodes"]] == [0, 1, 0]
    assert st["nodes"][1]["dirty_pages"] == 16


def test_dump_mentions_every_node_and_unscrubbed_pages(heap_factory) -> None:
    heap = heap_factory(8 * MiB, nodes=three_nodes_one_cpuless())
    dom = heap.create_domain()
    dom.alloc(3, node=1).free()
    text = heap.dump()
    assert isinstance(text, str)
    for node in range(3):
        assert re.search(rf"\bnode[ =]?{node}\b", text, re.IGNORECASE), text
        assert f"Node {node} has" in text
    assert "unscrubbed" in text
    assert re.search(r"Node 1 has 8 unscrubbed", text), text
    assert re.search(r"Node 0 has 0 unscrubbed", text), text


def test_check_passes_and_catches_corruption(heap) -> None:
    heap.check()
    dom = heap.create_domain()
    blk = dom.alloc(2)
    heap.check()
    # White-box: mark an allocated page dirty; the checker must notice.
    heap.core.state["ft8"][PG_NEED_SCRUB, blk.mfn] = 1
    with pytest.raises(HeapCorruption, match="scrubbing"):
        heap.check()
    heap.core.state["ft8"][PG_NEED_SCRUB, blk.mfn] = 0
    heap.check()


@pytest.mark.parametrize("timeout", [-1, float("nan"), float("inf"), "1", True])
def test_wait_clean_refuses_a_bad_timeout(heap, timeout) -> None:
    with pytest.raises(InvalidArgument):
        heap.wait_clean(timeout)


def test_wait_clean_takes_numpy_numbers(heap) -> None:
    assert heap.wait_clean(np.int64(1)) is True and heap.wait_clean(np.float32(0.5)) is True


def test_wait_clean(heap_factory) -> None:
    quiet = heap_factory(4 * MiB, nodes=1, scrub="alloc")
    assert quiet.wait_clean(0) is True  # nothing dirty
    d = quiet.create_domain()
    d.alloc(1).free()
    assert quiet.wait_clean(1) is False  # dirty, and nobody to clean it
    busy = heap_factory(8 * MiB, nodes=2, scrub="idle")
    dom = busy.create_domain()
    dom.populate(busy.total_pages * PAGE)
    dom.destroy()
    assert busy.wait_clean(30) is True
    assert busy.stats()["dirty_pages"] == 0
    busy.check()


def test_max_domains_slots(heap_factory) -> None:
    heap = heap_factory(4 * MiB, nodes=1, max_domains=2)
    a = heap.create_domain()
    b = heap.create_domain()
    with pytest.raises(OutOfMemory):
        heap.create_domain()
    a.destroy()
    c = heap.create_domain()  # the slot is reused
    assert c.alive and b.alive
    assert c.pages == 0
    del b  # collected: destroyed, its slot free again
    assert heap.create_domain().alive
    heap.check()


# --- quotas ----------------------------------------------------------------------------------
def test_quota_is_enforced_naming_the_domain(heap) -> None:
    dom = heap.create_domain("capped", max_bytes="64KiB")
    assert dom.max_bytes == 64 * 1024
    blk = dom.alloc(4)  # exactly the quota
    before = stats_snapshot(heap)
    dom_before = dom.stats()
    with pytest.raises(OutOfMemory, match="capped"):
        dom.alloc(0)
    with pytest.raises(OutOfMemory, match="capped"):
        dom.populate(PAGE)
    with pytest.raises(OutOfMemory, match="capped"):
        dom.alloc_bytes(1)
    assert stats_snapshot(heap) == before
    assert dom.stats() == dom_before
    heap.check()
    blk.free()
    assert dom.populate(64 * 1024, order=1) == 8  # fits again, exactly
    with pytest.raises(OutOfMemory, match="capped"):
        dom.alloc(0)
    # The quota is the domain's, not the heap's: others still allocate.
    assert heap.create_domain().alloc(4).order == 4
    heap.check()


def test_quota_rounds_up_to_pages(heap) -> None:
    dom = heap.create_domain(max_bytes=PAGE + 1)
    assert dom.max_bytes == 2 * PAGE
    _held = dom.alloc(1)
    with pytest.raises(OutOfMemory):
        dom.alloc(0)


@pytest.mark.parametrize("kwargs", [
    {"max_bytes": 0}, {"max_bytes": -1}, {"max_bytes": "abc"}, {"max_bytes": 1.5},
    {"max_bytes": True}, {"name": 5}, {"name": b"x"},
], ids=repr)
def test_create_domain_rejects_bad_arguments(heap, kwargs: dict) -> None:
    before = stats_snapshot(heap)
    with pytest.raises(InvalidArgument):
        heap.create_domain(**kwargs)
    assert stats_snapshot(heap) == before
    heap.check()


# --- misuse: refused, and nothing changed ---------------------------------------------------
@dataclass
class World:
    heap: xenheap.Heap
    dom: xenheap.Domain
    other: xenheap.Domain
    blk: xenheap.Block  # a live block of dom
    freed: xenheap.Block  # a block of dom already freed
    stale_copy: xenheap.Block  # a copy of a handle whose block was freed and reallocated
    new: xenheap.Block  # the reallocated block: same mfn and order as stale_copy
    foreign: xenheap.Block  # a live block of other
    dead: xenheap.Domain  # destroyed
    dead_blk: xenheap.Block  # a block dead held when it was destroyed


@pytest.fixture(params=["alloc", "sync"])
def world(heap_factory, request) -> World:
    heap = heap_factory(8 * MiB, nodes=2, scrub=request.param)
    dom = heap.create_domain("dom")
    other = heap.create_domain("other")
    # All of node 1, freed and taken again: the same mfn and order, a new allocation.
    old = dom.alloc(heap.max_order, node=1)
    stale_copy = copy.copy(old)
    old.free()
    new = dom.alloc(heap.max_order, node=1)
    assert (new.mfn, new.order) == (old.mfn, old.order)
    blk = dom.alloc(2, node=0)
    freed = dom.alloc(1, node=0)
    freed.free()
    foreign = other.alloc(0, node=0)
    dead = heap.create_domain("dead")
    dead_blk = dead.alloc(3, node=0)
    dead.destroy()
    dom.populate(10 * PAGE, node=0)
    heap.check()
    return World(heap, dom, other, blk, freed, stale_copy, new, foreign, dead, dead_blk)


MAX = object()  # placeholder for heap.max_order + 1


def _order(w: World, value: object) -> object:
    return w.heap.max_order + 1 if value is MAX else value


MISUSES: list[tuple[str, Callable[[World], object], type[Exception]]] = []
for bad in (-1, MAX, "1", 1.5, True, None, 2**70):
    MISUSES.append((f"alloc order {bad!r}", lambda w, b=bad: w.dom.alloc(_order(w, b)),
                    InvalidArgument))
    MISUSES.append((f"populate order {bad!r}",
                    lambda w, b=bad: w.dom.populate(PAGE, order=_order(w, b)), InvalidArgument))
for bad in (-1, "abc", 0, 1.5, True, None, "1 parsec"):
    MISUSES.append((f"alloc_bytes {bad!r}", lambda w, b=bad: w.dom.alloc_bytes(b),
                    InvalidArgument))
MISUSES.append(("alloc_bytes above the largest chunk",
                lambda w: w.dom.alloc_bytes((PAGE << w.heap.max_order) + 1), InvalidArgument))
for bad in (-1, "abc", 0, 1.5, True, None):
    MISUSES.append((f"populate nbytes {bad!r}", lambda w, b=bad: w.dom.populate(b),
                    InvalidArgument))
for bad in (None, 0, 1, "no", 0.0):  # as truth values they would skip the zeroing
    MISUSES.append((f"alloc zero={bad!r}", lambda w, b=bad: w.dom.alloc(0, zero=b),
                    InvalidArgument))
for bad in (-1, 2, "0", 1.5, True):
    MISUSES.append((f"alloc node {bad!r}", lambda w, b=bad: w.dom.alloc(0, node=b),
                    InvalidArgument))
    MISUSES.append((f"alloc_bytes node {bad!r}", lambda w, b=bad: w.dom.alloc_bytes(1, node=b),
                    InvalidArgument))
    MISUSES.append((f"populate node {bad!r}", lambda w, b=bad: w.dom.populate(PAGE, node=b),
                    InvalidArgument))
for bad in (object, "O", "V3", "V12288", "garbage", "U", 1, [("a", "i4"), ("b", "O")],
            "(2,)i4", None, np.array([1, 2])):
    MISUSES.append((f"array dtype {bad!r}", lambda w, b=bad: w.blk.array(b), InvalidArgument))
MISUSES.append(("array dtype wider than the block",
                lambda w: w.blk.array(f"V{2 * w.blk.nbytes}"), InvalidArgument))
MISUSES += [
    ("double free via block", lambda w: w.freed.free(), InvalidFree),
    ("double free via domain", lambda w: w.dom.free(w.freed), InvalidFree),
    ("free another domain's block", lambda w: w.dom.free(w.foreign), InvalidFree),
    ("free own block through another domain", lambda w: w.other.free(w.blk), InvalidFree),
    ("free a block of a destroyed domain", lambda w: w.dead_blk.free(), InvalidFree),
    ("free a destroyed domain's block via it", lambda w: w.dead.free(w.dead_blk), InvalidFree),
    ("free a stale handle (same mfn reallocated)", lambda w: w.stale_copy.free(), InvalidFree),
    ("free a hand-made handle with a wrong order",
     lambda w: w.dom.free(xenheap.Block(w.dom, w.blk.mfn, 1, w.blk.tag)), InvalidFree),
    ("free a hand-made handle past the heap",
     lambda w: w.dom.free(xenheap.Block(w.dom, w.heap.total_pages + 8, 0, 1)), InvalidFree),
    ("free a non-block", lambda w: w.dom.free("not a block"), InvalidFree),
    ("view through a hand-made stale handle",  # not freed itself: its tag is the old one
     lambda w: xenheap.Block(w.dom, w.stale_copy.mfn, w.stale_copy.order,
                             w.stale_copy.tag).view(), InvalidFree),
    ("view a freed block", lambda w: w.freed.view(), InvalidFree),
    ("array of a freed block", lambda w: w.freed.array(), InvalidFree),
    ("view a destroyed domain's block", lambda w: w.dead_blk.view(), InvalidFree),
    ("alloc in a destroyed domain", lambda w: w.dead.alloc(0), DomainDead),
    ("alloc_bytes in a destroyed domain", lambda w: w.dead.alloc_bytes(PAGE), DomainDead),
    ("populate in a destroyed domain", lambda w: w.dead.populate(PAGE), DomainDead),
    ("destroy twice", lambda w: w.dead.destroy(), DomainDead),
    ("alloc bigger than any free chunk",
     lambda w: w.dom.alloc(w.heap.max_order, node=0), OutOfMemory),
    ("populate more than the heap", lambda w: w.dom.populate(w.heap.total_pages * PAGE),
     OutOfMemory),
    ("populate a huge size", lambda w: w.dom.populate(2**64), OutOfMemory),
]


@pytest.mark.parametrize(("call", "exc"), [(c, e) for _, c, e in MISUSES],
                         ids=[name for name, _, _ in MISUSES])
def test_misuse_is_refused_and_changes_nothing(world: World, call, exc) -> None:
    heap = world.heap
    before = stats_snapshot(heap)
    doms_before = [d.stats() for d in (world.dom, world.other, world.dead)]
    alive_before = [d.alive for d in (world.dom, world.other, world.dead)]
    with pytest.raises(exc):
        call(world)
    heap.check()
    assert stats_snapshot(heap) == before
    assert [d.stats() for d in (world.dom, world.other, world.dead)] == doms_before
    assert [d.alive for d in (world.dom, world.other, world.dead)] == alive_before
    # The live handles still work afterwards.
    assert_zero(world.foreign)
    world.blk.array()[:] = 1
    world.blk.free()
    world.foreign.free()
    heap.check()


def test_a_stale_handle_does_not_free_the_new_block(world: World) -> None:
    dom = world.dom
    pages = dom.pages
    free = world.heap.stats()["free_pages"]
    with pytest.raises(InvalidFree):
        world.stale_copy.free()
    with pytest.raises(InvalidFree):
        dom.free(world.stale_copy)
    assert dom.pages == pages
    assert world.heap.stats()["free_pages"] == free
    # The new block at that mfn is still this domain's: usable and freeable, once.
    world.new.array()[:] = 9
    world.new.free()
    assert dom.pages == pages - (1 << world.new.order)
    with pytest.raises(InvalidFree):
        world.stale_copy.free()
    world.heap.check()


@pytest.mark.parametrize("mode", ["alloc", "sync"])
def test_free_after_realloc_of_the_same_page_refuses_the_old_handle(heap_factory,
                                                                   mode: str) -> None:
    heap = heap_factory(4 * MiB, nodes=1, scrub=mode)
    dom = heap.create_domain()
    old = dom.alloc(heap.max_order)
    old.free()
    new = dom.alloc(heap.max_order)  # the whole heap again: necessarily the same mfn
    assert (new.mfn, new.order) == (old.mfn, old.order)
    assert new != old  # a different allocation
    before = stats_snapshot(heap)
    with pytest.raises(InvalidFree):
        old.free()
    with pytest.raises(InvalidFree):
        dom.free(old)
    assert stats_snapshot(heap) == before
    assert dom.pages == heap.total_pages
    new.array()[:] = 3  # the new block is untouched and still ours
    new.free()
    assert dom.pages == 0
    heap.check()


def test_array_with_a_malformed_dtype_tuple_raises_invalid_argument(heap) -> None:
    blk = heap.create_domain().alloc(0)
    with pytest.raises(InvalidArgument):
        blk.array(("i4", -1))


def test_populate_an_absurd_size_raises_out_of_memory(heap) -> None:
    dom = heap.create_domain()
    before = stats_snapshot(heap)
    for nbytes, order in ((10**30, 0), (2**70, heap.max_order), (2**64, 0)):
        with pytest.raises(OutOfMemory):
            dom.populate(nbytes, order=order)
    assert stats_snapshot(heap) == before
    heap.check()


def test_numpy_integer_sizes_are_accepted(heap) -> None:
    dom = heap.create_domain(max_bytes=np.int64(64 * 1024))
    assert dom.alloc_bytes(np.int64(PAGE)).order == 0
    assert dom.populate(np.int64(2 * PAGE)) == 2


def test_numpy_numbers_are_accepted_wherever_python_ones_are() -> None:
    with xenheap.Heap("4MiB", nodes=1, max_domains=np.int64(4),
                      scrub_deadline=np.float32(0.5)) as heap:
        assert heap.scrub_deadline == 0.5
        dom = heap.create_domain()
        assert len(dom.alloc_many(np.int64(3), np.int8(1))) == 3
        assert not dom.alloc(0, zero=np.True_).array().any()
        dom.alloc(0, zero=np.False_)


@pytest.mark.parametrize("call", ["alloc order", "alloc node", "populate order"])
def test_numpy_integer_order_and_node_are_accepted(heap_factory, call: str) -> None:
    heap = heap_factory(4 * MiB, nodes=2)
    dom = heap.create_domain()
    if call == "alloc order":
        assert dom.alloc(np.int64(2)).order == 2
    elif call == "alloc node":
        assert dom.alloc(0, node=np.int64(1)).node == 1
    else:
        assert dom.populate(4 * PAGE, order=np.int32(1)) == 2


# --- close -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["alloc", "sync", "idle"])
def test_close_then_every_call_raises_heap_closed(mode: str) -> None:
    heap = xenheap.Heap(size="4MiB", nodes=2, scrub=mode)
    dom = heap.create_domain()
    blk = dom.alloc(1)
    dom.populate(4 * PAGE)
    heap.close()
    assert heap.closed
    assert not dom.alive
    heap.close()  # idempotent
    assert all(not s.is_alive() for s in heap.scrubbers)
    for call in (heap.create_domain, lambda: dom.alloc(0), lambda: dom.alloc_bytes(PAGE),
                 lambda: dom.populate(PAGE), blk.free, lambda: dom.free(blk), dom.destroy,
                 heap.check):
        with pytest.raises(HeapClosed):
            call()


def test_close_returns_though_a_call_stays_counted_in_flight(caplog) -> None:
    """A call interrupted between counting itself in and out (a KeyboardInterrupt at the
    wrong bytecode) leaves the count raised: close() gives up waiting after
    CLOSE_IN_FLIGHT_S, says so, stops the scrubbers and leaves the arenas mapped."""
    heap = xenheap.Heap(size="4MiB")
    assert api.enter_heap(heap.core.state["meta"])  # counted in, never out
    with caplog.at_level("WARNING", logger="xenheap.heap"):
        closer = threading.Thread(target=heap.close, daemon=True)
        closer.start()
        closer.join(CLOSE_IN_FLIGHT_S + 10)
    assert not closer.is_alive(), "close() waited for the call for ever"
    assert heap.closed and not any(s.is_alive() for s in heap.scrubbers)
    assert "still counted in flight" in caplog.text


@pytest.mark.parametrize("call", ["view", "array"])
def test_block_view_after_close_raises_heap_closed(call: str) -> None:
    heap = xenheap.Heap(size="1MiB", nodes=1, scrub="alloc")
    blk = heap.create_domain().alloc(0)
    heap.close()
    with pytest.raises(HeapClosed):
        getattr(blk, call)()


@pytest.mark.parametrize("mode", ["alloc", "idle"])
def test_heap_queries_after_close_report_the_final_state(mode: str) -> None:
    """Decided: stats(), dump() and wait_clean() keep answering from the state after close,
    so a service can log its last figures; everything that changes the heap raises."""
    heap = xenheap.Heap(size="1MiB", nodes=1, scrub=mode)
    dom = heap.create_domain()
    _held = dom.alloc(2)  # a dropped handle might be freed (by the scrubber's chore) first
    heap.close()
    stats = heap.stats()
    assert stats["allocated_pages"] == 4
    assert "unscrubbed pages" in heap.dump()
    assert heap.wait_clean(0.01) is True


def test_close_leaves_the_figures_of_parked_blocks_as_they_were() -> None:
    """A block the user freed stays out of bytes_allocated after close: the closed heap's
    figures are those it was left with, parked blocks (cached_bytes) included."""
    heap = xenheap.Heap(size="1MiB", nodes=1, scrub="alloc", reuse_bytes="64KiB")
    dom = heap.create_domain()
    _held = dom.alloc(1)
    dom.alloc(0).free()  # parked for dom's reuse
    keys = ("bytes_allocated", "cached_bytes", "num_frees")
    before = ({k: heap.stats()[k] for k in keys}, {k: dom.stats()[k] for k in keys})
    assert before[0]["cached_bytes"] == PAGE
    heap.close()
    assert ({k: heap.stats()[k] for k in keys}, {k: dom.stats()[k] for k in keys}) == before
    with pytest.raises(HeapClosed):
        dom.destroy()  # refused, so it changes nothing either
    assert ({k: heap.stats()[k] for k in keys}, {k: dom.stats()[k] for k in keys}) == before


def test_a_check_short_of_memory_leaves_the_node_locks_free(heap_factory) -> None:
    """check() allocates arrays as large as the heap; failing, it must not hold the locks."""
    heap = heap_factory(2 * MiB, nodes=2, scrub="alloc")
    hs = heap.core.hs
    meta = hs.meta.copy()
    meta[M_NR_PAGES] = 2**50  # arrays of a PiB: beyond any address space
    with pytest.raises(MemoryError):
        check_heap(hs._replace(meta=meta))
    assert [hs.nodes[n, N_LOCK] == hs.nodes[n, N_LOCK + 1] for n in range(2)] == [True, True]
    heap.create_domain().alloc(0)
    heap.check()


# --- check() while a scrub is finishing --------------------------------------------------------
def test_check_while_a_scrub_finishes_leaves_the_free_lists_ordered(heap_factory) -> None:
    heap = heap_factory(2 * MiB, nodes=1, scrub="alloc")  # we play the scrubber thread
    dom = heap.create_domain()
    a, _b, c, _d = (dom.alloc(0) for _ in range(4))
    a.free()
    c.free()  # two dirty order-0 chunks, their buddies in use: [a, c] on the order-0 list
    heap.check()
    state = heap.core.state
    # A real scrub step on c (the tail), stalled after zeroing it (its only granule).
    inject_fault(heap, "scrub_stall", 1_000_000)
    out: list[int] = []
    scrubber = threading.Thread(target=lambda: out.append(scrub_free_pages(
        heap.core.hs, 0, 4096, 64, np.zeros((8, 2), dtype=np.int64))), daemon=True)
    scrubber.start()
    deadline = time.monotonic() + 30
    while load(state["ft8"], PG_SCRUB_STATE, c.mfn) != BUDDY_SCRUBBING:
        assert time.monotonic() < deadline
    error = None
    try:
        heap.check()  # takes the lock and aborts the scrub; the stall ends meanwhile
    except HeapCorruption as exc:
        error = exc
    scrubber.join(30)
    inject_fault(heap, None)
    assert not scrubber.is_alive()
    if state["nodes"][0, N_SCRUB_PASSES] != 0:
        pytest.skip("the scrubber took the lock before check() aborted it (timing)")
    assert error is None, error
    heap.check()
    # The other dirty page can still be found and scrubbed.
    assert heap.stats()["dirty_pages"] == 1
    assert scrub_free_pages(heap.core.hs, 0, 4096, 64,
                            np.zeros((8, 2), dtype=np.int64)) != NOTHING_DIRTY


# --- issue 9: status codes and wake masks apart ---------------------------------------------
def test_destroy_on_the_64th_node_succeeds_and_retires_the_domain():
    with xenheap.Heap("256MiB", nodes=64) as heap:  # the documented limit: mask bit 63
        with heap.create_domain() as dom:
            dom.populate("2MiB", node=63)  # 512 dirty pages on node 63 wake its scrubber
        assert not dom.alive
        assert heap.wait_clean(30)
        assert heap.stats()["domains"] == 0
        heap.check()


# --- issue 12: metadata paid as used ----------------------------------------------------
def test_a_one_tib_virtual_heap_costs_only_the_chunk_heads_it_links():
    import psutil

    process = psutil.Process()
    rss = process.memory_info().rss
    with xenheap.Heap("1TiB", scrub="alloc") as heap:  # 6 GiB of frame table, virtually
        grown = process.memory_info().rss - rss
        assert grown < 64 * MiB, f"creating it made {grown / MiB:.0f} MiB resident"
        blk = heap.create_domain().alloc(0)
        blk.array()[:] = 1
        assert heap.stats()["free_pages"] == heap.total_pages - 1
