"""xenheap: a multi-threaded userspace page allocator that scrubs freed memory from idle threads.

    import xenheap
    with xenheap.Heap(size="1GiB") as heap, heap.create_domain("tenant") as dom:
        blk = dom.alloc(order=4)          # 64 KiB, zeroed
        blk.array("uint64")[:] = 7

See README.md for the whole API and the scrub modes.
"""

from xenheap import firstuse  # noqa: F401  (first: says so when numba compiles the kernels)
from xenheap.block import Block
from xenheap.domain import Domain
from xenheap.errors import (
    DomainDead,
    HeapClosed,
    HeapCorruption,
    InvalidArgument,
    InvalidFree,
    OutOfMemory,
    ReleaseFailed,
    XenHeapError,
)
from xenheap.heap import Heap

__all__ = [
    "Block",
    "Domain",
    "DomainDead",
    "Heap",
    "HeapClosed",
    "HeapCorruption",
    "InvalidArgument",
    "InvalidFree",
    "OutOfMemory",
    "ReleaseFailed",
    "XenHeapError",
]
__version__ = "0.1.0"
