"""The scrubbers' promises on a busy machine: CPU-bound processes alongside, no CAP_SYS_NICE.

Every test is bounded in time and asserts behaviour (clean memory, threads gone, work done
by the deadline path, nothing faulted in), never a speed.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
from numba import njit

import xenheap
from native_kernels.atomics import atomic_load, cpu_relax
from native_kernels.cleaning import drain_charges, record_alloc_charge
from native_kernels.layout import (
    BUDDY_SCRUBBING,
    CHARGE_SLOTS,
    L_HEAD,
    NIL,
    NODE_FIELDS,
    PAGE_SIZE,
    PG_NEXT,
    PG_SCRUB_STATE,
    PG_TAG,
    TAG_MIXED,
)
from xenheap import charges as charges_module
from xenheap import prim
from xenheap.faults import inject_fault

MiB = 2**20
_HOG = "import time\nend = time.monotonic() + {secs}\nwhile time.monotonic() < end: pass\n"


class Hogs:
    """``n`` CPU-bound normal-priority processes for at most ``secs`` seconds."""

    def __init__(self, n: int, secs: float = 60.0) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", _HOG.format(secs=secs)])
                      for _ in range(n)]

    def __enter__(self) -> Hogs:
        time.sleep(0.2)  # let them start spinning
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait(10)


def _unprivileged(code: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``code`` in a child without CAP_SYS_NICE (as an ordinary user runs a service)."""
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0 and shutil.which("setpriv"):
        cmd = ["setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice", *cmd]
    return subprocess.run(cmd, timeout=timeout, capture_output=True)


_BUSY_TENANTS = """
import threading, time, numpy as np, xenheap

heap = xenheap.Heap("256MiB", scrub_deadline=0.5)
with heap.create_domain() as dom:
    for blk in [dom.alloc(9) for _ in range(128)]:
        blk.array()[:] = 0xAB
tenant = heap.create_domain()
blocks = []
while True:  # take every page while the free memory is dirty
    try:
        blocks.append(tenant.alloc(9))
    except xenheap.OutOfMemory:
        break
assert len(blocks) == 128, len(blocks)
assert not any(b.array().any() for b in blocks), "dirty memory handed out"
tenant.destroy()
assert heap.wait_clean(60), "not clean"
heap.check()
heap.close()
left = [t.name for t in threading.enumerate() if t.name.startswith("xenheap")]
assert not left, left
print("done")
"""


def test_an_unprivileged_heap_under_cpu_hogs_hands_out_clean_memory_and_closes():
    with Hogs(2 * psutil.cpu_count()):
        done = _unprivileged(_BUSY_TENANTS)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
    assert b"done" in done.stdout


def test_overdue_memory_is_cleaned_at_normal_priority_when_no_cpu_is_idle():
    with Hogs(2 * psutil.cpu_count()), xenheap.Heap("64MiB", scrub_deadline=0.2) as heap:
        with heap.create_domain() as dom:
            for blk in [dom.alloc(8) for _ in range(64)]:
                blk.array()[:] = 1
        assert heap.wait_clean(60)
        st = heap.stats()
        assert st["scrub_deadline_cpu_seconds"] > 0  # the deadline path did the work
        assert st["scrub_cpu_seconds"] >= st["scrub_deadline_cpu_seconds"]
        heap.check()


