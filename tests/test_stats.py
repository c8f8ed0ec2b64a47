"""Statistics: the fields, their units and meaning (the four of Python's memory pools move as
pyarrow's do), a destroyed domain's figures, dump()'s heading, numpy_allocator()'s target,
fault injection's validation, and the one line first use prints while numba compiles."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable

import numpy as np
import pytest
from conftest import MiB
from numba.core import event

import xenheap
from native_kernels.layout import (
    D_ID,
    FAULT_NONE,
    FAULT_POPULATE_FAIL,
    FAULT_SCRUB_STALL,
    M_FAULT,
    M_FAULT_ARG,
)
from xenheap import firstuse
from xenheap.collect import heap_resident_bytes
from xenheap.faults import FAULTS, inject_fault
from xenheap.stats import DomainStats, HeapStats, NodeStats

PAGE = 4096
POOL = ("bytes_allocated", "max_memory", "total_bytes_allocated", "num_allocations")
HeapFactory = Callable[..., xenheap.Heap]


def pool(stats: HeapStats | DomainStats) -> tuple[int, int, int, int]:
    """(bytes_allocated, max_memory, total_bytes_allocated, num_allocations)."""
    return (stats["bytes_allocated"], stats["max_memory"], stats["total_bytes_allocated"],
            stats["num_allocations"])


# --- fields and units -------------------------------------------------------------------------
def test_stats_hold_exactly_the_documented_fields(heap: xenheap.Heap) -> None:
    dom = heap.create_domain()
    _held = dom.alloc(2)
    st = heap.stats()
    assert set(st) == set(HeapStats.__required_keys__)
    for node in st["nodes"]:
        assert set(node) == set(NodeStats.__required_keys__)
    assert set(dom.stats()) == set(DomainStats.__required_keys__)
    assert isinstance(st, dict) and isinstance(dom.stats(), dict)  # plain dicts to callers
    doc = sys.modules["xenheap.stats"].__doc__
    for key in (set(HeapStats.__required_keys__) | set(NodeStats.__required_keys__)
                | set(DomainStats.__required_keys__)):
        assert key in doc, f"{key} is not documented in xenheap.stats"


@pytest.mark.parametrize("mode", ["idle", "alloc"])
def test_units_are_in_the_names(heap_factory: HeapFactory, mode: str) -> None:
    heap = heap_factory(8 * MiB, nodes=2, scrub=mode)
    dom = heap.create_domain()
    dom.alloc(3).free()
    _held = dom.alloc(1)
    if mode == "idle":
        assert heap.wait_clean(30)

    def check(stats: dict, where: str) -> None:
        for key, value in stats.items():
            assert not key.endswith(("_ns", "_us", "_ms")) and "_ns_" not in key, (where, key)
            if key.endswith(("_bytes", "_pages")) or key.startswith("num_"):
                assert type(value) is int and value >= 0, (where, key, value)
            if key.endswith(("_seconds", "_per_second")):
                assert type(value) is float and value >= 0, (where, key, value)
            if key.endswith("_bytes") and key != "process_resident_bytes":
                assert value % PAGE == 0, (where, key, value)  # whole pages

    st = heap.stats()
    check(dict(st), "heap")
    for node in st["nodes"]:
        check(dict(node), f"node {node['node']}")
    check(dict(dom.stats()), "domain")
    # released, in bytes at both levels
    assert st["released_bytes"] == sum(n["released_bytes"] for n in st["nodes"])


def test_page_and_byte_figures_agree(heap_factory: HeapFactory) -> None:
    heap = heap_factory(16 * MiB, nodes=1, scrub="sync")  # sync: no freed block is parked
    dom = heap.create_domain()
    blocks = [dom.alloc(o) for o in (0, 3, 5, 1)]
    blocks[1].free()
    st, ds = heap.stats(), dom.stats()
    assert st["bytes_allocated"] == st["allocated_pages"] * PAGE == (1 + 32 + 2) * PAGE
    assert ds["bytes_allocated"] + ds["cached_bytes"] == ds["pages"] * PAGE
    assert ds["max_memory"] == ds["peak_pages"] * PAGE
    assert st["num_frees"] == sum(n["num_frees"] for n in st["nodes"]) == 1
    assert st["num_allocations"] == sum(n["num_allocations"] for n in st["nodes"]) == 4


# --- the memory-pool figures ---------------------------------------------------------------
def test_pool_figures_move_as_pyarrows_do(heap_factory: HeapFactory) -> None:
    """bytes_allocated: held now; max_memory: its peak; total_bytes_allocated and
    num_allocations: cumulative. Heap-wide, and per domain."""
    heap = heap_factory(16 * MiB, nodes=1, scrub="sync")  # sync: no freed block is parked
    assert pool(heap.stats()) == (0, 0, 0, 0)
    dom = heap.create_domain()
    assert pool(dom.stats()) == (0, 0, 0, 0)

    a = dom.alloc(3)  # 8 pages
    b = dom.alloc(0)  # 1
    assert pool(dom.stats()) == (9 * PAGE, 9 * PAGE, 9 * PAGE, 2)
    a.free()
    assert pool(dom.stats()) == (1 * PAGE, 9 * PAGE, 9 * PAGE, 2)
    c = dom.alloc(2)  # 4
    assert pool(dom.stats()) == (5 * PAGE, 9 * PAGE, 13 * PAGE, 3)
    assert dom.populate(2 * PAGE) == 2  # two 1-page blocks
    assert pool(dom.stats()) == (7 * PAGE, 9 * PAGE, 15 * PAGE, 5)
    assert pool(heap.stats()) == pool(dom.stats())

    other = heap.create_domain()
    _held = other.alloc(4)  # 16
    assert pool(other.stats()) == (16 * PAGE, 16 * PAGE, 16 * PAGE, 1)
    assert pool(heap.stats()) == (23 * PAGE, 23 * PAGE, 31 * PAGE, 6)

    b.free()
    c.free()
    assert pool(heap.stats()) == (18 * PAGE, 23 * PAGE, 31 * PAGE, 6)
    assert heap.stats()["num_frees"] == 3

    # A destroy drops what the domain held; what it allocated stays in the cumulative figures.
    dom.destroy()
    final = dom.stats()
    assert pool(final) == (0, 9 * PAGE, 15 * PAGE, 5)
    assert final["num_frees"] == 5 and final["pages"] == 0 and final["blocks"] == 0
    assert pool(heap.stats()) == (16 * PAGE, 23 * PAGE, 31 * PAGE, 6)
    assert heap.stats()["domains"] == 1

    # Its slot goes to a new domain: the destroyed one keeps its final figures, and the heap
    # keeps counting both.
    new = heap.create_domain()
    assert new.slot == dom.slot  # the case this test is about
    _kept = new.alloc(1)  # 2
    assert dom.stats() == final
    assert pool(new.stats()) == (2 * PAGE, 2 * PAGE, 2 * PAGE, 1)
    assert pool(heap.stats()) == (18 * PAGE, 23 * PAGE, 33 * PAGE, 7)
    new.destroy()
    other.destroy()
    assert pool(heap.stats()) == (0, 23 * PAGE, 33 * PAGE, 7)
    heap.check()


def test_destroyed_domain_stats_stay_readable(heap_factory: HeapFactory) -> None:
    heap = heap_factory(8 * MiB, nodes=1)
    dom = heap.create_domain("gone", max_bytes="1MiB")
    held = [dom.alloc(2), dom.alloc(0)]
    with dom:
        pass  # destroyed on exit
    final = dom.stats()
    assert final["max_memory"] == 5 * PAGE and final["num_allocations"] == 2
    assert final["max_pages"] == 256 and final["bytes_allocated"] == 0
    del held
    kept = [key for key in final if not key.startswith("scrub")]
    for _ in range(3):  # slots handed out again and again
        heap.create_domain().alloc(3)  # scrub-on-allocate may clean its dirt meanwhile
        now = dom.stats()
        assert {key: now[key] for key in kept} == {key: final[key] for key in kept}
        assert now["scrubbed_bytes"] >= final["scrubbed_bytes"]
    assert dom.pages == 0


def test_destroyed_domain_stats_ignore_a_slot_being_reopened(
        heap_factory: HeapFactory) -> None:
    """open_domain zeroes a reused slot's counters before it writes the new id: a read of
    the row in between sees the old id over zeroes. A domain laid to rest answers from its
    last row, whatever its slot holds."""
    heap = heap_factory(8 * MiB, nodes=1, max_domains=1)
    dom = heap.create_domain("gone")
    held = [dom.alloc(0) for _ in range(3)]
    dom.destroy()
    final = dom.stats()
    assert final["num_allocations"] == 3
    new = heap.create_domain()  # the slot, laid to rest, goes to a new domain
    assert new.slot == dom.slot and dom.record.final_row is not None
    doms = heap.core.state["doms"]
    opened = doms[dom.slot].copy()
    doms[dom.slot] = 0  # open_domain halfway: counters zeroed, the old id still there
    doms[dom.slot, D_ID] = dom.id
    try:
        assert dom.stats()["num_allocations"] == 3
        assert dom.stats()["max_memory"] == final["max_memory"] == 3 * PAGE
    finally:
        doms[dom.slot] = opened
    del held
    heap.check()


def test_parked_blocks_are_not_bytes_the_user_holds(heap_factory: HeapFactory) -> None:
    heap = heap_factory(8 * MiB, nodes=1, reuse_bytes="1MiB")
    dom = heap.create_domain()
    keep, blk = dom.alloc(0), dom.alloc(1)
    blk.free()  # parked for this domain's reuse: still on its list, not the user's
    ds = dom.stats()
    assert ds["bytes_allocated"] + ds["cached_bytes"] == ds["pages"] * PAGE
    assert ds["bytes_allocated"] == 1 * PAGE
    st = heap.stats()
    assert st["bytes_allocated"] == 1 * PAGE and st["cached_bytes"] == ds["cached_bytes"]
    del keep


def test_released_bytes_per_node_and_heap(heap_factory: HeapFactory) -> None:
    heap = heap_factory(8 * MiB, nodes=2, scrub="sync")
    dom = heap.create_domain()
    for blk in [dom.alloc(0, node=n) for n in (0, 1) for _ in range(64)]:
        blk.array()[:] = 1  # resident
        blk.free()  # zeroed on free: clean, resident, free
    released = heap.release_unused()
    st = heap.stats()
    assert released > 0
    assert st["released_bytes"] == released == sum(n["released_bytes"] for n in st["nodes"])
    assert all(n["released_bytes"] > 0 for n in st["nodes"])


def test_heap_resident_bytes_counts_the_arenas_in_ram(heap_factory: HeapFactory) -> None:
    heap = heap_factory(8 * MiB, nodes=1, scrub="sync")
    dom = heap.create_domain()
    blk = dom.alloc(6)  # 256 KiB
    blk.array()[:] = 7
    resident = heap_resident_bytes(heap)
    assert blk.nbytes <= resident <= heap.total_pages * PAGE
    assert resident % PAGE == 0
    assert heap.stats()["process_resident_bytes"] >= resident
    heap.close()
    assert heap_resident_bytes(heap) == 0  # the arenas are gone
    assert heap.stats()["bytes_allocated"] == 64 * PAGE  # the last figures stay readable


# --- dump, numpy_allocator ------------------------------------------------------------------
def test_dump_starts_with_a_plain_heading(heap: xenheap.Heap) -> None:
    text = heap.dump()
    assert text.splitlines()[0] == f"xenheap: heap info ({heap!r})"
    assert "pressed" not in text


def test_numpy_allocator_gives_the_domain(heap: xenheap.Heap) -> None:
    dom = heap.create_domain()
    with dom.numpy_allocator() as d:
        assert d is dom
        a = np.ones(100_000)
        b = np.ones(1000)  # 8 KB: a block numpy's free may park for the next array
    ds = dom.stats()
    assert ds["numpy_pages"] > 0 and ds["bytes_allocated"] >= a.nbytes + b.nbytes
    del a, b
    ds = dom.stats()
    assert ds["numpy_pages"] == 0
    # Whatever the domain keeps parked for its next arrays is not held by the user.
    assert ds["bytes_allocated"] == 0
    assert ds["cached_bytes"] == ds["pages"] * PAGE
    assert heap.stats()["cached_bytes"] == ds["cached_bytes"]


# --- fault injection ----------------------------------------------------------------------
def test_inject_fault_is_not_on_the_heap(heap: xenheap.Heap) -> None:
    assert not hasattr(heap, "inject_fault")
    assert not hasattr(xenheap.Heap, "inject_fault")


def test_inject_fault_validates_and_switches(heap: xenheap.Heap) -> None:
    meta = heap.core.state["meta"]
    inject_fault(heap, "populate_fail", 7)
    assert (meta[M_FAULT], meta[M_FAULT_ARG]) == (FAULT_POPULATE_FAIL, 7)
    for kind, arg in (("meteor", 0), ("", 0), ("scrub_fail", -1), ("scrub_fail", True),
                      ("scrub_fail", 1.5), ("scrub_fail", "3")):
        with pytest.raises(xenheap.InvalidArgument):
            inject_fault(heap, kind, arg)
        # refused: nothing changed
        assert (meta[M_FAULT], meta[M_FAULT_ARG]) == (FAULT_POPULATE_FAIL, 7)
    with pytest.raises(ValueError, match="meteor"):  # InvalidArgument is a ValueError
        inject_fault(heap, "meteor")
    inject_fault(heap, "scrub_stall", 1000)
    assert (meta[M_FAULT], meta[M_FAULT_ARG]) == (FAULT_SCRUB_STALL, 1000)
    inject_fault(heap, None)
    assert meta[M_FAULT] == FAULT_NONE
    assert set(FAULTS) == {None, "scrub_fail", "scrub_stall", "populate_fail"}


def test_inject_fault_populate_fail_fires(heap: xenheap.Heap) -> None:
    dom = heap.create_domain()
    inject_fault(heap, "populate_fail", 3)
    with pytest.raises(xenheap.OutOfMemory, match="injected"):
        dom.populate(8 * PAGE)
    inject_fault(heap, None)
    assert dom.populate(8 * PAGE) == 8


# --- first use -----------------------------------------------------------------------------
@pytest.fixture
def fresh_notice(monkeypatch: pytest.MonkeyPatch) -> None:
    """firstuse as if nothing had been said yet in this process."""
    monkeypatch.setattr(firstuse, "_said", False)
    monkeypatch.delenv(firstuse.QUIET_ENV, raising=False)


def _compile_event(module: str, kind: str = "numba:compile") -> event.Event:
    def f() -> None:
        pass

    f.__module__ = module
    if kind == "numba:run_pass":
        data = {"name": "pass", "qualname": "f", "module": module}
    else:
        data = {"dispatcher": type("D", (), {"py_func": f})(), "args": (),
                "return_type": None}
    return event.Event(kind, event.EventStatus.START, data=data)


def test_first_use_notice_only_for_xenheaps_kernels_and_once(
        fresh_notice: None, capsys: pytest.CaptureFixture[str]) -> None:
    event.broadcast(_compile_event("someone_else.kernels"))
    event.broadcast(_compile_event("someone_else", "numba:run_pass"))
    assert capsys.readouterr().err == ""
    event.broadcast(_compile_event("native_kernels.buddy"))
    event.broadcast(_compile_event("native_kernels.numpy_handler", "numba:run_pass"))
    assert capsys.readouterr().err == firstuse.MESSAGE


def test_first_use_notice_is_silenced_by_xenheap_quiet(
        fresh_notice: None, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(firstuse.QUIET_ENV, "1")
    event.broadcast(_compile_event("native_kernels.buddy"))
    assert capsys.readouterr().err == ""


def test_first_use_says_it_compiles_once_and_nothing_from_the_cache() -> None:
    """A cold numba cache: one line while the kernels compile; warm: not a word."""
    code = ("import xenheap; h = xenheap.Heap('16MiB'); d = h.create_domain(); d.alloc(0); "
            "h.close()")
    with tempfile.TemporaryDirectory(prefix="xenheap-numba-cache-") as cache:
        env = {k: v for k, v in os.environ.items() if k != firstuse.QUIET_ENV}
        env["NUMBA_CACHE_DIR"] = cache
        runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                               text=True, timeout=600) for _ in ("cold", "warm")]
    for run in runs:
        assert run.returncode == 0, run.stderr
    cold, warm = (run.stderr.splitlines() for run in runs)
    assert cold.count(firstuse.MESSAGE.rstrip("\n")) == 1, cold
    assert [line for line in cold if line.startswith("xenheap:")] == \
        [firstuse.MESSAGE.rstrip("\n")]
    assert not any("xenheap" in line for line in warm), warm
