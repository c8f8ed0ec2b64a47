"""A heap's shared core: what the Heap, its domains and blocks, the statistics and the numpy
handler all work on, below them all.

``Heap`` is the public front; it builds one ``HeapCore`` and hands it to every ``Domain``
it creates (``heap.core``, ``dom.core``). This module's names are xenheap's internal
surface: its own modules and tests use them, applications should not (they may change).
It imports none of the modules above it.

The surface:

- Geometry: ``topology``, ``nodes``, ``pages_per_node``, ``total_pages``, ``max_order``,
  ``max_block_bytes``, ``mode`` (MODE_*), ``debug``, ``reuse_blocks`` (domains park
  their freed blocks), ``arenas``.
- State: ``state`` (the arrays of native_kernels.layout by name), ``hs`` (the same as
  one native_kernels.layout.HeapState, for the kernels that take it), ``arrays`` (the same
  one by one, as the API kernels take them), ``charges`` (xenheap.charges).
- Life: ``lock`` (domain slots, the live set, the closed flag), ``closed``,
  ``closed_reason``, ``forked`` (an inherited copy in a forked child), ``refuse_if_forked``.
- Calls: ``call`` (a guarded kernel call), ``wake`` (scrubbers of some nodes),
  ``placement`` (the node to allocate from), ``check_order``, ``dirty_pages`` (over
  ``all_nodes`` or some).
- Memory: ``node_of``, ``locate``, ``bytes_at`` (a uint8 view of some pages),
  ``close_arenas``.
- Domains: ``live_domains``, slots (``take_slot``,
  ``retire_slot``), destroyed domains' memory (``relinquishing``, ``relinquish``,
  ``relinquish_pending``), domains collected without a destroy (``orphans``),
  ``reuse_retired`` (destroyed domains' reuse counters), ``numpy_handlers``,
  ``arenas_await_arrays``.
- Scrubbers: ``scrubbers`` and ``scrubber_of`` (node -> index), set by the Heap;
  ``cleaned``, the condition a scrubber notifies when it finds its nodes clean.
"""

from __future__ import annotations

import collections
import numbers
import threading
import weakref
from typing import TYPE_CHECKING

import numpy as np

from native_kernels import api, domain_life
from native_kernels.buddy import init_heap
from native_kernels.counters import column_sum
from native_kernels.layout import (
    D_STATE,
    DOM_DEAD,
    DOM_FREE,
    E_CLOSED,
    M_DEBUG,
    M_MAX_DOMAINS,
    M_MAX_ORDER,
    M_MODE,
    M_NR_NODES,
    M_NR_PAGES,
    M_PAGES_PER_NODE,
    M_RELINQUISH,
    M_REUSE,
    MAX_ORDER_LIMIT,
    MODE_IDLE,
    N_ADDR,
    N_BASE,
    N_NEED_SCRUB,
    N_PAGES,
    PAGE_SIZE,
    PG_ORDER,
    PG_OWNER,
    PG_TAG,
    HeapState,
    new_state,
)
from xenheap import prim
from xenheap.arena import Arena
from xenheap.charges import ChargeBook
from xenheap.errors import HeapClosed, HeapCorruption, InvalidArgument, OutOfMemory
from xenheap.numpy_api import default_numpy_memory
from xenheap.topology import Topology

if TYPE_CHECKING:
    from xenheap.domain import Domain
    from xenheap.domain_record import DomainRecord
    from xenheap.scrubber import Scrubber

__all__ = ["HeapCore"]