def test_a_scrubber_waiting_for_an_idle_cpu_looks_less_often_the_longer_it_waits(
        monkeypatch):
    """Dirty, not yet overdue, and no CPU idle: each look costs the thread a wake-up, so it
    looks after 5 ms, then twice as long each time up to 20 ms, not every 5 ms."""
    looks = []
    monkeypatch.setattr(prim, "runnable_threads",
                        lambda: looks.append(1) or 64 * (os.cpu_count() or 1))
    with xenheap.Heap("16MiB", nodes=1, scrub_deadline=60) as heap:
        with heap.create_domain() as dom:
            dom.alloc(8).array()[:] = 1
        time.sleep(0.6)  # 120 looks at a steady 5 ms; 31 with the doubling
        assert 3 <= len(looks) <= 45, len(looks)
        assert heap.stats()["dirty_pages"] > 0  # waiting still, as none is idle


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_scrubber_leaves_its_busy_cpu_alone_while_another_node_idles(monkeypatch):
    """Two emulated nodes of one CPU each, a CPU-bound process on node 0's: the machine
    has an idle CPU, but not the one node 0's scrubber runs on, so node 0's dirt waits
    for its deadline, and no idle slice of node 0's scrubber takes that process's time.
    The machine-wide count is made to say one CPU is idle whatever else runs on this
    host, so that the scrubbers' own-CPU test decides."""
    monkeypatch.setattr(prim, "runnable_threads", lambda: 2)  # the hog and the asker
    cpu0, cpu1 = sorted(os.sched_getaffinity(0))[:2]
    pinned_hog = f"import os\nos.sched_setaffinity(0, {{{cpu0}}})\n" + _HOG.format(secs=60)
    hog = subprocess.Popen([sys.executable, "-c", pinned_hog])
    try:
        time.sleep(0.3)  # spinning
        with xenheap.Heap("512MiB", nodes=[[cpu0], [cpu1]], scrub_deadline=1.0) as heap:
            for node in (0, 1):
                with heap.create_domain() as dom:
                    for blk in [dom.alloc(8, node=node) for _ in range(64)]:  # 64 MiB
                        blk.array()[:] = 1
            assert heap.wait_clean(60)
            node0 = heap.scrubbers[0]
            assert node0.nodes == (0,) and node0.pinned
            spent = node0.cpu_figures
            assert spent.idle_cpu_seconds == 0.0 and spent.deadline_cpu_seconds > 0
            assert heap.scrubbers[1].cpu_figures.idle_cpu_seconds > 0  # its CPU was idle
            heap.check()
    finally:
        hog.kill()
        hog.wait(10)


def test_a_scrubber_without_busy_times_for_its_cpus_judges_idleness_machine_wide(
        monkeypatch, caplog):
    """No /proc/stat line for a pinned scrubber's CPUs (offline, or a container numbering
    them apart): it says so and judges idle CPUs machine-wide, as before, rather than
    taking every CPU for idle or dying."""
    assert prim.cpu_busy_seconds([10**6]) is None
    monkeypatch.setattr(prim, "cpu_busy_seconds", lambda cpus: None)
    with caplog.at_level(logging.WARNING, logger="xenheap.scrubber"), \
            xenheap.Heap("32MiB", nodes=2) as heap:
        with heap.create_domain() as dom:
            for blk in [dom.alloc(4) for _ in range(64)]:
                blk.array()[:] = 1
        assert heap.wait_clean(60)
        assert all(s.is_alive() and s.errors == 0 for s in heap.scrubbers)
    assert any("/proc/stat" in r.getMessage() for r in caplog.records)


def test_scrubbing_never_faults_untouched_memory_in():
    with xenheap.Heap("1GiB", scrub_deadline=0.2) as heap:
        dom = heap.create_domain()
        dom.populate("512MiB")  # allocated, never written: not in RAM
        rss = psutil.Process().memory_info().rss
        dom.destroy()
        assert heap.wait_clean(60)
        grown = psutil.Process().memory_info().rss - rss
        assert grown < 64 * MiB, f"scrubbing faulted in {grown / MiB:.0f} MiB"
        node = heap.stats()["nodes"][0]
        assert node["unmapped_pages"] >= (512 - 64) * MiB // 4096
        # Each page of the dirt counted once: zeroed (by whom) or dropped.
        assert (node["scrubbed_pages"] + node["alloc_scrubbed_pages"]
                + node["unmapped_pages"]) == 512 * MiB // 4096
        heap.check()


def test_dirt_of_no_domain_is_booked_unattributed_whoever_cleans_it():
    """In debug mode memory release_unused gave back reads zero, not the scrub pattern:
    it goes back dirty, of no domain, and its scrub is booked under -1 like allocators'."""
    with xenheap.Heap("16MiB", nodes=1, debug=True) as heap:
        assert heap.wait_clean(60)  # a debug heap starts dirty: the pattern laid down first
        assert heap.release_unused() > 0
        assert heap.wait_clean(60)
        ids = {c["id"] for c in heap.stats()["domain_charges"]}
        assert -1 in ids and 0 not in ids
        heap.check()


def chunk_being_scrubbed(heap: xenheap.Heap) -> int:
    """The head of the chunk a scrubber holds, once one does (within 30 s)."""
    ft8 = heap.core.state["ft8"]
    deadline = time.monotonic() + 30
    while not (ft8[PG_SCRUB_STATE] == BUDDY_SCRUBBING).any():
        assert time.monotonic() < deadline, "the scrubber never took a chunk"
        time.sleep(0.001)
    return int(np.flatnonzero(ft8[PG_SCRUB_STATE] == BUDDY_SCRUBBING)[0])


