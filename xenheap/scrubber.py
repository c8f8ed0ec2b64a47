"""The background scrubbers: one thread per node with CPUs, the userspace form of Xen's idle loop.

Each thread pins itself to its node's CPUs and scrubs its node and the CPU-less nodes nearest
to it, calling the nogil kernel ``scrub_nodes`` for one time slice at a time. It runs at
normal priority, never SCHED_IDLE: a SCHED_IDLE thread that the kernel preempts while it
holds a chunk or a node lock (or the GIL) can keep it for seconds on a busy machine, and an
unprivileged thread can never leave SCHED_IDLE again, so close() could not stop it. Idle
priority is decided instead before each slice:

- "idle" work: a slice runs when some CPU is idle, i.e. fewer other threads are runnable
  (``prim.runnable_threads``) than this process may use CPUs, and, for a thread pinned to
  fewer CPUs than that, when its own CPUs had time other threads left unused lately
  (``prim.cpu_busy_seconds``); the scrubber then uses CPU time nobody else wants, as Xen's
  idle loop does.
- "deadline" work: when a node has been dirty for ``scrub_deadline`` seconds, slices run
  whatever else is runnable, at normal priority, until the node is clean. The CPU this costs
  is counted apart (``deadline_cpu_seconds``, with the looks for an idle CPU before each
  slice: xenheap.charges says how the thread's time is charged).

Otherwise the thread sleeps on an event (set by a free that leaves one of its nodes 1 MiB
dirty), looking again every IDLE_WAIT_S when its nodes are clean, and while they are dirty
but no CPU is idle after BUSY_POLL_S, then twice as long each look up to BUSY_POLL_MAX_S:
each look costs a wake-up, and the cap bounds how late an idle CPU is seen (an idle spell
shorter than the wait may go unseen, leaving the work to the deadline). Finding its nodes
clean, it first notifies the heap's ``cleaned`` condition, on which ``Heap.wait_clean``
waits.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from native_kernels.counters import column_min_where
from native_kernels.layout import E_FAULT, N_DIRTY_SINCE_NS, N_NEED_SCRUB, HeapState
from native_kernels.scrub import scrub_nodes
from native_kernels.switches import set_switch
from xenheap import prim
from xenheap.charges import ChargeBook
from xenheap.errors import HeapClosed, XenHeapError

log = logging.getLogger(__name__)

# Pages zeroed between abort checks. bench/test_scrub_granule.py on the 2-core development
# machine, zeroing 256 MiB (medians of two runs): one libc memset 2.95-2.96 ms; the
# streaming kernel in granules of 64 pages 3.07-3.15 ms (0.94-0.96 of memset), of 16 pages
# 3.49-3.50 ms (0.85), of 4 pages 4.7-4.8 ms. 64 pages (256 KiB) is the smallest granule
# near memset's speed and zeroes in about 3 us: that bounds how long an aborting allocator
# waits for a running scrubber.
GRANULE_PAGES = 64
CHARGE_ROWS = 64  # domains one slice can tell apart; the rest are charged as one
# Pages one step may scan before it looks at the stop flag and the clock again.
BUDGET_PAGES = 4096
SLICE_S = 0.01  # one kernel call: then the GIL, the stop request and idleness are looked at
IDLE_WAIT_S = 0.1  # clean nodes: look again this often even without a wake-up
# Dirty nodes, no idle CPU: look again after BUSY_POLL_S, then twice as long each time up
# to BUSY_POLL_MAX_S (a second of it costs about 50 looks, not 200), anew after a free's
# wake-up or a look that found its nodes clean, overdue or a CPU idle. The cap bounds how
# late an idle CPU is seen, and the shortest idle spell a look is sure to catch.
BUSY_POLL_S = 0.005
BUSY_POLL_MAX_S = 0.02
# A thread pinned to some of the process's CPUs also asks whether other threads left at
# least IDLE_SHARE of one of those unused over the last IDLE_WINDOW_S (/proc/stat counts
# in 10 ms ticks), looking again that often while its nodes are dirty; after a clean spell
# the window starts anew, and its first answer comes after FIRST_WINDOW_S.
IDLE_WINDOW_S = 0.1
FIRST_WINDOW_S = 0.02
IDLE_SHARE = 0.5
ERROR_BACKOFF_S = 0.05
MAX_ERROR_BACKOFF_S = 1.0


class CpuFigures(NamedTuple):
    """A scrubber thread's CPU time, and the parts of it charged to domains."""

    cpu_seconds: float  # the thread's whole CPU time, as the OS counts it (thread_time)
    # Charged by slices run because a CPU was idle, each with the time since the charge
    # before it (xenheap.charges), and by those run because a node was overdue.
    idle_cpu_seconds: float
    deadline_cpu_seconds: float


