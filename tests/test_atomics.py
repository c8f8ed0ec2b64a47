"""The numba atomic intrinsics of native_kernels.atomics, called from small test kernels."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_threads
from numba import njit

from native_kernels.atomics import (
    atomic_cas,
    atomic_load,
    atomic_load_relaxed,
    atomic_max,
    atomic_store,
    fetch_add,
    fetch_or,
    monotonic_ns,
)


# --- test kernels ------------------------------------------------------------------------
@njit(nogil=True, cache=True)
def k_load(arr, idx):
    return atomic_load(arr, idx)


@njit(nogil=True, cache=True)
def k_load_relaxed(arr, idx):
    return atomic_load_relaxed(arr, idx)


@njit(nogil=True, cache=True)
def k_store(arr, idx, value):
    atomic_store(arr, idx, value)


@njit(nogil=True, cache=True)
def k_cas(arr, idx, expected, desired):
    return atomic_cas(arr, idx, expected, desired)


@njit(nogil=True, cache=True)
def k_fetch_add(arr, idx, value):
    return fetch_add(arr, idx, value)


@njit(nogil=True, cache=True)
def k_fetch_or(arr, idx, value):
    return fetch_or(arr, idx, value)




@njit(nogil=True, cache=True)
def k_max(arr, idx, value):
    atomic_max(arr, idx, value)


@njit(nogil=True, cache=True)
def k_add_loop(arr, idx, n):
    """fetch_add(arr[idx], 1) n times; returns the sum of the old values it saw."""
    seen = 0
    for _ in range(n):
        seen += fetch_add(arr, idx, 1)
    return seen


@njit(nogil=True, cache=True)
def k_cas_increment_loop(arr, idx, n):
    """Increment arr[idx] n times with a load + CAS retry loop; returns the failed CASes."""
    failures = 0
    for _ in range(n):
        while True:
            old = atomic_load(arr, idx)
            if atomic_cas(arr, idx, old, old + 1):
                break
            failures += 1
    return failures


@njit(nogil=True, cache=True)
def k_or_bits(arr, idx, first_bit, nbits):
    for b in range(first_bit, first_bit + nbits):
        fetch_or(arr, idx, np.int64(1) << b)


@njit(nogil=True, cache=True)
def k_max_loop(arr, idx, start, step, n):
    for i in range(n):
        atomic_max(arr, idx, start + i * step)


@njit(nogil=True, cache=True)
def k_clock():
    return monotonic_ns()


# --- single-threaded semantics -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint8, np.uint32, np.int64])
def test_load_store_1d(dtype) -> None:
    arr = np.zeros(8, dtype=dtype)
    k_store(arr, 3, 7)
    assert arr.tolist() == [0, 0, 0, 7, 0, 0, 0, 0]
    arr[5] = 42
    assert k_load(arr, 5) == 42
    assert k_load_relaxed(arr, 5) == 42
    assert k_load(arr, 3) == 7
    assert k_load(arr, 0) == 0


@pytest.mark.parametrize("dtype", [np.uint8, np.uint32, np.int64])
def test_cas_success_and_failure(dtype) -> None:
    arr = np.zeros(4, dtype=dtype)
    arr[2] = 5
    assert k_cas(arr, 2, 5, 9) is True  # expected matches: swapped
    assert arr[2] == 9
    assert k_cas(arr, 2, 5, 11) is False  # expected stale: nothing written
    assert arr[2] == 9
    assert arr[[0, 1, 3]].tolist() == [0, 0, 0]  # neighbours untouched


@pytest.mark.parametrize("dtype", [np.uint8, np.uint32, np.int64])
def test_fetch_add_or_and_return_old_value(dtype) -> None:
    arr = np.zeros(3, dtype=dtype)
    arr[1] = 0b1010
    assert k_fetch_add(arr, 1, 3) == 0b1010
    assert arr[1] == 0b1101
    assert k_fetch_or(arr, 1, 0b0010) == 0b1101
    assert arr[1] == 0b1111
    assert arr[0] == 0 and arr[2] == 0


def test_fetch_add_wraps_at_the_element_width() -> None:
    u8 = np.array([250], dtype=np.uint8)
    assert k_fetch_add(u8, 0, 10) == 250
    assert u8[0] == 4  # 260 mod 256: an 8-bit atomic, not a wider one
    u32 = np.array([0xFFFFFFFF, 0], dtype=np.uint32)
    assert k_fetch_add(u32, 0, 1) == 0xFFFFFFFF
    assert u32.tolist() == [0, 0]  # the carry did not spill into the next element
    i64 = np.array([5], dtype=np.int64)
    assert k_fetch_add(i64, 0, -7) == 5
    assert i64[0] == -2


def test_uint8_store_touches_one_byte_only() -> None:
    arr = np.full(8, 0xAA, dtype=np.uint8)
    k_store(arr, 4, 0x11)
    k_fetch_or(arr, 5, 0x01)
    assert arr.tolist() == [0xAA, 0xAA, 0xAA, 0xAA, 0x11, 0xAB, 0xAA, 0xAA]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint32, np.int64])
def test_two_dimensional_tuple_indexing(dtype) -> None:
    arr = np.zeros((3, 5), dtype=dtype)
    k_store(arr, (1, 3), 9)
    assert arr[1, 3] == 9 and int(arr.sum()) == 9
    arr[2, 4] = 6
    assert k_load(arr, (2, 4)) == 6
    assert k_cas(arr, (2, 4), 6, 8) is True and arr[2, 4] == 8
    assert k_cas(arr, (2, 4), 6, 1) is False and arr[2, 4] == 8
    assert k_fetch_add(arr, (0, 0), 2) == 0 and arr[0, 0] == 2
    assert k_fetch_or(arr, (0, 1), 4) == 0 and arr[0, 1] == 4
    assert int(arr.sum()) == 9 + 8 + 2 + 4


def test_three_dimensional_and_strided_views() -> None:
    arr = np.zeros((2, 3, 4), dtype=np.int64)
    k_store(arr, (1, 2, 3), 5)
    assert arr[1, 2, 3] == 5 and int(arr.sum()) == 5
    assert k_fetch_add(arr, (0, 1, 2), 7) == 0 and arr[0, 1, 2] == 7
    # A transposed (Fortran-ordered) and a strided view address the right elements.
    base = np.zeros((4, 6), dtype=np.int64)
    k_store(base.T, (5, 2), 3)
    assert base[2, 5] == 3 and int(base.sum()) == 3
    k_store(base[:, ::2], (1, 2), 4)
    assert base[1, 4] == 4 and int(base.sum()) == 7


def test_atomic_max_raises_only() -> None:
    arr = np.array([10, 0], dtype=np.int64)
    k_max(arr, 0, 5)
    assert arr[0] == 10
    k_max(arr, 0, 12)
    assert arr[0] == 12
    k_max(arr, 0, 12)
    assert arr[0] == 12
    u32 = np.zeros((2, 2), dtype=np.uint32)
    k_max(u32, (1, 0), 77)
    assert u32.tolist() == [[0, 0], [77, 0]]


def test_monotonic_ns_moves_forward() -> None:
    a = k_clock()
    b = k_clock()
    assert 0 < a <= b


# --- concurrency ---------------------------------------------------------------------------
def test_fetch_add_counter_hammered_by_four_threads_is_exact() -> None:
    n = 200_000
    arr = np.zeros((2, 8), dtype=np.int64)
    seen = run_threads(k_add_loop, [(arr, (1, 3), n)] * 4)
    assert arr[1, 3] == 4 * n
    assert int(arr.sum()) == 4 * n
    # Every old value 0..4n-1 was returned exactly once across the threads.
    total = 4 * n
    assert sum(seen) == total * (total - 1) // 2


def test_fetch_add_on_uint32_hammered_is_exact() -> None:
    n = 100_000
    arr = np.zeros(4, dtype=np.uint32)
    run_threads(k_add_loop, [(arr, 2, n)] * 4)
    assert arr.tolist() == [0, 0, 4 * n, 0]


def test_cas_retry_loop_from_four_threads_is_exact() -> None:
    n = 50_000
    arr = np.zeros(3, dtype=np.int64)
    run_threads(k_cas_increment_loop, [(arr, 1, n)] * 4)
    assert arr.tolist() == [0, 4 * n, 0]


def test_fetch_or_from_four_threads_keeps_every_bit() -> None:
    arr = np.zeros(2, dtype=np.int64)
    run_threads(k_or_bits, [(arr, 1, 15 * i, 15) for i in range(4)])
    assert arr[1] == (1 << 60) - 1
    assert arr[0] == 0


def test_atomic_max_from_four_threads_keeps_the_maximum() -> None:
    arr = np.zeros(1, dtype=np.int64)
    n = 50_000
    run_threads(k_max_loop, [(arr, 0, i, 4, n) for i in range(4)])
    assert arr[0] == 3 + 4 * (n - 1)