def test_a_frozen_scrubber_holding_a_chunk_does_not_make_allocators_wait():
    with xenheap.Heap("64MiB") as heap:
        inject_fault(heap, "scrub_stall", 5_000_000)  # parks it 5 s mid-chunk, deaf to aborts
        order = heap.max_order - 3
        dom = heap.create_domain()
        blocks = [dom.alloc(order) for _ in range(8)]
        for blk in blocks[1::2]:  # four dirty chunks whose buddies stay in use: no merging
            blk.array()[:] = 0xEE
            blk.free()
        ft8 = heap.core.state["ft8"]
        chunk_being_scrubbed(heap)  # it holds one now
        tenant = heap.create_domain()
        taken = [tenant.alloc(order) for _ in range(3)]  # the three chunks it does not hold
        assert (ft8[PG_SCRUB_STATE] == BUDDY_SCRUBBING).any(), "the stall ended early"
        assert heap.stats()["nodes"][0]["aborts"] == 0  # nobody waited for the frozen one
        assert not any(b.array().any() for b in taken)
        inject_fault(heap, None)
        tenant.destroy()
        assert heap.wait_clean(60)
        heap.check()


def test_an_allocation_takes_another_nodes_memory_before_a_frozen_scrubbers_chunk():
    """Node 0's only chunk is held by a frozen scrubber and node 1 (no CPUs: node 0's
    scrubber serves it) holds dirty memory nobody holds: an allocation preferring node 0
    takes node 1's rather than wait in the abort handshake."""
    cpus = sorted(os.sched_getaffinity(0))
    with xenheap.Heap("1MiB", scrub="alloc") as warm:  # the small allocation's kernel compiled
        warm.create_domain().alloc(0)
    with xenheap.Heap("16MiB", nodes=[cpus, []], reuse_bytes=0) as heap:
        inject_fault(heap, "scrub_stall", 5_000_000)  # parks it 5 s mid-chunk, deaf to aborts
        dirt = heap.create_domain()
        for node in (0, 1):  # every page of both nodes dirty, node 0's in one chunk
            blk = dirt.alloc(heap.max_order, node=node)
            blk.array()[:] = 0xEE
            blk.free()
        ft8 = heap.core.state["ft8"]
        held = chunk_being_scrubbed(heap)
        if heap.core.node_of(held) != 0:
            pytest.skip("the scrubber took node 1's chunk first")
        tenant = heap.create_domain()
        blk = tenant.alloc(0)
        assert (ft8[PG_SCRUB_STATE] == BUDDY_SCRUBBING).any(), "the stall ended early"
        assert blk.node == 1 and not blk.array().any()
        assert heap.stats()["nodes"][0]["aborts"] == 0  # nobody waited for the frozen one
        inject_fault(heap, None)
        tenant.destroy()
        assert heap.wait_clean(60)
        heap.check()


def test_close_stops_a_scrubber_doing_deadline_work_under_hogs():
    code = """
import threading, xenheap
heap = xenheap.Heap("512MiB", scrub_deadline=0.05)
with heap.create_domain() as dom:
    for blk in [dom.alloc(9) for _ in range(256)]:
        blk.array()[:] = 3
import time; time.sleep(0.1)
heap.close()
left = [t.name for t in threading.enumerate() if t.name.startswith("xenheap")]
assert not left, left
print("done")
"""
    with Hogs(2 * psutil.cpu_count()):
        done = _unprivileged(code)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
    assert b"done" in done.stdout


def test_scrub_deadline_is_validated():
    for bad in (0, -1.0, float("inf"), float("nan"), "1", True):
        with pytest.raises(xenheap.InvalidArgument):
            xenheap.Heap("4MiB", scrub_deadline=bad)
    assert np.isfinite(xenheap.Heap("4MiB", scrub="alloc", scrub_deadline=0.5).scrub_deadline)


