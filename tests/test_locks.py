"""The ticket spinlock and spin_lock_cond of native_kernels.locks."""

from __future__ import annotations

import threading
import time

import numpy as np
from conftest import JOIN_TIMEOUT_S, run_threads
from numba import njit

from native_kernels.atomics import atomic_load, atomic_store, fetch_add
from native_kernels.locks import spin_lock, spin_lock_cond, spin_trylock, spin_unlock

LOCK_ROW = 1  # the lock lives in words[LOCK_ROW, 0:2]; other rows must stay untouched
ROWS = 3


@njit(nogil=True, cache=True)
def k_lock(words, row):
    spin_lock(words, row, 0)


@njit(nogil=True, cache=True)
def k_unlock(words, row):
    spin_unlock(words, row, 0)


@njit(nogil=True, cache=True)
def k_trylock(words, row):
    return spin_trylock(words, row, 0)


@njit(nogil=True, cache=True)
def k_lock_cond(words, row, flags, flag_idx, give_up):
    return spin_lock_cond(words, row, 0, flags, flag_idx, give_up)


@njit(nogil=True, cache=True)
def k_locked_increments(words, row, counter, slot, n):
    """n times: lock, plain (non-atomic) read-modify-write of counter[0], unlock.

    counter[slot] counts this thread's own acquisitions.
    """
    for _ in range(n):
        spin_lock(words, row, 0)
        value = counter[0]
        # A few dependent steps widen the race window if the lock did not exclude.
        for _k in range(8):
            value = value * 3 + 1
        for _k in range(8):
            value = (value - 1) // 3
        counter[0] = value + 1
        spin_unlock(words, row, 0)
        counter[slot] += 1


@njit(nogil=True, cache=True)
def k_trylock_increments(words, row, counter, n):
    """Take the lock with spin_trylock n times (retrying), plain-increment counter[0]."""
    failures = 0
    for _ in range(n):
        while not spin_trylock(words, row, 0):
            failures += 1
        counter[0] += 1
        spin_unlock(words, row, 0)
    return failures


@njit(nogil=True, cache=True)
def k_lock_cond_increments(words, row, counter, flags, n):
    """Take the lock with spin_lock_cond (never giving up: flag never set) n times."""
    for _ in range(n):
        if not spin_lock_cond(words, row, 0, flags, 0, 1):
            return False
        counter[0] += 1
        spin_unlock(words, row, 0)
    return True


@njit(nogil=True, cache=True)
def k_set_flag(flags, idx, value):
    atomic_store(flags, idx, value)


@njit(nogil=True, cache=True)
def k_announce_then_lock_cond(words, row, flags, started_idx, flag_idx, give_up):
    """Mark ``started`` and then wait in spin_lock_cond."""
    fetch_add(flags, started_idx, 1)
    return spin_lock_cond(words, row, 0, flags, flag_idx, give_up)


@njit(nogil=True, cache=True)
def k_wait_flag(flags, idx, value, limit_ns_spins):
    """Spin until flags[idx] == value (at most ``limit_ns_spins`` polls); True if seen."""
    for _ in range(limit_ns_spins):
        if atomic_load(flags, idx) == value:
            return True
    return False


def new_words() -> np.ndarray:
    return np.zeros((ROWS, 2), dtype=np.int64)


def lock_is_free(words: np.ndarray, row: int = LOCK_ROW) -> bool:
    return int(words[row, 0]) == int(words[row, 1])


def test_lock_unlock_moves_the_tickets_and_nothing_else() -> None:
    words = new_words()
    k_lock(words, LOCK_ROW)
    assert words[LOCK_ROW].tolist() == [1, 0]  # ticket taken, not yet served past
    assert not lock_is_free(words)
    k_unlock(words, LOCK_ROW)
    assert words[LOCK_ROW].tolist() == [1, 1]
    assert lock_is_free(words)
    assert words[0].tolist() == [0, 0] and words[2].tolist() == [0, 0]


def test_trylock_fails_while_held_and_succeeds_after_unlock() -> None:
    words = new_words()
    assert k_trylock(words, LOCK_ROW) is True
    before = words.copy()
    assert k_trylock(words, LOCK_ROW) is False  # held (by "us"): refused, nothing taken
    np.testing.assert_array_equal(words, before)
    k_unlock(words, LOCK_ROW)
    assert lock_is_free(words)
    assert k_trylock(words, LOCK_ROW) is True
    k_unlock(words, LOCK_ROW)
    # A lock taken with spin_lock also refuses trylock.
    k_lock(words, LOCK_ROW)
    assert k_trylock(words, LOCK_ROW) is False
    k_unlock(words, LOCK_ROW)
    assert lock_is_free(words)
    # Other rows are independent locks.
    k_lock(words, 0)
    assert k_trylock(words, 2) is True
    k_unlock(words, 2)
    k_unlock(words, 0)
    assert all(lock_is_free(words, r) for r in range(ROWS))


def test_trylock_from_another_thread_fails_while_held() -> None:
    words = new_words()
    k_lock(words, LOCK_ROW)
    (got,) = run_threads(k_trylock, [(words, LOCK_ROW)])
    assert got is False
    k_unlock(words, LOCK_ROW)
    (got,) = run_threads(k_trylock, [(words, LOCK_ROW)])
    assert got is True
    k_unlock(words, LOCK_ROW)
    assert lock_is_free(words)


