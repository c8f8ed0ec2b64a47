"""The busy-machine experiment (``xenheap demo --busy N``): the idle-scrubbing heap on an
idle machine and beside N CPU-bound processes, side by side in one run.

Each side runs in a child process (``python -m xenheap.tools.busy``, whose :func:`main`
prints one JSON object), so that the heap has no capability an ordinary user lacks: as root,
where ``/usr/bin/setpriv`` exists, the child starts without ``CAP_SYS_NICE``. For the "busy"
side N hogs (:mod:`xenheap.tools.hogs`) start first and are always stopped afterwards.

What a side measures, on a heap of ``size`` bytes in scrub="idle" mode:

1. a guest takes the whole heap and writes every byte; destroying it is timed, and so is
   the wait until no page is dirty (capped: "timeout");
2. a guest fills and writes the heap again and is destroyed; at once a tenant takes every
   page, order 9 (2 MiB) blocks until OutOfMemory, writing nothing: each allocation is
   timed, and every block must read zero; the longest abort wait comes from ``stats()``;
3. the tenant is destroyed; once the heap is clean (or the cap passed) ``check()`` runs;
   the scrub CPU time is read, ``close()`` is timed, and xenheap threads still alive
   afterwards are listed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from xenheap import Block, Domain, Heap, HeapCorruption, OutOfMemory
from xenheap.tools.hogs import BusyExperimentError, start_hogs, stop_hogs

if TYPE_CHECKING:
    from xenheap.tools.machine import MachineInfo
    from xenheap.tools.progress import ScrubProgress

__all__ = ["BusyExperimentError", "BusyResult", "SideResult", "SideRun", "SideSummary",
           "child_command", "main", "measure_side", "run", "run_child", "summarize"]

log = logging.getLogger(__name__)

DEFAULT_SIZE = 1 << 30
ORDER_2MIB = 9
PATTERN = 0x5A5A5A5A5A5A5A5A
CLEAN_TIMEOUT_S = 20.0  # the measured wait for clean after the destroy
FINAL_CLEAN_TIMEOUT_S = 5.0  # the wait before check(), at the end of a side
CHILD_TIMEOUT_S = 180.0  # a side that takes longer is killed and reported as an error
SETPRIV = "/usr/bin/setpriv"
CAP_SYS_NICE = 23
SIDES = ("idle", "busy")


@dataclass
class SideResult:
    """One side's figures, as the child measured and printed them."""

    pid: int
    cap_sys_nice: bool | None  # None: /proc did not say
    heap_bytes: int
    nodes: int
    destroy_ms: float
    clean_after_ms: float | None  # None: not clean within the clean timeout
    clean_timed_out: bool
    tenant_pages: int
    all_pages_taken: bool
    alloc_2mib_count: int
    alloc_2mib_max_ms: float | None
    alloc_2mib_median_ms: float | None
    all_zero: bool
    abort_wait_max_ms: float
    aborts: int
    final_clean: bool  # clean before check() ran
    check_ok: bool
    check_error: str | None
    scrub_cpu_s: float | None
    close_ms: float
    threads_left: int
    thread_names: list[str]


@dataclass
class SideRun(SideResult):
    """A side's figures, and which round and side they came from (added by the parent)."""

    round: int
    side: str
    hogs: int
    hog_pids: list[int]


@dataclass
class SideSummary:
    """One side's rounds: medians of the times, the worst of the checks."""

    destroy_ms: float | None
    clean_after_ms: float | None
    abort_wait_max_ms: float | None
    alloc_2mib_max_ms: float | None
    close_ms: float | None
    scrub_cpu_s: float | None
    clean_timed_out: bool
    threads_left: int
    all_zero: bool
    all_pages_taken: bool
    check_ok: bool
    final_clean: bool
    cap_sys_nice: bool


@dataclass
class BusyResult:
    """The experiment: both sides summarized, and every round's figures."""

    experiment: str  # "busy"
    size_bytes: int
    heap_bytes: int
    nodes: int
    busy: int
    rounds: int
    launcher: str  # "setpriv" or "plain"
    clean_timeout_s: float
    final_clean_timeout_s: float
    machine: MachineInfo
    sides: dict[str, SideSummary]  # "idle", "busy"
    runs: list[SideRun]


