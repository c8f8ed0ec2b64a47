"""Domains (tenants, sessions, guests) and the blocks they own: handles onto the heap's state."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import numpy as np

from native_kernels import api
from native_kernels import domain as kernels
from native_kernels.layout import (
    D_ALLOCS,
    D_BLOCKS,
    D_FREES,
    D_ID,
    D_MAX_PAGES,
    D_NUMPY_PAGES,
    D_PAGES,
    D_PEAK,
    E_BAD_FREE,
    E_CORRUPT,
    E_DEAD,
    E_FAULT,
    E_QUOTA,
)
from xenheap.errors import (
    DomainDead,
    HeapClosed,
    HeapCorruption,
    InvalidArgument,
    InvalidFree,
    OutOfMemory,
)
from xenheap.sizes import format_size, parse_size

if TYPE_CHECKING:
    from xenheap.heap import Heap

_MFN_MASK = 0xFFFFFFFF
# From this order up (256 KiB) a call may zero enough memory to be worth releasing the GIL
# for (native_kernels/api.py says why small calls keep it).
LONG_ORDER = 6


class Block:
    """2**order contiguous pages owned by a domain, zeroed when handed out."""

    __slots__ = ("_freed", "_tag", "domain", "mfn", "order")

    def __init__(self, domain: Domain, mfn: int, order: int, tag: int) -> None:
        self.domain = domain
        self.mfn = mfn
        self.order = order
        self._tag = tag
        self._freed = False

    @property
    def nbytes(self) -> int:
        """Size of the block in bytes."""
        return self.domain.heap.page_size << self.order

    @property
    def node(self) -> int:
        """The node whose arena holds the block."""
        return self.domain.heap._node_of(self.mfn)

    def _check_usable(self) -> None:
        if self.domain.heap.closed:
            raise HeapClosed(self.domain.heap._closed_reason)
        if self._freed:
            raise InvalidFree(f"{self!r} was freed")
        if not self.domain.alive:
            raise InvalidFree(f"{self!r} belongs to destroyed {self.domain!r}")

    def view(self) -> memoryview:
        """A writable memoryview of the block's ``nbytes`` bytes (zero-copy)."""
        self._check_usable()
        return self.domain.heap._view(self.mfn, self.nbytes)

    def array(self, dtype: object = "uint8") -> np.ndarray:
        """A writable numpy view of the block (zero-copy) with the given dtype."""
        try:
            dt = np.dtype(dtype)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"bad dtype {dtype!r}: {exc}") from None
        if dt.itemsize == 0 or self.nbytes % dt.itemsize or dt.hasobject:
            raise InvalidArgument(f"dtype {dt} does not tile a block of {self.nbytes} bytes")
        self._check_usable()
        return self.domain.heap._bytes(self.mfn, self.nbytes).view(dt)

    def free(self) -> None:
        """Give the block back to the heap; its pages become dirty (zeroed first in "sync")."""
        self.domain.free(self)

    def __repr__(self) -> str:
        return f"<Block mfn={self.mfn} order={self.order} of domain {self.domain.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Block) and (other.mfn, other._tag) == (self.mfn, self._tag)

    def __hash__(self) -> int:
        return hash((self.mfn, self._tag))