# --- scrub work charged to the domain that dirtied the memory --------------------------------
def test_scrubber_cpu_is_charged_to_the_domains_that_dirtied_the_memory():
    with xenheap.Heap("512MiB") as heap:
        doms = [heap.create_domain(f"tenant{i}") for i in range(3)]
        for i, dom in enumerate(doms):
            for blk in [dom.alloc(9) for _ in range(16 * (i + 1))]:
                blk.array()[:] = 1
        for dom in doms:
            dom.destroy()
        assert heap.wait_clean(60)
        st = heap.stats()
        for i, dom in enumerate(doms):
            ds = dom.stats()
            assert ds["dirtied_bytes"] == ds["scrubbed_bytes"] == 16 * (i + 1) * 2 * MiB
        charged = {c["name"]: c for c in st["domain_charges"]}
        # Each paid; the split by pages holds within a slice (test below), not across slices,
        # and the first slice carries the thread's time before it.
        assert all(charged[f"tenant{i}"]["idle_cpu_seconds"]
                   + charged[f"tenant{i}"]["deadline_cpu_seconds"] > 0 for i in range(3))
        total = sum(c["idle_cpu_seconds"] + c["deadline_cpu_seconds"]
                    for c in st["domain_charges"])
        # All the thread's CPU time is charged, less its polling since its last slice: a
        # fixed cost (0.3 ms after a 4.5 ms scrub on a fast machine), not a share.
        assert 0 <= st["scrub_cpu_seconds"] - total <= max(0.05 * total, 0.005)
        # The heap's split is the domains': what was charged, and what is not yet.
        assert total == pytest.approx(st["scrub_idle_cpu_seconds"]
                                      + st["scrub_deadline_cpu_seconds"], abs=1e-9)
        assert st["scrub_uncharged_cpu_seconds"] == pytest.approx(
            st["scrub_cpu_seconds"] - total, abs=0.01)


def test_a_slice_is_split_over_its_domains_by_pages():
    book = charges_module.ChargeBook()
    one, three = book.opened(1, "one"), book.opened(2, "three")
    table = np.zeros((4, 2), dtype=np.int64)
    table[0], table[1] = (1, 100), (2, 300)
    assert book.charge_slice("idle", table, 0.4)
    assert one["idle_cpu_seconds"] == pytest.approx(0.1)
    assert three["idle_cpu_seconds"] == pytest.approx(0.3)
    assert (one["scrubbed_bytes"], three["scrubbed_bytes"]) == (100 * PAGE_SIZE, 300 * PAGE_SIZE)
    assert book.charge_slice("deadline", table[1:], 0.2)
    assert three["deadline_cpu_seconds"] == pytest.approx(0.2)
    assert one["deadline_cpu_seconds"] == 0.0
    # A slice that cleaned nothing charges nobody: the scrubber carries its time over.
    table[:] = 0
    assert not book.charge_slice("idle", table, 1.0)
    assert one["idle_cpu_seconds"] == pytest.approx(0.1)


def test_a_destroyed_domains_charges_outlive_the_books_history(monkeypatch):
    monkeypatch.setattr(charges_module, "HISTORY", 2)
    with xenheap.Heap("64MiB") as heap:
        gone = heap.create_domain("gone")
        for blk in [gone.alloc(9) for _ in range(4)]:
            blk.array()[:] = 1
        gone.destroy()
        assert heap.wait_clean(60)
        before = gone.stats()
        assert before["scrubbed_bytes"] == 8 * MiB
        for _ in range(3):  # three later destroys: the book lets "gone" go
            heap.create_domain().destroy()
        assert "gone" not in {c["name"] for c in heap.stats()["domain_charges"]}
        assert gone.stats() == before


def test_a_debug_heaps_first_scrub_is_not_deadline_work():
    """A debug heap starts dirty (the pattern is laid down by scrubbing); that dirt is new,
    not overdue, so an idle CPU scrubs it, not deadline work at normal priority."""
    with xenheap.Heap("64MiB", debug=True, scrub_deadline=60) as heap:
        assert heap.wait_clean(60)
        st = heap.stats()
        assert st["scrub_deadline_cpu_seconds"] == 0
        assert st["scrub_idle_cpu_seconds"] > 0


def test_scrub_on_allocate_is_charged_to_the_dirtier_and_outlives_its_slot():
    with xenheap.Heap("16MiB", scrub="alloc", max_domains=1) as heap:
        dirty = heap.create_domain("dirty")
        for blk in [dirty.alloc(4) for _ in range(16)]:  # 1 MiB, written
            blk.array()[:] = 3
        dirty.destroy()
        heir = heap.create_domain("heir")  # the only slot: the destroyed domain's
        heir.populate(heap.total_pages * 4096, order=4)  # zeroes the dirt as it allocates
        ds = dirty.stats()
        assert ds["dirtied_bytes"] == ds["scrubbed_bytes"] == 1 * MiB
        assert ds["scrub_alloc_cpu_seconds"] > 0
        assert heir.stats()["scrubbed_bytes"] == 0
        names = [c["name"] for c in heap.stats()["domain_charges"]]
        assert "dirty" in names and "heir" in names
        heap.check()