# --- the measured side (runs in the child) ---------------------------------------------------
def has_cap_sys_nice() -> bool | None:
    """Whether this process holds CAP_SYS_NICE (None if /proc does not say)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_NICE & 1)
    except (OSError, ValueError):
        pass
    return None


def _take_all(dom: Domain, timings: list[float] | None = None) -> list[Block]:
    """Allocate every free page to ``dom``: order 9 blocks until OutOfMemory, then smaller.

    ``timings`` receives the seconds each order-9 allocation took.
    """
    blocks: list[Block] = []
    for order in range(min(ORDER_2MIB, dom.heap.max_order), -1, -1):
        while True:
            start = time.perf_counter()
            try:
                blk = dom.alloc(order)
            except OutOfMemory:
                break
            if timings is not None and order == ORDER_2MIB:
                timings.append(time.perf_counter() - start)
            blocks.append(blk)
    return blocks


def _written_guest(heap: Heap, name: str) -> tuple[Domain, list[Block]]:
    """A domain holding the whole heap, every byte written (so every page is resident), and
    its blocks: held until the domain is destroyed, or dropping them would free them."""
    dom = heap.create_domain(name)
    blocks = _take_all(dom)
    for blk in blocks:
        blk.array("uint64").fill(PATTERN)
    return dom, blocks


def _warm_up(nodes: int | None) -> None:
    """Load every kernel the side uses on a tiny heap, so no timing includes numba."""
    with Heap(size=4 << 20, nodes=nodes, scrub="idle") as heap:
        guest, _blocks = _written_guest(heap, "warm-up")
        guest.destroy()
        tenant = heap.create_domain("warm-up-tenant")
        any(blk.array().any() for blk in _take_all(tenant, []))
        tenant.destroy()
        heap.wait_clean(FINAL_CLEAN_TIMEOUT_S)
        heap.check()
        heap.stats()


def measure_side(size: int, nodes: int | None = None,
                 clean_timeout: float = CLEAN_TIMEOUT_S,
                 final_clean_timeout: float = FINAL_CLEAN_TIMEOUT_S) -> SideResult:
    """Run the three phases on a fresh ``Heap(size, scrub="idle")``; its figures."""
    _warm_up(nodes)
    pid, cap_sys_nice = os.getpid(), has_cap_sys_nice()
    heap = Heap(size=size, nodes=nodes, scrub="idle")
    try:
        heap_bytes, heap_nodes = heap.total_pages * heap.page_size, heap.nodes
        guest, blocks = _written_guest(heap, "guest")
        start = time.perf_counter()
        guest.destroy()
        destroy_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        clean = heap.wait_clean(clean_timeout)
        clean_after_ms = (time.perf_counter() - start) * 1e3 if clean else None

        guest, blocks = _written_guest(heap, "guest-2")
        guest.destroy()
        tenant = heap.create_domain("tenant")  # right away: its free memory is all dirty
        timings: list[float] = []
        blocks = _take_all(tenant, timings)
        tenant_pages = tenant.pages
        all_zero = not any(blk.array().any() for blk in blocks)
        stats = heap.stats()
        abort_wait_max_ms = max(n["abort_wait_max_seconds"] for n in stats["nodes"]) * 1e3
        aborts = sum(n["aborts"] for n in stats["nodes"])
        tenant.destroy()
        del blocks

        final_clean = heap.wait_clean(final_clean_timeout)
        check_error: str | None = None
        try:
            heap.check()
        except HeapCorruption as exc:
            check_error = str(exc)
        scrub_cpu_s = heap.stats().get("scrub_cpu_seconds")
    finally:
        start = time.perf_counter()
        heap.close()
        close_ms = (time.perf_counter() - start) * 1e3
    names = [t.name for t in threading.enumerate()
             if t.name.startswith("xenheap-") and t.is_alive()]
    return SideResult(
        pid=pid, cap_sys_nice=cap_sys_nice, heap_bytes=heap_bytes, nodes=heap_nodes,
        destroy_ms=destroy_ms,
        clean_after_ms=clean_after_ms, clean_timed_out=not clean, tenant_pages=tenant_pages,
        all_pages_taken=tenant_pages == heap.total_pages, alloc_2mib_count=len(timings),
        alloc_2mib_max_ms=max(timings) * 1e3 if timings else None,
        alloc_2mib_median_ms=statistics.median(timings) * 1e3 if timings else None,
        all_zero=all_zero, abort_wait_max_ms=abort_wait_max_ms, aborts=aborts,
        final_clean=final_clean, check_ok=check_error is None, check_error=check_error,
        scrub_cpu_s=scrub_cpu_s, close_ms=close_ms, threads_left=len(names),
        thread_names=names)


def main(argv: Sequence[str] | None = None) -> int:
    """The child's entry point: measure one side, print its figures as JSON on stdout."""
    parser = argparse.ArgumentParser(prog="python -m xenheap.tools.busy",
                                     description="one side of xenheap demo --busy")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="heap bytes")
    parser.add_argument("--nodes", type=int, default=None, help="emulated nodes")
    parser.add_argument("--clean-timeout", type=float, default=CLEAN_TIMEOUT_S)
    parser.add_argument("--final-clean-timeout", type=float, default=FINAL_CLEAN_TIMEOUT_S)
    args = parser.parse_args(argv)
    result = measure_side(args.size, args.nodes, args.clean_timeout, args.final_clean_timeout)
    print(json.dumps(asdict(result)))
    sys.stdout.flush()
    return 0


