"""Raw memory from kernels: addresses as typed pointers, memset and memcpy by address.

Arena memory is reached by address (an int64), not through numpy arrays, so that one kernel
can touch any node's arena; these intrinsics turn addresses into what numba can index.
"""

from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from native_kernels.jit import INTERNAL


@intrinsic
def trailing_zeros(typingctx, word):
    """The index of the lowest set bit of a uint64 (64 if none): one instruction (tzcnt)."""

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i64, [i64, ir.IntType(1)]), "llvm.cttz.i64")
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 0)])

    return types.int64(types.uint64), codegen


@intrinsic
def call_function(typingctx, address, arg):
    """Call the C function at ``address``, which takes an int64 and returns one: how a
    kernel calls back into Python (a ctypes callback, which takes the GIL itself)."""

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(i64, [i64])
        return builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [args[1]])

    return types.int64(types.int64, types.int64), codegen


@intrinsic
def pointer_to(typingctx, addr, dtype):
    """``addr`` (int64) as a typed pointer, for ``numba.carray(pointer_to(a, t), n)``."""
    target = dtype.dtype if isinstance(dtype, types.NumberClass) else dtype.instance_type
    ptr_type = types.CPointer(target)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr_type))

    return ptr_type(types.int64, dtype), codegen


@intrinsic
def voidptr_to_address(typingctx, ptr):
    """A ``void *`` (as numba passes C callbacks' pointers) as an int64 address."""

    def codegen(context, builder, sig, args):
        return builder.ptrtoint(args[0], ir.IntType(64))

    return types.int64(types.voidptr), codegen


@intrinsic
def address_to_voidptr(typingctx, addr):
    """An int64 address as a ``void *`` to return from a C callback."""

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return types.voidptr(types.int64), codegen


@intrinsic
def memset_bytes(typingctx, addr, value, nbytes):
    """libc memset(addr, value, nbytes) through LLVM's intrinsic."""

    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], ir.IntType(8).as_pointer())
        val = context.cast(builder, args[1], sig.args[1], types.uint8)
        cgutils.memset(builder, ptr, args[2], val)
        return context.get_dummy_value()

    return types.void(types.int64, value, types.int64), codegen


@intrinsic
def memcpy_bytes(typingctx, dst, src, nbytes):
    """libc memcpy(dst, src, nbytes) through LLVM's intrinsic; the ranges must not overlap."""

    def codegen(context, builder, sig, args):
        i8p = ir.IntType(8).as_pointer()
        cgutils.raw_memcpy(builder, builder.inttoptr(args[0], i8p),
                           builder.inttoptr(args[1], i8p), args[2], 1)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64), codegen


@intrinsic
def _array_address(typingctx, ary):
    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.ptrtoint(arr.data, ir.IntType(64))

    return types.int64(ary), codegen


@njit(nogil=True, cache=True, **INTERNAL)
def fill_row(flags, row, start, count, value):
    """``flags[row, start:start + count] = value`` for a C-contiguous 2-D uint8 array, as one
    memset: numba compiles the slice assignment to a per-element loop."""
    memset_bytes(_array_address(flags) + row * flags.shape[1] + start, value, count)


@njit(nogil=True, cache=True, **INTERNAL)
def fill_row32(words, row, start, count, value):
    """``words[row, start:start + count] = value`` for a C-contiguous 2-D uint32 array, as a
    plain loop over a raw pointer, which LLVM vectorizes (the slice assignment is not)."""
    out = carray(pointer_to(_array_address(words) + (row * words.shape[1] + start) * 4,
                            types.uint32), count)
    for i in range(count):
        out[i] = value
