"""The background scrubbers: one idle-priority thread per node with CPUs (Xen's idle loop).

Each thread pins itself to its node's CPUs, asks for SCHED_IDLE, and calls the nogil kernel
``scrub_nodes`` for its node and the CPU-less nodes nearest to it. That kernel takes one
bounded step (``scrub_free_pages``) on each node in turn until none is dirty, checking an
atomic stop flag between steps, so it needs the GIL only to return and a stop request is
seen within milliseconds. The thread then sleeps on an event, set by a free that leaves one
of its nodes with 1 MiB or more of dirty pages, and looks again every 0.1 s regardless.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import numpy as np

from native_kernels.layout import E_FAULT
from native_kernels.scrub import scrub_nodes
from native_kernels.switches import set_switch
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
# Pages one step may scan before it looks at the stop flag again: about 0.3 ms of zeroing.
BUDGET_PAGES = 4096
# How often an idle scrubber looks for dirty pages by itself: frees wake it only once a
# node holds buddy.WAKE_DIRTY_PAGES dirty pages (and numpy's frees cannot wake it at all).
IDLE_WAIT_S = 0.1
ERROR_BACKOFF_S = 0.05
MAX_ERROR_BACKOFF_S = 1.0


class Scrubber(threading.Thread):
    """Scrubs ``nodes`` (its own first) from a daemon thread pinned to ``cpus``."""

    def __init__(self, state: dict, nodes: Sequence[int], cpus: Sequence[int],
                 arenas: Sequence[object]) -> None:
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
        self._stop_flag = np.zeros(1, dtype=np.int64)  # what the kernel polls
        self._arenas = tuple(arenas)  # the memory it writes stays mapped while it runs
        self._arrays = (state["ft32"], state["ft8"], state["nodes"], state["lists"],
                        state["meta"])

    def stop(self) -> None:
        """Ask the thread to stop; it finishes its current bounded step first."""
        self._stop_requested.set()
        set_switch(self._stop_flag, 0, 1)
        if self.idle_priority and self.native_id is not None:
            prim.set_thread_normal(self.native_id)  # so it runs, and sees the flag, at once
        self.wakeup.set()

    def _scrub(self) -> None:
        """Scrub until the nodes are clean or a stop is requested."""
        if scrub_nodes(*self._arrays, self._node_array, self._stop_flag, BUDGET_PAGES,
                       GRANULE_PAGES) == E_FAULT:
            raise XenHeapError(f"injected scrubber fault on nodes {self.nodes}")

    def run(self) -> None:
        if self.cpus:
            self.pinned = prim.pin_current_thread(self.cpus)
        self.idle_priority = prim.set_current_thread_idle()
        backoff = ERROR_BACKOFF_S
        while not self._stop_requested.is_set():
            try:
                self.state = "scrubbing"
                self.wakeup.clear()
                # A free that dirties a node after the clear sets the event again, so the
                # wait below cannot miss it.
                self._scrub()
                backoff = ERROR_BACKOFF_S
                self.state = "idle"
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
