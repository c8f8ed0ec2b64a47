"""Destroying a domain that holds all of the heap's memory, every page written: sync vs idle.

Two groups per size: the destroy call itself, and destroy until all memory is clean again.
"""

from __future__ import annotations

import pytest
from benchconf import ROUNDS, SIZES, size_id

from xenheap.tools.workload import populated_domain, wait_until_clean

MODES = ["sync", "idle"]


def _populated(heap):
    def setup():
        wait_until_clean(heap)  # every round starts from a clean heap
        dom, _, _ = populated_domain(heap, "guest")
        return (dom,), {}

    return setup


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=size_id)
def test_destroy(benchmark, make_heap, size: int, mode: str) -> None:
    benchmark.group = f"destroy {size_id(size)}"
    heap = make_heap(size, scrub=mode)
    benchmark.pedantic(lambda dom: dom.destroy(), setup=_populated(heap), rounds=ROUNDS)
    assert wait_until_clean(heap)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=size_id)
def test_destroy_until_clean(benchmark, make_heap, size: int, mode: str) -> None:
    benchmark.group = f"destroy {size_id(size)} until all memory is clean"
    heap = make_heap(size, scrub=mode)

    def destroy_and_wait(dom) -> None:
        dom.destroy()
        assert wait_until_clean(heap)

    benchmark.pedantic(destroy_and_wait, setup=_populated(heap), rounds=ROUNDS)
