"""The Heap: per-node arenas, the frame table, domains, scrubbers; the public face of xenheap."""

from __future__ import annotations

import atexit
import logging
import math
import numbers
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence

import numpy as np
from numba.core.compiler_lock import global_compiler_lock

from native_kernels import api
from native_kernels import check as check_kernels
from native_kernels.layout import (
    M_CLOSED,
    M_FORKED,
    MAX_NODES,
    MODE_ALLOC,
    MODE_IDLE,
    MODE_SYNC,
    PAGE_SIZE,
)
from xenheap import collect, prim, stats
from xenheap.core import HeapCore
from xenheap.domain import Domain, parked_numpy_since
from xenheap.errors import (
    HeapClosed,
    HeapCorruption,
    InvalidArgument,
)
from xenheap.giveback import destroy_orphans, free_all_dropped, return_parked
from xenheap.numpy_api import default_numpy_memory
from xenheap.release import release_unused
from xenheap.reuse import DEFAULT_REUSE_BYTES, REUSE_IDLE_S
from xenheap.scrubber import Scrubber, ask_to_stop, plan_scrubbers, stop_all
from xenheap.sizes import parse_size
from xenheap.topology import resolve_topology

log = logging.getLogger(__name__)

SCRUB_MODES = {"idle": MODE_IDLE, "sync": MODE_SYNC, "alloc": MODE_ALLOC}
DEFAULT_MAX_DOMAINS = 4096
# A frame-table owner word holds slot + 1 below OWNER_PINNED's bit; the domain table costs
# DOM_FIELDS words a slot, 320 MiB at this limit.
MAX_DOMAINS_LIMIT = 1 << 20
MAX_QUOTA_PAGES = 2**62  # a larger max_bytes is kept as this many pages (int64 sums)
DEFAULT_SCRUB_DEADLINE_S = 1.0
TICK_S = 0.05  # how often the first scrubber does the heap's periodic chores (_tick)
# wait_clean wakes when a scrubber finds its nodes clean, and looks this often anyway
# (allocators zeroing what they take clean memory too, and notify nobody).
WAIT_CLEAN_POLL_S = 0.005
# How long close() waits for calls still in kernels (or in release_unused's OS calls);
# then it leaves the arenas mapped. One interrupted between counting itself in and out
# (a KeyboardInterrupt at the wrong bytecode) would otherwise make it wait for ever.
CLOSE_IN_FLIGHT_S = 1.0
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
    per block order up to 2 MiB blocks (xenheap.reuse); 0 turns reuse off. Thread-safe; bulk
    heap work (populate, large blocks, destroy, scrubbing) runs without the GIL.

    ``core`` is what the heap shares with its domains (xenheap.core): xenheap's internal
    surface, not for applications.
    """

    def __init__(self, size: int | str = "1GiB", nodes: int | Sequence[Sequence[int]] | None
                 = None, scrub: str = "idle", debug: bool = False,
                 max_domains: int = DEFAULT_MAX_DOMAINS,
                 scrub_deadline: float = DEFAULT_SCRUB_DEADLINE_S,
                 reuse_bytes: int | str = DEFAULT_REUSE_BYTES) -> None:
        if not isinstance(scrub, str) or scrub not in SCRUB_MODES:
            raise InvalidArgument(f"scrub must be one of {sorted(SCRUB_MODES)}, got {scrub!r}")
        if not isinstance(debug, bool):
            raise InvalidArgument(f"debug must be a bool, got {debug!r}")
        if (isinstance(max_domains, bool) or not isinstance(max_domains, (int, np.integer))
                or not 1 <= max_domains <= MAX_DOMAINS_LIMIT):
            raise InvalidArgument(f"max_domains must be an int in 1..{MAX_DOMAINS_LIMIT}, "
                                  f"got {max_domains!r}")
        if (isinstance(scrub_deadline, bool)
                or not isinstance(scrub_deadline, (int, float, np.integer, np.floating))
                or not 0 < scrub_deadline < float("inf")):
            raise InvalidArgument("scrub_deadline must be a positive number of seconds, got "
                                  f"{scrub_deadline!r}")
        self.scrub_deadline = float(scrub_deadline)
        self.reuse_bytes = parse_size(reuse_bytes, what="reuse_bytes")
        # Domains may park freed blocks for their own reuse, except where a free must write
        # the memory ("sync" zeroes it, debug poisons it to catch writes after free).
        reuse_blocks = self.reuse_bytes > 0 and scrub != "sync" and not debug
        nbytes = parse_size(size)
        topology = resolve_topology(nodes)
        nr_nodes = len(topology.nodes)
        if nr_nodes > MAX_NODES:
            raise InvalidArgument(f"at most {MAX_NODES} nodes, got {nr_nodes}")
        pages_per_node = nbytes // PAGE_SIZE // nr_nodes
        if pages_per_node < 1:
            raise InvalidArgument(f"size {nbytes} is less than one page per node "
                                  f"({nr_nodes} nodes of {PAGE_SIZE} bytes)")
        if pages_per_node * nr_nodes >= 0xFFFFFFFF:
            raise InvalidArgument(f"size {nbytes} exceeds the 32-bit frame numbers")
        self.core = core = HeapCore(topology, pages_per_node, max_domains, SCRUB_MODES[scrub],
                                    debug, reuse_blocks)
        self.topology = topology
        self.page_size = PAGE_SIZE
        self.max_order = core.max_order
        self.total_pages = core.total_pages
        self.scrub_mode = scrub
        self.debug = debug
        self._release_lock = threading.Lock()  # one release_unused at a time
        self._next_tick = 0.0  # time.monotonic() of the next _tick's chores
        self._chores = threading.Lock()  # held by _tick's chores; check() holds it to wait
        if core.mode == MODE_IDLE:
            with default_numpy_memory():
                self._start_scrubbers()
        _heaps.add(self)

    def _start_scrubbers(self) -> None:
        core = self.core
        usable_cpus = prim.usable_cpus()  # here: a scrubber's own affinity is its node's
        for node_ids, cpus in plan_scrubbers(self.topology):
            # The first scrubber also does the heap's periodic chores (_tick).
            scrubber = Scrubber(core.hs, node_ids, cpus, usable_cpus, core.arenas,
                                self.scrub_deadline, core.charges, core.cleaned,
                                None if core.scrubbers else _weak_tick(self))
            for node in node_ids:
                core.scrubber_of[node] = len(core.scrubbers)
            core.scrubbers.append(scrubber)
            scrubber.start()
        # A heap dropped unclosed: nothing but the threads would keep it alive, and they
        # stop once it is collected (its arenas go with the last reference).
        weakref.finalize(self, ask_to_stop, core.scrubbers).atexit = False

    # --- properties ----------------------------------------------------------------------
    @property
    def nodes(self) -> int:
        """Number of nodes (real or emulated)."""
        return self.core.nodes

    @property
    def closed(self) -> bool:
        """True once close() has begun."""
        return self.core.closed

    @property
    def scrubbers(self) -> list[Scrubber]:
        """The background scrubber threads (none unless scrub="idle")."""
        return list(self.core.scrubbers)

    def _tick(self) -> None:
        """The first scrubber's chores: destroyed domains' memory is relinquished at once;
        at most every TICK_S, dropped blocks and idle domains' parked blocks go back to
        the heap, and the allocators' scrub charges into the book before their slots fill
        up."""
        now = time.monotonic()
        due = now >= self._next_tick
        if not (due or self.core.relinquishing) or not self._chores.acquire(blocking=False):
            return  # nothing to do yet, or check() is looking at the heap: frees would show
        try:
            self.core.relinquish()  # at once: a destroy just handed it over
            if due:
                self._next_tick = now + TICK_S
                self._tidy_domains()
                self.core.charges.drain_allocators(self.core.state["nodes"], self.nodes)
        finally:
            self._chores.release()

    def _tidy_domains(self) -> None:
        """Free the blocks whose handles were dropped, and give back the parked blocks of
        domains that have not used them for a while, so that they reach the scrubbers (and
        the dirty-lifetime bound) too."""
        free_all_dropped(self.core)
        now = time.monotonic()
        stale = now - REUSE_IDLE_S
        for dom in self.core.live_domains():
            reuse = dom.record.reuse
            # Each kind by its own clock; both go back together (a busy one just refills).
            if (reuse is not None and reuse.quiet_for(now) >= REUSE_IDLE_S
                    and reuse.cached_bytes()) or parked_numpy_since(dom, stale):
                return_parked(self.core, dom.record)

    # --- public API ----------------------------------------------------------------------
    def create_domain(self, name: str | None = None, max_bytes: int | str | None = None
                      ) -> Domain:
        """A new, empty domain; ``max_bytes`` caps what it may hold (rounded up to pages)."""
        max_pages = 0
        if max_bytes is not None:
            quota = parse_size(max_bytes, what="max_bytes")
            if quota == 0:
                raise InvalidArgument("max_bytes must be positive (or None for no quota)")
            max_pages = min(-(-quota // PAGE_SIZE), MAX_QUOTA_PAGES)
        if name is not None and not isinstance(name, str):
            raise InvalidArgument(f"name must be a str, got {name!r}")
        if self.core.orphans:  # collected domains' slots come free
            destroy_orphans(self.core)
        slot, dom_id = self.core.take_slot(max_pages)
        dom = Domain(self, slot, dom_id, name, max_pages)
        with self.core.lock:
            self.core.domains.add(dom)
        return dom

    def stats(self) -> stats.HeapStats:
        """Counters of the heap and of each node, in bytes under the names Python memory
        pools use (bytes_allocated, max_memory, total_bytes_allocated, num_allocations),
        in pages where pages are the point; xenheap.stats documents every field."""
        self.core.refuse_if_forked()
        self.core.relinquish()
        free_all_dropped(self.core)
        with default_numpy_memory():  # its working arrays never come from a caller's domain
            return collect.heap_stats(self)

    def dump(self) -> str:
        """Free pages per node and order, then unscrubbed pages per node (after Xen's 'H'
        debug key), under the heading ``xenheap: heap info (<Heap ...>)``."""
        self.core.refuse_if_forked()
        self.core.relinquish()
        with default_numpy_memory():
            return collect.dump(self)

    def check(self) -> None:
        """Raise HeapCorruption naming the first broken invariant.

        Exact when no call changes the heap meanwhile (allocation, free, destroy,
        release_unused, numpy's callbacks); running scrubbers are stopped for it, and the
        heap's periodic chores wait.
        """
        with self.core.lock:
            if self.core.closed:
                raise HeapClosed(self.core.closed_reason)
        with self._chores:
            self.core.relinquish()  # destroyed domains' memory is on the free lists
            code, mfn = check_kernels.check_heap(self.core.hs)
            if code != check_kernels.OK:
                raise HeapCorruption(f"{stats.INVARIANTS[code]} (at mfn {mfn})")
            hs = self.core.hs
            for dom in self.core.live_domains():
                reuse = dom.record.reuse
                bad = None if reuse is None else reuse.parked_not_owned(dom.slot + 1,
                                                                        hs.ft32, hs.ft8)
                if bad is not None:
                    raise HeapCorruption(f"a block parked for reuse by {dom!r} is not its "
                                         f"block (at mfn {bad}): freed in the heap as well, "
                                         "or parked twice")

    def wait_clean(self, timeout: float | None = None) -> bool:
        """True once no page is dirty, and every scrubber has counted the CPU time of the
        slice that cleaned the last ones (stats() right after sees it); False if
        ``timeout`` passes first.

        Without running scrubbers (scrub="alloc", or all stopped) nothing will clean the
        heap in the background, so it answers at once.
        """
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, numbers.Real)
                                    or not timeout >= 0 or math.isinf(timeout)):
            raise InvalidArgument(f"timeout must be None or a number of seconds >= 0, "
                                  f"got {timeout!r}")
        core = self.core
        core.refuse_if_forked()  # before the condition's lock: a parent thread may hold it
        deadline = None if timeout is None else time.monotonic() + timeout
        core.relinquish()
        while True:
            with core.cleaned:  # looked at under its lock: no notify is missed
                if not self._cleaning():
                    return True
                if not any(s.is_alive() for s in core.scrubbers):
                    return False
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return False
                core.cleaned.wait(WAIT_CLEAN_POLL_S if deadline is None
                                  else min(WAIT_CLEAN_POLL_S, deadline - now))

    def _cleaning(self) -> bool:
        """Pages dirty, a destroyed domain's memory not yet back, or a scrubber in a slice
        (whose CPU time it counts when the slice ends)."""
        core = self.core
        return (core.dirty_pages() != 0 or core.relinquish_pending()
                or any(s.state == "scrubbing" and s.is_alive() for s in core.scrubbers))

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
        self.core.refuse_if_forked()
        self.core.relinquish()
        with self._release_lock, default_numpy_memory():
            return release_unused(self.core, limit)

    def close(self) -> None:
        """Stop the scrubbers, wait for calls in flight, unmap the arenas. Idempotent.

        The arenas stay mapped (freed with the last reference) while a numpy array made
        from this heap may live, if a scrubber did not stop within its second, or if a
        call was still in flight after CLOSE_IN_FLIGHT_S.
        """
        with self.core.lock:
            if self.core.closed:
                return
            self.core.closed = True
            orphans = list(self.core.orphans)  # collected domains: none is destroyed now
            self.core.orphans.clear()
        # Live domains and collected ones alike: their caches' views and their handlers
        # would hold the arenas. Waits for reuse in progress, then allows none.
        for rec in [dom.record for dom in self.core.live_domains()] + orphans:
            return_parked(self.core, rec, close=True)
            rec.capsule = None  # only arrays still alive may hold a handler now
        meta = self.core.state["meta"]
        api.close_heap(meta)  # refuse new calls; scrubbers stop at their next step
        stop_all(self.core.scrubbers)
        deadline = time.monotonic() + CLOSE_IN_FLIGHT_S
        while (in_flight := api.close_heap(meta)) and time.monotonic() < deadline:
            time.sleep(0.0005)  # calls already in kernels finish first
        self.core.relinquishing.clear()  # destroyed domains' memory goes with the heap
        stuck = [s.name for s in self.core.scrubbers if s.is_alive()]
        arrays = self.core.numpy_handlers and numpy_handlers_live(self.core.state)
        # The scrubbers, the numpy handlers' records and the callers hold the arenas.
        if stuck:
            log.warning("heap closed, arenas left mapped: scrubbers %s still running", stuck)
        elif in_flight:
            log.warning("heap closed, arenas left mapped: %d call(s) still counted in "
                        "flight after %.1f s", in_flight, CLOSE_IN_FLIGHT_S)
        elif arrays:  # as designed: the memory goes with the last array
            log.info("heap closed, arenas left mapped while numpy arrays made from it live")
            self.core.arenas_await_arrays = True
            if not numpy_handlers_live(self.core.state):  # the last one went meanwhile
                self.core.close_arenas()
        else:
            self.core.close_arenas()

    def __enter__(self) -> Heap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Heap {self.total_pages} pages on {self.nodes} node(s), "
                f"scrub={self.scrub_mode!r}{' debug' if self.debug else ''}"
                f"{' closed' if self.core.closed else ''}>")


def _weak_tick(heap: Heap) -> Callable[[], None]:
    """``heap._tick`` for the first scrubber, without keeping ``heap`` alive."""
    ref = weakref.ref(heap)

    def tick() -> None:
        alive = ref()
        if alive is not None:
            alive._tick()

    return tick


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
    states = [heap.core.state for heap in _heaps]
    numpy_alloc = sys.modules.get("xenheap.numpy_alloc")
    if numpy_alloc is not None:
        states += numpy_alloc.inherited_states()
    for state in states:
        state["meta"][M_CLOSED] = 1
        state["meta"][M_FORKED] = 1
    for heap in list(_heaps):
        core = heap.core
        core.lock = threading.Lock()
        core.cleaned = threading.Condition()
        heap._release_lock = threading.Lock()
        heap._chores = threading.Lock()
        core.closed = True
        core.forked = True
        core.closed_reason = FORKED_REASON
        core.scrubbers = []
    _heaps.clear()


# numba loads a kernel from its cache, or compiles it, holding its compiler lock. A fork
# while another thread holds it would leave the child's copy held by a thread the child does
# not have, and the child's first kernel call (a heap of its own) would wait forever; so a
# fork waits for that lock and holds it across. Per thread, whether this fork's hook holds
# it: an interrupted wait (the fork goes on regardless) must not be released after.
_fork_hold = threading.local()


def _hold_compiler_lock_for_fork() -> None:
    _fork_hold.held = False
    global_compiler_lock.acquire()
    _fork_hold.held = True


def _release_compiler_lock_after_fork() -> None:
    if getattr(_fork_hold, "held", False):
        _fork_hold.held = False
        global_compiler_lock.release()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disown_heaps_after_fork)
    os.register_at_fork(before=_hold_compiler_lock_for_fork,
                        after_in_parent=_release_compiler_lock_after_fork,
                        after_in_child=_release_compiler_lock_after_fork)


def numpy_handlers_live(state: dict) -> bool:
    """Whether a numpy handler of the heap owning ``state`` may still be in use."""
    from xenheap.numpy_alloc import handlers_for  # imported once a handler was made

    return handlers_for(state) > 0


@atexit.register
def _close_heaps() -> None:
    """Stop every scrubber before the interpreter tears down, so exit never hangs."""
    for heap in list(_heaps):
        heap.close()
