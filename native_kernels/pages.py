"""Raw page memory: zeroing, the SCRUB_DEBUG pattern fill and check, poisoning.

Two ways to fill pages, for two kinds of reader:
- ``fill_pages`` calls LLVM's memset intrinsic (libc ``memset``): cached stores, for a block
  about to be handed to a caller who will touch it next (scrub-on-allocate);
- ``stream_fill_pages`` writes 32-byte vectors with non-temporal stores, as Xen's
  ``clear_page_sse2`` does: for memory nobody reads soon (the scrubber, "sync" destroy). glibc
  memset switches to such stores only for multi-MiB runs. Zeroing 256 MiB in 256 KiB
  granules took 5.6 ms with memset, 3.1 ms with this loop, against 2.95 ms for one memset
  of the whole 256 MiB (bench/test_scrub_granule.py, 2-core development machine, medians).
"""

from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic

from native_kernels.jit import INTERNAL
from native_kernels.layout import PAGE_SHIFT
from native_kernels.raw import memset_bytes, pointer_to


@intrinsic
def _stream_store_32(typingctx, addr, word):
    """Store ``word`` repeated over 64 bytes at ``addr`` with non-temporal 32-byte stores."""

    def codegen(context, builder, sig, args):
        vty = ir.VectorType(ir.IntType(64), 4)
        ptr = builder.inttoptr(args[0], vty.as_pointer())
        vec = ir.Constant(vty, ir.Undefined)
        for k in range(4):
            vec = builder.insert_element(vec, args[1], ir.Constant(ir.IntType(32), k))
        nontemporal = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        for half in (0, 1):
            store = builder.store(vec, builder.gep(ptr, [ir.Constant(ir.IntType(64), half)]),
                                  align=32)
            store.set_metadata("nontemporal", nontemporal)
        return context.get_dummy_value()

    return types.void(types.int64, types.uint64), codegen


@intrinsic
def _store_fence(typingctx):
    """Order the weakly-ordered streaming stores before what follows (an mfence on x86)."""

    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@njit(nogil=True, cache=True)
def stream_fill_pages(addr, npages, value):
    """Set ``npages`` pages from ``addr`` to byte ``value``, bypassing the caches."""
    word = types.uint64(value) * types.uint64(0x0101010101010101)
    for offset in range(0, npages << PAGE_SHIFT, 64):
        _stream_store_32(addr + offset, word)
    _store_fence()


@njit(nogil=True, cache=True)
def fill_pages(addr, npages, value):
    """Set ``npages`` pages from ``addr`` to the byte ``value`` (0 to scrub)."""
    memset_bytes(addr, value, npages << PAGE_SHIFT)


@njit(nogil=True, cache=True, **INTERNAL)
def pages_hold(addr, npages, value):
    """True if every byte of ``npages`` pages from ``addr`` equals ``value``."""
    words = carray(pointer_to(addr, types.uint64), (npages << PAGE_SHIFT) >> 3)
    pattern = types.uint64(value) * types.uint64(0x0101010101010101)
    for i in range(words.shape[0]):
        if words[i] != pattern:
            return False
    return True
