"""The Heap: per-node arenas, the frame table, domains, scrubbers; the public face of xenheap."""

from __future__ import annotations

import atexit
import logging
import numbers
import os
import sys
import threading
import time
import weakref
from collections.abc import Sequence

import numpy as np

from native_kernels import api
from native_kernels import check as check_kernels
from native_kernels import domain as domain_kernels
from native_kernels.buddy import init_heap
from native_kernels.counters import column_sum
from native_kernels.layout import (
    D_STATE,
    DOM_DEAD,
    DOM_FREE,
    E_CLOSED,
    M_CLOSED,
    M_DEBUG,
    M_FORKED,
    M_MAX_DOMAINS,
    M_MAX_ORDER,
    M_MODE,
    M_NR_NODES,
    M_NR_PAGES,
    M_PAGES_PER_NODE,
    M_REUSE,
    MAX_NODES,
    MAX_ORDER_LIMIT,
    MODE_ALLOC,
    MODE_IDLE,
    MODE_SYNC,
    N_ADDR,
    N_BASE,
    N_NEED_SCRUB,
    N_PAGES,
    PAGE_SIZE,
    new_state,
)
from native_kernels.release import (
    C_MFN,
    C_ORDER,
    C_RELEASED,
    CHUNK_UNUSED,
    CLAIM_FIELDS,
    claim_clean_chunks,
    return_claimed_chunks,
)
from xenheap import prim, stats
from xenheap.arena import Arena
from xenheap.charges import ChargeBook
from xenheap.domain import Domain
from xenheap.errors import (
    HeapClosed,
    HeapCorruption,
    InvalidArgument,
    OutOfMemory,
    ReleaseFailed,
)
from xenheap.numpy_api import default_numpy_memory
from xenheap.reuse import DEFAULT_REUSE_BYTES, REUSE_IDLE_S
from xenheap.scrubber import Scrubber, plan_scrubbers, stop_all
from xenheap.sizes import parse_size
from xenheap.topology import resolve_topology

log = logging.getLogger(__name__)

SCRUB_MODES = {"idle": MODE_IDLE, "sync": MODE_SYNC, "alloc": MODE_ALLOC}
RELEASE_BATCH = 4096  # chunks claimed per release_unused step
DEFAULT_MAX_DOMAINS = 4096
DEFAULT_SCRUB_DEADLINE_S = 1.0
TICK_S = 0.05  # how often the first scrubber does the heap's periodic chores (_tick)
FORKED_REASON = ("this heap belongs to the parent process (inherited across fork); create a "
                 "new Heap in the child")
# Every heap not yet collected, closed ones too: the fork hook marks them all, and exit
# closes them (close() is idempotent).
_heaps: weakref.WeakSet[Heap] = weakref.WeakSet()


