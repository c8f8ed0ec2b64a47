"""Zeroing a domain's worth of memory: the scrubbers vs libc memset and numpy fill(0).

One group per size and node layout (1 node; 2 emulated nodes, one scrubber each). All three
zero the same memory: a domain holding the whole heap with a pattern in every page.
"""

from __future__ import annotations

import pytest
from benchconf import ROUNDS, SIZES, size_id

from xenheap.tools.baselines import block_regions, coalesce, fill_zero, memset_regions
from xenheap.tools.workload import populated_domain, wait_until_clean, write_pattern

WAYS = ["scrubbers", "memset", "memset-threads", "numpy-fill0"]


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("nodes", [1, 2], ids=lambda n: f"{n}node")
@pytest.mark.parametrize("size", SIZES, ids=size_id)
def test_zero_memory(benchmark, make_heap, size: int, nodes: int, way: str) -> None:
    benchmark.group = f"zero {size_id(size)}, {nodes} node(s)"
    heap = make_heap(size, nodes=nodes, scrub="idle")
    threads = len(heap.scrubbers)
    guest, blocks, _ = populated_domain(heap, "guest")
    if way == "scrubbers":
        def setup():
            wait_until_clean(heap)
            dom, _, _ = populated_domain(heap, "guest")
            return (dom,), {}

        def destroy_and_wait(dom) -> None:
            dom.destroy()
            assert wait_until_clean(heap)

        guest.destroy()
        benchmark.pedantic(destroy_and_wait, setup=setup, rounds=ROUNDS)
        return
    regions = coalesce(block_regions(blocks))

    def rewrite():
        write_pattern(blocks)  # dirty again, as a destroyed domain's memory is
        return (), {}

    op = {
        "memset": lambda: memset_regions(regions),
        "memset-threads": lambda: memset_regions(regions, threads=threads),
        "numpy-fill0": lambda: fill_zero(blocks),
    }[way]
    benchmark.pedantic(op, setup=rewrite, rounds=ROUNDS)
    guest.destroy()