class Scrubber(threading.Thread):
    """Scrubs ``nodes`` (its own first) from a daemon thread pinned to ``cpus``."""

    def __init__(self, hs: HeapState, nodes: Sequence[int], cpus: Sequence[int],
                 usable_cpus: int, arenas: Sequence[object], deadline_s: float,
                 charges: ChargeBook,
                 cleaned: threading.Condition,
                 on_tick: Callable[[], None] | None = None) -> None:
        super().__init__(name=f"xenheap-scrub-node{nodes[0]}", daemon=True)
        self.nodes = tuple(nodes)
        self._node_array = np.array(self.nodes, dtype=np.int64)
        self.cpus = tuple(cpus)
        # CPUs the process may use, against which idleness is judged: more than this thread,
        # once pinned to its node's CPUs, may use.
        self.usable_cpus = usable_cpus
        # Pinned to fewer CPUs than that: the machine-wide test cannot tell whether its own
        # are the idle ones, so _own_cpus_idle looks (set once pinned).
        self._watch_cpus = False
        self._cpus_idle = True
        self._judged = False  # _cpus_idle comes from a window (not the initial guess)
        self._busy_mark = (0.0, 0.0, 0.0)  # (monotonic, busy, own) at the window's start
        self._busy_poll_s = BUSY_POLL_S  # the next wait while dirty and no CPU is idle
        self.deadline_ns = int(deadline_s * 1e9)
        self._on_tick = on_tick  # called each time round the loop (Heap._tick)
        self._cleaned = cleaned  # notified each time round the loop that finds it all clean
        self._book = charges
        self._charges = np.zeros((CHARGE_ROWS, 2), dtype=np.int64)  # this slice's, by domain
        self._charged_cpu = 0.0  # thread_time when the last slice was charged
        self.wakeup = threading.Event()
        self.errors = 0
        self.last_error: str | None = None
        self.state = "starting"
        self.pinned = False
        # Replaced whole, so that the statistics read the three figures from one moment.
        self.cpu_figures = CpuFigures(0.0, 0.0, 0.0)
        self._stop_requested = threading.Event()
        self._stop_flag = np.zeros(1, dtype=np.int64)  # what the kernel polls
        self._arenas = tuple(arenas)  # the memory it writes stays mapped while it runs
        self._nodes_rows = hs.nodes
        self._hs = hs

    def stop(self) -> None:
        """Ask the thread to stop; it finishes its current bounded step first."""
        self._stop_requested.set()
        set_switch(self._stop_flag, 0, 1)
        self.wakeup.set()

    def _next_step(self) -> tuple[str | None, float]:
        """What to do now: ("idle" | "deadline", 0) to scrub a slice, or (None | "clean",
        seconds to wait)."""
        oldest = column_min_where(self._nodes_rows, N_DIRTY_SINCE_NS, N_NEED_SCRUB,
                                  self._node_array)
        if oldest < 0:  # every node clean
            return "clean", IDLE_WAIT_S
        overdue_in = (oldest + self.deadline_ns - time.monotonic_ns()) / 1e9
        if overdue_in <= 0:
            return "deadline", 0.0
        others = prim.runnable_threads() - 1  # minus this thread
        if others == 0 or (others < self.usable_cpus and self._own_cpus_idle()):
            return "idle", 0.0  # nothing else runs, or a CPU is idle, and one of its own
        if others < self.usable_cpus and not self._judged:
            return None, min(BUSY_POLL_S, overdue_in)  # its own CPUs' first answer is near
        wait_s = self._busy_poll_s
        self._busy_poll_s = min(2 * wait_s, BUSY_POLL_MAX_S)
        return None, min(wait_s, overdue_in)

    def _own_cpus_idle(self) -> bool:
        """Whether the CPUs this thread is pinned to had time that other threads left
        unused (IDLE_SHARE of one of them) over the last IDLE_WINDOW_S: busy ones on its
        node and idle ones elsewhere pass the machine-wide test, and a slice there would
        take time from the threads running on them. Its own CPU time is not counted.
        True for a thread not pinned; False for a pinned one until a first window of
        FIRST_WINDOW_S is measured."""
        if not self._watch_cpus:
            return True
        now = time.monotonic()
        start, busy0, own0 = self._busy_mark
        elapsed = now - start
        if elapsed > 2 * IDLE_WINDOW_S:  # not asked for a while (clean): start anew
            self._start_window()
        elif elapsed >= (IDLE_WINDOW_S if self._judged else FIRST_WINDOW_S):
            busy, own = prim.cpu_busy_seconds(self.cpus), time.thread_time()
            if busy is None:
                self._stop_watching()
            else:
                others = (busy - busy0) - (own - own0)
                self._cpus_idle = others <= (len(self.cpus) - IDLE_SHARE) * elapsed
                self._judged = True
                self._busy_mark = (now, busy, own)
        return self._cpus_idle or not self._watch_cpus

    def _start_window(self) -> None:
        """A new window from now: not idle until its first FIRST_WINDOW_S says so."""
        busy = prim.cpu_busy_seconds(self.cpus)
        if busy is None:
            self._stop_watching()
            return
        self._cpus_idle, self._judged = False, False
        self._busy_mark = (time.monotonic(), busy, time.thread_time())

    def _stop_watching(self) -> None:
        """/proc/stat says nothing of this thread's CPUs: idleness is judged machine-wide
        only, as for a thread not pinned."""
        self._watch_cpus = False
        log.warning("scrubber %s: /proc/stat gives no busy time for CPUs %s; judging idle "
                    "CPUs machine-wide only", self.name, self.cpus)

    def _scrub(self, kind: str) -> None:
        """One slice of scrubbing, its CPU time charged to ``kind``."""
        until = time.monotonic_ns() + int(SLICE_S * 1e9)
        got = scrub_nodes(self._hs, self._node_array, self._stop_flag, BUDGET_PAGES,
                          GRANULE_PAGES, until, self._charges)
        now = time.thread_time()
        # Everything since the last charge, polling included, goes to the domains whose
        # dirt this slice cleaned; a slice that cleaned nothing carries it over.
        charged = now - self._charged_cpu
        if self._book.charge_slice(kind, self._charges, charged):
            self._charged_cpu = now
            self._charges[:] = 0
            figures = self.cpu_figures
            self.cpu_figures = (
                figures._replace(cpu_seconds=now,
                                 deadline_cpu_seconds=figures.deadline_cpu_seconds + charged)
                if kind == "deadline" else
                figures._replace(cpu_seconds=now,
                                 idle_cpu_seconds=figures.idle_cpu_seconds + charged))
        if got == E_FAULT:
            raise XenHeapError(f"injected scrubber fault on nodes {self.nodes}")

    def run(self) -> None:
        if self.cpus:
            self.pinned = prim.pin_current_thread(self.cpus)
            self._watch_cpus = self.pinned and len(self.cpus) < self.usable_cpus
            if self._watch_cpus:
                self._start_window()
        backoff = ERROR_BACKOFF_S
        while not self._stop_requested.is_set():
            try:
                # A free that dirties a node after the clear sets the event again, so the
                # wait below cannot miss it.
                self.wakeup.clear()
                if self._on_tick is not None:
                    # HeapClosed: close() began, and the loop ends at its next look.
                    with contextlib.suppress(HeapClosed):
                        self._on_tick()
                kind, wait_s = self._next_step()
                if kind is not None:  # not waiting for an idle CPU: the next wait starts anew
                    self._busy_poll_s = BUSY_POLL_S
                if kind in (None, "clean"):
                    self.state = "idle"  # before the notification: wait_clean reads it
                    if kind == "clean":
                        with self._cleaned:
                            self._cleaned.notify_all()
                    if self.wakeup.wait(wait_s):  # a free dirtied its nodes: a new spell
                        self._busy_poll_s = BUSY_POLL_S
                else:
                    self.state = "scrubbing"
                    self._scrub(kind)
                backoff = ERROR_BACKOFF_S
            except Exception as exc:
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.state = "error"
                log.exception("scrubber for nodes %s failed; scrub-on-allocate covers it",
                              self.nodes)
                self._stop_requested.wait(backoff)
                backoff = min(backoff * 2, MAX_ERROR_BACKOFF_S)
            finally:
                self.cpu_figures = self.cpu_figures._replace(cpu_seconds=time.thread_time())
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


def ask_to_stop(scrubbers: Sequence[Scrubber]) -> None:
    """Ask every scrubber to stop, without waiting (a collected heap's finalizer does, and
    may run on one of them)."""
    for scrubber in scrubbers:
        scrubber.stop()


def stop_all(scrubbers: Sequence[Scrubber], timeout: float = 1.0) -> None:
    """Stop and join every scrubber, within ``timeout`` seconds in all."""
    ask_to_stop(scrubbers)
    deadline = time.monotonic() + timeout
    for scrubber in scrubbers:
        scrubber.join(max(0.0, deadline - time.monotonic()))
        if scrubber.is_alive():
            log.warning("scrubber %s did not stop within %.1f s", scrubber.name, timeout)
