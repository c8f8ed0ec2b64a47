"""The busy-machine experiment (``xenheap demo --busy N``): the idle-scrubbing heap on an
idle machine and beside N CPU-bound processes, side by side in one run.

Each side runs in a child process (``python -m xenheap.busy``, whose :func:`main` prints
one JSON object), so that the heap has no capability an ordinary user lacks: as root, where
``/usr/bin/setpriv`` exists, the child starts without ``CAP_SYS_NICE``. For the "busy" side
N hogs (tight Python loops at normal priority) start first and are always stopped afterwards.

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
import select
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from xenheap import Block, Domain, Heap, HeapCorruption, OutOfMemory, XenHeapError
from xenheap.progress import ScrubProgress
from xenheap.sizes import format_size

log = logging.getLogger(__name__)

DEFAULT_SIZE = 1 << 30
ORDER_2MIB = 9
PATTERN = 0x5A5A5A5A5A5A5A5A
CLEAN_TIMEOUT_S = 20.0  # the measured wait for clean after the destroy
FINAL_CLEAN_TIMEOUT_S = 5.0  # the wait before check(), at the end of a side
CHILD_TIMEOUT_S = 180.0  # a side that takes longer is killed and reported as an error
HOG_READY_TIMEOUT_S = 10.0
HOG_STOP_TIMEOUT_S = 2.0
SETPRIV = "/usr/bin/setpriv"
CAP_SYS_NICE = 23
SIDES = ("idle", "busy")
FIELDS = ("destroy_ms", "clean_after_ms", "abort_wait_max_ms", "alloc_2mib_max_ms",
          "scrub_cpu_s", "close_ms", "threads_left", "all_zero", "check_ok")

# A hog: a tight loop, no numpy, ended by SIGTERM, by its deadline, or when its parent
# goes away (it is then re-parented), so that not even a killed parent leaves one behind.
HOG_CODE = """\
import os, sys, time
ppid, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
sys.stdout.write("r"); sys.stdout.close()
try:
    while os.getppid() == ppid and time.monotonic() < end:
        for _ in range(100000):
            pass
except KeyboardInterrupt:
    pass
"""


class BusyExperimentError(XenHeapError):
    """A side of the busy experiment failed or overran its time (the child was killed)."""


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


def _written_guest(heap: Heap, name: str) -> Domain:
    """A domain holding the whole heap, every byte written (so every page is resident)."""
    dom = heap.create_domain(name)
    for blk in _take_all(dom):
        blk.array("uint64").fill(PATTERN)
    return dom


def _warm_up(nodes: int | None) -> None:
    """Load every kernel the side uses on a tiny heap, so no timing includes numba."""
    with Heap(size=4 << 20, nodes=nodes, scrub="idle") as heap:
        _written_guest(heap, "warm-up").destroy()
        tenant = heap.create_domain("warm-up-tenant")
        any(blk.array().any() for blk in _take_all(tenant, []))
        tenant.destroy()
        heap.wait_clean(FINAL_CLEAN_TIMEOUT_S)
        heap.check()
        heap.stats()


def measure_side(size: int, nodes: int | None = None,
                 clean_timeout: float = CLEAN_TIMEOUT_S,
                 final_clean_timeout: float = FINAL_CLEAN_TIMEOUT_S) -> dict:
    """Run the three phases on a fresh ``Heap(size, scrub="idle")``; the figures as a dict."""
    _warm_up(nodes)
    out: dict = {"pid": os.getpid(), "cap_sys_nice": has_cap_sys_nice()}
    heap = Heap(size=size, nodes=nodes, scrub="idle")
    try:
        out.update(heap_bytes=heap.total_pages * heap.page_size, nodes=heap.nodes,
                   scrubbers_idle_priority=[getattr(s, "idle_priority", None)
                                            for s in heap.scrubbers])
        guest = _written_guest(heap, "guest")
        start = time.perf_counter()
        guest.destroy()
        out["destroy_ms"] = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        clean = heap.wait_clean(clean_timeout)
        out["clean_after_ms"] = (time.perf_counter() - start) * 1e3 if clean else None
        out["clean_timed_out"] = not clean

        _written_guest(heap, "guest-2").destroy()
        tenant = heap.create_domain("tenant")  # right away: its free memory is all dirty
        timings: list[float] = []
        blocks = _take_all(tenant, timings)
        out["tenant_pages"] = tenant.pages
        out["all_pages_taken"] = tenant.pages == heap.total_pages
        out["alloc_2mib_count"] = len(timings)
        out["alloc_2mib_max_ms"] = max(timings) * 1e3 if timings else None
        out["alloc_2mib_median_ms"] = statistics.median(timings) * 1e3 if timings else None
        out["all_zero"] = not any(blk.array().any() for blk in blocks)
        stats = heap.stats()
        out["abort_wait_max_ms"] = max(n["abort_wait_ns_max"] for n in stats["nodes"]) / 1e6
        out["aborts"] = sum(n["aborts"] for n in stats["nodes"])
        del blocks
        tenant.destroy()

        out["final_clean"] = heap.wait_clean(final_clean_timeout)
        try:
            heap.check()
            out["check_ok"], out["check_error"] = True, None
        except HeapCorruption as exc:
            out["check_ok"], out["check_error"] = False, str(exc)
        out["scrub_cpu_s"] = heap.stats().get("scrub_cpu_seconds")
    finally:
        start = time.perf_counter()
        heap.close()
        out["close_ms"] = (time.perf_counter() - start) * 1e3
    names = [t.name for t in threading.enumerate()
             if t.name.startswith("xenheap-") and t.is_alive()]
    out["threads_left"], out["thread_names"] = len(names), names
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """The child's entry point: measure one side, print its figures as JSON on stdout."""
    parser = argparse.ArgumentParser(prog="python -m xenheap.busy",
                                     description="one side of xenheap demo --busy")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="heap bytes")
    parser.add_argument("--nodes", type=int, default=None, help="emulated nodes")
    parser.add_argument("--clean-timeout", type=float, default=CLEAN_TIMEOUT_S)
    parser.add_argument("--final-clean-timeout", type=float, default=FINAL_CLEAN_TIMEOUT_S)
    args = parser.parse_args(argv)
    result = measure_side(args.size, args.nodes, args.clean_timeout, args.final_clean_timeout)
    print(json.dumps(result))
    sys.stdout.flush()
    return 0


