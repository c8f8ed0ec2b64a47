"""What xenheap is compared with.

The zeroing baselines are libc ``memset`` (the kernel the scrubber uses) and numpy
``fill(0)``, both run on the heap's own memory. The peers a user would otherwise pick for a
zeroed buffer are ``bytearray(n)``, ``numpy.zeros(n)`` and ``mmap.mmap(-1, n)``.
"""

from __future__ import annotations

import mmap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from xenheap import prim
from xenheap.tools.workload import MiB, rate

if TYPE_CHECKING:
    from xenheap.domain import Block, Domain

# What a buffer's user writes once (any non-zero byte; distinct from the workload's pattern).
WRITE_BYTE = 0x5A


# --- memory as (address, bytes) regions -------------------------------------------------------
def block_regions(blocks: Sequence[Block]) -> list[tuple[int, int]]:
    """(address, bytes) of each block, for memset. Valid only while the blocks are held."""
    return [(prim.address_of(blk.view()), blk.nbytes) for blk in blocks]


def coalesce(regions: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge address-adjacent regions: memset's best case is one call per contiguous run.

    (glibc switches to non-temporal stores for large calls; here that doubles its speed.)
    """
    runs: list[list[int]] = []
    for addr, nbytes in sorted(regions):
        if runs and runs[-1][0] + runs[-1][1] == addr:
            runs[-1][1] += nbytes
        else:
            runs.append([addr, nbytes])
    return [(addr, nbytes) for addr, nbytes in runs]


def _shares(regions: Sequence[tuple[int, int]], parts: int) -> list[list[tuple[int, int]]]:
    """Cut ``regions`` into ``parts`` lists of about equal bytes (page-aligned cuts)."""
    total = sum(n for _, n in regions)
    quota = -(-total // parts // prim.PAGE_SIZE) * prim.PAGE_SIZE
    shares: list[list[tuple[int, int]]] = [[] for _ in range(parts)]
    index, room = 0, quota
    for addr, nbytes in regions:
        while nbytes:
            take = min(nbytes, room)
            shares[index].append((addr, take))
            addr, nbytes, room = addr + take, nbytes - take, room - take
            if room == 0 and index < parts - 1:
                index, room = index + 1, quota
    return shares


@contextmanager
def scratch_regions(nbytes: int, chunk: int = 2 * MiB) -> Iterator[list[tuple[int, int]]]:
    """A faulted-in anonymous mapping of ``nbytes``, as (address, bytes) regions of ``chunk``.

    For measuring memset where no heap exists (``xenheap info``).
    """
    mapping = prim.map_anonymous(nbytes)
    arr = None
    try:
        arr = np.frombuffer(mapping, dtype=np.uint8)
        arr.fill(1)  # fault every page in: memset is to be timed, not the page faults
        base = int(arr.ctypes.data)
        arr = None
        yield [(base + off, min(chunk, nbytes - off)) for off in range(0, nbytes, chunk)]
    finally:
        # The view goes first, even when an interrupt came mid-fill (the traceback keeps
        # this frame): a mapping with a view of it alive cannot close (BufferError).
        arr = None
        mapping.close()


# --- zeroing by hand --------------------------------------------------------------------------
def memset_regions(regions: Sequence[tuple[int, int]], value: int = 0,
                   threads: int = 1) -> None:
    """libc memset over ``regions``, one call per region.

    With ``threads`` > 1 the regions are cut into that many equal shares zeroed at once
    (ctypes drops the GIL around each call, so they really run in parallel).
    """
    def zero(share: Sequence[tuple[int, int]]) -> None:
        for addr, nbytes in share:
            prim.libc_memset(addr, value, nbytes)

    if threads == 1:
        zero(regions)
        return
    workers = [threading.Thread(target=zero, args=(share,))
               for share in _shares(regions, threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def fill_zero(blocks: Sequence[Block]) -> None:
    """numpy ``fill(0)`` over every block (a fresh view each, so none outlives the call)."""
    for blk in blocks:
        blk.array("uint64").fill(0)


def _best_rate(nbytes: int, op: Callable[[], None], repeats: int) -> float | None:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        op()
        best = min(best, time.perf_counter() - start)
    return rate(nbytes, best)


def memset_bandwidth(regions: Sequence[tuple[int, int]], value: int = 0, threads: int = 1,
                     repeats: int = 1) -> float | None:
    """Bytes/s of :func:`memset_regions` (best of ``repeats``; None if too fast to time)."""
    return _best_rate(sum(n for _, n in regions),
                      lambda: memset_regions(regions, value, threads), repeats)


def numpy_fill_bandwidth(blocks: Sequence[Block], repeats: int = 1) -> float | None:
    """Bytes/s of :func:`fill_zero` (best of ``repeats``; None if too fast to time)."""
    return _best_rate(sum(blk.nbytes for blk in blocks), lambda: fill_zero(blocks), repeats)


# --- other zeroed buffers ---------------------------------------------------------------------
def buffer_peers(dom: Domain) -> dict[str, Callable[[int], None]]:
    """One call each: obtain a buffer of n bytes, write it once, release it.

    Every peer writes through a numpy uint8 array (its own, or a zero-copy view), so the
    write costs the same and only obtaining and releasing differ. Zeroed buffers, then two
    that need not be: xenheap's ``alloc(zero=False)`` (the domain's own old bytes, when it
    reuses a block) against ``numpy.empty``.
    """
    def xenheap_buffer(n: int) -> None:
        blk = dom.alloc_bytes(n)
        blk.array()[:n].fill(WRITE_BYTE)
        blk.free()

    def xenheap_unzeroed(n: int) -> None:
        blk = dom.alloc_bytes(n, zero=False)
        blk.array()[:n].fill(WRITE_BYTE)
        blk.free()

    def numpy_empty(n: int) -> None:
        np.empty(n, dtype=np.uint8).fill(WRITE_BYTE)

    def bytearray_buffer(n: int) -> None:
        buf = bytearray(n)
        np.frombuffer(buf, dtype=np.uint8).fill(WRITE_BYTE)

    def numpy_buffer(n: int) -> None:
        np.zeros(n, dtype=np.uint8).fill(WRITE_BYTE)

    def mmap_buffer(n: int) -> None:
        buf = mmap.mmap(-1, n)
        np.frombuffer(buf, dtype=np.uint8).fill(WRITE_BYTE)  # the view dies with the statement
        buf.close()

    return {"xenheap": xenheap_buffer, "bytearray": bytearray_buffer,
            "numpy.zeros": numpy_buffer, "mmap": mmap_buffer,
            "xenheap zero=False": xenheap_unzeroed, "numpy.empty": numpy_empty}
