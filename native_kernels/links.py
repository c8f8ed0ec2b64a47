"""Doubly linked lists through the frame table: the one list primitive.

A chunk or block is linked by its head page's ``ft32[PG_NEXT]`` and ``ft32[PG_PREV]``, which
hold ``mfn + 1`` so that zero (NIL) ends a list. A list's two ends, its head and tail
links, are two words of another array, named by index tuples as the atomics name theirs: a
free list's are ``lists[node, order, L_HEAD]`` and ``[..., L_TAIL]``, a domain's block
list's ``doms[slot, D_HEAD]`` and ``[slot, D_TAIL]``. (Index tuples rather than a slice of
the row: a slice is an array built on every call, on the hottest paths.) The caller holds
the lock that guards the list: the node's heap lock for a free list, the domain's lock for
a block list.

The slab lists of native_kernels.small are the one list not built on this: a slab is a
block on its domain's list, so its frame-table links are taken, and its slab links live in
the slab's own header instead.
"""

from numba import njit

from native_kernels.jit import INTERNAL
from native_kernels.layout import NIL, PG_NEXT, PG_PREV


@njit(nogil=True, cache=True, **INTERNAL)
def _link_at(ft32, ends, near, far, out, back, first, last):
    """Put the chain ``first``..``last`` at the ``near`` end of the list: ``out`` is the
    frame-table row that leads away from that end (PG_NEXT from the head), ``back`` the
    row that leads to it. link_head and link_tail are this, one the other's mirror."""
    old = ends[near]
    ft32[out, last] = old
    ft32[back, first] = NIL
    if old == NIL:
        ends[far] = last + 1
    else:
        ft32[back, old - 1] = last + 1
    ends[near] = first + 1


@njit(nogil=True, cache=True, **INTERNAL)
def link_head(ft32, ends, head, tail, first, last):
    """Put the chain ``first``..``last`` (already linked among themselves; one entry when
    first == last) at the head of the list whose ends are ``ends[head]``, ``ends[tail]``."""
    _link_at(ft32, ends, head, tail, PG_NEXT, PG_PREV, first, last)


@njit(nogil=True, cache=True, **INTERNAL)
def link_tail(ft32, ends, head, tail, mfn):
    """Put entry ``mfn`` at the tail of the list."""
    _link_at(ft32, ends, tail, head, PG_PREV, PG_NEXT, mfn, mfn)


@njit(nogil=True, cache=True, **INTERNAL)
def unlink(ft32, ends, head, tail, mfn):
    """Take entry ``mfn`` off the list, clearing its links."""
    nxt = ft32[PG_NEXT, mfn]
    prv = ft32[PG_PREV, mfn]
    if prv == NIL:
        ends[head] = nxt
    else:
        ft32[PG_NEXT, prv - 1] = nxt
    if nxt == NIL:
        ends[tail] = prv
    else:
        ft32[PG_PREV, nxt - 1] = prv
    ft32[PG_NEXT, mfn] = NIL
    ft32[PG_PREV, mfn] = NIL


@njit(nogil=True, cache=True, **INTERNAL)
def detach_all(ends, head, tail):
    """Empty the list at once; returns its first entry's link (the chain stays linked)."""
    first = ends[head]
    ends[head] = NIL
    ends[tail] = NIL
    return first
