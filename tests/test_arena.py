"""Tests of xenheap.arena.Arena."""

from __future__ import annotations

import gc
import logging

import numpy as np
import pytest

from xenheap import prim
from xenheap.arena import Arena
from xenheap.errors import HeapClosed, InvalidArgument
from xenheap.topology import Node

PAGE = prim.PAGE_SIZE
UNBOUND = Node(id=0, cpus=(0,), distances=(10,), os_node=None)
OS_NODE_0 = Node(id=0, cpus=(0,), distances=(10,), os_node=0)


@pytest.fixture
def arena() -> Arena:
    a = Arena(UNBOUND, 16 * PAGE)
    yield a
    a.close()


def test_arena_attributes(arena: Arena) -> None:
    assert arena.node is UNBOUND
    assert arena.nbytes == 16 * PAGE
    assert arena.address % PAGE == 0
    assert arena.bound is False  # os_node None: never bound
    assert isinstance(arena.hugepage, bool)
    assert arena.array.dtype == np.uint8
    assert arena.array.shape == (16 * PAGE,)
    assert arena.array.ctypes.data == arena.address
    assert arena.array.flags.writeable
    assert not arena.array.any()  # fresh memory reads zero
    assert not arena.closed
    assert "node=0" in repr(arena)


def test_arena_bound_to_os_node_0() -> None:
    with Arena(OS_NODE_0, 4 * PAGE) as a:
        assert a.bound is prim.capabilities()["mbind"]
        a.array[:] = 1
        assert int(a.array.sum()) == 4 * PAGE
    assert a.closed


def test_arena_hugepage_advice_matches_capability() -> None:
    with Arena(UNBOUND, 2 * prim.HUGE_PAGE_SIZE) as a:
        # madvise accepts any page-aligned range where THP is offered.
        assert a.hugepage is prim.capabilities()["madv_hugepage"]


def test_view_writes_show_in_array(arena: Arena) -> None:
    view = arena.view(3 * PAGE + 5, 10)
    assert isinstance(view, memoryview)
    assert view.format == "B" and view.nbytes == 10 and not view.readonly
    view[:] = b"0123456789"
    assert bytes(arena.array[3 * PAGE + 5 : 3 * PAGE + 15]) == b"0123456789"
    assert arena.array[3 * PAGE + 4] == 0 and arena.array[3 * PAGE + 15] == 0
    arena.array[3 * PAGE + 5] = ord("X")
    assert view[0] == ord("X")  # zero-copy both ways
    assert prim.address_of(view) == arena.address + 3 * PAGE + 5
    view.release()


def test_view_bounds(arena: Arena) -> None:
    assert arena.view(0, 16 * PAGE).nbytes == 16 * PAGE
    assert arena.view(16 * PAGE, 0).nbytes == 0
    for offset, nbytes in ((0, 16 * PAGE + 1), (16 * PAGE, 1), (-1, 1), (0, -1), (1.0, 1)):
        with pytest.raises(InvalidArgument):
            arena.view(offset, nbytes)  # type: ignore[arg-type]


def test_close_is_idempotent() -> None:
    a = Arena(UNBOUND, PAGE)
    a.close()
    assert a.closed
    a.close()
    assert a.closed
    with pytest.raises(HeapClosed):
        _ = a.array
    with pytest.raises(HeapClosed):
        a.view(0, 1)


def test_close_with_live_view_warns_and_keeps_view_valid(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = Arena(UNBOUND, 2 * PAGE)
    view = a.view(PAGE, 4)
    held = a.array
    with caplog.at_level(logging.WARNING, logger="xenheap.arena"):
        a.close()  # must not raise BufferError
    assert a.closed
    assert any("views" in r.getMessage() for r in caplog.records)
    view[:] = b"abcd"  # the mapping is still there for the live view
    assert bytes(held[PAGE : PAGE + 4]) == b"abcd"
    a.close()
    view.release()
    del held
    gc.collect()


def test_close_without_views_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    a = Arena(UNBOUND, PAGE)
    view = a.view(0, 8)
    view.release()
    with caplog.at_level(logging.WARNING, logger="xenheap.arena"):
        a.close()
    assert caplog.records == []


@pytest.mark.parametrize("bad", [0, -PAGE, PAGE + 1, 100, True, float(PAGE)])
def test_arena_rejects_bad_size(bad: object) -> None:
    with pytest.raises(InvalidArgument):
        Arena(UNBOUND, bad)  # type: ignore[arg-type]
