"""A domain's record: what xenheap's modules share about one domain, below them all.

``Domain`` is the public front; it keeps one ``DomainRecord`` (``dom.record``), as a
``Heap`` keeps its ``HeapCore``. Blocks, the statistics, the heap's chores and the numpy
handler read and write a domain's state here rather than through its private names. The
kernels know the domain by ``slot`` and ``id`` (its row of the domain table); this holds
what lives on the Python side only. Applications should not use it (it may change).
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

from xenheap.charges import DomainCharges
from xenheap.reuse import ReuseCache


class DomainRecord:
    """The Python-side state of one domain. Each field says who writes it.

    - ``slot``, ``id``: the domain's row of the domain table and its id there (fixed).
    - ``max_pages``: its quota in pages, 0 for none (fixed).
    - ``destroyed``: set once, by its destroy (alive -> dying -> dead is the kernels'
      D_STATE; this only says the destroy was asked for).
    - ``reuse``: its cache of freed blocks (xenheap.reuse), or None where frees must write the
      memory ("sync" zeroes, debug poisons).
    - ``dropped``: (mfn, order, tag) of handles dropped unfreed (xenheap.block says why
      they wait), appended by ``Block.__del__``, drained under ``dropping`` by whoever frees
      them: a second caller waits, so that its stats() does not count blocks another thread
      took off the queue but has not freed yet.
    - ``returning``: held while parked blocks go back to the heap: an allocation short of
      room that finds it held waits, then retries, rather than fail while they are in flight.
    - ``capsule``: numpy's "mem_handler" capsule for the domain, made on first use (None
      before, and after a destroy or close: live arrays hold their own reference).
    - ``final_row``: its row of the domain table once laid to rest (written by HeapCore),
      for its statistics once the slot has a new domain.
    - ``charges``: its entry of the heap's charge book (xenheap.charges), which the book
      adds to under its lock (fixed).
    """

    __slots__ = ("capsule", "charges", "destroyed", "dropped", "dropping", "final_row", "id",
                 "max_pages", "returning", "reuse", "slot")

    def __init__(self, slot: int, dom_id: int, max_pages: int,
                 reuse: ReuseCache | None, charges: DomainCharges) -> None:
        self.slot = slot
        self.id = dom_id
        self.max_pages = max_pages
        self.destroyed = False
        self.reuse = reuse
        self.dropped: deque[tuple[int, int, int]] = deque()
        self.dropping = threading.Lock()
        self.returning = threading.Lock()
        self.capsule: object | None = None
        self.final_row: np.ndarray | None = None
        self.charges = charges
