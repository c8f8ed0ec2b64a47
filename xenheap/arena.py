"""An arena: one node's memory, one anonymous mapping advised for huge pages and bound."""

from __future__ import annotations

import logging
import mmap

import numpy as np

from xenheap import prim
from xenheap.errors import HeapClosed, InvalidArgument
from xenheap.topology import Node

__all__ = ["Arena", "ArenaBytes"]

log = logging.getLogger(__name__)


class ArenaBytes(np.ndarray):
    """The type of an arena's bytes: not a plain ndarray, so that numpy's views of a block
    stop at the block's root (xenheap.block says why)."""


class Arena:
    """The memory of one node: ``nbytes`` of anonymous mapping, zero until written.

    Attributes: ``node``, ``nbytes``, ``address`` (start, an int), ``hugepage`` (the
    huge-page advice was accepted), ``bound`` (mbind to ``node.os_node`` succeeded) and
    ``array`` (a writable, zero-copy numpy uint8 view of the whole arena).
    """

    def __init__(self, node: Node, nbytes: int) -> None:
        if (
            isinstance(nbytes, bool)
            or not isinstance(nbytes, int)
            or nbytes <= 0
            or nbytes % prim.PAGE_SIZE
        ):
            raise InvalidArgument(
                f"arena size must be a positive multiple of {prim.PAGE_SIZE}, got {nbytes!r}"
            )
        self.node = node
        self.nbytes = nbytes
        self._mmap: mmap.mmap | None = prim.map_anonymous(nbytes)
        try:
            self._array: np.ndarray | None = np.frombuffer(self._mmap, dtype=np.uint8).view(
                ArenaBytes)
            self.address: int = int(self._array.ctypes.data)
            self.hugepage: bool = prim.advise_hugepage(self.address, nbytes)
            # Bind before anything touches the pages: placement happens at first fault.
            self.bound: bool = (
                prim.bind_to_node(self.address, nbytes, node.os_node)
                if node.os_node is not None
                else False
            )
        except BaseException:
            self._array = None
            self._mmap.close()
            self._mmap = None
            raise
        log.debug(
            "arena for node %d: %d bytes at %#x, hugepage=%s, bound=%s",
            node.id,
            nbytes,
            self.address,
            self.hugepage,
            self.bound,
        )

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._mmap is None

    @property
    def array(self) -> np.ndarray:
        """A writable numpy uint8 view of the whole arena (zero-copy)."""
        if self._array is None:
            raise HeapClosed(f"arena of node {self.node.id} is closed")
        return self._array

    def view(self, offset: int, nbytes: int) -> memoryview:
        """A writable, zero-copy memoryview (format "B") of ``nbytes`` at ``offset``."""
        if self._mmap is None:
            raise HeapClosed(f"arena of node {self.node.id} is closed")
        for name, value in (("offset", offset), ("nbytes", nbytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"{name} must be a non-negative int, got {value!r}")
        if offset + nbytes > self.nbytes:
            raise InvalidArgument(
                f"range [{offset}, {offset + nbytes}) exceeds the arena's {self.nbytes} bytes"
            )
        with memoryview(self._mmap) as whole:
            # The slice keeps its own export of the mapping; the whole view can go.
            return whole[offset : offset + nbytes].cast("B")

    def close(self) -> None:
        """Unmap the arena; idempotent.

        If a view of it is still alive, the mapping is left for the garbage collector to
        free once the last view goes, with a warning: unmapping it would make that view
        point at nothing.
        """
        if self._mmap is None:
            return
        mapping, self._mmap = self._mmap, None
        self._array = None
        try:
            mapping.close()
        except BufferError:
            log.warning(
                "arena of node %d closed while views of it are alive; "
                "its memory is freed when the last view goes",
                self.node.id,
            )

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"at {self.address:#x}"
        return f"<Arena node={self.node.id} nbytes={self.nbytes} {state}>"
