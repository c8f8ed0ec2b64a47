"""Run-time switches in the meta row: fault injection, the closed flag."""

from numba import njit

from native_kernels.atomics import atomic_store


@njit(nogil=True, cache=True)
def set_meta(meta, field, value):
    """Store ``value`` in ``meta[field]`` for every thread to see (release order)."""
    atomic_store(meta, field, value)
