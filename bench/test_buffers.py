"""A zeroed buffer a service asks for, written once and released: xenheap vs its peers.

One group per buffer size; the peers are bytearray(n), numpy.zeros(n) and mmap.mmap(-1, n).
"""

from __future__ import annotations

import pytest
from benchconf import size_id

from xenheap.tools.baselines import buffer_peers
from xenheap.tools.bench import BUFFER_SIZES

PEERS = ["xenheap", "bytearray", "numpy.zeros", "mmap"]


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("nbytes", BUFFER_SIZES, ids=size_id)
def test_zeroed_buffer(benchmark, service_heap, nbytes: int, peer: str) -> None:
    benchmark.group = f"zeroed buffer {size_id(nbytes)}: obtain, write once, release"
    dom = service_heap.create_domain(f"buffers-{peer}")
    try:
        benchmark(buffer_peers(dom)[peer], nbytes)
    finally:
        dom.destroy()
