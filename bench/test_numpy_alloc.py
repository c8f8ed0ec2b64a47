"""numpy arrays from a domain's NEP 49 handler against numpy's default allocator.

    pytest bench/test_numpy_alloc.py --benchmark-only --benchmark-group-by=group

Each case makes an array, writes it once and drops it; inside the scope the data comes from
the heap (large: whole pinned blocks, already zero and faulted in; small: slab objects).
"""

import contextlib

import numpy as np
import pytest

import xenheap

SIZES = {"4KiB": 4096, "64KiB": 65536, "2MiB": 2 << 20}
SMALL_ARRAYS = 1000


@pytest.fixture(scope="module")
def domain():
    with xenheap.Heap("256MiB") as heap, heap.create_domain("bench") as dom:
        yield dom


def _scope(where, dom):
    return dom.numpy_allocator() if where == "xenheap" else contextlib.nullcontext()


@pytest.mark.parametrize("where", ["xenheap", "numpy"])
@pytest.mark.parametrize("size", list(SIZES))
def test_zeros_written_once(benchmark, domain, size, where):
    nbytes = SIZES[size]

    def make():
        arr = np.zeros(nbytes, dtype=np.uint8)
        arr[::4096] = 1
        return int(arr[0])

    benchmark.group = f"numpy.zeros {size}, written once"
    with _scope(where, domain):
        assert benchmark(make) == 1


@pytest.mark.parametrize("where", ["xenheap", "numpy"])
def test_many_small_arrays(benchmark, domain, where):
    def make():
        arrays = [np.full(i % 100 + 1, i, dtype=np.int64) for i in range(SMALL_ARRAYS)]
        return sum(int(a[0]) for a in arrays)

    benchmark.group = f"{SMALL_ARRAYS} arrays under 1 KiB"
    with _scope(where, domain):
        assert benchmark(make) == sum(range(SMALL_ARRAYS))


@pytest.mark.parametrize("itemsize", [8, 64, 256, 1000])
def test_heap_bytes_per_array_byte(benchmark, itemsize):
    """Not a timing: records heap bytes used per byte of array data for small arrays."""
    with xenheap.Heap("64MiB") as heap, heap.create_domain() as dom:
        with dom.numpy_allocator():
            arrays = benchmark.pedantic(
                lambda: [np.zeros(itemsize, dtype=np.uint8) for _ in range(2000)],
                rounds=1, iterations=1)
        used = dom.stats()["numpy_pages"] * heap.page_size
        benchmark.group = "heap bytes per array byte"
        benchmark.extra_info["heap_bytes_per_data_byte"] = used / (itemsize * len(arrays))
        assert used >= itemsize * len(arrays)
