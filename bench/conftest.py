"""Shared set-up of the pytest-benchmark suites in bench/.

Run them with ``pytest bench/ --benchmark-only --benchmark-group-by=group``: each group is
one table comparing xenheap with its peers on the same case. ``XENHEAP_BENCH_QUICK=1``
shrinks every case (the test suite runs them once that way, with ``--benchmark-disable``,
so they cannot rot). Sizes and counts live in benchconf.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from benchconf import SERVICE_HEAP

from xenheap import Heap
from xenheap.tools.workload import warm_kernels, warm_up


@pytest.fixture(scope="session", autouse=True)
def _kernels_loaded() -> None:
    # numba loads each kernel at its first call, holding the GIL: never inside a timing.
    warm_kernels()


@pytest.fixture
def make_heap() -> Iterator[Callable[..., Heap]]:
    """Heap(...) closed at the end of the test, whatever happens."""
    heaps: list[Heap] = []

    def make(*args: object, **kwargs: object) -> Heap:
        heap = Heap(*args, **kwargs)
        heaps.append(heap)
        return heap

    yield make
    for heap in heaps:
        heap.close()


@pytest.fixture(scope="module")
def service_heap() -> Iterator[Heap]:
    """An idle-mode heap that has served a while: every page faulted in and clean."""
    with Heap(SERVICE_HEAP, scrub="idle") as heap:
        warm_up(heap)
        yield heap
