"""numpy's memory-handler C-API (NEP 49) through ctypes, without compiling any kernel.

numpy keeps the current "mem_handler" capsule in a context variable and exports
``PyDataMem_SetHandler`` in its C-API table; numpy has no Python-level setter. This module
only reaches that table, so the library may import it at start-up: the numba callbacks that
a domain's handler points to live in xenheap.numpy_alloc, compiled on first use.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
from collections.abc import Iterator

import numpy as np

CAPSULE_NAME = b"mem_handler"
_SET_HANDLER_INDEX = 304  # PyDataMem_SetHandler in numpy's C-API table (__multiarray_api.h)

capsule_new = ctypes.pythonapi.PyCapsule_New
capsule_new.restype = ctypes.py_object
capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
capsule_pointer.restype = ctypes.c_void_p
capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _set_handler_address() -> int:
    api = np._core._multiarray_umath._ARRAY_API
    table = ctypes.cast(capsule_pointer(api, None), ctypes.POINTER(ctypes.c_void_p))
    return table[_SET_HANDLER_INDEX]


_address = _set_handler_address()
# Install ``capsule`` as the current handler; returns the previous one.
set_handler = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.py_object)(_address)
# The same call with NULL, which numpy reads as "its default handler".
_set_default_handler = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p)(_address)


def _find_handler_var() -> contextvars.ContextVar | None:
    """numpy's context variable itself ("current_allocator"), found in a copy of the
    context right after PyDataMem_SetHandler set it; None if this numpy keeps it otherwise.
    PyDataMem_SetHandler is a get and a set of it, so ``var.get()`` and ``var.set()`` do
    the same from Python at a fifth of the ctypes call's cost (about 0.1 against 0.5 us
    for each end of a ``with dom.numpy_allocator():`` block)."""
    default = _set_default_handler(None)
    try:
        for var, value in contextvars.copy_context().items():
            if var.name == "current_allocator" and value is not None:
                try:
                    if capsule_pointer(value, CAPSULE_NAME):
                        return var
                except (ValueError, TypeError):
                    pass
    finally:
        set_handler(default)
    return None


handler_var = _find_handler_var()


@contextlib.contextmanager
def default_numpy_memory() -> Iterator[None]:
    """Within the block numpy allocates with its default handler, whatever domain's handler
    the caller installed: the heap's own bookkeeping must never come from a domain (its
    quota could refuse it, and freeing it would re-enter the handler's bookkeeping)."""
    previous = _set_default_handler(None)
    try:
        yield
    finally:
        set_handler(previous)
