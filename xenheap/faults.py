"""Fault injection, a test hook: not part of the Heap API.

    from xenheap.faults import inject_fault
    inject_fault(heap, "scrub_stall", 200_000)   # the scrubber stalls 0.2 s holding a chunk
    ...
    inject_fault(heap, None)                      # off again

The kernels poll one switch in the heap's state (native_kernels.layout.M_FAULT, with its
argument in M_FAULT_ARG); it is off unless a test turns it on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from native_kernels.layout import (
    FAULT_NONE,
    FAULT_POPULATE_FAIL,
    FAULT_SCRUB_FAIL,
    FAULT_SCRUB_STALL,
    M_FAULT,
    M_FAULT_ARG,
)
from native_kernels.switches import set_switch
from xenheap.errors import InvalidArgument

if TYPE_CHECKING:
    from xenheap.heap import Heap

__all__ = ["FAULTS", "inject_fault"]

FAULTS: dict[str | None, int] = {
    None: FAULT_NONE,
    "scrub_fail": FAULT_SCRUB_FAIL,
    "scrub_stall": FAULT_SCRUB_STALL,
    "populate_fail": FAULT_POPULATE_FAIL,
}


def inject_fault(heap: Heap, kind: str | None, arg: int = 0) -> None:
    """Turn on fault ``kind`` in ``heap``: "scrub_fail" (a scrubber fails after ``arg`` pages
    of a chunk), "scrub_stall" (a scrubber stalls ``arg`` microseconds holding a chunk, deaf
    to aborts), "populate_fail" (populate runs dry after ``arg`` blocks); None turns it off.

    InvalidArgument for an unknown kind or a negative ``arg``; HeapClosed in a forked child.
    """
    if kind not in FAULTS:
        raise InvalidArgument(f"fault must be one of {list(FAULTS)}, got {kind!r}")
    if isinstance(arg, bool) or not isinstance(arg, int) or arg < 0:
        raise InvalidArgument(f"fault argument must be a non-negative int, got {arg!r}")
    core = heap.core
    meta = core.state["meta"]
    core.refuse_if_forked()
    set_switch(meta, M_FAULT, FAULT_NONE)  # never a new kind with the old argument
    set_switch(meta, M_FAULT_ARG, arg)
    set_switch(meta, M_FAULT, FAULTS[kind])
