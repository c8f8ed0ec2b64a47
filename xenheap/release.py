"""Giving clean free memory back to the OS (``Heap.release_unused``).

Whole free chunks, highest orders first, are claimed off their lists (native_kernels.
release), each resident one is dropped with MADV_DONTNEED, and all go back to their lists,
clean: memory dropped that way reads zero when touched again.
"""

from __future__ import annotations

import logging

import numpy as np

from native_kernels import api
from native_kernels.layout import PAGE_SIZE
from native_kernels.release import (
    C_MFN,
    C_ORDER,
    C_RELEASED,
    CHUNK_UNUSED,
    CLAIM_FIELDS,
    claim_clean_chunks,
    return_claimed_chunks,
)
from xenheap import prim
from xenheap.core import HeapCore
from xenheap.errors import HeapClosed, ReleaseFailed

__all__ = ["release_unused"]

log = logging.getLogger(__name__)

RELEASE_BATCH = 4096  # chunks claimed per step


def release_unused(core: HeapCore, limit: int) -> int:
    """Give up to ``limit`` pages of clean free memory back to the OS; the bytes given back
    (Heap.release_unused documents the rest). The caller allows one call at a time, and
    numpy's default allocator for its arrays (default_numpy_memory)."""
    released = [0]
    meta = core.state["meta"]
    if not api.enter_heap(meta):  # held across the OS calls: close() waits for them
        raise HeapClosed(core.closed_reason)
    try:
        for node in range(core.nodes):
            if released[0] < limit:
                _release_node(core, node, limit - released[0], released)
    except OSError as exc:
        raise ReleaseFailed(f"release_unused gave back {released[0] * PAGE_SIZE} "
                            f"bytes, then the OS refused: {exc}",
                            released[0] * PAGE_SIZE) from exc
    finally:
        api.leave_heap(meta)
        if core.debug:
            core.wake((1 << core.nodes) - 1)  # released pages came back dirty
    log.debug("released %d pages to the OS", released[0])
    return released[0] * PAGE_SIZE


def _release_node(core: HeapCore, node: int, limit: int, released: list[int]) -> None:
    """release_unused for one node; adds the pages given to the OS to ``released[0]``."""
    arena = core.arenas[node]
    base = node * core.pages_per_node
    batches = []
    pages = 0
    try:
        # Claim all the chunks first: one given back goes to its list's head, where the
        # next claim would take it again. A batch is listed before it is filled, so an
        # interrupt anywhere still finds every claimed chunk in the finally below.
        claimed = 0
        while claimed < limit:
            chunks = np.full((RELEASE_BATCH, CLAIM_FIELDS), CHUNK_UNUSED, dtype=np.int64)
            batches.append(chunks)
            count = claim_clean_chunks(core.hs, node, limit - claimed, chunks)
            claimed += int((1 << chunks[:count, C_ORDER]).sum())
            if count < RELEASE_BATCH:
                break
        for chunks in batches:
            for row in chunks:
                if row[C_ORDER] == CHUNK_UNUSED:
                    break
                addr = arena.address + (int(row[C_MFN]) - base) * PAGE_SIZE
                size = PAGE_SIZE << int(row[C_ORDER])
                resident = prim.resident_pages(addr, size)
                if resident:
                    prim.release_pages(addr, size)
                    row[C_RELEASED] = 1
                    pages += resident
    finally:
        released[0] += pages
        for i, chunks in enumerate(batches):
            return_claimed_chunks(core.hs, node, chunks, 0 if i else pages)
