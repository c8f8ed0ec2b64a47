"""A buffer a service asks for, written once and released: xenheap vs its peers.

One group per buffer size. Zeroed buffers: xenheap (a domain that reuses its own freed
blocks, the default), xenheap without reuse (``reuse_bytes=0``: every buffer comes from
the heap, pre-zeroed by the scrubbers), bytearray(n), numpy.zeros(n) and mmap.mmap(-1, n).
Buffers that need not be zeroed: ``alloc(zero=False)`` against numpy.empty(n).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from benchconf import BUFFER_SIZES, SERVICE_HEAP, size_id

from xenheap import Heap
from xenheap.tools.baselines import buffer_peers
from xenheap.tools.workload import warm_up

PEERS = ["xenheap", "xenheap, no reuse", "bytearray", "numpy.zeros", "mmap",
         "xenheap zero=False", "numpy.empty"]


@pytest.fixture(scope="module")
def plain_heap() -> Iterator[Heap]:
    """The service heap's twin without reuse."""
    with Heap(SERVICE_HEAP, scrub="idle", reuse_bytes=0) as heap:
        warm_up(heap)
        yield heap


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("nbytes", BUFFER_SIZES, ids=size_id)
def test_buffer(benchmark, service_heap, plain_heap, nbytes: int, peer: str) -> None:
    benchmark.group = f"buffer {size_id(nbytes)}: obtain, write once, release"
    heap = plain_heap if peer == "xenheap, no reuse" else service_heap
    dom = heap.create_domain(f"buffers-{peer}")
    try:
        benchmark(buffer_peers(dom)[peer.replace(", no reuse", "")], nbytes)
    finally:
        dom.destroy()
