"""The jitted core of xenheap: every state change of the heap happens in these kernels.

All functions here are numba ``@njit(nogil=True, cache=True)`` code over numpy arrays and raw
arena addresses; no Python object crosses into them, so any number of threads run them at once.
"""
