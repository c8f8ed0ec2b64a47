"""The operating-system calls xenheap makes, all in one place.

mmap, madvise, mbind, thread affinity and scheduling policy, sched_getcpu and libc memset.
Calls Python lacks go through ctypes to libc. "Not offered here" (an old kernel, a
container without the privilege) is reported as False, never raised: xenheap runs
without NUMA binding, huge pages or idle priority, only slower.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import mmap
import os
import platform
import threading
from collections.abc import Iterable, Sequence

import numpy as np
import psutil

from native_kernels.layout import PAGE_SIZE
from xenheap.errors import InvalidArgument, OutOfMemory

__all__ = [
    "PAGE_SIZE",
    "address_of",
    "advise_hugepage",
    "allowed_cpus",
    "bind_to_node",
    "capabilities",
    "cpu_busy_seconds",
    "current_cpu",
    "libc_memset",
    "map_anonymous",
    "pin_current_thread",
    "release_pages",
    "resident_pages",
    "resident_set_bytes",
    "runnable_threads",
    "set_current_thread_idle",
]

log = logging.getLogger(__name__)

# One PAGE_SIZE, the layout's: the frame table has a record per page of that size.
if mmap.PAGESIZE != PAGE_SIZE:
    raise ImportError(
        f"xenheap needs {PAGE_SIZE}-byte pages (native_kernels.layout.PAGE_SIZE: one "
        f"frame-table record per page), but this machine's page size is {mmap.PAGESIZE} "
        "bytes (a 16 KiB or 64 KiB arm64 kernel?)"
    )
HUGE_PAGE_SIZE = 2 * 1024 * 1024  # x86_64 and arm64 (4 KiB granule) PMD size

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
MADV_NOHUGEPAGE = getattr(mmap, "MADV_NOHUGEPAGE", 15)
MPOL_PREFERRED = 1
_SYS_MBIND = {"x86_64": 237, "amd64": 237, "aarch64": 235, "arm64": 235}.get(
    platform.machine().lower()
)

_CLK_TCK = os.sysconf("SC_CLK_TCK")  # /proc/stat's tick (USER_HZ)
# errnos meaning "this machine does not offer it": answer False rather than raise.
_UNAVAILABLE = frozenset({errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.EOPNOTSUPP})

_libc = ctypes.CDLL(None, use_errno=True)

_madvise = _libc.madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_madvise.restype = ctypes.c_int

_mincore = _libc.mincore
_mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_mincore.restype = ctypes.c_int
_RESIDENT_BIT = bytes(b & 1 for b in range(256))  # mincore's other bits are reserved

_memset = _libc.memset
_memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
_memset.restype = ctypes.c_void_p

# syscall() is variadic: no argtypes, every argument passed as a full-width long.
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

_sched_getcpu = getattr(_libc, "sched_getcpu", None)
if _sched_getcpu is not None:
    _sched_getcpu.argtypes = ()
    _sched_getcpu.restype = ctypes.c_int


def _check_range(addr: int, nbytes: int) -> None:
    if isinstance(addr, bool) or not isinstance(addr, int) or addr < 0:
        raise InvalidArgument(f"address must be a non-negative int, got {addr!r}")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise InvalidArgument(f"byte count must be a non-negative int, got {nbytes!r}")


def map_anonymous(nbytes: int) -> mmap.mmap:
    """Map ``nbytes`` of private, anonymous, read/write memory without reserving swap.

    The pages read zero and cost nothing until first touched.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise InvalidArgument(f"mapping size must be a positive int, got {nbytes!r}")
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
    try:
        return mmap.mmap(-1, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        if exc.errno == errno.ENOMEM:
            raise OutOfMemory(f"cannot map {nbytes} bytes of address space: {exc}") from exc
        raise


def zeroed_array(shape: int | tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """A zeroed numpy array in its own anonymous mapping, in 4 KiB pages: only the pages
    written cost memory.

    numpy.zeros asks for transparent huge pages on large arrays, so one write into a sparse
    array (the frame table of a large heap, where only chunk heads are written) would
    fault in and zero 2 MiB. The mapping is page-aligned, so rows of a multiple of 64 bytes
    sit on their own cache lines.
    """
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    mapping = map_anonymous(max(count * dt.itemsize, 1))
    _madvise_call(address_of(mapping), len(mapping), MADV_NOHUGEPAGE)  # refused: harmless
    return np.frombuffer(mapping, dtype=dt, count=count).reshape(shape)


def address_of(buf: object) -> int:
    """Start address of a writable, contiguous buffer (an mmap, bytearray, memoryview...).

    Leaves no buffer export behind, so an mmap can still be closed afterwards.
    """
    with memoryview(buf) as view:  # type: ignore[arg-type]
        if view.readonly:
            raise InvalidArgument("address_of needs a writable buffer")
        if not view.c_contiguous:
            raise InvalidArgument("address_of needs a contiguous buffer")
        arr = np.frombuffer(view, dtype=np.uint8) if view.nbytes else None
        # An empty buffer has no meaningful address; numpy would invent one.
        addr = 0 if arr is None else int(arr.ctypes.data)
        del arr  # release the export before the memoryview is released
    return addr


def _madvise_call(addr: int, nbytes: int, advice: int) -> int:
    """Run madvise; 0 on success, else the errno."""
    if _madvise(addr, nbytes, advice) == 0:
        return 0
    return ctypes.get_errno()


def advise_hugepage(addr: int, nbytes: int) -> bool:
    """Ask for transparent huge pages on a range (MADV_HUGEPAGE); False if not offered.

    True means the advice was accepted, not that huge pages will be used: that depends on
    /sys/kernel/mm/transparent_hugepage and on alignment.
    """
    _check_range(addr, nbytes)
    err = _madvise_call(addr, nbytes, MADV_HUGEPAGE)
    if err == 0:
        return True
    if err in _UNAVAILABLE:
        log.debug("madvise(MADV_HUGEPAGE) not offered: %s", os.strerror(err))
        return False
    raise OSError(err, f"madvise(MADV_HUGEPAGE) failed: {os.strerror(err)}")


def release_pages(addr: int, nbytes: int) -> None:
    """Give a page-aligned range back to the OS (MADV_DONTNEED); it then reads zero."""
    _check_range(addr, nbytes)
    err = _madvise_call(addr, nbytes, MADV_DONTNEED)
    if err != 0:
        raise OSError(err, f"madvise(MADV_DONTNEED) failed: {os.strerror(err)}")


def resident_pages(addr: int, nbytes: int) -> int:
    """How many pages of a page-aligned range are in RAM (mincore).

    A page that is not (never touched, already released, or swapped out) takes no RAM:
    releasing it gives nothing back.
    """
    _check_range(addr, nbytes)
    vector = bytearray(-(-nbytes // PAGE_SIZE))
    buf = (ctypes.c_ubyte * len(vector)).from_buffer(vector)
    if _mincore(addr, nbytes, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mincore failed: {os.strerror(err)}")
    del buf  # the bytearray may not be read while a ctypes export holds it
    return vector.translate(_RESIDENT_BIT).count(1)


def bind_to_node(addr: int, nbytes: int, os_node: int) -> bool:
    """Prefer OS NUMA node ``os_node`` for a page-aligned range (mbind, MPOL_PREFERRED).

    Call it before the pages are touched. False where mbind is not offered or the node
    does not exist.
    """
    _check_range(addr, nbytes)
    if isinstance(os_node, bool) or not isinstance(os_node, int) or os_node < 0:
        raise InvalidArgument(f"OS node must be a non-negative int, got {os_node!r}")
    if _SYS_MBIND is None:
        log.debug("mbind: no syscall number known for %s", platform.machine())
        return False
    bits = ctypes.sizeof(ctypes.c_ulong) * 8
    words = os_node // bits + 1
    nodemask = (ctypes.c_ulong * words)()
    nodemask[os_node // bits] = 1 << (os_node % bits)
    # The kernel reads maxnode - 1 bits of the mask.
    maxnode = words * bits + 1
    ctypes.set_errno(0)
    result = _syscall(
        ctypes.c_long(_SYS_MBIND),
        ctypes.c_ulong(addr),
        ctypes.c_ulong(nbytes),
        ctypes.c_long(MPOL_PREFERRED),
        ctypes.c_void_p(ctypes.addressof(nodemask)),
        ctypes.c_ulong(maxnode),
        ctypes.c_ulong(0),
    )
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNAVAILABLE:
        log.debug("mbind to node %d not possible: %s", os_node, os.strerror(err))
        return False
    raise OSError(err, f"mbind to node {os_node} failed: {os.strerror(err)}")


def pin_current_thread(cpus: Iterable[int]) -> bool:
    """Restrict the calling thread (only it, on Linux) to ``cpus``; False on failure."""
    try:
        os.sched_setaffinity(0, set(cpus))
    except (AttributeError, OSError, ValueError, OverflowError, TypeError) as exc:
        log.debug("cannot pin thread to CPUs %r: %s", cpus, exc)
        return False
    return True


def set_current_thread_idle() -> bool:
    """Put the calling thread (only it, on Linux) under SCHED_IDLE; False where refused."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError) as exc:
        log.debug("cannot set SCHED_IDLE: %s", exc)
        return False
    return True


def runnable_threads() -> int:
    """Threads runnable on the whole machine right now, the caller included (the kernel's
    nr_running, from /proc/loadavg). Host-wide: a container sees its host's count."""
    with open("/proc/loadavg", "rb") as f:
        return int(f.read().split()[3].split(b"/")[0])


def cpu_busy_seconds(cpus: Sequence[int]) -> float | None:
    """Seconds the CPUs ``cpus`` have spent running anything since boot (not idle, not
    waiting for I/O): their ``cpuN`` lines of /proc/stat, counted in USER_HZ ticks, so
    10 ms steps. None if /proc/stat cannot be read or lacks a line for one of them (a CPU
    taken offline; a container whose /proc/stat numbers its CPUs apart from the host's)."""
    wanted = {b"cpu%d" % cpu for cpu in cpus}
    busy = 0
    found = 0
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if not line.startswith(b"cpu"):
                    break  # the CPU lines come first
                fields = line.split()
                if fields[0] in wanted:
                    # user nice system idle iowait irq softirq steal (guest is in user)
                    ticks = [int(x) for x in fields[1:9]]
                    busy += sum(ticks) - ticks[3] - ticks[4]
                    found += 1
    except (OSError, ValueError, IndexError) as exc:
        log.debug("cannot read /proc/stat: %s", exc)
        return None
    return busy / _CLK_TCK if found == len(wanted) else None


def allowed_cpus() -> set[int]:
    """The CPUs the calling thread may run on (its affinity): the process's, if asked
    before the thread pins itself."""
    return set(os.sched_getaffinity(0))


def usable_cpus() -> int:
    """How many CPUs the calling thread may run on (allowed_cpus)."""
    return len(allowed_cpus())


def resident_set_bytes() -> int:
    """The whole process's resident set size (RSS), in bytes."""
    return int(psutil.Process().memory_info().rss)


def current_cpu() -> int:
    """The CPU the calling thread runs on right now, or -1 where unknown."""
    if _sched_getcpu is None:
        return -1
    return int(_sched_getcpu())


def libc_memset(addr: int, value: int, nbytes: int) -> None:
    """Fill ``nbytes`` at ``addr`` with byte ``value`` using libc memset (GIL released).

    The caller guarantees the range is mapped and writable.
    """
    _check_range(addr, nbytes)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise InvalidArgument(f"memset value must be a byte (0..255), got {value!r}")
    if nbytes == 0:
        return
    if addr == 0:
        raise InvalidArgument("memset to a null address")
    _memset(addr, value, nbytes)


def _probe_mbind() -> bool:
    buf = map_anonymous(PAGE_SIZE)
    try:
        return bind_to_node(address_of(buf), PAGE_SIZE, 0)
    except OSError as exc:
        log.debug("mbind probe failed: %s", exc)
        return False
    finally:
        buf.close()


def _probe_hugepage() -> bool:
    # Map twice the size so a huge-page-aligned range lies inside.
    buf = map_anonymous(2 * HUGE_PAGE_SIZE)
    try:
        start = address_of(buf)
        aligned = (start + HUGE_PAGE_SIZE - 1) & ~(HUGE_PAGE_SIZE - 1)
        return advise_hugepage(aligned, HUGE_PAGE_SIZE)
    except OSError as exc:
        log.debug("MADV_HUGEPAGE probe failed: %s", exc)
        return False
    finally:
        buf.close()


def _probe_sched_idle() -> bool:
    # A throwaway thread, so the caller's own policy is never changed.
    result = [False]

    def probe() -> None:
        try:
            result[0] = set_current_thread_idle() and os.sched_getscheduler(0) == os.SCHED_IDLE
        except (AttributeError, OSError):
            result[0] = False

    thread = threading.Thread(target=probe, name="xenheap-probe-sched-idle", daemon=True)
    thread.start()
    thread.join()
    return result[0]


@functools.lru_cache(maxsize=1)
def _probe_all() -> tuple[tuple[str, bool], ...]:
    return (
        ("mbind", _probe_mbind()),
        ("madv_hugepage", _probe_hugepage()),
        ("sched_idle", _probe_sched_idle()),
    )


def capabilities() -> dict[str, bool]:
    """Which optional OS features work here: "mbind", "madv_hugepage", "sched_idle".

    Probed for real once per process.
    """
    return dict(_probe_all())