class Domain:
    """An owner of memory; destroying it gives all its memory back at once.

    Also a context manager: destroyed on exit.
    """

    def __init__(self, heap: Heap, slot: int, dom_id: int, name: str | None,
                 max_pages: int) -> None:
        self.heap = heap
        self.id = dom_id
        self.name = name if name is not None else f"d{dom_id}"
        self._slot = slot
        self._max_pages = max_pages
        self._destroyed = False
        self._capsule: object | None = None
        self._final_stats: dict[str, int] | None = None

    # --- state -------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """True until the domain is destroyed (or its heap closed)."""
        return not self._destroyed and not self.heap.closed

    @property
    def pages(self) -> int:
        """Pages the domain holds now."""
        return self.stats()["pages"]

    @property
    def max_bytes(self) -> int | None:
        """The domain's quota in bytes, or None."""
        return self._max_pages * self.heap.page_size if self._max_pages else None

    def stats(self) -> dict[str, int]:
        """Pages held now and at the peak, blocks, allocations, frees, the quota in pages,
        and pages held by live numpy arrays (which outlive a destroy until numpy frees
        them)."""
        self.heap._refuse_if_forked()
        row = kernels.domain_row(self.heap._state["doms"], self._slot)
        if row[D_ID] != self.id:  # the slot went to another domain after this one died
            return dict(self._final_stats or {})
        return {
            "pages": int(row[D_PAGES]),
            "peak_pages": int(row[D_PEAK]),
            "blocks": int(row[D_BLOCKS]),
            "allocations": int(row[D_ALLOCS]),
            "frees": int(row[D_FREES]),
            "max_pages": int(row[D_MAX_PAGES]),
            "numpy_pages": int(row[D_NUMPY_PAGES]),
        }

    # --- allocation ----------------------------------------------------------------------
    def _raise_for(self, code: int, what: str) -> None:
        if code == E_DEAD:
            raise DomainDead(f"{self!r} was destroyed")
        if code == E_QUOTA:
            raise OutOfMemory(
                f"{what} would exceed the quota of domain {self.name!r} "
                f"({format_size(self._max_pages * self.heap.page_size)}, "
                f"holding {format_size(self.pages * self.heap.page_size)})"
            )
        if code == E_FAULT:
            raise OutOfMemory(f"{what}: ran dry (injected fault)")
        if code == E_CORRUPT:
            raise HeapCorruption(
                f"{what}: a clean page did not carry the scrub pattern "
                "(written after free, or never scrubbed)"
            )
        raise OutOfMemory(f"{what}: no free memory large enough")

    def alloc(self, order: int = 0, node: int | None = None) -> Block:
        """A zeroed block of 2**order contiguous pages (from ``node`` only, if given)."""
        heap = self.heap
        order = heap._check_order(order)
        pref, exact = heap._placement(node)
        kernel = api.heap_alloc if order >= LONG_ORDER else api.heap_alloc_short
        packed = heap._call(kernel, heap._zone, self._slot, self.id, order, pref,
                            exact)
        if packed < 0:
            self._raise_for(packed, f"alloc(order={order})")
        return Block(self, packed & _MFN_MASK, order, packed >> 32)

    def order_for(self, nbytes: int) -> int:
        """The smallest order whose block holds ``nbytes`` bytes."""
        size = parse_size(nbytes, what="nbytes")
        if size == 0:
            raise InvalidArgument("nbytes must be positive")
        order = (-(-size // self.heap.page_size) - 1).bit_length()
        self.heap._check_order(order, what=f"nbytes={size}")
        return order

    def alloc_bytes(self, nbytes: int, node: int | None = None) -> Block:
        """A zeroed block of the smallest order that holds ``nbytes`` bytes."""
        return self.alloc(self.order_for(nbytes), node)

    def populate(self, nbytes: int, order: int = 0, node: int | None = None) -> int:
        """Allocate enough 2**order blocks to hold ``nbytes``, in one call, all or nothing.

        Returns the number of blocks; they stay with the domain until it is destroyed.
        """
        heap = self.heap
        order = heap._check_order(order)
        size = parse_size(nbytes, what="nbytes")
        if size == 0:
            raise InvalidArgument("nbytes must be positive")
        block_bytes = heap.page_size << order
        count = -(-size // block_bytes)
        if count << order > heap.total_pages:
            raise OutOfMemory(f"populate({format_size(size)}) exceeds the whole heap "
                              f"({format_size(heap.total_pages * heap.page_size)})")
        pref, exact = heap._placement(node)
        got = heap._call(api.heap_populate, heap._zone, self._slot, self.id, count, order, pref,
                         exact)
        if got < 0:
            self._raise_for(got, f"populate({format_size(size)}, order={order})")
        return got

    def free(self, blk: Block) -> None:
        """Give ``blk`` back to the heap; refused (nothing changed) if it is not ours to free."""
        if not isinstance(blk, Block):
            raise InvalidFree(f"not a Block: {blk!r}")
        if blk.domain is not self:
            raise InvalidFree(f"{blk!r} belongs to domain {blk.domain.id}, not {self.id}")
        if blk._freed:
            raise InvalidFree(f"double free of {blk!r}")
        heap = self.heap
        # Only "sync" and debug mode write the block on free.
        long = blk.order >= LONG_ORDER and (heap.scrub_mode == "sync" or heap.debug)
        kernel = api.heap_free if long else api.heap_free_short
        code = heap._call(kernel, self._slot, self.id, blk.mfn, blk.order, blk._tag)
        if code == E_DEAD:
            raise InvalidFree(f"{blk!r} belongs to destroyed {self!r}")
        if code == E_BAD_FREE:
            raise InvalidFree(f"{blk!r} is stale: it is no longer a block of {self!r}")
        blk._freed = True
        if code:
            heap._wake(1 << heap._node_of(blk.mfn))

    def destroy(self) -> None:
        """Free all the domain's memory. Returns at once, leaving the pages dirty for the
        scrubbers, except in "sync" mode, which zeroes every page before returning."""
        heap = self.heap
        status, wake = heap._call(api.heap_destroy, self._slot, self.id)
        if status < 0:
            raise DomainDead(f"{self!r} was already destroyed")
        self._destroyed = True
        self._capsule = None  # arrays made with it hold their own reference
        self._final_stats = self.stats()
        heap._retire_slot(self._slot)
        if wake:
            heap._wake(wake)

    def numpy_allocator(self) -> contextlib.AbstractContextManager[None]:
        """``with dom.numpy_allocator():`` numpy arrays created in this thread or asyncio
        task take their data from this domain (numpy's NEP 49 handler, a context variable).

        Arrays may outlive the block and the domain: a destroyed domain's blocks that live
        arrays use are freed (dirty) when numpy frees those arrays. Allocation failures,
        the quota included, surface as numpy's usual MemoryError.
        """
        from xenheap.numpy_alloc import numpy_allocator  # compiles the callbacks on first use

        return numpy_allocator(self)

    def _numpy_handler(self) -> object:
        """This domain's "mem_handler" capsule, made once."""
        if self._capsule is None:
            from xenheap.numpy_alloc import make_handler

            self._capsule = make_handler(self)
        return self._capsule

    def __enter__(self) -> Domain:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.alive:
            self.destroy()

    def __repr__(self) -> str:
        state = "alive" if self.alive else "destroyed"
        return f"<Domain {self.id} {self.name!r} {state}>"
