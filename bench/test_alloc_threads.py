"""Allocation throughput: threads calling alloc(0) + free in a loop on one shared domain.

The kernels run without the GIL; the Python around them does not. One group, one row per
thread count; ``extra_info`` holds the operations per second.
"""

from __future__ import annotations

import pytest
from benchconf import ALLOC_OPS, ROUNDS

from xenheap.tools.bench import alloc_throughput


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_alloc_free_threads(benchmark, service_heap, threads: int) -> None:
    benchmark.group = f"alloc+free 4 KiB, {ALLOC_OPS} per thread"
    result = benchmark.pedantic(alloc_throughput,
                                args=(service_heap, threads, ALLOC_OPS), rounds=ROUNDS)
    benchmark.extra_info["ops_per_s"] = result.ops_per_s
    assert result.ops == threads * ALLOC_OPS
