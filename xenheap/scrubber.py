"""The background scrubbers: one idle-priority thread per node with CPUs (Xen's idle loop).

Each thread pins itself to its node's CPUs, asks for SCHED_IDLE, and calls the nogil kernel
``scrub_free_pages`` for its node and for the CPU-less nodes nearest to it, one bounded step
at a time, so that a stop request is seen within milliseconds. It sleeps on an event while
its nodes have nothing dirty; a free that makes one of them dirty sets the event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from native_kernels.layout import E_FAULT
from native_kernels.scrub import NOTHING_DIRTY, scrub_free_pages
from xenheap import prim
from xenheap.errors import XenHeapError

log = logging.getLogger(__name__)

# Pages zeroed between abort checks. bench/test_scrub_granule.py on the 2-core development
# machine, zeroing 256 MiB (medians of two runs): one libc memset 2.95-2.96 ms; the
# streaming kernel in granules of 64 pages 3.07-3.15 ms (0.94-0.96 of memset), of 16 pages
# 3.49-3.50 ms (0.85), of 4 pages 4.7-4.8 ms. 64 pages (256 KiB) is the smallest granule
# near memset's speed and zeroes in about 3 us: that bounds how long an aborting allocator
# waits for a running scrubber.
GRANULE_PAGES = 64
# Pages one kernel call may scan before returning, so stop requests are seen within ~2 ms.
BUDGET_PAGES = 4096
IDLE_WAIT_S = 0.5  # a safety net: a wake-up is normally an event, not this timeout
ERROR_BACKOFF_S = 0.05
MAX_ERROR_BACKOFF_S = 1.0


class Scrubber(threading.Thread):
    """Scrubs ``nodes`` (its own first) from a daemon thread pinned to ``cpus``."""

    def __init__(self, state: dict, nodes: Sequence[int], cpus: Sequence[int],
                 dirty_pages: Callable[[np.ndarray], int]) -> None:
        super().__init__(name=f"xenheap-scrub-node{nodes[0]}", daemon=True)
        self.nodes = tuple(nodes)
        self._node_array = np.array(self.nodes, dtype=np.int64)
        self.cpus = tuple(cpus)
        self.wakeup = threading.Event()
        self.errors = 0
        self.last_error: str | None = None
        self.state = "starting"
        self.pinned = False
        self.idle_priority = False
        self._stop_requested = threading.Event()
        self._arrays = (state["ft32"], state["ft8"], state["nodes"], state["lists"],
                        state["meta"])
        self._dirty_pages = dirty_pages

    def stop(self) -> None:
        """Ask the thread to stop; it finishes its current bounded step first."""
        self._stop_requested.set()
        self.wakeup.set()

    def _scrub_round(self) -> bool:
        """One bounded step on each node; True if any node still had dirty chunks."""
        busy = False
        for node in self.nodes:
            if self._stop_requested.is_set():
                return False
            got = scrub_free_pages(*self._arrays, node, BUDGET_PAGES, GRANULE_PAGES)
            if got == E_FAULT:
                raise XenHeapError(f"injected scrubber fault on node {node}")
            busy |= got != NOTHING_DIRTY
        return busy

    def run(self) -> None:
        if self.cpus:
            self.pinned = prim.pin_current_thread(self.cpus)
        self.idle_priority = prim.set_current_thread_idle()
        backoff = ERROR_BACKOFF_S
        while not self._stop_requested.is_set():
            try:
                self.state = "scrubbing"
                if self._scrub_round():
                    backoff = ERROR_BACKOFF_S
                    continue
                self.state = "idle"
                self.wakeup.clear()
                # A free that dirtied a node after the clear sets the event again.
                if self._dirty_pages(self._node_array) == 0 or not self._scrub_round():
                    self.wakeup.wait(IDLE_WAIT_S)
            except Exception as exc:
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.state = "error"
                log.exception("scrubber for nodes %s failed; scrub-on-allocate covers it",
                              self.nodes)
                self._stop_requested.wait(backoff)
                backoff = min(backoff * 2, MAX_ERROR_BACKOFF_S)
        self.state = "stopped"


def plan_scrubbers(topology) -> list[tuple[list[int], tuple[int, ...]]]:
    """Which nodes each scrubber serves and where it runs: (nodes, cpus) per thread.

    A node with CPUs gets its own scrubber; a node without is served by the scrubber of the
    nearest node with CPUs, or by one unpinned scrubber when no node has CPUs.
    """
    served: dict[int, list[int]] = {}
    for node in topology.nodes:
        owner = topology.nearest_with_cpus(node.id)
        served.setdefault(owner if owner is not None else node.id, []).append(node.id)
    if all(not node.cpus for node in topology.nodes):
        return [([n.id for n in topology.nodes], ())]
    return [(nodes, topology.nodes[owner].cpus) for owner, nodes in sorted(served.items())]


def stop_all(scrubbers: Sequence[Scrubber], timeout: float = 1.0) -> None:
    """Stop and join every scrubber, within ``timeout`` seconds in all."""
    for scrubber in scrubbers:
        scrubber.stop()
    deadline = time.monotonic() + timeout
    for scrubber in scrubbers:
        scrubber.join(max(0.0, deadline - time.monotonic()))
        if scrubber.is_alive():
            log.warning("scrubber %s did not stop within %.1f s", scrubber.name, timeout)
