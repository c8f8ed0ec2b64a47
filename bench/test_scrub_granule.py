"""How big a scrub granule must be for the zeroing kernel to run at libc memset's speed.

The scrubber checks for BUDDY_SCRUB_ABORT after every granule, so an aborting allocator waits up
to one granule's zeroing: the granule should be the smallest size that reaches the bandwidth
of one large libc memset over the same memory. Compares, on one faulted-in arena:
libc memset of the whole arena, and the streaming (non-temporal) kernel and plain memset
called once per granule of 1..256 pages.

    pytest bench/test_scrub_granule.py --benchmark-only --benchmark-group-by=group
"""

import numpy as np
import pytest
from numba import njit

from native_kernels.layout import PAGE_SHIFT
from native_kernels.pages import fill_pages, stream_fill_pages
from xenheap import prim

ARENA_BYTES = 256 << 20
GRANULES = (1, 4, 16, 64, 256)


@njit(nogil=True, cache=True)
def _by_granule(addr, npages, granule, streaming):
    i = 0
    while i < npages:
        n = min(granule, npages - i)
        if streaming:
            stream_fill_pages(addr + (i << PAGE_SHIFT), n, 0)
        else:
            fill_pages(addr + (i << PAGE_SHIFT), n, 0)
        i += granule


@pytest.fixture(scope="module")
def arena():
    mapping = prim.map_anonymous(ARENA_BYTES)
    view = np.frombuffer(mapping, dtype=np.uint8)
    addr = prim.address_of(mapping)
    prim.advise_hugepage(addr, ARENA_BYTES)
    view[:] = 1  # fault it in: the scrubber zeroes memory that a domain has used
    held = {"addr": addr, "view": view}
    yield held
    held.clear()  # drop every export of the mapping before closing it
    del view
    mapping.close()


def test_libc_memset_whole(benchmark, arena):
    addr, view = arena["addr"], arena["view"]
    benchmark.group = "scrub granule"
    benchmark.extra_info["bytes"] = ARENA_BYTES
    benchmark(prim.libc_memset, addr, 0, ARENA_BYTES)
    assert view.max() == 0


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "memset"])
@pytest.mark.parametrize("granule", GRANULES)
def test_zero_by_granule(benchmark, arena, granule, streaming):
    addr, view = arena["addr"], arena["view"]
    view[:4096] = 1
    benchmark.group = "scrub granule"
    benchmark.extra_info["bytes"] = ARENA_BYTES
    benchmark(_by_granule, addr, ARENA_BYTES >> PAGE_SHIFT, granule, streaming)
    assert view.max() == 0
