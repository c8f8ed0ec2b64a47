"""numpy arrays allocated from a domain: numpy's NEP 49 memory handler.

``with dom.numpy_allocator():`` installs a ``"mem_handler"`` capsule whose callbacks are the
numba cfuncs of native_kernels.numpy_handler. numpy keeps the current handler in a context
variable, so the scope follows numpy's own rule: this thread or asyncio task only, and the
previous handler comes back on exit, exception or not. Every array records the handler it
was made with and returns its memory through it, so an array may outlive the block, the
domain (whose blocks stay pinned until numpy frees them) and even ``Heap.close()`` (the
arenas stay mapped while any such array lives).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import weakref
from typing import TYPE_CHECKING

from native_kernels import numpy_handler as cb
from native_kernels.layout import E_QUOTA
from xenheap.domain import numpy_handler
from xenheap.errors import DomainDead, HeapClosed
from xenheap.giveback import destroy_orphans, free_dropped, return_parked_now
from xenheap.numpy_api import (
    CAPSULE_NAME,
    capsule_new,
    default_numpy_memory,
    handler_var,
    set_handler,
)

if TYPE_CHECKING:
    from xenheap.domain import Domain

log = logging.getLogger(__name__)

# The same call as numpy_api's on a capsule being destroyed: no new reference may be taken
# to it then.
_dying_capsule_pointer = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))


class _Allocator(ctypes.Structure):
    _fields_ = [("ctx", ctypes.c_void_p), ("malloc", ctypes.c_void_p),
                ("calloc", ctypes.c_void_p), ("realloc", ctypes.c_void_p),
                ("free", ctypes.c_void_p)]


class _Handler(ctypes.Structure):
    """numpy's PyDataMem_Handler, version 1."""

    _fields_ = [("name", ctypes.c_char * 127), ("version", ctypes.c_uint8),
                ("allocator", _Allocator)]


def _handler_name(domain_name: str) -> bytes:
    """numpy's name for a domain's handler: a C string of at most 126 bytes, cut at a
    character (numpy decodes it as UTF-8) and without NULs (which would end it early)."""
    name = f"xenheap:{domain_name}".replace("\0", "?").encode(errors="replace")[:126]
    return name.decode(errors="ignore").encode()


# Keeps each handler's ctypes structures, context record and heap memory alive while numpy
# holds its capsule (the context variable, and every array made with it). No lock: the
# capsule's destructor may run inside any allocation of this thread (the garbage collector
# freeing an array's last reference), so it must never wait for one this thread holds.
# Every use is one step under the GIL instead: an insert, a pop, a copy of the values.
live_handlers: dict[int, tuple] = {}


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _capsule_destructor(capsule: int) -> None:
    try:
        entry = live_handlers.pop(_dying_capsule_pointer(capsule, CAPSULE_NAME), None)
    except (AttributeError, TypeError):  # shutdown cleared this module: the entry stays
        return
    if entry is None:
        return
    core = entry[3]
    # The last handler of a heap that close() left mapped for its arrays: unmap it now (a
    # block's view still alive keeps the mapping until it goes; Arena.close says so).
    if core.arenas_await_arrays and not handlers_for(core.state):
        core.close_arenas()


# numpy may destroy a capsule, free an array or allocate through a handler after this
# module's globals are gone (the garbage collector at interpreter shutdown): the table, and
# with it every handler's structures and callbacks, and the capsule destructor, are then
# still what numpy points to. So each holds one reference that is never given back.
for _pinned in (live_handlers, _capsule_destructor):
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(_pinned))
del _pinned


def _live_entries() -> list[tuple]:
    """A copy of live_handlers's entries: copied in one step, so no pop lands mid-iteration."""
    return list(live_handlers.values())


def inherited_states() -> list[dict]:
    """After a fork, in the child: the states of every heap whose numpy handler may still be
    referenced by an inherited array (closed heaps included)."""
    return [entry[2] for entry in _live_entries()]


_RECLAIM = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)
_reclaiming = threading.local()  # set while this thread runs a reclaim: none nests in it