class Heap:
    """A page allocator over one anonymous mmap arena per NUMA node (real or emulated).

    ``size`` is split evenly over the nodes (rounded down to whole pages). ``nodes``: None for
    the machine's nodes, an int to emulate that many over this machine's CPUs, or a list of
    CPU lists (a list may be empty: a node without CPUs). ``scrub``: "idle" (background
    scrubbers, the default), "sync" (zero on free and destroy) or "alloc" (zero on
    allocation only). ``debug``: Xen's SCRUB_DEBUG (pattern 0xc2 instead of zeros, freed pages
    poisoned, every allocation verified). ``scrub_deadline``: seconds a node may stay dirty
    before its scrubber cleans it at normal priority even though no CPU is idle (scrub="idle"
    only). ``reuse_bytes``: how much of its own freed memory a domain may keep for reuse,
    per block order up to 2 MiB blocks (xenheap.reuse); 0 turns reuse off. Thread-safe; the
    heap work runs without the GIL.
    """

    def __init__(self, size: int | str = "1GiB", nodes: int | Sequence[Sequence[int]] | None
                 = None, scrub: str = "idle", debug: bool = False,
                 max_domains: int = DEFAULT_MAX_DOMAINS,
                 scrub_deadline: float = DEFAULT_SCRUB_DEADLINE_S,
                 reuse_bytes: int | str = DEFAULT_REUSE_BYTES) -> None:
        if scrub not in SCRUB_MODES:
            raise InvalidArgument(f"scrub must be one of {sorted(SCRUB_MODES)}, got {scrub!r}")
        if not isinstance(debug, bool):
            raise InvalidArgument(f"debug must be a bool, got {debug!r}")
        if isinstance(max_domains, bool) or not isinstance(max_domains, int) or max_domains < 1:
            raise InvalidArgument(f"max_domains must be a positive int, got {max_domains!r}")
        if (isinstance(scrub_deadline, bool) or not isinstance(scrub_deadline, (int, float))
                or not 0 < scrub_deadline < float("inf")):
            raise InvalidArgument("scrub_deadline must be a positive number of seconds, got "
                                  f"{scrub_deadline!r}")
        self.scrub_deadline = float(scrub_deadline)
        self.reuse_bytes = parse_size(reuse_bytes, what="reuse_bytes")
        # Domains may park freed blocks for their own reuse, except where a free must write
        # the memory ("sync" zeroes it, debug poisons it to catch writes after free).
        self._reuse_blocks = self.reuse_bytes > 0 and scrub != "sync" and not debug
        nbytes = parse_size(size)
        self.topology = resolve_topology(nodes)
        nr_nodes = len(self.topology.nodes)
        if nr_nodes > MAX_NODES:
            raise InvalidArgument(f"at most {MAX_NODES} nodes, got {nr_nodes}")
        pages_per_node = nbytes // PAGE_SIZE // nr_nodes
        if pages_per_node < 1:
            raise InvalidArgument(f"size {nbytes} is less than one page per node "
                                  f"({nr_nodes} nodes of {PAGE_SIZE} bytes)")
        if pages_per_node * nr_nodes >= 0xFFFFFFFF:
            raise InvalidArgument(f"size {nbytes} exceeds the 32-bit frame numbers")
        self.page_size = PAGE_SIZE
        self.max_order = min(MAX_ORDER_LIMIT, pages_per_node.bit_length() - 1)
        self._max_block_bytes = PAGE_SIZE << self.max_order
        self.scrub_mode = scrub
        self.debug = debug
        self._mode = SCRUB_MODES[scrub]
        self._pages_per_node = pages_per_node
        self.total_pages = pages_per_node * nr_nodes

        self._arenas = [Arena(node, pages_per_node * PAGE_SIZE) for node in self.topology.nodes]
        with default_numpy_memory():  # never from a domain's handler the caller installed
            self._state = new_state(nr_nodes, pages_per_node, max_domains, prim.zeroed_array)
            self._all_nodes = np.arange(nr_nodes, dtype=np.int64)
            self._charges = ChargeBook()  # scrub work by the domain that dirtied the memory
        self._fill_state(max_domains)
        s = self._state
        init_heap(s["ft32"], s["ft8"], s["nodes"], s["lists"], s["meta"])
        # The arguments every domain kernel starts with (allocation adds the zone table).
        self._arrays = (s["ft32"], s["ft8"], s["nodes"], s["lists"], s["doms"], s["meta"])
        self._node_arrays = (s["ft32"], s["ft8"], s["nodes"], s["lists"], s["meta"])
        self._zone = s["zone"]
        self._cpu_node = self.topology.cpu_to_node()

        self._lock = threading.Lock()  # domain slots and the closed flag
        self._closed = False
        self._forked = False  # an inherited copy in a forked child (set by the fork hook)
        self._closed_reason = "the heap is closed"
        self._release_lock = threading.Lock()  # one release_unused at a time
        self._numpy_handlers = 0  # numpy handlers made; their arrays may outlive close()
        self._free_slots = list(range(max_domains - 1, -1, -1))
        self._dying_slots: list[int] = []
        self._next_id = 1

        # Live domains: to drain their reuse caches, and to drop their numpy handlers at close.
        # Changed and copied under self._lock (live_domains): the scrubber reads it too.
        self._domains: weakref.WeakSet[Domain] = weakref.WeakSet()
        # The reuse counters of destroyed domains' caches (hits, hit pages, parks, returned),
        # for the statistics; a live domain's are in its cache.
        self._reuse_retired = (0, 0, 0, 0)
        self._next_tick = 0.0  # time.monotonic() of the next _tick's chores
        self._scrubbers: list[Scrubber] = []
        self._scrubber_of = [0] * nr_nodes
        if self._mode == MODE_IDLE:
            with default_numpy_memory():
                self._start_scrubbers()
        _heaps.add(self)

    def _fill_state(self, max_domains: int) -> None:
        s = self._state
        meta, nodes, zone = s["meta"], s["nodes"], s["zone"]
        meta[M_NR_PAGES] = self.total_pages
        meta[M_NR_NODES] = len(self._arenas)
        meta[M_PAGES_PER_NODE] = self._pages_per_node
        meta[M_MAX_ORDER] = self.max_order
        meta[M_MODE] = self._mode
        meta[M_DEBUG] = int(self.debug)
        meta[M_REUSE] = int(self._reuse_blocks)
        meta[M_MAX_DOMAINS] = max_domains
        for i, arena in enumerate(self._arenas):
            nodes[i, N_BASE] = i * self._pages_per_node
            nodes[i, N_PAGES] = self._pages_per_node
            nodes[i, N_ADDR] = arena.address
            zone[i, :] = self.topology.zone_order(i)

    def _start_scrubbers(self) -> None:
        for node_ids, cpus in plan_scrubbers(self.topology):
            # The first scrubber also does the heap's periodic chores (_tick).
            scrubber = Scrubber(self._state, node_ids, cpus, self._arenas, self.scrub_deadline,
                                self._charges, None if self._scrubbers else self._tick)
            for node in node_ids:
                self._scrubber_of[node] = len(self._scrubbers)
            self._scrubbers.append(scrubber)
            scrubber.start()

    # --- properties ----------------------------------------------------------------------
    @property
    def nodes(self) -> int:
        """Number of nodes (real or emulated)."""
        return len(self._arenas)

    @property
    def closed(self) -> bool:
        """True once close() has begun."""
        return self._closed

    @property
    def scrubbers(self) -> list[Scrubber]:
        """The background scrubber threads (none unless scrub="idle")."""
        return list(self._scrubbers)

    # --- helpers for Domain and Block ----------------------------------------------------
    def _node_of(self, mfn: int) -> int:
        return mfn // self._pages_per_node

    def _locate(self, mfn: int) -> tuple[Arena, int]:
        """The arena holding page ``mfn`` and the page's byte offset in it."""
        node = self._node_of(mfn)
        return self._arenas[node], (mfn - node * self._pages_per_node) * PAGE_SIZE

    def _view(self, mfn: int, nbytes: int) -> memoryview:
        arena, offset = self._locate(mfn)
        return arena.view(offset, nbytes)

    def _bytes(self, mfn: int, nbytes: int) -> np.ndarray:
        """A uint8 numpy view of ``nbytes`` from page ``mfn``: a slice of the arena's array,
        cheaper to make than a view through a memoryview."""
        arena, offset = self._locate(mfn)
        return arena.array[offset:offset + nbytes]

    def _check_order(self, order: object, what: str = "order") -> int:
        # type() first: the ABC check costs a quarter of a microsecond on every allocation.
        if type(order) is not int and (isinstance(order, bool)
                                       or not isinstance(order, numbers.Integral)):
            raise InvalidArgument(f"order must be an int, got {order!r}")
        order = int(order)
        if not 0 <= order <= self.max_order:
            raise InvalidArgument(f"{what}: order {order} is outside 0..{self.max_order} "
                                  "(the largest chunk of this heap)")
        return order

    def _placement(self, node: int | None) -> tuple[int, bool]:
        """(preferred node, exact): the calling CPU's node first, or exactly ``node``."""
        if node is None:
            return self._cpu_node.get(prim.current_cpu(), 0), False
        if (isinstance(node, bool) or not isinstance(node, numbers.Integral)
                or not 0 <= node < self.nodes):
            raise InvalidArgument(f"node must be None or 0..{self.nodes - 1}, got {node!r}")
        return int(node), True

    def _call(self, kernel, *args):
        """Run an API kernel (native_kernels.api) over the state; HeapClosed once closed.

        Returns the kernel's result: a status or value, or a (status, value) pair.
        """
        if self._forked:  # no kernel call: numba's locks may be held by a parent thread
            raise HeapClosed(self._closed_reason)
        result = kernel(*self._arrays, *args)
        if (result if type(result) is int else result[0]) == E_CLOSED:
            raise HeapClosed(self._closed_reason)
        return result

    def _wake(self, node_mask: int) -> None:
        """Wake the scrubbers of the nodes in ``node_mask`` (frees left them 1 MiB dirty);
        bit 63 may make the mask negative, which ``>>`` reads as two's complement."""
        if not self._scrubbers:
            return
        for node in range(self.nodes):
            if node_mask >> node & 1:
                self._scrubbers[self._scrubber_of[node]].wakeup.set()

    def _refuse_if_forked(self) -> None:
        """HeapClosed in a forked child, before any kernel runs (see _disown_heaps_after_fork)."""
        if self._forked:
            raise HeapClosed(self._closed_reason)

    def _dirty_pages(self, nodes: np.ndarray | None = None) -> int:
        """Dirty pages on ``nodes`` (all by default), read atomically."""
        self._refuse_if_forked()
        selected = self._all_nodes if nodes is None else nodes
        return int(column_sum(self._state["nodes"], N_NEED_SCRUB, selected))

    def _live_domains(self) -> list[Domain]:
        """A copy of the live domains (a WeakSet cannot be iterated while another thread
        adds to it)."""
        with self._lock:
            return list(self._domains)

    def _flush_reuse(self, dom: Domain | None = None) -> bool:
        """Give the blocks parked for reuse by ``dom`` (every domain, if None) back to the
        heap: an allocation found its quota or the heap short. True if any went back."""
        doms = [dom] if dom is not None else self._live_domains()
        return sum(d._return_parked() for d in doms) > 0

    def _tick(self) -> None:
        """Periodic chores, done by the first scrubber at most every TICK_S: idle domains'
        parked blocks go back to the heap, and the allocators' scrub charges into the book
        before their slots fill up."""
        now = time.monotonic()
        if now < self._next_tick:
            return
        self._next_tick = now + TICK_S
        self._trim_reuse()
        self._charges.drain_allocators(self._state["nodes"], self.nodes)

    def _trim_reuse(self) -> None:
        """Give back the parked blocks of domains that have not used them for a while, so
        that they reach the scrubbers (and the dirty-lifetime bound) too."""
        stale = time.monotonic() - REUSE_IDLE_S
        for dom in self._live_domains():
            reuse = dom._reuse
            # Each kind by its own clock; both go back together (a busy one just refills).
            if (reuse is not None and reuse.used_at < stale and reuse.cached_bytes()) \
                    or dom._parked_numpy_since(stale):
                dom._return_parked()

    def _retire_slot(self, slot: int) -> None:
        """A destroyed domain's slot: free now, or once numpy frees its last pinned block."""
        with self._lock:
            self._dying_slots.append(slot)

    def _reap_slots(self) -> None:
        """Move slots of domains laid to rest to the free list; caller holds self._lock."""
        doms = self._state["doms"]
        still_dying = []
        for slot in self._dying_slots:
            if domain_kernels.domain_row(doms, slot)[D_STATE] == DOM_DEAD:
                self._free_slots.append(slot)
            else:
                still_dying.append(slot)
        self._dying_slots = still_dying

    # --- public API ----------------------------------------------------------------------
    def create_domain(self, name: str | None = None, max_bytes: int | str | None = None
                      ) -> Domain:
        """A new, empty domain; ``max_bytes`` caps what it may hold (rounded up to pages)."""
        max_pages = 0
        if max_bytes is not None:
            quota = parse_size(max_bytes, what="max_bytes")
            if quota == 0:
                raise InvalidArgument("max_bytes must be positive (or None for no quota)")
            # A quota beyond the heap cannot bind; capping it keeps it within int64.
            max_pages = min(-(-quota // PAGE_SIZE), self.total_pages + 1)
        if name is not None and not isinstance(name, str):
            raise InvalidArgument(f"name must be a str, got {name!r}")
        with self._lock:
            if self._closed:
                raise HeapClosed(self._closed_reason)
            self._reap_slots()
            if not self._free_slots:
                raise OutOfMemory(f"all {len(self._state['doms'])} domain slots are in use")
            slot = self._free_slots.pop()
            dom_id = self._next_id
            self._next_id += 1
        state = self._state["doms"][slot, D_STATE]
        if state not in (DOM_FREE, DOM_DEAD):
            raise HeapCorruption(f"domain slot {slot} was handed out while in state {state}")
        domain_kernels.open_domain(self._state["doms"], slot, dom_id, max_pages)
        dom = Domain(self, slot, dom_id, name, max_pages)
        with self._lock:
            self._domains.add(dom)
        self._charges.opened(dom_id, dom.name)
        return dom

    def stats(self) -> stats.HeapStats:
        """Counters of the heap and of each node, in bytes under the names Python memory
        pools use (bytes_allocated, max_memory, total_bytes_allocated, num_allocations),
        in pages where pages are the point; xenheap.stats documents every field."""
        self._refuse_if_forked()
        return stats.heap_stats(self)

    def dump(self) -> str:
        """Free pages per node and order, then unscrubbed pages per node (after Xen's 'H'
        debug key), under the heading ``xenheap: heap info (<Heap ...>)``."""
        self._refuse_if_forked()
        return stats.dump(self)

    def check(self) -> None:
        """Raise HeapCorruption naming the first broken invariant.

        Exact when no call changes the heap meanwhile (allocation, free, destroy,
        release_unused, numpy's callbacks); running scrubbers are stopped for it.
        """
        s = self._state
        with self._lock:
            if self._closed:
                raise HeapClosed(self._closed_reason)
        code, mfn = check_kernels.check_heap(s["ft32"], s["ft8"], s["nodes"], s["lists"],
                                             s["doms"], s["meta"])
        if code != check_kernels.OK:
            raise HeapCorruption(f"{stats.INVARIANTS[code]} (at mfn {mfn})")

    def wait_clean(self, timeout: float | None = None) -> bool:
        """True once no page is dirty; False if ``timeout`` passes first.

        Without running scrubbers (scrub="alloc", or all stopped) nothing will clean the
        heap in the background, so it answers at once.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._dirty_pages() != 0:
            if not any(s.is_alive() for s in self._scrubbers):
                return False
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True

    def release_unused(self, nbytes: int | str | None = None) -> int:
        """Give up to ``nbytes`` (all, if None) of clean free memory back to the OS.

        Uses MADV_DONTNEED: the pages stay free and clean (they read zero when touched
        again) but stop counting towards the process's resident memory. It works in whole
        free chunks, highest orders first, and never splits one, so it may release less
        than ``nbytes``; dirty memory is left to the scrubbers. While a node's chunks are
        being released they are off its free lists, so allocations made meanwhile may find
        less memory. Returns the bytes given back: pages that were resident, so memory
        already released is not counted again.

        If the OS refuses (``madvise`` fails with EINVAL on memory locked by ``mlockall``,
        say), or the call is interrupted, every chunk goes back to the free lists first;
        then ReleaseFailed (or the interrupt) is raised, carrying the bytes given back
        before the failure, which ``stats()["released_bytes"]`` counts too.
        """
        limit = self.total_pages if nbytes is None else \
            min(self.total_pages, -(-parse_size(nbytes, what="nbytes") // PAGE_SIZE))
        self._refuse_if_forked()
        released = [0]
        meta = self._state["meta"]
        with self._release_lock:
            if not api.enter_heap(meta):  # held across the OS calls: close() waits for them
                raise HeapClosed(self._closed_reason)
            try:
                for node in range(self.nodes):
                    if released[0] < limit:
                        self._release_node(node, limit - released[0], released)
            except OSError as exc:
                raise ReleaseFailed(f"release_unused gave back {released[0] * PAGE_SIZE} "
                                    f"bytes, then the OS refused: {exc}",
                                    released[0] * PAGE_SIZE) from exc
            finally:
                api.leave_heap(meta)
                if self.debug:
                    self._wake((1 << self.nodes) - 1)  # released pages came back dirty
        log.debug("released %d pages to the OS", released[0])
        return released[0] * PAGE_SIZE

    def _release_node(self, node: int, limit: int, released: list[int]) -> None:
        """release_unused for one node; adds the pages given to the OS to ``released[0]``."""
        arena = self._arenas[node]
        base = node * self._pages_per_node
        batches = []
        pages = 0
        try:
            # Claim all the chunks first: one given back goes to its list's head, where the
            # next claim would take it again. A batch is listed before it is filled, so an
            # interrupt anywhere still finds every claimed chunk in the finally below.
            claimed = 0
            while claimed < limit:
                with default_numpy_memory():
                    chunks = np.full((RELEASE_BATCH, CLAIM_FIELDS), CHUNK_UNUSED,
                                     dtype=np.int64)
                batches.append(chunks)
                count = claim_clean_chunks(*self._node_arrays, node, limit - claimed, chunks)
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
                return_claimed_chunks(*self._node_arrays, node, chunks, 0 if i else pages)

    def close(self) -> None:
        """Stop the scrubbers, wait for calls in flight, unmap the arenas. Idempotent.

        The arenas stay mapped (freed with the last reference) while a numpy array made
        from this heap may live, or if a scrubber did not stop within its second.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for dom in self._live_domains():  # waits for reuse in progress, then allows none
            dom._return_parked(close=True)
            dom._capsule = None  # only arrays still alive may hold a handler now
        meta = self._state["meta"]
        api.close_heap(meta)  # refuse new calls; scrubbers stop at their next step
        stop_all(self._scrubbers)
        while api.close_heap(meta):  # calls already in kernels finish first
            time.sleep(0.0005)
        stuck = [s.name for s in self._scrubbers if s.is_alive()]
        arrays = self._numpy_handlers and numpy_handlers_live(self._state)
        # The scrubbers and the numpy handlers' records hold the arenas themselves.
        if stuck:
            log.warning("heap closed, arenas left mapped: scrubbers %s still running", stuck)
        elif arrays:  # as designed: the memory goes with the last array
            log.info("heap closed, arenas left mapped while numpy arrays made from it live")
        else:
            for arena in self._arenas:
                arena.close()

    def __enter__(self) -> Heap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Heap {self.total_pages} pages on {self.nodes} node(s), "
                f"scrub={self.scrub_mode!r}{' debug' if self.debug else ''}"
                f"{' closed' if self._closed else ''}>")


def _disown_heaps_after_fork() -> None:
    """In a forked child: every inherited heap refuses use with a clear error.

    The child has a copy of the memory but not the scrubber threads, and a lock word, a
    threading lock or numba's compiler lock may have been held by a parent thread at the
    fork; a working heap cannot be rebuilt from that safely, so the child creates its own
    heaps instead. This hook therefore calls no kernel and takes no lock: the child runs one
    thread, so plain stores into its copy of each state are seen by everything it runs
    later. Closed heaps whose numpy arrays the child inherited are marked too, so that
    numpy's frees and reallocs of those arrays do nothing.
    """
    states = [heap._state for heap in _heaps]
    numpy_alloc = sys.modules.get("xenheap.numpy_alloc")
    if numpy_alloc is not None:
        states += numpy_alloc.inherited_states()
    for state in states:
        state["meta"][M_CLOSED] = 1
        state["meta"][M_FORKED] = 1
    for heap in list(_heaps):
        heap._lock = threading.Lock()
        heap._release_lock = threading.Lock()
        heap._closed = True
        heap._forked = True
        heap._closed_reason = FORKED_REASON
        heap._scrubbers = []
    _heaps.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disown_heaps_after_fork)


def numpy_handlers_live(state: dict) -> bool:
    """Whether a numpy handler of the heap owning ``state`` may still be in use."""
    from xenheap.numpy_alloc import handlers_for  # imported once a handler was made

    return handlers_for(state) > 0


@atexit.register
def _close_heaps() -> None:
    """Stop every scrubber before the interpreter tears down, so exit never hangs."""
    for heap in list(_heaps):
        heap.close()
