"""Atomic operations on numpy array elements, as numba intrinsics emitting LLVM atomics.

Every value that another thread may read or write while the owner runs without the heap lock
(lock words, scrub_state, counters, stop flags) goes through these, never through a plain
array element: LLVM could otherwise keep it in a register and spin forever.

``idx`` is an integer for a 1-D array or a tuple of integers for an n-D one; no bounds check.
Orderings: loads acquire, stores release, read-modify-writes sequentially consistent.
"""

import platform

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from native_kernels.jit import INTERNAL

_ACQUIRE = "acquire"
_RELEASE = "release"
_SEQ_CST = "seq_cst"


def _element_pointer(context, builder, aryty, ary, idxty, idx):
    arr = context.make_array(aryty)(context, builder, ary)
    if isinstance(idxty, types.BaseTuple):
        values = cgutils.unpack_tuple(builder, idx, len(idxty))
        value_types = list(idxty)
    else:
        values, value_types = [idx], [idxty]
    values = [
        context.cast(builder, v, t, types.intp)
        for v, t in zip(values, value_types, strict=True)
    ]
    return cgutils.get_item_pointer(context, builder, aryty, arr, values, wraparound=False)


def _align(aryty) -> int:
    return aryty.dtype.bitwidth // 8


@intrinsic
def atomic_load(typingctx, ary, idx):
    """Load ``ary[idx]`` with acquire ordering."""

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        return builder.load_atomic(ptr, _ACQUIRE, _align(sig.args[0]))

    return ary.dtype(ary, idx), codegen


@intrinsic
def atomic_load_relaxed(typingctx, ary, idx):
    """Load ``ary[idx]`` atomically with no ordering (statistics, progress hints)."""

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        return builder.load_atomic(ptr, "monotonic", _align(sig.args[0]))

    return ary.dtype(ary, idx), codegen


@intrinsic
def atomic_store(typingctx, ary, idx, value):
    """Store ``value`` into ``ary[idx]`` with release ordering."""

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        ptr = _element_pointer(context, builder, aryty, args[0], sig.args[1], args[1])
        val = context.cast(builder, args[2], sig.args[2], aryty.dtype)
        builder.store_atomic(val, ptr, _RELEASE, _align(aryty))
        return context.get_dummy_value()

    return types.void(ary, idx, value), codegen


@intrinsic
def atomic_cas(typingctx, ary, idx, expected, desired):
    """Compare-and-swap ``ary[idx]`` from ``expected`` to ``desired``; True if it swapped."""

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        ptr = _element_pointer(context, builder, aryty, args[0], sig.args[1], args[1])
        exp = context.cast(builder, args[2], sig.args[2], aryty.dtype)
        des = context.cast(builder, args[3], sig.args[3], aryty.dtype)
        pair = builder.cmpxchg(ptr, exp, des, _SEQ_CST, _SEQ_CST)
        return builder.extract_value(pair, 1)

    return types.boolean(ary, idx, expected, desired), codegen


def _make_rmw(op: str, doc: str):
    @intrinsic
    def rmw(typingctx, ary, idx, value):
        def codegen(context, builder, sig, args):
            aryty = sig.args[0]
            ptr = _element_pointer(context, builder, aryty, args[0], sig.args[1], args[1])
            val = context.cast(builder, args[2], sig.args[2], aryty.dtype)
            return builder.atomic_rmw(op, ptr, val, _SEQ_CST)

        return ary.dtype(ary, idx, value), codegen

    rmw.__doc__ = doc
    return rmw


fetch_add = _make_rmw("add", "Add ``value`` to ``ary[idx]``; returns the old value.")
fetch_or = _make_rmw("or", "Bitwise-or ``value`` into ``ary[idx]``; returns the old value.")


def _call_no_args(symbol: str, returns_int: bool):
    """Codegen calling an external function by symbol: resolved at link time, so cacheable."""

    def codegen(context, builder, sig, args):
        ret = ir.IntType(32) if returns_int else ir.VoidType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, []), symbol)
        builder.call(fn, [])
        return context.get_dummy_value()

    return codegen


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


