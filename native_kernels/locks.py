"""A fair ticket spinlock living in two int64 words of a state row, and Xen's _spin_lock_cond.

A lock is ``words[row, col]`` (the next ticket) and ``words[row, col + 1]`` (the ticket being
served). Tickets make the lock FIFO, so a stream of allocators cannot starve each other.
Waiters back off spin -> yield -> sleep (atomics.backoff): a holder the OS preempted gets a
CPU back even when its waiters share all of its CPUs.
"""

from numba import njit

from native_kernels.atomics import atomic_cas, atomic_load, atomic_store, backoff, fetch_add


@njit(nogil=True, cache=True)
def spin_lock(words, row, col):
    """Take the lock, waiting in ticket order."""
    ticket = fetch_add(words, (row, col), 1)
    attempt = 0
    while atomic_load(words, (row, col + 1)) != ticket:
        backoff(attempt)
        attempt += 1


@njit(nogil=True, cache=True)
def spin_trylock(words, row, col):
    """Take the lock only if it is free and nobody waits; True if taken."""
    serving = atomic_load(words, (row, col + 1))
    return atomic_cas(words, (row, col), serving, serving + 1)


@njit(nogil=True, cache=True)
def spin_unlock(words, row, col):
    """Release the lock to the next ticket.

    Only the holder writes the "serving" word, so a load and a store do (Linux's ticket
    unlock): no locked instruction.
    """
    atomic_store(words, (row, col + 1), atomic_load(words, (row, col + 1)) + 1)


@njit(nogil=True, cache=True)
def spin_lock_cond(words, row, col, flags, flag_idx, give_up_value):
    """Spin for the lock, but give up as soon as ``flags[flag_idx] == give_up_value``.

    Xen's ``_spin_lock_cond`` (later ``spin_lock_cb``): a scrubber that finished a chunk waits
    for the heap lock to mark it clean, but if an allocator asks for the chunk meanwhile
    (BUDDY_SCRUB_ABORT), the scrubber must hand it over at once instead, because that allocator
    holds the lock and waits for it. It does not take a ticket (a ticket cannot be abandoned),
    so it tries the lock between checks. Returns True with the lock held, False without it.
    """
    attempt = 0
    while True:
        if spin_trylock(words, row, col):
            return True
        if atomic_load(flags, flag_idx) == give_up_value:
            return False
        backoff(attempt)
        attempt += 1
