"""A bounded soak: 4 threads per core doing random alloc/free/destroy under quotas while the
scrubbers run, with check() every few seconds. The default run soaks for a few seconds; the
long one is marked slow (``pytest -m slow -s tests/test_soak.py``; XENHEAP_SOAK_S sets its
length) and prints operations per second, p99 latency and the page accounting."""

import os
import random
import threading
import time

import numpy as np
import pytest

import xenheap

CHECK_EVERY_S = 2.0


def soak(seconds: float, threads: int, size: str = "128MiB") -> dict:
    """Run the soak; returns its figures. Raises AssertionError on any broken invariant."""
    errors: list[str] = []
    latencies: list[np.ndarray] = []
    ops = [0] * threads
    drift: list[tuple[int, int]] = []
    with xenheap.Heap(size, nodes=[[0], [1], []]) as heap:
        quota = heap.total_pages * heap.page_size // threads
        stop = threading.Event()

        def worker(index: int) -> None:
            rng = random.Random(index)
            lat = np.zeros(200_000, dtype=np.int64)
            n = 0
            dom = heap.create_domain(f"soak-{index}", max_bytes=quota)
            held = []
            try:
                while not stop.is_set():
                    roll = rng.random()
                    start = time.perf_counter_ns()
                    if roll < 0.55:
                        try:
                            blk = dom.alloc(rng.randrange(0, 7))
                        except MemoryError:
                            blk = None
                        if blk is not None:
                            arr = blk.array()
                            if arr[0] or arr[-1] or arr.any():
                                errors.append(f"dirty block {blk}")
                            arr[::512] = index + 1
                            held.append(blk)
                    elif roll < 0.97 and held:
                        held.pop(rng.randrange(len(held))).free()
                    elif roll >= 0.97:
                        dom.destroy()
                        dom = heap.create_domain(f"soak-{index}", max_bytes=quota)
                        held = []
                    if n < lat.shape[0]:
                        lat[n] = time.perf_counter_ns() - start
                    n += 1
                dom.destroy()
            except Exception as exc:  # reported by the caller
                errors.append(repr(exc))
            ops[index] = n
            latencies.append(lat[:min(n, lat.shape[0])])

        workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        began = time.perf_counter()
        for t in workers:
            t.start()
        deadline = began + seconds
        while time.perf_counter() < deadline and not errors:
            time.sleep(min(CHECK_EVERY_S, max(0.0, deadline - time.perf_counter())))
            stats = heap.stats()
            drift.append((stats["free_pages"] + stats["allocated_pages"], stats["total_pages"]))
        stop.set()
        for t in workers:
            t.join(60)
        elapsed = time.perf_counter() - began
        assert not any(t.is_alive() for t in workers), "deadlock"
        assert errors == []
        heap.check()
        stats = heap.stats()
        assert stats["free_pages"] == stats["total_pages"]
        assert all(total == expected for total, expected in drift)
        assert heap.wait_clean(30)
        heap.check()
        lat = np.concatenate(latencies)
        return {
            "seconds": elapsed,
            "threads": threads,
            "operations": sum(ops),
            "ops_per_second": sum(ops) / elapsed,
            "p50_us": float(np.percentile(lat, 50)) / 1e3,
            "p99_us": float(np.percentile(lat, 99)) / 1e3,
            "accounting_samples": len(drift),
            "aborts": sum(n["aborts"] for n in stats["nodes"]),
        }


def test_short_soak():
    figures = soak(3.0, threads=4 * (os.cpu_count() or 1))
    assert figures["operations"] > 0


@pytest.mark.slow
def test_long_soak(capsys):
    figures = soak(float(os.environ.get("XENHEAP_SOAK_S", "120")),
                   threads=4 * (os.cpu_count() or 1))
    with capsys.disabled():
        print("\nsoak:", figures)
    assert figures["accounting_samples"] > 0
