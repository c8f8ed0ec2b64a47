"""The idle-machine scrubbing figures, side by side in one run, sides alternated, medians.

Run it as a script (``python bench/idle_scrub.py``; it needs about 12 GiB of memory): time
until a destroyed 2 GiB is clean against one thread's libc memset of 2 GiB, destroy in
"sync" against "idle", and a domain of 8 GiB populated but never written (time until
clean, RSS growth).
"""

from __future__ import annotations

import statistics
import time

import psutil

import xenheap
from xenheap import prim

GiB = 2**30


def clean_after_destroy(heap: xenheap.Heap, nbytes: int) -> float:
    """Seconds from destroying a domain of ``nbytes`` of written 2 MiB blocks to clean."""
    dom = heap.create_domain()
    blocks = [dom.alloc(9) for _ in range(nbytes >> 21)]  # held until the destroy
    for blk in blocks:
        blk.array()[:] = 7
    dom.destroy()
    start = time.perf_counter()
    if not heap.wait_clean(60):
        raise RuntimeError("not clean within 60 s")
    return time.perf_counter() - start


def destroy_time(mode: str) -> float:
    """Seconds to destroy 1 GiB of written 2 MiB blocks in scrub mode ``mode``."""
    with xenheap.Heap("1GiB", scrub=mode) as heap:
        dom = heap.create_domain()
        blocks = [dom.alloc(9) for _ in range(512)]  # held until the destroy
        for blk in blocks:
            blk.array()[:] = 3
        start = time.perf_counter()
        dom.destroy()
        return time.perf_counter() - start


def main() -> None:
    mapping = prim.map_anonymous(2 * GiB)
    address = prim.address_of(mapping)
    # Memory of the heap's kind: huge pages where offered (the arenas ask for them), and
    # resident.
    prim.advise_hugepage(address, 2 * GiB)
    prim.libc_memset(address, 1, 2 * GiB)
    cleans, memsets = [], []
    with xenheap.Heap("3GiB") as heap:
        clean_after_destroy(heap, 256 << 20)  # kernels loaded
        for r in range(5):
            for side in (("heap", "memset") if r % 2 == 0 else ("memset", "heap")):
                if side == "heap":
                    cleans.append(clean_after_destroy(heap, 2 * GiB))
                else:
                    start = time.perf_counter()
                    prim.libc_memset(address, 0, 2 * GiB)
                    memsets.append(time.perf_counter() - start)
    ratios = [c / m for c, m in zip(cleans, memsets, strict=True)]
    print(f"2 GiB clean after destroy: {statistics.median(cleans) * 1e3:.0f} ms; libc memset "
          f"of 2 GiB: {statistics.median(memsets) * 1e3:.0f} ms; ratio "
          f"{statistics.median(ratios):.2f} (rounds {min(ratios):.2f}-{max(ratios):.2f})")
    mapping.close()

    destroy_time("idle")
    times: dict[str, list[float]] = {"sync": [], "idle": []}
    for r in range(5):
        for mode in (("sync", "idle") if r % 2 == 0 else ("idle", "sync")):
            times[mode].append(destroy_time(mode))
    sync, idle = statistics.median(times["sync"]), statistics.median(times["idle"])
    print(f"destroy 1 GiB of written 2 MiB blocks: sync {sync * 1e3:.1f} ms, idle "
          f"{idle * 1e3:.2f} ms, {sync / idle:.0f}x")

    with xenheap.Heap("9GiB") as heap:
        dom = heap.create_domain()
        dom.populate("8GiB", order=9)
        process = psutil.Process()
        rss = process.memory_info().rss
        start = time.perf_counter()
        dom.destroy()
        clean = heap.wait_clean(60)
        elapsed = time.perf_counter() - start
        print(f"8 GiB populated, never written, destroyed: clean={clean} in "
              f"{elapsed * 1e3:.0f} ms, RSS +{(process.memory_info().rss - rss) / 2**20:.1f} "
              f"MiB, {heap.stats()['nodes'][0]['unmapped_pages']} pages dropped, not zeroed")
        heap.check()


if __name__ == "__main__":
    main()
