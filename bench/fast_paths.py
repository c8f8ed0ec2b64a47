"""The fast paths against numpy, side by side in one run, sides alternated, medians.

Run it as a script (``python bench/fast_paths.py``): buffers of 4 KiB, 2 MiB and 64 MiB
obtained, written once and released (zeroed, and ``zero=False`` against ``numpy.empty``;
64 MiB also against the write alone, into memory already faulted in), numpy arrays under
``dom.numpy_allocator()`` against numpy's own allocator, a 1 TiB virtual heap's creation,
and populate + destroy from one thread and from two, against two loops that share nothing
(one computing, one writing memory) run the same way: what the machine gives
two threads at that moment. Prints Markdown.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import numpy as np
import psutil
from numba import njit

import xenheap

MiB = 2**20
SMALL_SIZES = [8 + (i * 997) % 993 for i in range(1000)]  # 8-1000 bytes


# The reference loops below take about as long as one populate + destroy, on this machine.
SPIN_STEPS = 9_000_000
TOUCH_BYTES = 2 * MiB  # about what a populate of 256 MiB writes in the frame table
TOUCH_ROUNDS = 700


@njit(nogil=True, cache=True)
def _spin(steps: int) -> int:
    """A loop that touches no memory: two threads of it show the CPUs' own parallelism."""
    x = np.uint64(88172645463325252)
    for _ in range(steps):  # xorshift: each step needs the last, so nothing folds away
        x ^= x << np.uint64(13)
        x ^= x >> np.uint64(7)
        x ^= x << np.uint64(17)
    return x


@njit(nogil=True, cache=True)
def _touch(buffer: np.ndarray, rounds: int) -> None:
    """One write per cache line of ``buffer``, ``rounds`` times: memory-bound work."""
    for _ in range(rounds):
        for i in range(0, buffer.size, 8):
            buffer[i] += 1


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
    faulted = np.zeros(64 * MiB, dtype=np.uint8)
    faulted[:] = 0  # its pages faulted in: what is left is the write

    def write_faulted() -> None:
        faulted[:] = 1

    compare("zeroed 64 MiB vs only writing 64 MiB already faulted in (the floor)",
            buffer(64 * MiB), write_faulted, 8, 7)
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

    def spin_work(h: xenheap.Heap, node: int) -> None:
        _spin(SPIN_STEPS)

    buffers = [np.zeros(TOUCH_BYTES // 8, dtype=np.int64) for _ in (0, 1)]

    def touch_work(h: xenheap.Heap, node: int) -> None:
        _touch(buffers[node], TOUCH_ROUNDS)

    def threads(work: Callable[[xenheap.Heap, int], None], count: int) -> float:
        with xenheap.Heap("1GiB", nodes=2, scrub="alloc") as h:
            work(h, 0)
            work(h, 1)
            start = time.perf_counter()
            if count == 1:
                work(h, 0)
                work(h, 1)
            else:
                workers = [threading.Thread(target=work, args=(h, n)) for n in (0, 1)]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
            return time.perf_counter() - start

    # The same two-thread runs of loops that share nothing, one computing and one writing
    # memory: what this machine gives two threads at that moment, the ceilings for the
    # populate + destroy ratio.
    times: dict[tuple[str, int], list[float]] = {}
    for r in range(7):
        for name, work in (("populate", populate_destroy), ("spin", spin_work),
                           ("touch", touch_work)):
            for count in ((1, 2) if r % 2 == 0 else (2, 1)):
                times.setdefault((name, count), []).append(threads(work, count))
    med = {key: statistics.median(v) for key, v in times.items()}
    print(f"populate + destroy 256 MiB of 4 KiB blocks on each of 2 nodes: one thread "
          f"{med['populate', 1] * 1e3:.0f} ms, two threads {med['populate', 2] * 1e3:.0f} ms "
          f"({med['populate', 1] / med['populate', 2]:.2f}x); loops sharing nothing, in the "
          f"same rounds: computing {med['spin', 1] / med['spin', 2]:.2f}x, writing "
          f"{TOUCH_BYTES // MiB} MiB each {med['touch', 1] / med['touch', 2]:.2f}x")


if __name__ == "__main__":
    main()
