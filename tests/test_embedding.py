"""Embedding in a service: quotas, returning memory to the OS, fork safety, injected faults."""

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import traceback

import numpy as np
import psutil
import pytest
from conftest import read_all_free_memory
from numba import njit
from numba.core.compiler_lock import global_compiler_lock

import xenheap
from native_kernels.layout import (
    BUDDY_SCRUBBING,
    D_LOCK,
    N_SCRUBBING,
    PAGE_SIZE,
    PG_SCRUB_STATE,
)
from native_kernels.locks import spin_lock, spin_unlock
from native_kernels.scrub import NOTHING_DIRTY, scrub_free_pages
from xenheap import prim
from xenheap.faults import inject_fault

WAIT_S = 30


@njit
def hold_lock(words, row, col):
    spin_lock(words, row, col)


@njit
def release_lock(words, row, col):
    spin_unlock(words, row, col)


def _snapshot(heap):
    stats = heap.stats()
    stats.pop("process_resident_bytes")  # the process's RSS moves with everything else
    return stats


# --- quotas ------------------------------------------------------------------------------
def test_quota_refuses_past_the_limit_naming_the_domain_and_changes_nothing():
    with xenheap.Heap("16MiB", scrub="alloc") as heap:
        dom = heap.create_domain("tenant-a", max_bytes="64KiB")
        assert dom.max_bytes == 64 * 1024
        blocks = [dom.alloc(2) for _ in range(4)]  # 4 x 16 KiB: exactly the quota
        before = _snapshot(heap)
        before_dom = dom.stats()
        with pytest.raises(xenheap.OutOfMemory, match="tenant-a") as info:
            dom.alloc(0)
        assert "64.0 KiB" in str(info.value)
        with pytest.raises(xenheap.OutOfMemory, match="tenant-a"):
            dom.populate("4KiB")
        assert _snapshot(heap) == before
        assert dom.stats() == before_dom
        heap.check()
        blocks.pop().free()
        dom.alloc(2)  # room again after a free
        heap.check()


def test_domain_stats_track_pages_peak_allocations_frees():
    with xenheap.Heap("16MiB", scrub="alloc", reuse_bytes=0) as heap:  # frees reach the heap
        dom = heap.create_domain()
        a, b = dom.alloc(3), dom.alloc(1)
        a.free()
        dom.populate(3 * PAGE_SIZE)
        stats = dom.stats()
        assert stats["pages"] == 2 + 3 == dom.pages
        assert stats["peak_pages"] == 8 + 2
        assert stats["num_allocations"] == 2 + 3
        assert stats["num_frees"] == 1
        assert stats["blocks"] == 4
        dom.destroy()
        after = dom.stats()
        assert after["pages"] == 0 and after["num_frees"] == 5 and after["peak_pages"] == 10
        del b


