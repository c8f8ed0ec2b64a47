"""Many threads allocating, freeing, creating and destroying domains at once."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
from conftest import MiB, three_nodes_one_cpuless

import xenheap

RUN_S = 2.0  # how long the threads run
MAX_OPS = 4000  # per thread, so a fast machine stays bounded too
JOIN_S = 60.0
WORKERS = 8
CHURNERS = 2


def quiesce(heap: xenheap.Heap, timeout: float = 30.0) -> None:
    """Wait (bounded) until the scrubbers are done and idle (see test_stateful.quiesce)."""
    if not heap.scrubbers:
        return
    assert heap.wait_clean(timeout), "scrubbers did not clean the heap in time"
    deadline = time.monotonic() + timeout
    while not all(s.state == "idle" for s in heap.scrubbers):
        assert time.monotonic() < deadline, [s.state for s in heap.scrubbers]
        time.sleep(0.001)


class Outcome:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.allocs = 0
        self.frees = 0
        self.ooms = 0
        self.domains = 0

    def error(self, who: str, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(f"{who}: {type(exc).__name__}: {exc}")

    def add(self, allocs: int = 0, frees: int = 0, ooms: int = 0, domains: int = 0) -> None:
        with self.lock:
            self.allocs += allocs
            self.frees += frees
            self.ooms += ooms
            self.domains += domains


def check_fresh(blk: xenheap.Block, fill: int) -> np.ndarray:
    data = blk.array()
    if not (data == fill).all():
        raise AssertionError(f"{blk!r} handed out with {int((data != fill).sum())} bytes "
                             f"not {fill:#x}")
    return data


def worker(heap, dom, seed: int, start: threading.Barrier, deadline_box: list[float],
           out: Outcome, fill: int) -> None:
    rng = random.Random(seed)
    held: list[tuple[xenheap.Block, int]] = []
    allocs = frees = ooms = 0
    try:
        start.wait(JOIN_S)
        deadline = deadline_box[0]
        for i in range(MAX_OPS):
            if time.monotonic() >= deadline:
                break
            if held and (len(held) >= 24 or rng.random() < 0.45):
                blk, marker = held.pop(rng.randrange(len(held)))
                data = blk.array("uint64")
                if data[0] != marker or data[-1] != marker:
                    raise AssertionError(f"{blk!r} lost its marker: someone else wrote into it")
                blk.free()
                frees += 1
                continue
            order = rng.choice((0, 0, 0, 1, 1, 2, 3, 4, 6))
            node = rng.choice((None, None, rng.randrange(heap.nodes)))
            try:
                blk = dom.alloc(order, node=node)
            except xenheap.OutOfMemory:
                ooms += 1
                continue
            allocs += 1
            if node is not None and blk.node != node:
                raise AssertionError(f"{blk!r} asked for node {node}")
            check_fresh(blk, fill)
            marker = (seed << 32) | i
            data = blk.array("uint64")
            data[0] = marker
            data[-1] = marker
            held.append((blk, marker))
        for blk, marker in held:
            data = blk.array("uint64")
            if data[0] != marker or data[-1] != marker:
                raise AssertionError(f"{blk!r} lost its marker at the end")
    except BaseException as exc:
        out.error(f"worker {seed}", exc)
    finally:
        out.add(allocs=allocs, frees=frees, ooms=ooms)


def churner(heap, seed: int, start: threading.Barrier, deadline_box: list[float],
            out: Outcome, fill: int) -> None:
    rng = random.Random(seed)
    created = ooms = allocs = 0
    try:
        start.wait(JOIN_S)
        deadline = deadline_box[0]
        for _ in range(MAX_OPS // 8):
            if time.monotonic() >= deadline:
                break
            dom = heap.create_domain(f"churn{seed}-{created}")
            created += 1
            try:
                dom.populate(rng.randrange(1, 64) * 4096 * rng.choice((1, 8)),
                             order=rng.choice((0, 1, 3)))
                allocs += 1
                for _ in range(rng.randrange(4)):
                    blk = dom.alloc(rng.choice((0, 2, 5)))
                    allocs += 1
                    check_fresh(blk, fill)
                    blk.array()[:] = 0xEE  # the next owner must never see this
            except xenheap.OutOfMemory:
                ooms += 1
            dom.destroy()
            if dom.alive or dom.pages != 0:
                raise AssertionError(f"{dom!r} still alive or holding pages after destroy")
    except BaseException as exc:
        out.error(f"churner {seed}", exc)
    finally:
        out.add(allocs=allocs, ooms=ooms, domains=created)


@pytest.mark.parametrize(("mode", "debug", "nodes", "per_domain"), [
    ("alloc", False, 2, 1),
    ("alloc", False, 2, 2),
    ("idle", False, "three", 1),
    ("idle", True, 2, 1),
], ids=["alloc-2nodes", "alloc-2nodes-shared-domains", "idle-3nodes", "idle-debug-2nodes"])
def test_threads_allocate_free_create_destroy(mode: str, debug: bool, nodes: object,
                                              per_domain: int) -> None:
    """``per_domain`` workers share each domain, and so its reuse cache."""
    topology = three_nodes_one_cpuless() if nodes == "three" else nodes
    heap = xenheap.Heap(size=8 * MiB, nodes=topology, scrub=mode, debug=debug)
    try:
        fill = 0xC2 if debug else 0
        out = Outcome()
        start = threading.Barrier(WORKERS + CHURNERS + 1)
        deadline_box = [0.0]
        doms = [heap.create_domain(f"worker{i}") for i in range(WORKERS // per_domain)]
        threads = [threading.Thread(target=worker,
                                    args=(heap, doms[i // per_domain], i + 1, start,
                                          deadline_box, out, fill),
                                    daemon=True) for i in range(WORKERS)]
        threads += [threading.Thread(target=churner,
                                     args=(heap, 100 + i, start, deadline_box, out, fill),
                                     daemon=True) for i in range(CHURNERS)]
        for t in threads:
            t.start()
        deadline_box[0] = time.monotonic() + RUN_S
        start.wait(JOIN_S)
        for t in threads:
            t.join(max(0.0, deadline_box[0] + JOIN_S - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "threads did not finish in time"
        assert out.errors == []
        assert out.allocs >= 100, f"too little work done: {out.allocs} allocations"
        assert out.domains >= 2

        quiesce(heap)
        heap.check()
        # The heap's figure and the domains' are read one after the other, and the
        # scrubber's chore may be giving an idle cache back in between (its blocks leave
        # the cache, then the domain's list): read again until they agree, or a bound.
        deadline = time.monotonic() + 10
        while True:
            st = heap.stats()
            held = sum(d.pages for d in doms)
            if st["allocated_pages"] == held or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert st["free_pages"] + st["allocated_pages"] == st["total_pages"]
        assert st["allocated_pages"] == held
        assert st["domains"] == len(doms)
        for dom in doms:
            dom.destroy()
        quiesce(heap)
        heap.check()
        st = heap.stats()
        assert st["allocated_pages"] == 0
        assert st["free_pages"] == st["total_pages"]
        assert st["domains"] == 0
        if mode == "idle":
            assert st["dirty_pages"] == 0
        # Everything merged back: the largest chunk is allocatable on every node.
        last = heap.create_domain()
        for node in range(heap.nodes):
            blk = last.alloc(heap.max_order, node=node)
            assert (blk.array() == fill).all()
        heap.check()
    finally:
        heap.close()
