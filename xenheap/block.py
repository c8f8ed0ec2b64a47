"""A block handle, and the views that keep it alive.

A ``Block`` lives like a Python buffer: it is freed when its last reference goes, and the
numpy arrays and memoryviews made from it count as references, so its bytes stay the
domain's while any of them lives. ``free()`` (or ``with``) still gives it back at once.

How the views hold it: ``array()`` makes a hidden root array of type ``_Owner`` that holds
the handle, and returns a plain ndarray view of that root. numpy points every later view
at the first array up the chain whose base is of another type, so a slice, a dtype view,
``np.asarray`` or a memoryview of the user's array keeps the root, and so the handle,
alive. That is why the arena's array has a type of its own (xenheap.arena.ArenaBytes):
were the root's base a plain ndarray, numpy would skip the root and point views at the
arena.

The handle never holds its views (a closing heap must be able to drop its memory), and a
dropped handle is not freed in ``__del__`` itself: that may run inside the garbage
collector while this thread holds one of the domain's locks. It queues the block on its
domain (``DomainRecord.dropped``), which frees it at the next allocation or statistics call (or
``numpy_allocator()`` entry), or at the heap's periodic chore (every 0.05 to 0.1 s while a
scrubber runs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

import numpy as np
import numpy.typing as npt

from xenheap.errors import HeapClosed, InvalidArgument, InvalidFree
from xenheap.reuse import VIEW_KEY_SHIFT

if TYPE_CHECKING:
    from xenheap.domain import Domain

__all__ = ["Block"]


_UINT8 = "uint8"  # array()'s default, told apart by identity: no dtype to parse


class _Owner(np.ndarray):
    """The root of a block's views; ``block`` is the handle they keep alive."""

    __slots__ = ("block",)  # no per-root __dict__: one is made for every array() call
    block: Block


class Block:
    """2**order contiguous pages owned by a domain, zeroed when handed out.

    Freed by ``free()``, on leaving a ``with`` block, or once nothing refers to it or to a
    view of it. Copies (``copy.copy``) are the same handle. ``freed`` is True once it was
    freed through this handle; ``tag`` names this life of the block (the heap gives a block
    a new one each time it hands it out, the domain's reuse cache a new generation above
    it), so that a handle kept from an earlier life is refused as stale.
    """

    __slots__ = ("_issued", "domain", "freed", "mfn", "order", "tag")

    def __init__(self, domain: Domain, mfn: int, order: int, tag: int,
                 issued: bool = False) -> None:
        """``issued``: the domain handed this handle out, so dropping it frees the block;
        a handle made by hand never frees anything it is dropped."""
        self.domain = domain
        self.mfn = mfn
        self.order = order
        self.tag = tag
        self.freed = False
        self._issued = issued

    @property
    def nbytes(self) -> int:
        """Size of the block in bytes."""
        return self.domain.heap.page_size << self.order

    @property
    def node(self) -> int:
        """The node whose arena holds the block."""
        return self.domain.core.node_of(self.mfn)

    def _in_use(self) -> bool:
        """Not freed, and its domain and heap still there."""
        dom = self.domain
        return not self.freed and not dom.record.destroyed and not dom.core.closed

    def _check_usable(self) -> None:
        if self.domain.heap.closed:
            raise HeapClosed(self.domain.core.closed_reason)
        if self.freed:
            raise InvalidFree(f"{self!r} was freed")
        if not self.domain.alive:
            raise InvalidFree(f"{self!r} belongs to destroyed {self.domain!r}")

    def _refuse_stale(self) -> NoReturn:
        raise InvalidFree(f"{self!r} is stale: it is no longer a block of {self.domain!r}")

    def array(self, dtype: npt.DTypeLike = _UINT8) -> np.ndarray:
        """A writable numpy view of the block (zero-copy) with the given dtype; it and the
        views made from it keep the block alive."""
        dom = self.domain
        rec = dom.record
        if self.freed or rec.destroyed or dom.core.closed:  # _in_use(), inlined: hot path
            self._check_usable()
        # Only the block's live handle may see its bytes: one that a copy freed, or one
        # made by hand, may name memory the heap has since given to another domain. The
        # view: the reuse cache's while the block cycles through it, else a new one; kept
        # by the cache, never by the handle, so that a live handle does not keep a closed
        # heap's memory mapped.
        mfn, order = self.mfn, self.order
        reuse = rec.reuse
        if reuse is not None:
            if (mfn, order, self.tag) not in reuse.issued:  # what it handed out
                self._refuse_stale()
            u8 = reuse.views.get(mfn << VIEW_KEY_SHIFT | order)
            if u8 is None:
                u8 = dom.core.page_views(mfn, order)
        elif dom.core.owns_block(rec.slot, mfn, order, self.tag):
            u8 = dom.core.page_views(mfn, order)
        else:
            self._refuse_stale()
        root = u8.view(_Owner)
        root.block = self
        if dtype is _UINT8:  # the default: no dtype to parse
            return root.view(np.ndarray)  # positional: a keyword costs this path 10%
        if dtype is None:  # np.dtype(None) is float64, which no reader of array() expects
            raise InvalidArgument("dtype must be given, got None")
        try:
            dt = np.dtype(dtype)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"bad dtype {dtype!r}: {exc}") from None
        if dt.itemsize == 0 or self.nbytes % dt.itemsize or dt.hasobject or dt.subdtype:
            raise InvalidArgument(f"dtype {dt} does not tile a block of {self.nbytes} bytes "
                                  "as a flat array")
        return root.view(dt, np.ndarray)

    def view(self) -> memoryview:
        """A writable memoryview of the block's ``nbytes`` bytes (zero-copy); it keeps the
        block alive."""
        return self.array().data

    def free(self) -> None:
        """Give the block back to the heap; its pages become dirty (zeroed first in "sync")."""
        self.domain.free(self)

    def __enter__(self) -> Block:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Free the block, unless it was freed already or went with its domain or heap."""
        if self._in_use():
            self.domain.free(self)

    def __del__(self) -> None:
        if self._issued and not self.freed:
            dom = self.domain
            rec = dom.record
            if not rec.destroyed and not dom.core.closed:
                rec.dropped.append((self.mfn, self.order, self.tag))

    def __copy__(self) -> Block:
        return self

    def __deepcopy__(self, memo: object) -> Block:
        return self

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Block is a handle on this process's memory; it cannot be pickled")

    def __repr__(self) -> str:
        return f"<Block mfn={self.mfn} order={self.order} of domain {self.domain.id}>"

    def __eq__(self, other: object) -> bool:
        """The same block in the same life, of the same domain (so of the same heap)."""
        return (isinstance(other, Block) and other.domain is self.domain
                and (other.mfn, other.tag) == (self.mfn, self.tag))

    def __hash__(self) -> int:
        return hash((self.mfn, self.tag))