# --- the parent: hogs, children, rounds ------------------------------------------------------
def start_hogs(count: int, lifetime: float) -> list[subprocess.Popen]:
    """Start ``count`` CPU-bound processes and wait until each is running.

    On any failure (or an interrupt) the ones already started are stopped before raising.
    """
    hogs: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            hogs.append(subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", HOG_CODE, str(os.getpid()), str(lifetime)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                start_new_session=True))  # the terminal's ^C is ours to handle, not theirs
        deadline = time.monotonic() + HOG_READY_TIMEOUT_S
        for hog in hogs:
            ready, _, _ = select.select([hog.stdout], [], [],
                                        max(0.0, deadline - time.monotonic()))
            if not ready or hog.stdout.read(1) != b"r":
                raise BusyExperimentError(f"hog process {hog.pid} did not start")
            hog.stdout.close()
    except BaseException:
        stop_hogs(hogs)
        raise
    return hogs


def stop_hogs(hogs: Sequence[subprocess.Popen]) -> None:
    """Terminate the hogs and reap them (kill those that do not end in time)."""
    for hog in hogs:
        if hog.poll() is None:
            hog.terminate()
    for hog in hogs:
        try:
            hog.wait(HOG_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            hog.kill()
            hog.wait()
        if hog.stdout is not None and not hog.stdout.closed:
            hog.stdout.close()


def child_command(size: int, nodes: int | None) -> tuple[list[str], str]:
    """The measured child's command line, and how it is launched ("setpriv" or "plain")."""
    cmd = [sys.executable, "-m", "xenheap.busy", "--size", str(size)]
    if nodes is not None:
        cmd += ["--nodes", str(nodes)]
    if os.geteuid() == 0 and os.path.exists(SETPRIV):
        return [SETPRIV, "--inh-caps=-sys_nice", "--bounding-set=-sys_nice", *cmd], "setpriv"
    return cmd, "plain"


def run_child(cmd: Sequence[str], label: str, timeout: float = CHILD_TIMEOUT_S) -> dict:
    """Run one measured side; its JSON result. The child is killed if it overruns."""
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
        return json.loads(out)
    except ValueError:
        raise BusyExperimentError(f"the {label} side printed no result") from None


def _median(values: list) -> float | None:
    """Median of the figures, where None (a timeout) counts as longer than any figure."""
    if not values:
        return None
    ordered = sorted(values, key=lambda v: math.inf if v is None else v)
    middle = ordered[(len(ordered) - 1) // 2:len(ordered) // 2 + 1]
    return None if None in middle else sum(middle) / len(middle)


def summarize(runs: list[dict]) -> dict:
    """One side's rounds: medians of the times, the worst of the checks."""
    def nums(key: str) -> list:
        return [r.get(key) for r in runs]

    summary = {key: _median(nums(key)) for key in
               ("destroy_ms", "clean_after_ms", "abort_wait_max_ms", "alloc_2mib_max_ms",
                "close_ms")}
    cpu = [v for v in nums("scrub_cpu_s") if v is not None]
    summary["scrub_cpu_s"] = statistics.median(cpu) if len(cpu) == len(runs) else None
    summary["clean_timed_out"] = any(r["clean_timed_out"] for r in runs)
    summary["threads_left"] = max(r["threads_left"] for r in runs)
    summary["all_zero"] = all(r["all_zero"] for r in runs)
    summary["all_pages_taken"] = all(r["all_pages_taken"] for r in runs)
    summary["check_ok"] = all(r["check_ok"] for r in runs)
    summary["final_clean"] = all(r["final_clean"] for r in runs)
    summary["cap_sys_nice"] = any(r["cap_sys_nice"] for r in runs)
    return summary


def run(size: int = DEFAULT_SIZE, busy: int = 4, nodes: int | None = None, rounds: int = 1,
        progress: ScrubProgress | None = None) -> dict:
    """The experiment: ``rounds`` of both sides (their order alternating); medians per side."""
    if busy < 1 or rounds < 1:
        raise ValueError(f"busy and rounds must be at least 1, got {busy} and {rounds}")
    cmd, launcher = child_command(size, nodes)
    runs: list[dict] = []
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
                result.update(round=r, side=label, hogs=len(hogs),
                              hog_pids=[h.pid for h in hogs])
                runs.append(result)
    finally:
        if progress is not None:
            progress.end()
    from xenheap import measure  # only here: the child never needs it

    return {
        "experiment": "busy",
        "size_bytes": size,
        "heap_bytes": runs[0]["heap_bytes"],
        "nodes": runs[0]["nodes"],
        "busy": busy,
        "rounds": rounds,
        "launcher": launcher,
        "clean_timeout_s": CLEAN_TIMEOUT_S,
        "final_clean_timeout_s": FINAL_CLEAN_TIMEOUT_S,
        "machine": measure.machine_info(),
        "sides": {label: summarize([x for x in runs if x["side"] == label]) for label in SIDES},
        "runs": runs,
    }


# --- printing ------------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def _cells(side: dict, timeout_s: float) -> list[str]:
    clean = f"timeout (>{timeout_s:g} s)" if side["clean_after_ms"] is None else \
        _ms(side["clean_after_ms"])
    cpu = side["scrub_cpu_s"]
    return [_ms(side["destroy_ms"]), clean, _ms(side["abort_wait_max_ms"]),
            _ms(side["alloc_2mib_max_ms"]), "-" if cpu is None else f"{cpu:.3f}",
            _ms(side["close_ms"]), str(side["threads_left"]),
            "yes" if side["all_zero"] else "NO", "yes" if side["check_ok"] else "NO"]


def format_result(result: dict) -> str:
    """The experiment as printed: a title and one table, idle and busy side by side."""
    labels = ["destroy ms", "clean-after ms", "longest abort wait ms",
              "longest 2 MiB alloc ms", "scrub CPU s", "close ms", "threads left",
              "all zero", "check ok"]
    columns = [_cells(result["sides"][s], result["clean_timeout_s"]) for s in SIDES]
    rows = [["", "idle", f"busy ({result['busy']} hog{'s' if result['busy'] > 1 else ''})"],
            *([label, *cells] for label, *cells in zip(labels, *columns, strict=True))]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in
                                                  zip(row[1:], widths[1:], strict=True))])
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    machine = result["machine"]
    nice = any(result["sides"][s]["cap_sys_nice"] for s in SIDES)
    title = (f"xenheap demo --busy {result['busy']}: destroy a {format_size(result['size_bytes'])}"
             f" written domain, scrub=\"idle\", {result['nodes']} node"
             f"{'s' if result['nodes'] > 1 else ''}, heap "
             f"{'WITH' if nice else 'without'} CAP_SYS_NICE ({result['launcher']} child); "
             f"{machine['cpu']}, {machine['cpus']} CPUs; "
             f"median of {result['rounds']} round{'s' if result['rounds'] > 1 else ''}")
    wait = result["final_clean_timeout_s"]
    notes = [f"note: the {s} side's heap was still dirty {wait:g} s after the tenant's "
             "destroy; check() ran on it so" for s in SIDES
             if not result["sides"][s]["final_clean"]]
    return "\n".join([title, "", *lines, *notes])


if __name__ == "__main__":
    sys.exit(main())
