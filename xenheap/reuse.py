"""A domain's cache of its own freed blocks, reused without zeroing them for privacy.

Isolation is between domains: a block that only one domain ever wrote may go back to that
domain without anyone scrubbing it. So ``Domain.free`` parks small blocks here, LIFO per
order (the last freed is the one still in the CPU's caches), and ``Domain.alloc`` takes
them back: zeroed in place with ordinary stores (the caller writes the block next, so the
stores warm the cache instead of bypassing it), or as they are with ``zero=False`` (Xen's
MEMF_no_scrub: the domain's own old bytes, never another's).

A parked block stays on the domain's block list in the heap, so it counts against the
domain's quota and goes back dirty with everything else when the domain is destroyed. It is
not counted in ``bytes_allocated`` (what the user holds) but in ``cached_bytes``. The cache
is bounded per order (``Heap(reuse_bytes=...)``), is given back to the heap (dirty, for the
scrubbers) when an allocation finds the heap or the quota short, and after REUSE_IDLE_S
without use (as the heap's periodic chore sees it), so the dirty-lifetime bound still
covers memory a domain stopped using.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from native_kernels.layout import PAGE_SIZE, PG_ORDER, PG_OWNER, PG_TAG

if TYPE_CHECKING:
    from xenheap.domain import Block

REUSE_MAX_ORDER = 9  # blocks up to 2 MiB; larger ones are better zeroed by the scrubbers
DEFAULT_REUSE_BYTES = 4 << 20  # at most this many bytes parked per order (Heap reuse_bytes)
REUSE_IDLE_S = 0.25  # a cache unused this long goes back to the heap

_ZEROS_ORDERS = 4
_ZEROS = tuple(bytes(PAGE_SIZE << order) for order in range(_ZEROS_ORDERS))

# The views' key: a block's mfn and order in one int (orders stay below 2**6).
VIEW_KEY_SHIFT = 6

# A handle's tag: the heap's tag for the block (PG_TAG) in these bits, and above them the
# cache's generation, new each time the cache hands the block out again. The heap gives a
# block a new tag each time it hands it out; the cache keeps it, and without the generation
# an old handle (a copy, one made by hand) would name the block's next life as well.
HEAP_TAG_MASK = 0xFFFF_FFFF

PARKED = 0
NOT_PARKED = 1
FREED_ALREADY = 2
NOT_ISSUED = 3


class ReuseCache:
    """Freed blocks of one domain, by order: (mfn, tag) entries.

    ``make_view(mfn, order)`` gives a block's bytes as a uint8 numpy array.
    """

    __slots__ = ("_generation", "_lists", "_make_view", "_room", "_settling",
                 "closed", "hit_pages", "hits", "issued", "lock", "memoryviews", "parks",
                 "quiet_since", "returned", "uses_seen", "views")

    def __init__(self, bytes_per_order: int,
                 make_view: Callable[[int, int], np.ndarray]) -> None:
        # Blocks each order may park: at most bytes_per_order of them.
        self._room = [bytes_per_order // (PAGE_SIZE << order)
                      for order in range(REUSE_MAX_ORDER + 1)]
        self._make_view = make_view
        # (mfn, order, tag) of the live blocks. A free claims its block by removing it, one
        # atomic step whichever path the free takes, so two frees never both succeed.
        self.issued: set[tuple[int, int, int]] = set()
        # uint8 views of blocks by view_key(mfn, order), made once and kept while a block
        # cycles between the user and the cache (a view costs more to make than a 4 KiB
        # block to zero). Kept here, never by a handle, so that closing the heap can drop
        # them all. Keyed by order too, so that a view found always has the block's size.
        self.views: dict[int, np.ndarray] = {}
        self.memoryviews: dict[int, memoryview] = {}  # the same, to zero small blocks
        # Counted under the lock, for the statistics: blocks (and their pages) taken back,
        # and blocks parked; an allocation or a free all the same to the user.
        self.hits = 0
        self.hit_pages = 0
        self.parks = 0
        self.returned = 0  # parked blocks that went on to the heap: the kernel counts them too
        self._lists: list[list[tuple[int, int]]] = [[] for _ in range(REUSE_MAX_ORDER + 1)]
        # Taken by the owner's alloc and free and by whoever drains the cache (pressure,
        # idleness, destroy), so an entry is never in flight while the block goes back.
        # acquire()/release() rather than "with": half the cost on this path. Allocations
        # and frees never wait for it (see take and give).
        self.lock = threading.Lock()
        self._generation = 0  # of the last block handed out again (HEAP_TAG_MASK)
        # Blocks freed in the heap while the lock was busy, by view_key: the next holder of
        # the lock drops their views (_settle).
        self._settling: collections.deque[int] = collections.deque()
        self.closed = False
        # When the chore last saw hits or parks move (quiet_for): the clock is read once
        # a tick, not on every free.
        self.uses_seen = 0
        self.quiet_since = time.monotonic()

    def view(self, mfn: int, order: int) -> np.ndarray:
        """Block (mfn, order)'s bytes as a uint8 array, made once."""
        key = mfn << VIEW_KEY_SHIFT | order
        u8 = self.views.get(key)
        if u8 is None:
            u8 = self.views[key] = self._make_view(mfn, order)
        return u8

    def zeroer(self, mfn: int, order: int) -> memoryview:
        """Block (mfn, order)'s bytes as a memoryview, made once (see ``view``)."""
        key = mfn << VIEW_KEY_SHIFT | order
        mv = self.memoryviews.get(key)
        if mv is None:
            mv = self.memoryviews[key] = self.view(mfn, order).data
        return mv

    def take(self, order: int, zero: bool) -> tuple[int, int] | None:
        """The block of ``order`` parked last, recorded as handed out and zeroed if
        ``zero`` (ordinary stores: the caller writes it next); None if there is none, or
        if another thread holds the lock: the heap then serves the allocation.

        Waiting would cost far more. The holder is a thread that lost the GIL inside the
        lock; the waiter gives up the GIL to block, then holds the lock waiting for the
        GIL, and from then on the two threads hand both back and forth on every call: two
        threads allocating from one domain ran at half one thread's rate.
        """
        lock = self.lock
        if not lock.acquire(False):  # positional: a keyword costs this path 5%
            return None
        try:
            if self._settling:
                self._settle()
            entries = self._lists[order]
            if not entries or self.closed:
                return None  # a domain that only takes empties its cache: no clock needed
            mfn, tag = entries.pop()
            self._generation += 1
            tag = (tag & HEAP_TAG_MASK) | self._generation << 32
            self.issued.add((mfn, order, tag))
            self.hits += 1
            self.hit_pages += 1 << order
            if zero:  # under the lock: a drain must not give the block back meanwhile
                if order < _ZEROS_ORDERS:  # copying zeros beats numpy's fill below 32 KiB
                    mv = self.memoryviews.get(mfn << VIEW_KEY_SHIFT | order)  # zeroer(), inlined
                    if mv is None:
                        mv = self.zeroer(mfn, order)
                    mv[:] = _ZEROS[order]
                else:
                    self.view(mfn, order).fill(0)
            return mfn, tag
        finally:
            lock.release()

    def issue(self, mfn: int, order: int, tag: int) -> None:
        """Record a block the heap just handed out through the Python API."""
        self.issued.add((mfn, order, tag))

    def give(self, blk: Block) -> int:
        """Take back block ``blk`` that the Python API frees: claimed in ``issued``, and
        parked if there is room.

        PARKED: kept for reuse (and marked freed, under the lock). NOT_PARKED: the caller
        frees it in the heap (closed cache, order too large, full, or the lock busy).
        FREED_ALREADY: a double free. NOT_ISSUED: not a live block that this domain handed
        out (a stale or hand-made handle, or one that another free claimed first); nothing
        changed. Parking trusts only what the domain recorded, never the handle: a forged
        (mfn, order) parked here would hand out another domain's memory.
        """
        order = blk.order
        mfn = blk.mfn
        lock = self.lock
        if not lock.acquire(False):
            return self._give_busy(blk)
        try:
            if self._settling:
                self._settle()
            if blk.freed:
                return FREED_ALREADY
            try:
                self.issued.remove((mfn, order, blk.tag))
            except KeyError:
                return NOT_ISSUED
            if (order > REUSE_MAX_ORDER or self.closed
                    or len(self._lists[order]) >= self._room[order]):
                self._forget_views(mfn << VIEW_KEY_SHIFT | order)
                return NOT_PARKED
            blk.freed = True
            self.parks += 1
            self._lists[order].append((mfn, blk.tag))
            return PARKED
        finally:
            lock.release()

    def _give_busy(self, blk: Block) -> int:
        """give() while another thread holds the lock (see take): the block is claimed
        as in give, but never parked; the caller frees it in the heap. Its views go at
        the next holder of the lock."""
        if blk.freed:
            return FREED_ALREADY
        try:
            self.issued.remove((blk.mfn, blk.order, blk.tag))
        except KeyError:
            return NOT_ISSUED
        self._settling.append(blk.mfn << VIEW_KEY_SHIFT | blk.order)
        return NOT_PARKED

    def _settle(self) -> None:
        """Drop the views of the blocks that _give_busy let go (caller holds the lock);
        a block the heap has handed out again only makes its view anew."""
        settling = self._settling
        while settling:
            self._forget_views(settling.popleft())

    def _take_all(self) -> list[tuple[int, tuple[int, int]]]:
        """Every parked block out, as (order, (mfn, tag)), their views dropped (the caller
        holds the lock)."""
        self._settle()
        out = [(order, e) for order, entries in enumerate(self._lists) for e in entries]
        for entries in self._lists:
            entries.clear()
        for order, (mfn, _tag) in out:
            self._forget_views(mfn << VIEW_KEY_SHIFT | order)
        return out

    def drain(self, close: bool = False) -> list[tuple[int, tuple[int, int]]]:
        """Take every parked block out: (order, (mfn, tag)) pairs for the caller to free in
        the heap. ``close`` (the heap closes): none is taken out, and none parked or taken
        afterwards; the views go, and the parked blocks stay listed for the statistics,
        which a closed heap answers with the figures it was left with."""
        with self.lock:
            if not close:
                return self._take_all()
            self._settle()
            self.closed = True
            self.issued.clear()
            for mv in self.memoryviews.values():
                mv.release()
            self.memoryviews.clear()
            self.views.clear()
        return []

    def drain_now(self) -> list[tuple[int, tuple[int, int]]]:
        """drain() without waiting: nothing if another thread holds the lock, or this one
        (the caller may run inside the garbage collector, within take or give). The blocks
        count as returned at once: the caller frees them in the heap, or their domain's
        destroy does."""
        if not self.lock.acquire(False):
            return []
        try:
            out = self._take_all()
            self.returned += len(out)
        finally:
            self.lock.release()
        return out

    def retire(self) -> tuple[set | dict, ...]:
        """Close the cache for its domain's destroy: the parked blocks go with the domain.
        Returns the per-block records (issued blocks, views) for the caller to drop
        later: freeing one record per block the domain ever held would cost the destroy
        more than the rest of it."""
        with self.lock:
            self._settle()
            self.closed = True
            self.returned += sum(map(len, self._lists))
            self._lists = [[] for _ in range(REUSE_MAX_ORDER + 1)]
            records = (self.issued, self.views, self.memoryviews)
            self.issued, self.views, self.memoryviews = set(), {}, {}
        return records

    def parked_not_owned(self, owner: int, ft32: np.ndarray, ft8: np.ndarray) -> int | None:
        """For Heap.check: the first parked block (its mfn) that the frame table does not
        show as a block of ``owner`` (its domain's slot + 1) of the order and heap tag it
        was parked with, or that is parked twice; None if there is none."""
        with self.lock:
            seen: set[int] = set()
            for order, entries in enumerate(self._lists):
                for mfn, tag in entries:
                    if (mfn in seen or ft32[PG_OWNER, mfn] != owner
                            or ft32[PG_TAG, mfn] != tag & HEAP_TAG_MASK
                            or ft8[PG_ORDER, mfn] != order):
                        return mfn
                    seen.add(mfn)
        return None

    def _forget_views(self, key: int) -> None:
        """Drop the views of the block with view key ``key``: it goes back to the heap
        (caller holds the lock)."""
        mv = self.memoryviews.pop(key, None)
        if mv is not None:
            mv.release()
        self.views.pop(key, None)

    def quiet_for(self, now: float) -> float:
        """Seconds (by ``now``, time.monotonic) since hits or parks last moved, as seen by
        the periodic chore that calls this: a cache unused for REUSE_IDLE_S goes back."""
        uses = self.hits + self.parks
        if uses != self.uses_seen:
            self.uses_seen = uses
            self.quiet_since = now
        return now - self.quiet_since

    def count_returned(self, blocks: int) -> None:
        """``blocks`` drained blocks went on to the heap (freed there, or with a destroy)."""
        with self.lock:
            self.returned += blocks

    def cached_bytes(self) -> int:
        """Bytes parked now."""
        return sum(len(entries) << order for order, entries in enumerate(self._lists)) \
            * PAGE_SIZE
