"""Run-time switches other threads poll: fault injection, scrubber stop requests."""

from numba import njit

from native_kernels.atomics import atomic_store


@njit(nogil=True, cache=True)
def set_switch(flags, index, value):
    """Store ``value`` in ``flags[index]`` for every thread to see (release order)."""
    atomic_store(flags, index, value)
