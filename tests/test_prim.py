"""Tests of xenheap.prim against the real OS."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import pytest

from xenheap import prim
from xenheap.errors import InvalidArgument

PAGE = prim.PAGE_SIZE
T = TypeVar("T")


def in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a throwaway thread, so its affinity/policy changes die with it."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


@pytest.fixture
def mapping() -> mmap.mmap:
    buf = prim.map_anonymous(4 * PAGE)
    yield buf
    buf.close()


def test_map_anonymous_reads_zero_and_is_writable(mapping: mmap.mmap) -> None:
    assert len(mapping) == 4 * PAGE
    arr = np.frombuffer(mapping, dtype=np.uint8)
    assert not arr.any()
    arr[:] = 7
    assert mapping[0] == 7 and mapping[4 * PAGE - 1] == 7
    del arr


@pytest.mark.parametrize("bad", [0, -4096, True, 4096.0, "4096"])
def test_map_anonymous_rejects_bad_size(bad: object) -> None:
    with pytest.raises(InvalidArgument):
        prim.map_anonymous(bad)  # type: ignore[arg-type]


def test_map_anonymous_is_lazy() -> None:
    # MAP_NORESERVE: a mapping far larger than needed costs nothing until touched.
    buf = prim.map_anonymous(64 * 1024**3)
    try:
        buf[0] = 1
        buf[len(buf) - 1] = 2
        assert buf[0] == 1 and buf[len(buf) - 1] == 2
    finally:
        buf.close()


def test_address_of_matches_numpy_and_leaves_no_export(mapping: mmap.mmap) -> None:
    addr = prim.address_of(mapping)
    arr = np.frombuffer(mapping, dtype=np.uint8)
    assert addr == arr.ctypes.data
    assert addr % PAGE == 0
    del arr
    other = prim.map_anonymous(PAGE)
    prim.address_of(other)
    other.close()  # would raise BufferError if address_of left an export behind
    assert other.closed


def test_address_of_other_buffers() -> None:
    data = bytearray(b"hello world")
    assert prim.address_of(data) == np.frombuffer(data, dtype=np.uint8).ctypes.data
    view = memoryview(data)[6:]
    assert prim.address_of(view) == prim.address_of(data) + 6
    assert ctypes.string_at(prim.address_of(view), 5) == b"world"
    view.release()
    data.extend(b"!")  # bytearray can resize: address_of left no export behind
    assert prim.address_of(bytearray()) == 0
    with pytest.raises(InvalidArgument):
        prim.address_of(b"read-only")
    with pytest.raises(InvalidArgument):
        prim.address_of(memoryview(bytearray(8))[::2])
    with pytest.raises(TypeError):
        prim.address_of(12345)


def test_release_pages_makes_memory_read_zero(mapping: mmap.mmap) -> None:
    addr = prim.address_of(mapping)
    arr = np.frombuffer(mapping, dtype=np.uint8)
    arr[:] = 0xAB
    prim.release_pages(addr + PAGE, 2 * PAGE)
    assert not arr[PAGE : 3 * PAGE].any()
    assert (arr[:PAGE] == 0xAB).all()
    assert (arr[3 * PAGE :] == 0xAB).all()
    prim.release_pages(addr, 4 * PAGE)
    assert not arr.any()
    del arr


def test_release_pages_errors(mapping: mmap.mmap) -> None:
    addr = prim.address_of(mapping)
    with pytest.raises(OSError):
        prim.release_pages(addr + 1, PAGE)  # not page-aligned: EINVAL
    with pytest.raises(InvalidArgument):
        prim.release_pages(addr, -1)


def test_libc_memset_writes_exactly_the_range(mapping: mmap.mmap) -> None:
    addr = prim.address_of(mapping)
    prim.libc_memset(addr + 100, 0x5A, 1000)
    arr = np.frombuffer(mapping, dtype=np.uint8)
    assert (arr[100:1100] == 0x5A).all()
    assert not arr[:100].any()
    assert not arr[1100:].any()
    prim.libc_memset(addr + 100, 0, 10)
    assert not arr[100:110].any() and arr[110] == 0x5A
    del arr
    prim.libc_memset(0, 0, 0)  # nothing to do: no fault
    for bad in (-1, 256, True):
        with pytest.raises(InvalidArgument):
            prim.libc_memset(addr, bad, 1)
    with pytest.raises(InvalidArgument):
        prim.libc_memset(0, 0, 1)


def test_advise_hugepage(mapping: mmap.mmap) -> None:
    caps = prim.capabilities()
    big = prim.map_anonymous(2 * prim.HUGE_PAGE_SIZE)
    try:
        start = prim.address_of(big)
        aligned = -(-start // prim.HUGE_PAGE_SIZE) * prim.HUGE_PAGE_SIZE
        assert prim.advise_hugepage(aligned, prim.HUGE_PAGE_SIZE) is caps["madv_hugepage"]
        # Not page-aligned: EINVAL is "not offered" here, never an exception.
        assert prim.advise_hugepage(start + 1, PAGE) is False
    finally:
        big.close()
    with pytest.raises(InvalidArgument):
        prim.advise_hugepage(-1, PAGE)


def test_bind_to_node(mapping: mmap.mmap) -> None:
    caps = prim.capabilities()
    addr = prim.address_of(mapping)
    assert prim.bind_to_node(addr, 4 * PAGE, 0) is caps["mbind"]
    mapping[0] = 9  # still usable after binding
    assert mapping[0] == 9
    # A node far beyond any kernel's limit: refused quietly.
    assert prim.bind_to_node(addr, 4 * PAGE, 1 << 20) is False
    assert prim.bind_to_node(addr + 1, PAGE, 0) is False  # unaligned: EINVAL
    with pytest.raises(InvalidArgument):
        prim.bind_to_node(addr, PAGE, -1)
    with pytest.raises(InvalidArgument):
        prim.bind_to_node(addr, PAGE, True)


def test_pin_current_thread_takes_effect_in_that_thread_only() -> None:
    before = os.sched_getaffinity(0)
    cpu = max(before)

    def pin() -> tuple[bool, set[int], int]:
        ok = prim.pin_current_thread([cpu])
        return ok, os.sched_getaffinity(0), prim.current_cpu()

    ok, inside, running_on = in_thread(pin)
    assert isinstance(ok, bool)
    if ok:
        assert inside == {cpu}
        assert running_on in (cpu, -1)
    assert os.sched_getaffinity(0) == before  # the caller is untouched


def test_pin_current_thread_failures() -> None:
    before = os.sched_getaffinity(0)
    assert in_thread(lambda: prim.pin_current_thread([])) is False
    assert in_thread(lambda: prim.pin_current_thread([100_000])) is False
    assert in_thread(lambda: prim.pin_current_thread([-1])) is False
    assert os.sched_getaffinity(0) == before


def test_set_current_thread_idle_in_that_thread_only() -> None:
    before = os.sched_getscheduler(0)

    def idle() -> tuple[bool, int]:
        return prim.set_current_thread_idle(), os.sched_getscheduler(0)

    ok, policy = in_thread(idle)
    assert isinstance(ok, bool)
    if ok:
        assert policy == os.SCHED_IDLE
    else:
        assert policy != os.SCHED_IDLE
    assert os.sched_getscheduler(0) == before
    assert ok is prim.capabilities()["sched_idle"]


def test_current_cpu() -> None:
    cpu = prim.current_cpu()
    assert cpu == -1 or cpu in os.sched_getaffinity(0)


def test_capabilities() -> None:
    caps = prim.capabilities()
    assert set(caps) == {"mbind", "madv_hugepage", "sched_idle"}
    assert all(type(v) is bool for v in caps.values())
    caps["mbind"] = not caps["mbind"]
    assert prim.capabilities()["mbind"] is not caps["mbind"]  # a fresh copy each call
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # probing left the caller alone


def test_zeroed_array_is_lazy_zeroed_and_page_aligned() -> None:
    arr = prim.zeroed_array((4, 1 << 20), np.uint32)  # 16 MiB, never touched
    assert arr.shape == (4, 1 << 20) and arr.dtype == np.uint32 and arr.flags.writeable
    assert arr.ctypes.data % prim.PAGE_SIZE == 0
    assert prim.resident_pages(arr.ctypes.data, arr.nbytes) == 0
    arr[1, 12345] = 7  # one write: one 4 KiB page, not a 2 MiB huge page
    assert prim.resident_pages(arr.ctypes.data, arr.nbytes) == 1
    assert int(arr.sum()) == 7
