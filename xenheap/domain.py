"""Domains (tenants, sessions, guests): owners of blocks, destroyed with all they hold at once."""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import TYPE_CHECKING

import numpy as np

from native_kernels import api
from native_kernels.domain_life import domain_row
from native_kernels.layout import (
    D_ID,
    D_PARKED_COUNT,
    D_PARKED_NS,
    E_BAD_FREE,
    E_CORRUPT,
    E_DEAD,
    E_FAULT,
    E_NOMEM,
    E_QUOTA,
    NUMPY_PARK_ORDERS,
    PAGE_SHIFT,
)
from xenheap.block import Block
from xenheap.collect import domain_stats
from xenheap.domain_record import DomainRecord
from xenheap.errors import (
    DomainDead,
    HeapClosed,
    HeapCorruption,
    InvalidArgument,
    InvalidFree,
    OutOfMemory,
)
from xenheap.giveback import (
    destroy_record,
    flush_reuse,
    fold_reuse_counters,
    free_dropped,
)
from xenheap.numpy_api import default_numpy_memory
from xenheap.reuse import (
    FREED_ALREADY,
    HEAP_TAG_MASK,
    NOT_ISSUED,
    PARKED,
    REUSE_MAX_ORDER,
    ReuseCache,
)
from xenheap.sizes import format_size, parse_size
from xenheap.stats import DomainStats

if TYPE_CHECKING:
    from collections.abc import Callable

    from xenheap.core import HeapCore
    from xenheap.heap import Heap

log = logging.getLogger(__name__)

_MFN_MASK = 0xFFFFFFFF
# From this order up (256 KiB) a call may zero enough memory to be worth releasing the GIL
# for (native_kernels/api.py says why small calls keep it).
LONG_ORDER = 6
_NO_ROWS = np.empty((0, 2), dtype=np.int64)  # populate: no handles wanted


def _check_zero(zero: object) -> bool:
    """``zero`` as a bool; a numpy bool counts, anything else (None, 0, "no") is refused:
    read as truth values, they would hand out unzeroed memory by accident."""
    if isinstance(zero, np.bool_):
        return bool(zero)
    raise InvalidArgument(f"zero must be a bool, got {zero!r}")


def _orphaned(core: HeapCore, rec: DomainRecord) -> None:
    """A domain collected without a destroy: its record is queued for one, and its numpy
    handler let go. Nobody can install that handler again (arrays made with it hold their
    own reference), and kept, its entry in numpy_alloc.live_handlers would keep the heap's
    core, which queues the record, alive for good: a heap dropped with such a domain would
    never be collected."""
    rec.capsule = None
    core.orphans.append(rec)


# xenheap.numpy_alloc.numpy_allocator, imported on first use (which compiles the callbacks)
_numpy_allocator: Callable[[Domain], contextlib.AbstractContextManager[Domain]] | None = None