def test_lock_guards_a_plain_counter_four_threads_exact() -> None:
    n = 20_000
    words = new_words()
    counter = np.zeros(8, dtype=np.int64)
    run_threads(k_locked_increments, [(words, LOCK_ROW, counter, 1 + i, n) for i in range(4)])
    assert counter[0] == 4 * n
    assert counter[1:5].tolist() == [n] * 4
    assert lock_is_free(words)
    assert words[LOCK_ROW, 0] == 4 * n  # one ticket per acquisition


def test_eight_threads_on_two_cores_all_make_progress_in_bounded_time() -> None:
    n = 2_000
    words = new_words()
    counter = np.zeros(16, dtype=np.int64)
    start = time.monotonic()
    run_threads(k_locked_increments, [(words, LOCK_ROW, counter, 1 + i, n) for i in range(8)],
                timeout=60.0)
    elapsed = time.monotonic() - start
    assert counter[1:9].tolist() == [n] * 8  # every thread got all its turns
    assert counter[0] == 8 * n
    assert lock_is_free(words)
    assert elapsed < 30.0


def test_trylock_guards_a_plain_counter() -> None:
    n = 20_000
    words = new_words()
    counter = np.zeros(1, dtype=np.int64)
    run_threads(k_trylock_increments, [(words, LOCK_ROW, counter, n)] * 4)
    assert counter[0] == 4 * n
    assert lock_is_free(words)


def test_spin_lock_cond_guards_a_plain_counter_mixed_with_spin_lock() -> None:
    n = 10_000
    words = new_words()
    counter = np.zeros(8, dtype=np.int64)
    flags = np.zeros(1, dtype=np.uint8)
    barrier = threading.Barrier(4)
    results: list[object] = []

    def cond_thread() -> None:
        barrier.wait(JOIN_TIMEOUT_S)
        results.append(k_lock_cond_increments(words, LOCK_ROW, counter, flags, n))

    def lock_thread(slot: int) -> None:
        barrier.wait(JOIN_TIMEOUT_S)
        k_locked_increments(words, LOCK_ROW, counter, slot, n)
        results.append(True)

    threads = [threading.Thread(target=cond_thread, daemon=True) for _ in range(2)]
    threads += [threading.Thread(target=lock_thread, args=(s,), daemon=True) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads)
    assert results == [True] * 4
    assert counter[0] == 4 * n
    assert lock_is_free(words)


def test_spin_lock_cond_takes_a_free_lock() -> None:
    words = new_words()
    flags = np.zeros((2, 2), dtype=np.uint8)
    assert k_lock_cond(words, LOCK_ROW, flags, (1, 1), 2) is True
    assert not lock_is_free(words)  # we hold it now
    assert k_trylock(words, LOCK_ROW) is False
    k_unlock(words, LOCK_ROW)
    assert lock_is_free(words)


def test_spin_lock_cond_gives_up_without_the_lock_when_the_flag_is_set() -> None:
    words = new_words()
    flags = np.zeros(2, dtype=np.uint8)
    flags[1] = 2  # the give-up value is already there
    k_lock(words, LOCK_ROW)  # "another thread" holds it
    held = words.copy()
    (got,) = run_threads(k_lock_cond, [(words, LOCK_ROW, flags, 1, 2)])
    assert got is False
    np.testing.assert_array_equal(words, held)  # took no ticket, left the lock as it was
    k_unlock(words, LOCK_ROW)
    assert lock_is_free(words)


def test_spin_lock_cond_waiting_gives_up_once_the_flag_is_raised() -> None:
    words = new_words()
    flags = np.zeros(3, dtype=np.int64)  # [0] started, [1] the flag
    k_lock(words, LOCK_ROW)
    held = words.copy()
    out: list[object] = []
    t = threading.Thread(
        target=lambda: out.append(k_announce_then_lock_cond(words, LOCK_ROW, flags, 0, 1, 7)),
        daemon=True)
    t.start()
    # Wait (bounded) until the waiter is inside the kernel, then raise its give-up flag.
    assert k_wait_flag(flags, 0, 1, 2_000_000_000)
    assert t.is_alive() or out == [False]
    k_set_flag(flags, 1, 7)
    t.join(JOIN_TIMEOUT_S)
    assert not t.is_alive()
    assert out == [False]
    np.testing.assert_array_equal(words, held)
    k_unlock(words, LOCK_ROW)


def test_spin_lock_cond_waiting_gets_the_lock_when_released() -> None:
    words = new_words()
    flags = np.zeros(3, dtype=np.int64)
    k_lock(words, LOCK_ROW)
    out: list[object] = []
    t = threading.Thread(
        target=lambda: out.append(k_announce_then_lock_cond(words, LOCK_ROW, flags, 0, 1, 7)),
        daemon=True)
    t.start()
    assert k_wait_flag(flags, 0, 1, 2_000_000_000)
    k_unlock(words, LOCK_ROW)
    t.join(JOIN_TIMEOUT_S)
    assert not t.is_alive()
    assert out == [True]
    assert not lock_is_free(words)  # the waiter holds it now
    assert k_trylock(words, LOCK_ROW) is False
    k_unlock(words, LOCK_ROW)
    assert lock_is_free(words)
