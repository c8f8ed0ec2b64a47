"""The fast paths against numpy, side by side in one run, sides alternated, medians.

Run it as a script (``python bench/fast_paths.py``): buffers of 4 KiB, 2 MiB and 64 MiB
obtained, written once and released (zeroed, and ``zero=False`` against ``numpy.empty``),
numpy arrays under ``dom.numpy_allocator()`` against numpy's own allocator, a 1 TiB virtual
heap's creation, and populate + destroy from one thread and from two. Prints Markdown.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import numpy as np
import psutil

import xenheap

MiB = 2**20
SMALL_SIZES = [8 + (i * 997) % 993 for i in range(1000)]  # 8-1000 bytes


def per_call(fn: Callable[[], None], count: int) -> float:
    """Seconds per call of ``fn`` over ``count`` calls."""
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return (time.perf_counter() - start) / count


def compare(what: str, ours: Callable[[], None], theirs: Callable[[], None], count: int,
            rounds: int = 9) -> None:
    """One table row: medians over ``rounds``, the two sides alternating who goes first."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for r in range(rounds):
        for side in ((0, 1) if r % 2 == 0 else (1, 0)):
            times[side].append(per_call(ours if side == 0 else theirs, count))
    a, b = statistics.median(times[0]), statistics.median(times[1])
    print(f"| {what} | {a * 1e6:.2f} us | {b * 1e6:.2f} us | {b / a:.2f}x |", flush=True)


def main() -> None:
    heap = xenheap.Heap("1GiB")
    dom = heap.create_domain()

    def buffer(nbytes: int, zero: bool = True) -> Callable[[], None]:
        def run() -> None:
            blk = dom.alloc_bytes(nbytes, zero=zero)
            blk.array()[:] = 1
            blk.free()
        return run

    def numpy_buffer(nbytes: int, make: Callable = np.zeros) -> Callable[[], None]:
        def run() -> None:
            make(nbytes, dtype=np.uint8)[:] = 1
        return run

    def under_handler(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with dom.numpy_allocator():
                fn()
        return run

    def zeros_512() -> None:
        for _ in range(100):
            np.zeros(512)

    def small_arrays() -> None:
        arrays = [np.empty(n, dtype=np.uint8) for n in SMALL_SIZES]
        del arrays

    for warm in (buffer(4096), buffer(2 * MiB), buffer(64 * MiB), under_handler(zeros_512),
                 under_handler(small_arrays)):
        per_call(warm, 5)
    print("| what | xenheap | numpy | xenheap's speed / numpy's |\n| --- | --- | --- | --- |")
    compare("zeroed 4 KiB (alloc_bytes, array, write, free)", buffer(4096),
            numpy_buffer(4096), 20000)
    compare("zeroed 2 MiB, written once", buffer(2 * MiB), numpy_buffer(2 * MiB), 300)
    compare("2 MiB zero=False vs numpy.empty", buffer(2 * MiB, zero=False),
            numpy_buffer(2 * MiB, np.empty), 300)
    compare("zeroed 64 MiB, written once", buffer(64 * MiB), numpy_buffer(64 * MiB), 8, 7)
    compare("np.zeros(512) x100, handler vs numpy's", under_handler(zeros_512), zeros_512, 300)
    compare("1,000 small arrays (8-1000 B), handler vs numpy's", under_handler(small_arrays),
            small_arrays, 60)
    heap.close()

    process = psutil.Process()
    rss = process.memory_info().rss
    start = time.perf_counter()
    big = xenheap.Heap("1TiB", scrub="alloc")
    print(f"Heap('1TiB'): {(time.perf_counter() - start) * 1e3:.1f} ms, "
          f"+{(process.memory_info().rss - rss) / MiB:.1f} MiB resident")
    big.close()

    def populate_destroy(h: xenheap.Heap, node: int) -> None:
        d = h.create_domain()
        d.populate("256MiB", order=0, node=node)
        d.destroy()

    def threads(count: int) -> float:
        with xenheap.Heap("1GiB", nodes=2, scrub="alloc") as h:
            populate_destroy(h, 0)
            populate_destroy(h, 1)
            start = time.perf_counter()
            if count == 1:
                populate_destroy(h, 0)
                populate_destroy(h, 1)
            else:
                workers = [threading.Thread(target=populate_destroy, args=(h, n))
                           for n in (0, 1)]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
            return time.perf_counter() - start

    one: list[float] = []
    two: list[float] = []
    for r in range(5):
        order = (1, 2) if r % 2 == 0 else (2, 1)
        for count in order:
            (one if count == 1 else two).append(threads(count))
    print(f"populate + destroy 256 MiB of 4 KiB blocks on each of 2 nodes: one thread "
          f"{statistics.median(one) * 1e3:.0f} ms, two threads "
          f"{statistics.median(two) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
