"""The two OS calls a kernel makes itself: mincore and madvise(MADV_DONTNEED).

Everything else the OS offers goes through xenheap.prim, from Python. These two sit inside
the zeroing loop (native_kernels.cleaning.zero_dirty_runs), which runs without the GIL, so
they are declared to LLVM by name, as the libc symbols they are: numba then caches the
kernels that call them (a ctypes function pointer would be a different address in every
process and would forbid the cache).
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

MADV_DONTNEED = 4  # Linux, every architecture


def _libc_call(name, arg_bits):
    def codegen(context, builder, sig, args):
        values = [context.cast(builder, v, t, types.int64 if bits == 64 else types.int32)
                  for v, t, bits in zip(args, sig.args, arg_bits, strict=True)]
        fnty = ir.FunctionType(ir.IntType(32), [ir.IntType(bits) for bits in arg_bits])
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)
        return builder.call(fn, values)

    return codegen


@intrinsic
def sys_mincore(typingctx, addr, length, vector):
    """mincore(addr, length, vector): byte i of ``vector`` (an address) gets bit 0 set if
    page i is resident. Returns 0, or -1 (errno set)."""
    return types.int32(addr, length, vector), _libc_call("mincore", (64, 64, 64))


@intrinsic
def sys_madvise(typingctx, addr, length, advice):
    """madvise(addr, length, advice); returns 0, or -1 (errno set)."""
    return types.int32(addr, length, advice), _libc_call("madvise", (64, 64, 32))