# --- the parent: children, rounds ------------------------------------------------------------
def child_command(size: int, nodes: int | None) -> tuple[list[str], str]:
    """The measured child's command line, and how it is launched ("setpriv" or "plain")."""
    cmd = [sys.executable, "-m", "xenheap.tools.busy", "--size", str(size)]
    if nodes is not None:
        cmd += ["--nodes", str(nodes)]
    if os.geteuid() == 0 and os.path.exists(SETPRIV):
        return [SETPRIV, "--inh-caps=-sys_nice", "--bounding-set=-sys_nice", *cmd], "setpriv"
    return cmd, "plain"


def run_child(cmd: Sequence[str], label: str, timeout: float = CHILD_TIMEOUT_S) -> SideResult:
    """Run one measured side; its result. The child is killed if it overruns."""
    child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BusyExperimentError(f"the {label} side did not finish within {timeout:.0f} s "
                                  "(killed)") from None
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    for line in err.splitlines():
        if line.strip():
            log.warning("%s side: %s", label, line)
    if child.returncode != 0:
        last = next((x for x in reversed(err.splitlines()) if x.strip()), "no message")
        raise BusyExperimentError(f"the {label} side failed (exit status "
                                  f"{child.returncode}): {last.strip()}")
    try:
        return SideResult(**json.loads(out))
    except (ValueError, TypeError):  # not JSON, or not a side's figures
        raise BusyExperimentError(f"the {label} side printed no result") from None


def median_or_none(values: Sequence[float | None]) -> float | None:
    """Median of the figures, where None (a timeout) counts as longer than any figure."""
    if not values:
        return None
    ordered = sorted(values, key=lambda v: math.inf if v is None else v)
    middle = ordered[(len(ordered) - 1) // 2:len(ordered) // 2 + 1]
    if any(v is None for v in middle):
        return None
    return sum(v for v in middle if v is not None) / len(middle)


def summarize(runs: Sequence[SideResult]) -> SideSummary:
    """One side's rounds: medians of the times, the worst of the checks."""
    cpu = [r.scrub_cpu_s for r in runs if r.scrub_cpu_s is not None]
    return SideSummary(
        destroy_ms=median_or_none([r.destroy_ms for r in runs]),
        clean_after_ms=median_or_none([r.clean_after_ms for r in runs]),
        abort_wait_max_ms=median_or_none([r.abort_wait_max_ms for r in runs]),
        alloc_2mib_max_ms=median_or_none([r.alloc_2mib_max_ms for r in runs]),
        close_ms=median_or_none([r.close_ms for r in runs]),
        scrub_cpu_s=statistics.median(cpu) if len(cpu) == len(runs) else None,
        clean_timed_out=any(r.clean_timed_out for r in runs),
        threads_left=max(r.threads_left for r in runs),
        all_zero=all(r.all_zero for r in runs),
        all_pages_taken=all(r.all_pages_taken for r in runs),
        check_ok=all(r.check_ok for r in runs),
        final_clean=all(r.final_clean for r in runs),
        cap_sys_nice=any(r.cap_sys_nice for r in runs))


def run(size: int = DEFAULT_SIZE, busy: int = 4, nodes: int | None = None, rounds: int = 1,
        progress: ScrubProgress | None = None) -> BusyResult:
    """The experiment: ``rounds`` of both sides (their order alternating); medians per side."""
    if busy < 1 or rounds < 1:
        raise ValueError(f"busy and rounds must be at least 1, got {busy} and {rounds}")
    cmd, launcher = child_command(size, nodes)
    runs: list[SideRun] = []
    try:
        for r in range(rounds):
            for label in SIDES if r % 2 == 0 else SIDES[::-1]:
                if progress is not None:
                    progress.stage(f"demo --busy {busy}: round {r + 1} of {rounds}, "
                                   f"{label} side" + (f" ({busy} hogs)" if label == "busy"
                                                      else ""))
                hogs: list[subprocess.Popen] = []
                try:
                    if label == "busy":
                        hogs = start_hogs(busy, CHILD_TIMEOUT_S + 60)
                    result = run_child(cmd, label)
                finally:
                    stop_hogs(hogs)
                runs.append(SideRun(**asdict(result), round=r, side=label, hogs=len(hogs),
                                    hog_pids=[h.pid for h in hogs]))
    finally:
        if progress is not None:
            progress.end()
    from xenheap.tools.machine import machine_info  # only here: the child never needs it

    return BusyResult(
        experiment="busy",
        size_bytes=size,
        heap_bytes=runs[0].heap_bytes,
        nodes=runs[0].nodes,
        busy=busy,
        rounds=rounds,
        launcher=launcher,
        clean_timeout_s=CLEAN_TIMEOUT_S,
        final_clean_timeout_s=FINAL_CLEAN_TIMEOUT_S,
        machine=machine_info(),
        sides={label: summarize([x for x in runs if x.side == label]) for label in SIDES},
        runs=runs,
    )


if __name__ == "__main__":
    sys.exit(main())