class HeapCore:
    """The arenas, state arrays, locks and flags of one heap (see the module docstring)."""

    def __init__(self, topology: Topology, pages_per_node: int, max_domains: int, mode: int,
                 debug: bool, reuse_blocks: bool) -> None:
        self.topology = topology
        self.nodes = len(topology.nodes)
        self.pages_per_node = pages_per_node
        self.total_pages = pages_per_node * self.nodes
        self.max_order = min(MAX_ORDER_LIMIT, pages_per_node.bit_length() - 1)
        self.max_block_bytes = PAGE_SIZE << self.max_order
        self.mode = mode
        self.debug = debug
        self.reuse_blocks = reuse_blocks

        self.arenas = [Arena(node, pages_per_node * PAGE_SIZE) for node in topology.nodes]
        with default_numpy_memory():  # never from a domain's handler the caller installed
            self.state = new_state(self.nodes, pages_per_node, max_domains, prim.zeroed_array)
            self.all_nodes = np.arange(self.nodes, dtype=np.int64)
            self.charges = ChargeBook()  # scrub work by the domain that dirtied the memory
        self._fill_state(max_domains)
        s = self.state
        self.hs = HeapState(**s)
        init_heap(self.hs)
        self.arrays = tuple(self.hs)  # for the API kernels, which take them one by one
        self.meta_row = s["meta"].reshape(1, -1)  # meta as a row, for the counter kernels
        self._cpu_node = topology.cpu_to_node()

        self.lock = threading.Lock()  # domain slots, the live set and the closed flag
        self.closed = False
        self.forked = False  # an inherited copy in a forked child (set by the fork hook)
        self.closed_reason = "the heap is closed"
        self.numpy_handlers = 0  # numpy handlers made; their arrays may outlive close()
        # Set by close() when only numpy arrays kept the arenas mapped: the capsule
        # destructor of the last handler then unmaps them (xenheap.numpy_alloc).
        self.arenas_await_arrays = False
        self._free_slots = list(range(max_domains - 1, -1, -1))
        # Destroyed domains' slots until they are DOM_DEAD, each with its record, which
        # gets its final statistics row before the slot goes to another domain.
        self._dying_slots: list[DomainRecord] = []
        # Records of domains collected without a destroy (Domain's finalizer appends, from
        # inside the garbage collector: no lock), destroyed by xenheap.giveback.destroy_orphans.
        self.orphans: collections.deque[DomainRecord] = collections.deque()
        # (slot, id, Python-side records to drop) of domains destroyed with their
        # relinquish_memory left to relinquish()
        self.relinquishing: collections.deque[tuple[int, int, object]] = collections.deque()
        self._relinquish_lock = threading.Lock()  # one relinquish() at a time: see there
        self._next_id = 1
        # Live domains: to drain their reuse caches, and to drop their numpy handlers at
        # close. Changed and copied under self.lock (live_domains): the scrubber reads it.
        self.domains: weakref.WeakSet[Domain] = weakref.WeakSet()
        # The reuse counters of destroyed domains' caches (hits, hit pages, parks,
        # returned), for the statistics; a live domain's are in its cache.
        self.reuse_retired = (0, 0, 0, 0)
        self.scrubbers: list[Scrubber] = []
        self.scrubber_of = [0] * self.nodes
        # Notified by a scrubber that finds its nodes clean: wait_clean waits on it.
        self.cleaned = threading.Condition()

    def _fill_state(self, max_domains: int) -> None:
        s = self.state
        meta, nodes, zone = s["meta"], s["nodes"], s["zone"]
        meta[M_NR_PAGES] = self.total_pages
        meta[M_NR_NODES] = self.nodes
        meta[M_PAGES_PER_NODE] = self.pages_per_node
        meta[M_MAX_ORDER] = self.max_order
        meta[M_MODE] = self.mode
        meta[M_DEBUG] = int(self.debug)
        meta[M_REUSE] = int(self.reuse_blocks)
        meta[M_MAX_DOMAINS] = max_domains
        for i, arena in enumerate(self.arenas):
            nodes[i, N_BASE] = i * self.pages_per_node
            nodes[i, N_PAGES] = self.pages_per_node
            nodes[i, N_ADDR] = arena.address
            zone[i, :] = self.topology.zone_order(i)

    # --- memory ----------------------------------------------------------------------------
    def node_of(self, mfn: int) -> int:
        """The node whose arena holds page ``mfn``."""
        return mfn // self.pages_per_node

    def locate(self, mfn: int) -> tuple[Arena, int]:
        """The arena holding page ``mfn`` and the page's byte offset in it."""
        node = mfn // self.pages_per_node
        return self.arenas[node], (mfn - node * self.pages_per_node) * PAGE_SIZE

    def page_views(self, mfn: int, order: int) -> np.ndarray:
        """Block (mfn, order)'s bytes as a uint8 view (bytes_at, by order)."""
        return self.bytes_at(mfn, PAGE_SIZE << order)

    def bytes_at(self, mfn: int, nbytes: int) -> np.ndarray:
        """A uint8 numpy view of ``nbytes`` from page ``mfn``: a slice of the arena's array,
        cheaper to make than a view through a memoryview."""
        arena, offset = self.locate(mfn)
        return arena.array[offset:offset + nbytes]

    def owns_block(self, slot: int, mfn: int, order: int, tag: int) -> bool:
        """Whether the frame table shows (mfn, order, tag) as a block that the domain in
        ``slot`` holds now: the same test as a free's, for a handle that the domain's
        reuse cache cannot vouch for (reuse off). A snapshot, as any answer about memory
        that another thread may free is."""
        if not (type(mfn) is int and 0 <= mfn < self.total_pages
                and type(order) is int and 0 <= order <= self.max_order):
            return False
        word = self.hs.ft32.item  # Python ints: half the cost of numpy scalars here
        return (word(PG_OWNER, mfn) == slot + 1 and self.hs.ft8.item(PG_ORDER, mfn) == order
                and word(PG_TAG, mfn) == tag)

    def close_arenas(self) -> None:
        """Unmap the arenas (one that a view still uses goes with that view: Arena.close)."""
        for arena in self.arenas:
            arena.close()

    # --- calls -----------------------------------------------------------------------------
    def check_order(self, order: object, what: str = "order") -> int:
        """``order`` as an int in 0..max_order, or InvalidArgument."""
        # type() first: the ABC check costs a quarter of a microsecond on every allocation.
        if type(order) is not int and (isinstance(order, bool)
                                       or not isinstance(order, numbers.Integral)):
            raise InvalidArgument(f"order must be an int, got {order!r}")
        order = int(order)
        if not 0 <= order <= self.max_order:
            raise InvalidArgument(f"{what}: order {order} is outside 0..{self.max_order} "
                                  "(the largest chunk of this heap)")
        return order

    def placement(self, node: int | None) -> tuple[int, bool]:
        """(preferred node, exact): the calling CPU's node first, or exactly ``node``."""
        if node is None:
            return self._cpu_node.get(prim.current_cpu(), 0), False
        if (isinstance(node, bool) or not isinstance(node, numbers.Integral)
                or not 0 <= node < self.nodes):
            raise InvalidArgument(f"node must be None or 0..{self.nodes - 1}, got {node!r}")
        return int(node), True

    def call(self, kernel, *args):
        """Run an API kernel (native_kernels.api) over the state; HeapClosed once closed.

        Returns the kernel's result: a status or value, or a (status, value) pair.
        """
        if self.forked:  # no kernel call: numba's locks may be held by a parent thread
            raise HeapClosed(self.closed_reason)
        result = kernel(*self.arrays, *args)
        if (result if type(result) is int else result[0]) == E_CLOSED:
            raise HeapClosed(self.closed_reason)
        return result

    def wake(self, node_mask: int) -> None:
        """Wake the scrubbers of the nodes in ``node_mask`` (frees left them 1 MiB dirty);
        bit 63 may make the mask negative, which ``>>`` reads as two's complement."""
        if not self.scrubbers:
            return
        for node in range(self.nodes):
            if node_mask >> node & 1:
                self.scrubbers[self.scrubber_of[node]].wakeup.set()

    def refuse_if_forked(self) -> None:
        """HeapClosed in a forked child, before any kernel runs (xenheap.heap's fork hook)."""
        if self.forked:
            raise HeapClosed(self.closed_reason)

    def dirty_pages(self, nodes: np.ndarray | None = None) -> int:
        """Dirty pages on ``nodes`` (all by default), read atomically."""
        self.refuse_if_forked()
        selected = self.all_nodes if nodes is None else nodes
        return int(column_sum(self.state["nodes"], N_NEED_SCRUB, selected))

    # --- domains ---------------------------------------------------------------------------
    def live_domains(self) -> list[Domain]:
        """A copy of the live domains (a WeakSet cannot be iterated while another thread
        adds to it)."""
        with self.lock:
            return list(self.domains)

    def take_slot(self, max_pages: int) -> tuple[int, int]:
        """A free domain slot, opened for a new domain: (slot, domain id)."""
        if not self._free_slots:  # destroyed domains' slots come free once relinquished
            self.relinquish()
        with self.lock:
            if self.closed:
                raise HeapClosed(self.closed_reason)
            self._reap_slots()
            if not self._free_slots:
                raise OutOfMemory(f"all {len(self.state['doms'])} domain slots are in use")
            slot = self._free_slots.pop()
            dom_id = self._next_id
            self._next_id += 1
        state = self.state["doms"][slot, D_STATE]
        if state not in (DOM_FREE, DOM_DEAD):
            raise HeapCorruption(f"domain slot {slot} was handed out while in state {state}")
        domain_life.open_domain(self.state["doms"], slot, dom_id, max_pages)
        return slot, dom_id

    def retire_slot(self, rec: DomainRecord) -> None:
        """A destroyed domain's slot: free once the domain is laid to rest (its memory
        relinquished and numpy's last pinned block freed)."""
        with self.lock:
            self._dying_slots.append(rec)

    def _reap_slots(self) -> None:
        """Move slots of domains laid to rest to the free list, keeping each one's last
        statistics row on its record; caller holds self.lock."""
        doms = self.state["doms"]
        still_dying = []
        for rec in self._dying_slots:
            row = domain_life.domain_row(doms, rec.slot)
            if row[D_STATE] == DOM_DEAD:
                rec.final_row = row
                self._free_slots.append(rec.slot)
            else:
                still_dying.append(rec)
        self._dying_slots = still_dying

    def relinquish(self) -> None:
        """Run relinquish_memory for the domains destroyed since the last call (the first
        scrubber's chore calls this at once; so do the statistics, check() and
        wait_clean()): their blocks go back to the heap, dirty, and those nodes' scrubbers
        wake. Returns once every domain queued before the call is done, also one that
        another thread's call was relinquishing meanwhile. Their Python-side records
        (xenheap.reuse) are dropped here too."""
        # Nothing queued is not enough: another thread may have taken the last domain off
        # the queue and still be freeing it, under the lock.
        if self.closed or not (self.relinquishing or self._relinquish_lock.locked()):
            return
        with self._relinquish_lock:
            while self.relinquishing and not self.closed:
                slot, dom_id, _records = self.relinquishing.popleft()  # dropped here
                _pages, wake = self.call(api.heap_relinquish, slot, dom_id)
                if wake:
                    self.wake(wake)

    def defers_relinquish(self) -> bool:
        """Whether a destroy leaves relinquish_memory to the first scrubber's chore: with
        idle scrubbing running, outside debug mode (whose frees poison at once)."""
        return (self.mode == MODE_IDLE and not self.debug and bool(self.scrubbers)
                and self.scrubbers[0].is_alive())

    def relinquish_pending(self) -> bool:
        """True while some destroyed domain's relinquish_memory has not finished (also one
        an allocator runs because it found the heap short)."""
        first_row = self.all_nodes[:1]  # [0]: meta_row's one row
        return int(column_sum(self.meta_row, M_RELINQUISH, first_row)) != 0