def test_quota_holds_under_concurrent_allocation():
    with xenheap.Heap("32MiB", scrub="alloc") as heap:
        dom = heap.create_domain("shared", max_bytes=64 * PAGE_SIZE)
        refused = []
        kept = []

        def grab():
            for _ in range(64):
                try:
                    kept.append(dom.alloc(0))
                except xenheap.OutOfMemory:
                    refused.append(1)

        threads = [threading.Thread(target=grab) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        assert dom.pages == 64
        assert len(refused) == 4 * 64 - 64
        heap.check()


# --- returning memory to the OS ----------------------------------------------------------
def test_release_unused_drops_rss_and_memory_stays_clean():
    with xenheap.Heap("256MiB") as heap:
        dom = heap.create_domain()
        for blk in [dom.alloc(9) for _ in range(112)]:  # 224 MiB, written
            blk.array()[:] = 0x77
        dom.destroy()
        assert heap.wait_clean(WAIT_S)
        rss_before = psutil.Process().memory_info().rss
        released = heap.release_unused()
        rss_after = psutil.Process().memory_info().rss
        assert released == 112 * (PAGE_SIZE << 9)  # what was written; the rest never was
        assert rss_before - rss_after > 200 * 2**20
        stats = heap.stats()
        assert stats["released_bytes"] == released
        assert stats["dirty_pages"] == 0
        assert stats["free_pages"] == stats["total_pages"]
        heap.check()
        clean, held = read_all_free_memory(heap)
        assert clean and held == heap.total_pages


def test_release_unused_leaves_dirty_and_allocated_memory_alone():
    with xenheap.Heap("16MiB", scrub="alloc") as heap:
        # Resident, as memory the heap has used is: only resident memory can be released.
        prim.libc_memset(heap.core.arenas[0].address, 0, 16 * 2**20)
        dom = heap.create_domain()
        kept = dom.alloc(8)
        kept.array()[:] = 9
        dirty = heap.create_domain()
        dirty.populate("4MiB")
        dirty.destroy()
        dirty_pages = heap.stats()["dirty_pages"]
        assert heap.release_unused("1MiB") == 0  # the only clean chunk is 8 MiB: never split
        released = heap.release_unused("8MiB")
        assert released == 8 * 2**20
        assert heap.stats()["dirty_pages"] == dirty_pages
        assert (kept.array() == 9).all()
        heap.check()


def test_release_unused_rejects_bad_sizes():
    with xenheap.Heap("4MiB", scrub="alloc") as heap:
        before = _snapshot(heap)
        for bad in (-1, "lots", 1.5):
            with pytest.raises(xenheap.InvalidArgument):
                heap.release_unused(bad)
        assert _snapshot(heap) == before


# --- fork -------------------------------------------------------------------------------
def _in_child(fn):
    """Run ``fn`` in a forked child; returns its exit status (0 = all asserts held)."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _in_child_while_held(lock, fn, release_after: float | None = None) -> int:
    """_in_child(fn) while a parent thread holds ``lock`` (a context manager); it lets go
    ``release_after`` seconds after the fork began, else once the child is done."""
    held, release = threading.Event(), threading.Event()

    def holding() -> None:
        with lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=holding)
    holder.start()
    assert held.wait(30)
    if release_after is not None:
        threading.Timer(release_after, release.set).start()
    try:
        return _in_child(fn)
    finally:
        release.set()
        holder.join(30)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork with threads running
def test_fork_child_gets_a_clear_error_and_the_parent_is_unaffected():
    with xenheap.Heap("16MiB") as heap:
        dom = heap.create_domain()
        blk = dom.alloc(2)
        blk.array()[:] = 3

        def child():
            for call in (dom.alloc, heap.create_domain, heap.release_unused):
                try:
                    call()
                except xenheap.XenHeapError as exc:
                    assert "parent process" in str(exc)
                else:
                    raise AssertionError(f"{call} worked in the child")
            with xenheap.Heap("4MiB") as own:  # a fresh heap works, scrubbers and all
                own.create_domain().populate("1MiB")
                own.check()

        assert _in_child(child) == 0
        assert (blk.array() == 3).all()
        dom.alloc(0).free()
        dom.destroy()
        assert heap.wait_clean(WAIT_S)
        heap.check()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork with threads running
def test_wait_clean_in_a_forked_child_raises_though_a_parent_thread_held_its_condition():
    with xenheap.Heap("16MiB") as heap:
        def child():
            signal.alarm(10)  # a hang ends the child by SIGALRM: a nonzero status
            with pytest.raises(xenheap.HeapClosed, match="parent process"):
                heap.wait_clean(timeout=0.5)

        # A parent thread inside wait_clean at the fork, holding the condition.
        assert _in_child_while_held(heap.core.cleaned, child) == 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork with threads running
def test_a_fork_while_another_thread_holds_numbas_compiler_lock_leaves_the_child_working():
    """A parent thread loading or compiling a kernel at the fork (its first call of it)
    must not leave the child unable to load or compile any: its own heap would hang."""
    def child():
        signal.alarm(20)  # a hang ends the child by SIGALRM: a nonzero status
        assert njit(lambda x: x + 1)(1) == 2  # compiles: takes the compiler lock
        with xenheap.Heap("4MiB", scrub="alloc") as own:
            assert not own.create_domain().alloc(0).array().any()

    # Held as a first call of a kernel holds it, for longer: the fork waits for it.
    assert _in_child_while_held(global_compiler_lock, child, release_after=0.3) == 0


# --- injected faults ---------------------------------------------------------------------
def test_scrubber_failing_part_way_through_a_chunk_loses_nothing():
    with xenheap.Heap("64MiB") as heap:
        inject_fault(heap, "scrub_fail", 100)
        dom = heap.create_domain()
        dom.populate(heap.total_pages * PAGE_SIZE, order=4)
        dom.destroy()
        deadline = time.monotonic() + WAIT_S
        while heap.stats()["nodes"][0]["scrubber_errors"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        heap.check()  # progress recorded, chunk handed back
        clean, held = read_all_free_memory(heap)
        assert clean and held == heap.total_pages
        inject_fault(heap, None)
        heap.check()


def test_scrubber_stalling_while_holding_a_chunk_only_delays_the_allocator():
    with xenheap.Heap("64MiB") as heap:
        inject_fault(heap, "scrub_stall", 200_000)  # 0.2 s, deaf to aborts
        dom = heap.create_domain()
        for blk in [dom.alloc(heap.max_order - 2) for _ in range(4)]:
            blk.array()[:] = 0xEE
        dom.destroy()
        scrub_state = heap.core.state["ft8"][PG_SCRUB_STATE]
        deadline = time.monotonic() + WAIT_S
        while not (scrub_state == BUDDY_SCRUBBING).any():  # it took a chunk and stalls on it
            assert time.monotonic() < deadline
            time.sleep(0.001)
        clean, held = read_all_free_memory(heap)
        assert clean and held == heap.total_pages
        assert heap.stats()["nodes"][0]["abort_wait_max_seconds"] > 0
        inject_fault(heap, None)
        assert heap.wait_clean(WAIT_S)
        heap.check()


def test_populate_failing_in_the_middle_gives_everything_back():
    with xenheap.Heap("16MiB", scrub="alloc") as heap:
        dom = heap.create_domain()
        dom.populate("1MiB")
        before = _snapshot(heap)
        inject_fault(heap, "populate_fail", 50)
        with pytest.raises(MemoryError):
            dom.populate("2MiB")
        inject_fault(heap, None)
        after = _snapshot(heap)
        assert dom.pages == 256
        assert after["free_pages"] == before["free_pages"]
        assert after["dirty_pages"] == before["dirty_pages"]
        assert after["nodes"][0]["num_allocations"] == before["nodes"][0]["num_allocations"]
        heap.check()
        assert dom.populate("2MiB") == 512


def test_inject_fault_rejects_unknown_kinds():
    with xenheap.Heap("4MiB", scrub="alloc") as heap:
        with pytest.raises(xenheap.InvalidArgument):
            inject_fault(heap, "meteor")
        with pytest.raises(xenheap.InvalidArgument):
            inject_fault(heap, "scrub_fail", -1)


# --- regressions found in review -----------------------------------------------------------
def test_release_unused_releases_each_chunk_once_on_a_fragmented_heap():
    with xenheap.Heap("64MiB", scrub="sync") as heap:
        dom = heap.create_domain()
        blocks = [dom.alloc(0) for _ in range(heap.total_pages)]
        for blk in blocks[::2]:
            blk.free()  # zeroed on free: 8192 clean order-0 chunks, two claim batches
        free = heap.stats()["free_pages"]
        assert free == heap.total_pages // 2
        released = heap.release_unused()
        stats = heap.stats()
        assert released == free * PAGE_SIZE == stats["released_bytes"]
        assert stats["free_pages"] == free
        heap.check()
        # A second call finds them all again, but they are no longer resident: nothing to
        # give back, and nothing counted twice.
        assert heap.release_unused() == 0
        assert heap.stats()["released_bytes"] == released
        heap.check()


def test_close_with_a_stalled_scrubber_leaves_the_memory_mapped():
    code = """
import time, xenheap
from xenheap.faults import inject_fault
heap = xenheap.Heap('64MiB')
inject_fault(heap, 'scrub_stall', 2_000_000)
dom = heap.create_domain()
blk = dom.alloc(10)
blk.array()[:] = 1
blk.free()
deadline = time.monotonic() + 30
while heap.stats()['nodes'][0]['scrubber'] != 'scrubbing' and time.monotonic() < deadline:
    time.sleep(0.001)
time.sleep(0.05)
heap.close()
assert any(s.is_alive() for s in heap.scrubbers), 'the stall ended early'
assert not heap.core.arenas[0].closed
for s in heap.scrubbers:
    s.join(30)
print('survived')
"""
    done = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    assert b"survived" in done.stdout


def test_only_one_thread_scrubs_a_node_at_a_time():
    with xenheap.Heap("8MiB", scrub="alloc", reuse_bytes=0) as heap:  # the free makes dirt
        dom = heap.create_domain()
        dom.alloc(4).free()
        s = heap.core.state
        charges = np.zeros((8, 2), dtype=np.int64)
        args = (heap.core.hs, 0, 4096, 64, charges)
        s["nodes"][0, N_SCRUBBING] = 1  # as if another scrubber were working on node 0
        assert scrub_free_pages(*args) == NOTHING_DIRTY
        assert heap.stats()["dirty_pages"] == 16
        s["nodes"][0, N_SCRUBBING] = 0
        assert scrub_free_pages(*args) == 16
        assert charges[0].tolist() == [dom.id, 16]  # charged to the domain that freed them
        assert heap.stats()["dirty_pages"] == 0
        heap.check()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork with threads running
def test_a_forked_child_freeing_inherited_arrays_does_not_touch_the_heap():
    with xenheap.Heap("16MiB", scrub="alloc") as heap:
        dom = heap.create_domain()
        with dom.numpy_allocator():
            arrays = [np.ones(10), np.ones(100_000)]
        s = heap.core.state
        held = dom.stats()["numpy_pages"]
        hold_lock(s["doms"], dom.slot, D_LOCK)  # a parent thread mid-call at the fork

        def child():
            arrays.clear()  # numpy frees both; a free that took the lock would hang

        pid = os.fork()
        if pid == 0:
            child()
            os._exit(0)
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise AssertionError("the child hung freeing an inherited array")
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(status) == 0
        release_lock(s["doms"], dom.slot, D_LOCK)
        assert dom.stats()["numpy_pages"] == held  # the parent's arrays are untouched
        arrays.clear()
        assert dom.stats()["numpy_pages"] == 0
        heap.check()


# --- issue 9: release_unused never loses or double-counts memory; fork right after Heap() ---
def _fragmented_clean_heap(heap):
    """Every other page free and clean (zeroed on free: "sync"), resident: 8,192 order-0
    chunks on a 64 MiB heap, more than one claim batch. Returns the blocks held, which the
    caller keeps (with them, their domain): dropped, they would be freed."""
    dom = heap.create_domain()
    blocks = [dom.alloc(0) for _ in range(heap.total_pages)]
    for blk in blocks[::2]:
        blk.free()
    return blocks[1::2]


def test_release_unused_counts_only_memory_that_was_resident():
    with xenheap.Heap("64MiB", scrub="sync") as heap:
        assert heap.release_unused() == 0  # fresh memory was never touched
        dom = heap.create_domain()
        blk = dom.alloc(12)
        blk.array()[:] = 5
        blk.free()  # zeroed in place on free: 16 MiB clean and resident
        rss_before = psutil.Process().memory_info().rss
        assert heap.release_unused() == 16 * 2**20
        assert rss_before - psutil.Process().memory_info().rss > 12 * 2**20
        assert [heap.release_unused() for _ in range(3)] == [0, 0, 0]
        assert heap.stats()["released_bytes"] == 16 * 2**20
        heap.check()


def test_a_refused_release_gives_every_chunk_back_and_raises():
    libc = ctypes.CDLL(None, use_errno=True)
    with xenheap.Heap("4MiB", scrub="sync") as heap:
        dom = heap.create_domain()
        blocks = [dom.alloc(0) for _ in range(heap.total_pages)]
        for blk in blocks[::2]:
            blk.free()  # zeroed: clean, resident, many chunks
        arena = heap.core.arenas[0]
        if libc.mlock(ctypes.c_void_p(arena.address), ctypes.c_size_t(4 * 2**20)) != 0:
            pytest.skip("mlock refused (RLIMIT_MEMLOCK)")
        try:
            free = heap.stats()["free_pages"]
            with pytest.raises(xenheap.ReleaseFailed) as info:
                heap.release_unused()  # madvise(MADV_DONTNEED) refuses locked memory
            assert info.value.released_bytes == 0
            assert heap.stats()["free_pages"] == free
            assert heap.stats()["released_bytes"] == 0
            heap.check()
        finally:
            libc.munlock(ctypes.c_void_p(arena.address), ctypes.c_size_t(4 * 2**20))
        assert heap.release_unused() == free * PAGE_SIZE  # every chunk is back on its list
        heap.check()


def test_an_interrupted_release_gives_every_claimed_chunk_back(monkeypatch):
    with xenheap.Heap("64MiB", scrub="sync") as heap:
        held = _fragmented_clean_heap(heap)
        free = heap.stats()["free_pages"]
        calls = []
        real = prim.release_pages

        def interrupted(addr, nbytes):
            calls.append(nbytes)
            if len(calls) == 100:  # in the first of two claimed batches
                raise KeyboardInterrupt
            real(addr, nbytes)

        monkeypatch.setattr(prim, "release_pages", interrupted)
        with pytest.raises(KeyboardInterrupt):
            heap.release_unused()
        st = heap.stats()
        assert st["free_pages"] == free
        assert st["released_bytes"] == 99 * PAGE_SIZE
        heap.check()
        del held


_FORK_RIGHT_AFTER_HEAP = """
import os, sys, time
import numpy as np
import xenheap

def wait(pid, what):
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            sys.exit(f"{what} hung")
        time.sleep(0.005)

heap = xenheap.Heap(size="16MiB")  # its scrubber thread is loading its kernels right now
pids = [os.fork() for _ in range(1)]
if pids[0] == 0:
    for call in (lambda: heap.create_domain(), heap.stats, heap.wait_clean):
        try:
            call()
        except xenheap.HeapClosed as exc:
            assert "parent process" in str(exc), exc
        else:
            os._exit(3)
    os._exit(0)
codes = [wait(pids[0], "a child forked right after Heap()")]

# Inherited numpy arrays: of a live heap and of one closed in the parent.
live = heap.create_domain()
closed_heap = xenheap.Heap(size="16MiB", scrub="alloc")
gone = closed_heap.create_domain()
with live.numpy_allocator():
    a = np.ones(100_000)
with gone.numpy_allocator():
    b = np.ones(100_000)
    c = np.ones(10)
closed_heap.close()
pid = os.fork()
if pid == 0:
    try:
        a.resize(300_000, refcheck=False)  # a realloc through the handler: refused, no lock
        os._exit(4)
    except MemoryError:
        pass
    del a, b, c  # frees through the handlers: nothing done, no lock taken
    os._exit(0)
codes.append(wait(pid, "a child freeing inherited arrays"))
print("codes", codes)
sys.exit(0 if codes == [0, 0] else 1)
"""


def test_a_child_forked_right_after_heap_creation_gets_heap_closed_without_hanging():
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", _FORK_RIGHT_AFTER_HEAP], timeout=180,
                              capture_output=True)
        assert done.returncode == 0, (done.stdout + done.stderr).decode()
