"""Fault injection for tests: off unless a test turns it on (Heap.inject_fault)."""

from numba import njit

from native_kernels.atomics import atomic_store
from native_kernels.layout import M_FAULT, M_FAULT_ARG


@njit(nogil=True, cache=True)
def set_fault(meta, kind, arg):
    """Arm fault ``kind`` (layout.FAULT_*) with ``arg``; FAULT_NONE disarms."""
    atomic_store(meta, M_FAULT_ARG, arg)
    atomic_store(meta, M_FAULT, kind)