@intrinsic
def cpu_relax(typingctx):
    """The x86 PAUSE hint inside a spin loop (numba's JIT has no inline assembler).

    Elsewhere it emits nothing: the atomic load in the loop already keeps the loop honest.
    """
    if _X86:
        return types.void(), _call_no_args("llvm.x86.sse2.pause", returns_int=False)
    return types.void(), lambda context, builder, sig, args: context.get_dummy_value()


@intrinsic
def sched_yield(typingctx):
    """Give the CPU to another runnable thread of equal or higher priority."""
    return types.void(), _call_no_args("sched_yield", returns_int=True)


@intrinsic
def usleep(typingctx, usec):
    """Sleep ``usec`` microseconds: the back-off that lets any preempted holder run."""

    def codegen(context, builder, sig, args):
        arg = context.cast(builder, args[0], sig.args[0], types.uint32)
        fnty = ir.FunctionType(ir.IntType(32), [ir.IntType(32)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "usleep")
        builder.call(fn, [arg])
        return context.get_dummy_value()

    return types.void(usec), codegen


CLOCK_MONOTONIC = 1
CLOCK_MONOTONIC_COARSE = 6


def _clock_ns_codegen(clock_id):
    """Codegen of an intrinsic that reads clock ``clock_id`` in nanoseconds (vDSO
    clock_gettime)."""

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        i32 = ir.IntType(32)
        ts = cgutils.alloca_once(builder, ir.ArrayType(i64, 2))
        fnty = ir.FunctionType(i32, [i32, i64.as_pointer()])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "clock_gettime")
        builder.call(fn, [ir.Constant(i32, clock_id), builder.bitcast(ts, i64.as_pointer())])
        sec = builder.load(builder.gep(ts, [ir.Constant(i64, 0), ir.Constant(i32, 0)]))
        nsec = builder.load(builder.gep(ts, [ir.Constant(i64, 0), ir.Constant(i32, 1)]))
        return builder.add(builder.mul(sec, ir.Constant(i64, 1_000_000_000)), nsec)

    return codegen


@intrinsic
def monotonic_ns(typingctx):
    """CLOCK_MONOTONIC in nanoseconds, read inside a kernel."""
    return types.int64(), _clock_ns_codegen(CLOCK_MONOTONIC)


@intrinsic
def coarse_monotonic_ns(typingctx):
    """CLOCK_MONOTONIC_COARSE in nanoseconds: the same clock as monotonic_ns at the kernel
    tick's resolution (a few ms behind at most), read from the vDSO page without asking
    the clock source, which in a VM can cost more than a whole numpy free."""
    return types.int64(), _clock_ns_codegen(CLOCK_MONOTONIC_COARSE)


SPINS_BEFORE_YIELD = 64
YIELDS_BEFORE_SLEEP = 16
SLEEP_USEC = 50


@njit(nogil=True, cache=True, **INTERNAL)
def backoff(attempt):
    """One step of spin -> yield -> sleep back-off; ``attempt`` counts from 0.

    Spinning alone starves a preempted lock holder that shares the waiters' CPUs
    (docs/design.md, "Threads and locks"); sched_yield hands the CPU only to threads of
    equal or higher priority, a sleep to anyone.
    """
    if attempt < SPINS_BEFORE_YIELD:
        cpu_relax()
    elif attempt < SPINS_BEFORE_YIELD + YIELDS_BEFORE_SLEEP:
        sched_yield()
    else:
        usleep(SLEEP_USEC)


@njit(nogil=True, cache=True)
def atomic_max(ary, idx, value):
    """Raise ``ary[idx]`` to ``value`` if it is lower (a CAS loop); for high-water marks."""
    current = atomic_load(ary, idx)
    while value > current:
        if atomic_cas(ary, idx, current, value):
            return
        current = atomic_load(ary, idx)


@njit(nogil=True, cache=True, **INTERNAL)
def add_locked(ary, idx, delta):
    """Add ``delta`` to a counter that only lock holders write but anyone may read.

    A plain read and an atomic store: no locked instruction, which matters on paths that
    update several counters per block (readers still never see a torn or stale-forever value).
    """
    atomic_store(ary, idx, ary[idx] + delta)