class Domain:
    """An owner of memory; destroying it gives all its memory back at once.

    Also a context manager: destroyed on exit; and destroyed too once collected (nothing
    refers to it, nor to its blocks). Its state beyond the public attributes is in
    ``record`` (xenheap.domain_record), which the package's other modules share; what they
    ask of domains are this module's functions (``parked_numpy_since``, ``numpy_handler``)
    and xenheap.giveback's (dropped handles, parked blocks, collected domains).
    """

    def __init__(self, heap: Heap, slot: int, dom_id: int, name: str | None,
                 max_pages: int) -> None:
        self.heap = heap
        self.core = heap.core  # the heap's internal surface (xenheap.core), not for users
        self.id = dom_id
        self.name = name if name is not None else f"d{dom_id}"
        core = self.core
        self.record = DomainRecord(
            slot, dom_id, max_pages,
            ReuseCache(heap.reuse_bytes, core.page_views) if core.reuse_blocks else None,
            core.charges.opened(dom_id, self.name))
        # Collected without a destroy: queued for one (nothing may wait for a lock in the
        # garbage collector). The record must not refer back to this object.
        self._collected = weakref.finalize(self, _orphaned, core, self.record)
        self._collected.atexit = False

    # --- state -------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """True until the domain is destroyed (or its heap closed)."""
        return not self.record.destroyed and not self.heap.closed

    @property
    def slot(self) -> int:
        """The domain's row in the heap's domain table (``heap.core.state["doms"]``), which
        a later domain may reuse once this one is laid to rest: with ``id``, what the
        kernels know it by."""
        return self.record.slot

    @property
    def pages(self) -> int:
        """Pages the domain holds now."""
        return self.stats()["pages"]

    @property
    def max_bytes(self) -> int | None:
        """The domain's quota in bytes, or None."""
        max_pages = self.record.max_pages
        return max_pages * self.heap.page_size if max_pages else None

    def stats(self) -> DomainStats:
        """Bytes held now, at the peak and ever (pyarrow's names), allocations, frees, pages
        and blocks held, the quota in pages, and pages held by live numpy arrays (which
        outlive a destroy until numpy frees them). A destroyed domain keeps its figures.
        Every field is in xenheap.stats."""
        rec = self.record
        self._free_dropped_now()
        if rec.destroyed:
            self.core.relinquish()
        with default_numpy_memory():  # its working arrays never come from this domain
            return domain_stats(self)

    def _free_dropped_now(self) -> None:
        """Free the blocks of dropped handles, before figures are read: also while another
        thread frees the last of them, by waiting for it (free_dropped)."""
        rec = self.record
        if rec.dropped or rec.dropping.locked():
            free_dropped(self)

    # --- allocation ----------------------------------------------------------------------
    def _raise_for(self, code: int, what: str) -> None:
        if code == E_DEAD:
            raise DomainDead(f"{self!r} was destroyed")
        if code == E_QUOTA:  # exact bytes: a rounded size may read as "full" when it is not
            quota = self.record.max_pages * self.heap.page_size
            raise OutOfMemory(
                f"{what} would exceed the quota of domain {self.name!r} ({quota} bytes, "
                f"{format_size(quota)}; it holds {self.pages * self.heap.page_size} bytes, "
                "parked blocks included)"
            )
        if code == E_FAULT:
            raise OutOfMemory(f"{what}: ran dry (injected fault)")
        if code == E_CORRUPT:
            raise HeapCorruption(
                f"{what}: a clean page did not carry the scrub pattern "
                "(written after free, or never scrubbed)"
            )
        raise OutOfMemory(f"{what}: no free memory large enough")

    def alloc(self, order: int = 0, node: int | None = None, zero: bool = True) -> Block:
        """A block of 2**order contiguous pages (from ``node`` only, if given).

        Zeroed, unless ``zero=False`` (Xen's MEMF_no_scrub): then a block this domain freed
        may come back holding its old bytes. It never holds another domain's.
        """
        if zero is not True and zero is not False:
            zero = _check_zero(zero)
        rec = self.record
        if rec.dropped:
            free_dropped(self)
        core = self.core
        reuse = rec.reuse
        if (reuse is not None and node is None and type(order) is int
                and 0 <= order <= REUSE_MAX_ORDER):
            if core.closed:  # before the lock: a forked child's copy may be held
                raise HeapClosed(core.closed_reason)
            entry = reuse.take(order, zero)
            if entry is not None:
                return Block(self, entry[0], order, entry[1], True)
        order = core.check_order(order)
        pref, exact = core.placement(node)
        kernel = api.heap_alloc if order >= LONG_ORDER else api.heap_alloc_short
        packed = self._call_making_room(1 << order, kernel, rec.slot, rec.id, order, pref,
                                        exact)
        if packed < 0:
            self._raise_for(packed, f"alloc(order={order})")
        mfn = packed & _MFN_MASK
        if reuse is not None:
            reuse.issue(mfn, order, packed >> 32)
        return Block(self, mfn, order, packed >> 32, True)

    def _call_making_room(self, pages: int, kernel, *args):
        """core.call(kernel, *args), which allocates ``pages``; if the quota or the heap was
        short, give parked blocks back (this domain's, or every domain's) and try once more.
        Not when the quota could not take ``pages`` even with none parked: a refused call
        changes nothing."""
        core = self.core
        got = core.call(kernel, *args)
        if got == E_QUOTA:
            if self._room_without_parked(pages):  # which frees dropped handles first
                flush_reuse(core, self)
                got = core.call(kernel, *args)
        elif got == E_NOMEM and flush_reuse(core):
            got = core.call(kernel, *args)
        return got

    def _room_without_parked(self, pages: int) -> bool:
        """Whether the quota takes ``pages`` more once the parked blocks are given back."""
        rec = self.record
        self._free_dropped_now()
        # A return in flight took its blocks out of the cache but has not freed them yet:
        # read between returns, or those blocks count as held (parked ones are excluded).
        with rec.returning, default_numpy_memory():
            held = domain_stats(self)["bytes_allocated"] // self.heap.page_size
        return held + pages <= rec.max_pages

    def alloc_many(self, count: int, order: int = 0, node: int | None = None) -> list[Block]:
        """``count`` zeroed blocks of 2**order pages in one call, all or nothing."""
        if self.record.dropped:
            free_dropped(self)
        heap, core = self.heap, self.core
        order = core.check_order(order)
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise InvalidArgument(f"count must be a positive int, got {count!r}")
        count = int(count)
        if count << order > heap.total_pages:
            raise OutOfMemory(f"alloc_many({count}, order={order}) exceeds the whole heap")
        pref, exact = core.placement(node)
        with default_numpy_memory():
            out = np.empty((count, 2), dtype=np.int64)
        got = self._call_making_room(count << order, api.heap_alloc_many, self.record.slot,
                                     self.id, count, order, pref, exact, out)
        if got < 0:
            self._raise_for(got, f"alloc_many({count}, order={order})")
        rows = out.tolist()
        reuse = self.record.reuse
        if reuse is not None:
            for mfn, tag in rows:
                reuse.issue(mfn, order, tag)
        return [Block(self, mfn, order, tag, True) for mfn, tag in rows]

    def order_for(self, nbytes: int | str) -> int:
        """The smallest order whose block holds ``nbytes`` bytes."""
        if type(nbytes) is int and 0 < nbytes <= self.core.max_block_bytes:  # nothing to check
            return ((nbytes - 1) >> PAGE_SHIFT).bit_length()
        size = parse_size(nbytes, what="nbytes")
        if size == 0:
            raise InvalidArgument("nbytes must be positive")
        order = ((size - 1) >> PAGE_SHIFT).bit_length()
        self.core.check_order(order, what=f"nbytes={size}")
        return order

    def alloc_bytes(self, nbytes: int | str, node: int | None = None,
                    zero: bool = True) -> Block:
        """A block of the smallest order that holds ``nbytes`` bytes (see alloc)."""
        return self.alloc(self.order_for(nbytes), node, zero)

    def populate(self, nbytes: int | str, order: int = 0, node: int | None = None) -> int:
        """Allocate enough 2**order blocks to hold ``nbytes``, in one call, all or nothing.

        Returns the number of blocks; they stay with the domain until it is destroyed.
        """
        if self.record.dropped:
            free_dropped(self)
        heap, core = self.heap, self.core
        order = core.check_order(order)
        size = parse_size(nbytes, what="nbytes")
        if size == 0:
            raise InvalidArgument("nbytes must be positive")
        block_bytes = heap.page_size << order
        count = -(-size // block_bytes)
        if count << order > heap.total_pages:
            raise OutOfMemory(f"populate({format_size(size)}) exceeds the whole heap "
                              f"({format_size(heap.total_pages * heap.page_size)})")
        pref, exact = core.placement(node)
        got = self._call_making_room(count << order, api.heap_alloc_many, self.record.slot,
                                     self.id, count, order, pref, exact, _NO_ROWS)
        if got < 0:
            self._raise_for(got, f"populate({format_size(size)}, order={order})")
        return got

    def free(self, blk: Block) -> None:
        """Give ``blk`` back to the heap; refused (nothing changed) if it is not ours to free."""
        if not isinstance(blk, Block):
            raise InvalidFree(f"not a Block: {blk!r}")
        if blk.domain is not self:
            if blk.domain.heap is not self.heap:
                raise InvalidFree(f"{blk!r} belongs to another heap")
            raise InvalidFree(f"{blk!r} belongs to domain {blk.domain.id}, not {self.id}")
        heap, core, rec = self.heap, self.core, self.record
        reuse = rec.reuse
        if reuse is not None and not core.closed:  # the cache claims the block, parked or not
            parked = reuse.give(blk)
            if parked == PARKED:
                return
            if parked == FREED_ALREADY:
                raise InvalidFree(f"double free of {blk!r}")
            if parked == NOT_ISSUED:
                if core.closed:  # closed meanwhile: its cache forgot the blocks it issued
                    raise HeapClosed(core.closed_reason)
                if rec.destroyed:
                    raise InvalidFree(f"{blk!r} belongs to destroyed {self!r}")
                raise InvalidFree(f"{blk!r} is stale: it is no longer a block of {self!r}")
        if blk.freed:
            raise InvalidFree(f"double free of {blk!r}")
        # Only "sync" and debug mode write the block on free.
        long = blk.order >= LONG_ORDER and (heap.scrub_mode == "sync" or heap.debug)
        kernel = api.heap_free if long else api.heap_free_short
        code = core.call(kernel, rec.slot, rec.id, blk.mfn, blk.order,
                         blk.tag & HEAP_TAG_MASK)
        if code == E_DEAD:
            raise InvalidFree(f"{blk!r} belongs to destroyed {self!r}")
        if code == E_BAD_FREE:
            raise InvalidFree(f"{blk!r} is stale: it is no longer a block of {self!r}")
        blk.freed = True
        if code:
            core.wake(1 << core.node_of(blk.mfn))

    def destroy(self) -> None:
        """Free all the domain's memory. Returns at once: the first scrubber's thread frees
        the blocks right after (Xen's relinquish_memory), dirty, for the scrubbers. In
        "sync" mode every page is zeroed before this returns; in "alloc" and debug mode
        the blocks are freed (and poisoned) before it returns. A domain collected without
        a destroy (nothing refers to it, nor to its blocks) is destroyed at the heap's next
        chore or statistics call."""
        core, rec = self.core, self.record
        core.refuse_if_forked()  # before the cache's lock: a parent thread may hold it
        reuse = rec.reuse
        # Parked blocks are on the domain's list: they go with it. Under ``returning``, so
        # that a return of parked blocks in flight first frees them and counts them
        # returned: else the destroy would free them again, and count them freed twice.
        # close() also waits on it, for each live domain, before it stops the kernels: a
        # destroy that found the heap open is never cut off halfway.
        with rec.returning:
            with core.lock:  # where close() sets it: a refused destroy changes nothing
                if core.closed:
                    raise HeapClosed(core.closed_reason)
                records = reuse.retire() if reuse is not None else None
            self._collected.detach()
            destroy_record(core, rec, records, who=self)
            with core.lock:  # off the live list with its reuse counters, once
                if self in core.domains:
                    core.domains.discard(self)
                    fold_reuse_counters(core, reuse)

    def numpy_allocator(self) -> contextlib.AbstractContextManager[Domain]:
        """``with dom.numpy_allocator():`` numpy arrays created in this thread or asyncio
        task take their data from this domain (numpy's NEP 49 handler, a context variable).

        Arrays may outlive the block and the domain: a destroyed domain's blocks that live
        arrays use are freed (dirty) when numpy frees those arrays. Allocation failures,
        the quota included, surface as numpy's usual MemoryError.
        """
        global _numpy_allocator
        if _numpy_allocator is None:  # once: an import here cost 0.9 us of a 2.4 us block
            from xenheap.numpy_alloc import numpy_allocator

            _numpy_allocator = numpy_allocator
        return _numpy_allocator(self)

    def __enter__(self) -> Domain:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.alive:
            self.destroy()

    def __repr__(self) -> str:
        state = "alive" if self.alive else "destroyed"
        return f"<Domain {self.id} {self.name!r} {state}>"


def parked_numpy_since(dom: Domain, stale: float) -> bool:
    """numpy blocks are parked and none was parked after ``stale`` (time.monotonic)."""
    rec = dom.record
    if rec.capsule is None:
        return False
    row = domain_row(dom.core.state["doms"], rec.slot)
    return bool(row[D_ID] == rec.id and row[D_PARKED_NS] < stale * 1e9
                and row[D_PARKED_COUNT:D_PARKED_COUNT + NUMPY_PARK_ORDERS].any())


def numpy_handler(dom: Domain) -> object:
    """The domain's "mem_handler" capsule, made once; HeapClosed or DomainDead if the heap
    closed or the domain was destroyed meanwhile."""
    rec = dom.record
    capsule = rec.capsule
    if capsule is None:
        from xenheap.numpy_alloc import make_handler

        capsule = rec.capsule = make_handler(dom)
        # A close() or destroy() drops the record's handler after it sets the flag read
        # here: one of the two sees this handler, which would keep the arenas mapped.
        if dom.core.closed or rec.destroyed:
            rec.capsule = None
            if dom.core.closed:
                raise HeapClosed(dom.core.closed_reason)
            raise DomainDead(f"{dom!r} was destroyed")
    return capsule
