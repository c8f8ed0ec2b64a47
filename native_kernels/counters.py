"""Lock-free snapshots of counter rows for statistics and wake-up decisions."""

import numpy as np
from numba import njit

from native_kernels.atomics import atomic_load_relaxed


@njit(nogil=True, cache=True)
def snapshot(rows):
    """A copy of a 2-D int64 counter array, each element read atomically."""
    out = np.empty_like(rows)
    for i in range(rows.shape[0]):
        for j in range(rows.shape[1]):
            out[i, j] = atomic_load_relaxed(rows, (i, j))
    return out


@njit(nogil=True, cache=True)
def column_sum(rows, column, selected):
    """Sum of ``rows[i, column]`` over the row indices in ``selected``, read atomically."""
    total = 0
    for i in selected:
        total += atomic_load_relaxed(rows, (i, column))
    return total


@njit(nogil=True, cache=True)
def column_min_where(rows, column, nonzero_column, selected):
    """Smallest ``rows[i, column]`` over the rows in ``selected`` whose ``nonzero_column`` is
    not zero (-1 if none), read atomically: the oldest stamp of the nodes that are dirty."""
    best = -1
    for i in selected:
        if atomic_load_relaxed(rows, (i, nonzero_column)) != 0:
            value = atomic_load_relaxed(rows, (i, column))
            if best < 0 or value < best:
                best = value
    return best
