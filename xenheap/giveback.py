"""Memory on its way back to the heap: blocks whose handles were dropped unfreed, blocks
parked in the domains' reuse caches, and domains collected without a destroy.

Allocations short of room, numpy's callbacks and ``numpy_allocator()`` entries, the
statistics, ``close()`` and the first scrubber's chore call these. They work on a domain's
record (xenheap.domain_record) and the heap's core; a ``Domain`` is only passed through.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from native_kernels import api
from xenheap.block import Block
from xenheap.errors import DomainDead, HeapClosed, InvalidFree
from xenheap.reuse import HEAP_TAG_MASK

if TYPE_CHECKING:
    from xenheap.core import HeapCore
    from xenheap.domain import Domain
    from xenheap.domain_record import DomainRecord
    from xenheap.reuse import ReuseCache

__all__ = ["destroy_orphans", "destroy_record", "flush_reuse", "fold_reuse_counters",
           "free_all_dropped", "free_dropped", "return_parked", "return_parked_now"]

log = logging.getLogger(__name__)


def free_dropped(dom: Domain) -> int:
    """Free the blocks whose handles were dropped unfreed (any thread may call it);
    returns how many went back (at least 1 if another thread was freeing them: they are
    back by the time this returns, so an allocation short of room may retry)."""
    if dom.core.forked:
        return 0  # the lock below may be held by a parent thread; the child frees none
    dropped = dom.record.dropped
    dropping = dom.record.dropping
    freed = int(_acquire_noting_wait(dropping))
    try:
        while dropped:
            try:
                entry = dropped.popleft()
            except IndexError:  # a destroy cleared the queue meanwhile
                break
            try:
                dom.free(Block(dom, *entry))
                freed += 1
            except (InvalidFree, HeapClosed) as exc:  # destroyed or closed meanwhile
                log.debug("dropped block %r not freed: its domain or heap went first (%s)",
                          entry, exc)
            except BaseException:  # interrupted: the next call frees it (or refuses it
                dropped.appendleft(entry)  # as freed already, should this one have)
                raise
    finally:
        dropping.release()
    return freed


def _acquire_noting_wait(lock: threading.Lock) -> bool:
    """Take ``lock``; True if another thread held it, whose work is then done."""
    waited = not lock.acquire(False)
    if waited:
        lock.acquire()
    return waited


def _free_drained(core: HeapCore, rec: DomainRecord,
                  entries: list[tuple[int, tuple[int, int]]]) -> int:
    """Free in the heap the parked blocks drained from ``rec``'s cache; returns the mask of
    the nodes whose scrubbers should wake."""
    wake = 0
    for order, (mfn, tag) in entries:
        # E_DEAD: a destroy took the domain meanwhile, and with it these blocks.
        if core.call(api.heap_free_short, rec.slot, rec.id, mfn, order,
                     tag & HEAP_TAG_MASK) > 0:
            wake |= 1 << core.node_of(mfn)
    return wake


def return_parked(core: HeapCore, rec: DomainRecord, close: bool = False) -> int:
    """Give the blocks that the domain of ``rec`` parked for reuse (by the Python API and
    by numpy) back to the heap, dirty; returns how many (at least 1 if another thread was
    doing it: its blocks are back by the time this returns, so an allocation short of
    room may retry). ``close``: park none afterwards (the heap closes)."""
    if core.forked:
        return 0  # the lock below may be held by a parent thread
    returning = rec.returning
    waited = _acquire_noting_wait(returning)
    try:
        return _return_parked_locked(core, rec, close) + int(waited)
    finally:
        returning.release()


def _return_parked_locked(core: HeapCore, rec: DomainRecord, close: bool) -> int:
    if rec.reuse is not None and close:
        rec.reuse.drain(close=True)
        return 0
    if core.closed or rec.destroyed:
        return 0  # a closed heap's memory went with it, a dead domain's with the domain
    entries = rec.reuse.drain() if rec.reuse is not None else []
    try:
        numpy_blocks = core.call(api.heap_flush_parked, rec.slot, rec.id) \
            if rec.capsule is not None else 0
        wake = _free_drained(core, rec, entries)
    except HeapClosed:  # closed meanwhile (a scrubber's chore): the memory goes with it
        return len(entries)
    if rec.reuse is not None:
        rec.reuse.count_returned(len(entries))
    if wake:
        core.wake(wake)
    return len(entries) + max(numpy_blocks, 0)


def return_parked_now(core: HeapCore, dom: Domain | None) -> bool:
    """return_parked for ``dom`` (every live domain, if None) from numpy's callbacks, whose
    quota or heap ran short. They may run inside the garbage collector while this thread
    holds any of xenheap's locks, so this waits for none: a domain whose locks are held is
    skipped, and nothing is woken (the scrubbers find the dirt at their next look). True
    if any block went back."""
    if core.closed or core.forked:
        return False
    if dom is not None:
        doms = [dom]
    elif core.lock.acquire(False):
        try:
            doms = list(core.domains)
        finally:
            core.lock.release()
    else:
        return False
    back = 0
    for d in doms:
        rec = d.record
        if rec.reuse is None or rec.destroyed or not rec.returning.acquire(False):
            continue
        try:
            entries = rec.reuse.drain_now()
            _free_drained(core, rec, entries)  # the scrubbers are not woken: see above
            back += len(entries)
        except HeapClosed:  # closed meanwhile: the memory goes with it
            return False
        finally:
            rec.returning.release()
    return back > 0


def flush_reuse(core: HeapCore, dom: Domain | None = None) -> bool:
    """Give the blocks parked for reuse by ``dom`` (every live domain, if None) back to the
    heap, and its dropped blocks: an allocation found its quota or the heap short.
    True if any went back."""
    # The heap short: collected domains' memory too (the allocation's kernel relinquishes it).
    destroyed = destroy_orphans(core) if dom is None and core.orphans else 0
    doms = [dom] if dom is not None else core.live_domains()
    return destroyed + sum(free_dropped(d) + return_parked(core, d.record) for d in doms) > 0


def free_all_dropped(core: HeapCore) -> None:
    """Free what users dropped: blocks whose handles went unfreed (xenheap.block), and
    domains collected without a destroy."""
    if core.orphans:
        destroy_orphans(core)
    for dom in core.live_domains():
        if dom.record.dropped:
            free_dropped(dom)


def fold_reuse_counters(core: HeapCore, reuse: ReuseCache | None) -> None:
    """Move a destroyed domain's reuse counters into the heap's (caller holds core.lock, in
    the section that takes the domain off the set the statistics read)."""
    if reuse is not None:
        hits, pages, parks, returned = core.reuse_retired
        core.reuse_retired = (hits + reuse.hits, pages + reuse.hit_pages,
                              parks + reuse.parks, returned + reuse.returned)


def destroy_record(core: HeapCore, rec: DomainRecord, records: object, who: object) -> None:
    """Destroy the domain of ``rec`` in the kernels, its reuse cache retired (``records``:
    what retire() gave, dropped once its memory is relinquished); ``who`` (its str) names
    the domain in errors."""
    defer = core.defers_relinquish()
    try:
        status, wake = core.call(api.heap_destroy, rec.slot, rec.id, defer)
    except HeapClosed:  # closed meanwhile, after close() dropped the live domains' handlers
        rec.capsule = None
        raise
    if status < 0:
        raise DomainDead(f"{who!s} was already destroyed")
    rec.destroyed = True
    rec.dropped.clear()  # their blocks go with the domain
    rec.capsule = None  # arrays made with it hold their own reference (see numpy_handler)
    core.charges.destroyed(rec.id)
    core.retire_slot(rec)
    if defer:  # the first scrubber's chore frees the blocks (HeapCore.relinquish)
        core.relinquishing.append((rec.slot, rec.id, records))
        core.scrubbers[0].wakeup.set()
    elif wake:
        core.wake(wake)


def destroy_orphans(core: HeapCore) -> int:
    """Destroy the domains collected without a destroy (Domain's finalizer queued them);
    returns how many."""
    orphans = core.orphans
    destroyed = 0
    while orphans and not core.closed and not core.forked:
        # Off the queue with its reuse counters into the heap's in one section: the
        # statistics read both under the lock. Nothing else can reach its cache.
        with core.lock:
            if not orphans:
                break
            rec = orphans.popleft()
            records = rec.reuse.retire() if rec.reuse is not None else None
            fold_reuse_counters(core, rec.reuse)
        try:
            destroy_record(core, rec, records, who=f"collected domain {rec.id}")
            destroyed += 1
        except (DomainDead, HeapClosed) as exc:  # closed meanwhile: its memory goes with it
            log.debug("collected domain %d not destroyed: %s", rec.id, exc)
    return destroyed