def test_dirt_of_several_domains_in_one_chunk_is_charged_to_each():
    """Frees write the dirtier on a chunk's head only; buddies freed by different domains
    merge into one chunk whose pages then each name theirs, and splitting it again hands
    each part its share: whoever zeroes any of it charges every domain exactly its bytes."""
    with xenheap.Heap("8MiB", nodes=1, scrub="alloc", reuse_bytes=0) as heap:
        doms = [heap.create_domain(f"d{i}") for i in range(3)]
        held: list[list] = [[], [], []]
        full = False
        while not full:  # the whole heap, interleaved: buddies belong to different domains
            for i, d in enumerate(doms):
                try:
                    held[i].append(d.alloc(i))  # 1, 2 and 4 pages
                except xenheap.OutOfMemory:
                    full = True
        for blocks in held:
            for blk in blocks:
                blk.array()[:] = 1
        for k in range(max(len(b) for b in held)):  # freed interleaved: merges mix them
            for blocks in held:
                if k < len(blocks):
                    blocks[k].free()
        assert heap.stats()["dirty_pages"] == sum(len(b) << i for i, b in enumerate(held))
        taker = heap.create_domain("taker")
        taken = [taker.alloc(0)]  # splits the one, mixed, chunk: every part is mixed too
        assert all(tag & TAG_MIXED for tag in _free_chunk_tags(heap))
        taken += [taker.alloc(o) for o in (3, 1, 5, 2, 0, 4, 6)]
        taker.populate(heap.stats()["free_pages"] * 4096)  # and all the rest
        assert heap.stats()["dirty_pages"] == 0 and len(taken) == 8
        for i, d in enumerate(doms):
            st = d.stats()
            assert st["dirtied_bytes"] == st["scrubbed_bytes"] == len(held[i]) * (4096 << i)
        assert taker.stats()["scrubbed_bytes"] == 0
        heap.check()


def _free_chunk_tags(heap: xenheap.Heap) -> list[int]:
    """PG_TAG of every free chunk's head (white-box: the free lists of node 0)."""
    ft32, lists = heap.core.state["ft32"], heap.core.state["lists"]
    tags = []
    for order in range(heap.max_order + 1):
        link = int(lists[0, order, L_HEAD])
        while link != NIL:
            tags.append(int(ft32[PG_TAG, link - 1]))
            link = int(ft32[PG_NEXT, link - 1])
    return tags


@njit(nogil=True, cache=True)
def _charge_many(nodes, dirtier, count):
    for i in range(count):
        record_alloc_charge(nodes, 0, dirtier, 1, 1)
        for _ in range((i * 2654435761) % 97):  # uneven gaps, as an allocator's zeroing
            cpu_relax()


@njit(nogil=True, cache=True)
def _drain_until(nodes, stop, totals, out):
    while atomic_load(stop, 0) == 0:
        for r in range(drain_charges(nodes, 0, out)):
            totals[out[r, 0] + 1] += out[r, 1]
        for _ in range(200):  # room for the chargers: the lock is a fair one
            cpu_relax()


def test_allocator_charges_stay_with_their_domain_while_slots_are_drained_and_freed():
    """Two domains sharing a home slot charge scrub-on-allocate work while a drain keeps
    emptying and freeing slots: not a page goes to the wrong domain (a slot freed between
    an allocator's look at its owner and its add once took the work to the next owner)."""
    nodes = np.zeros((1, NODE_FIELDS), np.int64)
    stop = np.zeros(1, np.int64)
    first, second = 1, 1 + CHARGE_SLOTS  # the same home slot
    totals = np.zeros(second + 2, np.int64)  # by domain id + 1 (-1: no slot)
    out = np.zeros((CHARGE_SLOTS + 1, 3), np.int64)
    count = 5_000
    drainer = threading.Thread(target=_drain_until, args=(nodes, stop, totals, out))
    chargers = [threading.Thread(target=_charge_many, args=(nodes, d, count))
                for d in (first, second)]
    drainer.start()
    for t in chargers:
        t.start()
    for t in chargers:
        t.join(120)
    stop[0] = 1
    drainer.join(120)
    assert not any(t.is_alive() for t in (*chargers, drainer))
    for r in range(drain_charges(nodes, 0, out)):
        totals[out[r, 0] + 1] += out[r, 1]
    assert (totals[first + 1], totals[second + 1], totals[0]) == (count, count, 0)