def _reclaimer(dom: Domain) -> ctypes._CFunctionType:
    """The callback numpy's callbacks make when the quota or the heap is short (CTX_RECLAIM,
    given E_QUOTA or E_NOMEM): the domain's reuse cache, or every live domain's, goes back
    to the heap, as for a Python API allocation short of room, since no kernel can reach
    those blocks (xenheap.giveback.return_parked_now: it waits for no lock, as numpy may
    allocate inside the garbage collector while this thread holds one). 1 if any went
    back, else 0. It holds the domain weakly: arrays keep their handler, and must not keep
    the domain from being collected (and destroyed)."""
    core, ref = dom.core, weakref.ref(dom)

    def reclaim(code: int) -> int:
        if getattr(_reclaiming, "active", False):
            return 0
        owner = ref() if code == E_QUOTA else None
        if code == E_QUOTA and owner is None:
            return 0
        _reclaiming.active = True
        try:
            with default_numpy_memory():  # its own arrays never come from the handler
                return int(return_parked_now(core, owner))
        except Exception:  # a C caller cannot take an exception: the allocation fails
            log.exception("giving back the reuse caches for numpy failed")
            return 0
        finally:
            _reclaiming.active = False

    return _RECLAIM(reclaim)


def make_handler(dom: Domain) -> object:
    """A new "mem_handler" capsule allocating from ``dom``."""
    heap, core = dom.heap, dom.core
    s = core.state
    # A ctypes record, not a numpy array: numpy would take it from the caller's current
    # handler, perhaps another domain's, and the handler's own bookkeeping must never come
    # from a handler.
    ctx = (ctypes.c_int64 * cb.CTX_FIELDS)()
    for field, name in ((cb.CTX_FT32, "ft32"), (cb.CTX_FT8, "ft8"), (cb.CTX_NODES, "nodes"),
                        (cb.CTX_LISTS, "lists"), (cb.CTX_DOMS, "doms"), (cb.CTX_META, "meta"),
                        (cb.CTX_ZONE, "zone")):
        ctx[field] = s[name].ctypes.data
    ctx[cb.CTX_NR_PAGES] = heap.total_pages
    ctx[cb.CTX_NR_NODES] = heap.nodes
    ctx[cb.CTX_MAX_DOMAINS] = s["doms"].shape[0]
    ctx[cb.CTX_SLOT] = dom.slot
    ctx[cb.CTX_DOM_ID] = dom.id
    ctx[cb.CTX_NODE] = core.placement(None)[0]
    reclaim = _reclaimer(dom)
    ctx[cb.CTX_RECLAIM] = ctypes.cast(reclaim, ctypes.c_void_p).value or 0
    handler = _Handler(_handler_name(dom.name), 1,
                       _Allocator(ctypes.addressof(ctx), cb.numpy_malloc.address,
                                  cb.numpy_calloc.address, cb.numpy_realloc.address,
                                  cb.numpy_free.address))
    live_handlers[ctypes.addressof(handler)] = (handler, ctx, s, core, reclaim)
    core.numpy_handlers += 1
    return capsule_new(ctypes.addressof(handler), CAPSULE_NAME,
                        ctypes.cast(_capsule_destructor, ctypes.c_void_p))


class numpy_allocator:
    """Within the block, numpy arrays of this thread or task take their data from ``dom``;
    ``with dom.numpy_allocator() as d:`` gives ``d is dom``.

    A class rather than a generator-based context manager: entering and leaving one is a
    third of the cost (about 1.5 us less), which counts when the block makes a few arrays.
    """

    __slots__ = ("_dom", "_previous")

    def __init__(self, dom: Domain) -> None:
        self._dom = dom
        self._previous: object | None = None  # the handler to restore; set while entered

    def __enter__(self) -> Domain:
        dom = self._dom
        if self._previous is not None:  # one handler to restore, as a generator's would be
            raise RuntimeError("this numpy_allocator() is already entered; call "
                               "dom.numpy_allocator() again for another block")
        if dom.heap.closed:
            raise HeapClosed(dom.core.closed_reason)
        if not dom.alive:
            raise DomainDead(f"{dom!r} was destroyed")
        handler = numpy_handler(dom)
        # Neither can numpy's callbacks free dropped handles, should the quota run short,
        # nor destroy collected domains, should the heap (their reclaim waits for no lock).
        if dom.record.dropped:
            free_dropped(dom)
        if dom.core.orphans:
            destroy_orphans(dom.core)
        if handler_var is not None:
            self._previous = handler_var.get()
            handler_var.set(handler)
        else:
            self._previous = set_handler(handler)
        return dom

    def __exit__(self, *exc_info: object) -> None:
        previous, self._previous = self._previous, None
        if handler_var is not None:
            handler_var.set(previous)
        else:
            set_handler(previous)


def handlers_for(state: dict) -> int:
    """Handlers of the heap with ``state`` that numpy may still hold (installed, cached by a
    live domain, or referenced by a live array)."""
    return sum(1 for entry in _live_entries() if entry[2] is state)
