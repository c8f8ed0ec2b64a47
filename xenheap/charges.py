"""Scrub work charged to the domain that dirtied the memory.

Background zeroing that nobody pays for is what made Linux reject pre-zeroing in the kernel:
its CPU time escapes the owner's accounting. Here every dirty free page records the domain
that freed it (PG_TAG), and whoever zeroes it charges that domain:

- a scrubber counts, per time slice, the pages it zeroed by domain (a table it owns), and
  splits the CPU time the OS counted for its thread (time.thread_time) since its last
  charge over those domains by pages: "idle" slices (a CPU was idle) and "deadline" slices
  (a node stayed dirty past scrub_deadline) apart. So a slice's domains pay for the slice
  and for the thread's time before it since the last charge: watching for idle CPUs (while
  a node is dirty and none is idle; xenheap.scrubber), the heap's periodic chores,
  slices that found nothing to clean. Only the time since the last charge is charged to
  nobody yet (for a scrubber whose nodes stay clean, all of it): the heap reports it as
  scrub_uncharged_cpu_seconds. Within a slice the split is by pages; across slices it is
  not, as a slice that follows a long wait carries that wait;
- an allocator that zeroes dirty pages it took (scrub-on-allocate) adds the pages and the
  nanoseconds it spent to its node's charge slots (layout.N_CHARGES), drained here.

Work on dirt of no domain, and work that found no room (a slice's table full, or every
charge slot of a node taken by other domains between two drains), is booked under id -1,
"(unattributed)". release_unused() never cleans dirty memory (it gives back clean chunks
only), so it has nothing to charge; in debug mode the chunks it gives back read zero
instead of the scrub pattern, and go back dirty with no dirtier: their scrub is
unattributed. The book keeps every live domain and the last HISTORY destroyed ones; a
domain's record (xenheap.domain_record) keeps its own entry, so that its statistics keep
their figures after the book let them go (work on its dirt after that is booked under its
id anew, in the heap's list).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import TypedDict

import numpy as np

from native_kernels.cleaning import drain_charges
from native_kernels.layout import CHARGE_SLOTS, PAGE_SIZE

HISTORY = 1024  # destroyed domains whose charges stay readable


class DomainCharges(TypedDict):
    """What one domain's dirt cost, and who cleaned it."""

    id: int  # the domain's id (-1: unattributed, see the module's docstring)
    name: str
    scrubbed_bytes: int  # bytes of its dirty memory zeroed (or dropped) so far, by anyone
    idle_cpu_seconds: float  # scrubber time spent on it while a CPU was idle
    deadline_cpu_seconds: float  # scrubber time spent on it past the deadline
    alloc_cpu_seconds: float  # allocators' time zeroing it before use (scrub-on-allocate)


def _empty(dom_id: int) -> DomainCharges:
    return DomainCharges(id=dom_id, name=f"d{dom_id}" if dom_id > 0 else "(unattributed)",
                         scrubbed_bytes=0, idle_cpu_seconds=0.0, deadline_cpu_seconds=0.0,
                         alloc_cpu_seconds=0.0)


class ChargeBook:
    """The charges of one heap's domains (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._book: OrderedDict[int, DomainCharges] = OrderedDict()
        self._dead: deque[int] = deque()  # destroyed domains, oldest first
        self._rows = np.zeros((CHARGE_SLOTS + 1, 3), dtype=np.int64)  # drain buffer

    def _entry(self, dom_id: int) -> DomainCharges:
        """The entry of ``dom_id``, made if need be: one not opened here (work on the dirt of
        a domain already evicted) joins the destroyed ones, so that it is evicted in turn."""
        entry = self._book.get(dom_id)
        if entry is None:
            entry = self._book[dom_id] = _empty(dom_id)
            if dom_id > 0:
                self._remember_dead(dom_id)
        return entry

    def _remember_dead(self, dom_id: int) -> None:
        self._dead.append(dom_id)
        while len(self._dead) > HISTORY:
            self._book.pop(self._dead.popleft(), None)

    def opened(self, dom_id: int, name: str) -> DomainCharges:
        """A new domain: its entry, under its name (kept by the domain's record too)."""
        with self._lock:
            entry = self._book[dom_id] = _empty(dom_id)
            entry["name"] = name
        return entry

    def destroyed(self, dom_id: int) -> None:
        """Keep the destroyed domain's charges (later work on its dirt still adds to them)
        among the last HISTORY."""
        with self._lock:
            self._remember_dead(dom_id)

    def charge_slice(self, kind: str, table: np.ndarray, cpu_seconds: float) -> bool:
        """Split a scrubber's ``cpu_seconds`` over the rows (id, pages) of its ``table``,
        by pages, as ``kind`` ("idle" or "deadline") work. False (nothing charged) if the
        table is empty: the caller carries the time over to its next slice."""
        used = table[table[:, 1] > 0]
        total = int(used[:, 1].sum()) if used.size else 0
        if total == 0:
            return False
        field = "idle_cpu_seconds" if kind == "idle" else "deadline_cpu_seconds"
        with self._lock:
            for dom_id, pages in used.tolist():
                entry = self._entry(dom_id)
                entry["scrubbed_bytes"] += pages * PAGE_SIZE
                entry[field] += cpu_seconds * pages / total  # type: ignore[literal-required]
        return True

    def drain_allocators(self, nodes: np.ndarray, nr_nodes: int) -> None:
        """Move the allocators' charges out of the nodes' slots into the book."""
        with self._lock:
            for node in range(nr_nodes):
                rows = drain_charges(nodes, node, self._rows)
                for dom_id, pages, ns in self._rows[:rows].tolist():
                    entry = self._entry(dom_id)
                    entry["scrubbed_bytes"] += pages * PAGE_SIZE
                    entry["alloc_cpu_seconds"] += ns / 1e9

    def copy(self, entry: DomainCharges) -> DomainCharges:
        """A copy of ``entry`` (one that opened() gave), as charged so far."""
        with self._lock:
            return DomainCharges(**entry)

    def all(self) -> list[DomainCharges]:
        """Copies of every entry: live domains and the last HISTORY destroyed ones."""
        with self._lock:
            return [DomainCharges(**entry) for entry in self._book.values()]
