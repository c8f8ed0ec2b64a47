"""Shared fixtures and helpers for the heap tests."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

import xenheap
from native_kernels.layout import D_HEAD, NIL, PG_NEXT, PG_ORDER, SCRUB_PATTERN

# The first-use line ("compiling its kernels") would show on a cold numba cache in tests
# that want a quiet stderr; the tests of that line clear this.
os.environ.setdefault("XENHEAP_QUIET", "1")

JOIN_TIMEOUT_S = 30.0  # generous: threads on a loaded 2-core machine

MiB = 1024 * 1024


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on, sorted."""
    return sorted(os.sched_getaffinity(0))


def three_nodes_one_cpuless() -> list[list[int]]:
    """An emulated topology of three nodes, the last without CPUs (two CPUs if we have them)."""
    cpus = allowed_cpus()
    if len(cpus) >= 2:
        return [[cpus[0]], [cpus[1]], []]
    return [[cpus[0]], [], []]


def all_cpus_on_node0(nr_nodes: int = 2) -> list[list[int]]:
    """Every allowed CPU on node 0, the other nodes CPU-less: node 0 is always preferred."""
    return [allowed_cpus()] + [[] for _ in range(nr_nodes - 1)]


def expected_fill(debug: bool) -> int:
    """The byte a freshly handed-out page holds: 0, or Xen's SCRUB_PATTERN in debug mode."""
    return SCRUB_PATTERN if debug else 0


def assert_zero(block: xenheap.Block, debug: bool = False) -> None:
    """Assert that every byte of ``block`` reads zero (0xC2 in debug mode)."""
    data = block.array("uint8")
    want = expected_fill(debug)
    bad = np.flatnonzero(data != want)
    assert bad.size == 0, (
        f"{block!r}: {bad.size} of {data.size} bytes differ from {want:#x}, "
        f"first at offset {int(bad[0])} = {int(data[bad[0]]):#x}"
    )


def stats_snapshot(heap: xenheap.Heap) -> dict:
    """heap.stats() without the fields that move by themselves (scrubber state, RSS)."""
    st = heap.stats()
    st.pop("process_resident_bytes", None)  # the process's RSS: not the heap's to keep still
    for node in st["nodes"]:
        for key in ("scrubber", "scrub_seconds", "scrub_bytes_per_second"):
            node.pop(key, None)
    return st


def domain_block_list(heap: xenheap.Heap, dom: xenheap.Domain) -> list[tuple[int, int]]:
    """(mfn, order) of every block on ``dom``'s list, read from the state (no concurrency)."""
    ft32, ft8 = heap.core.state["ft32"], heap.core.state["ft8"]
    out = []
    link = int(heap.core.state["doms"][dom.slot, D_HEAD])
    while link != NIL:
        mfn = link - 1
        out.append((mfn, int(ft8[PG_ORDER, mfn])))
        link = int(ft32[PG_NEXT, mfn])
        assert len(out) <= heap.total_pages, "domain list loops"
    return out


def pages_read(heap: xenheap.Heap, mfn: int, npages: int) -> np.ndarray:
    """The bytes of pages [mfn, mfn + npages) straight from the arena (white-box)."""
    node = heap.core.node_of(mfn)
    arena = heap.core.arenas[node]
    offset = (mfn - node * heap.core.pages_per_node) * heap.page_size
    return arena.array[offset:offset + npages * heap.page_size]


@pytest.fixture
def heap_factory() -> Iterator[Callable[..., xenheap.Heap]]:
    """Build ``xenheap.Heap(**kwargs)`` (default 8 MiB, scrub="alloc", no reuse: every free
    reaches the buddy lists, which is what these tests look at); closed after the test."""
    heaps: list[xenheap.Heap] = []

    def make(size: int | str = 8 * MiB, **kwargs: object) -> xenheap.Heap:
        kwargs.setdefault("scrub", "alloc")
        kwargs.setdefault("reuse_bytes", 0)
        heap = xenheap.Heap(size=size, **kwargs)
        heaps.append(heap)
        return heap

    yield make
    for heap in heaps:
        heap.close()


@pytest.fixture
def heap(heap_factory: Callable[..., xenheap.Heap]) -> xenheap.Heap:
    """An 8 MiB, one-node heap without scrubber threads."""
    return heap_factory(8 * MiB, nodes=1, scrub="alloc")


def run_threads(target, args_list, timeout: float = JOIN_TIMEOUT_S) -> list[object]:
    """Run ``target(*args)`` for each args in a thread of its own, started together at a
    barrier; returns the results, failing if a thread raised or outlived ``timeout``."""
    barrier = threading.Barrier(len(args_list))
    results: list[object] = [None] * len(args_list)
    errors: list[BaseException] = []

    def body(i: int, args: tuple) -> None:
        try:
            barrier.wait(timeout)
            results[i] = target(*args)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i, a), daemon=True)
               for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "threads did not finish in time"
    assert not errors, errors
    return results


def read_all_free_memory(heap: xenheap.Heap, value: int = 0) -> tuple[bool, int]:
    """Allocate every free page (max order first) in a new domain, check each block holds
    only ``value``, destroy the domain; returns (all held it, pages allocated)."""
    dom = heap.create_domain("reader")
    clean = True
    kept = []  # a dropped handle would be freed and handed out again
    for order in range(heap.max_order, -1, -1):
        while True:
            try:
                blk = dom.alloc(order)
            except xenheap.OutOfMemory:
                break
            kept.append(blk)
            clean &= bool((blk.array() == value).all())
    held = dom.pages
    dom.destroy()
    return clean, held
