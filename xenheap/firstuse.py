"""One line on stderr when numba starts compiling xenheap's kernels.

The kernels are numba functions cached on disk (``cache=True``). The first use on a machine,
or after numba's cache was cleared, compiles them, which takes seconds with nothing else to
show for it; later processes load them from the cache in a moment. So the moment numba
begins to compile one of them, this module writes :data:`MESSAGE` to ``sys.stderr``, once
per process, and nothing at all when every kernel comes from the cache. ``XENHEAP_QUIET=1``
in the environment silences it.

It listens to numba's event API (``numba.core.event``): ``"numba:compile"``, broadcast when
a dispatcher compiles (never when it loads from the cache), and ``"numba:run_pass"``, which
also covers the numpy handler's ``cfunc`` callbacks, whose compilation broadcasts no
``"numba:compile"``. Importing xenheap installs it.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from numba.core import event

__all__ = ["MESSAGE", "install"]

MESSAGE = ("xenheap: compiling its kernels, once (10 to 60 s); later starts load them from "
           "numba's cache\n")
QUIET_ENV = "XENHEAP_QUIET"
# The packages whose numba functions are xenheap's kernels.
_PACKAGES = ("native_kernels", "xenheap")
_KINDS = ("numba:compile", "numba:run_pass")

_lock = threading.Lock()
_said = False
_installed = False


def _is_ours(module: object) -> bool:
    if not isinstance(module, str):
        return False
    return module.partition(".")[0] in _PACKAGES


def _module_of(ev: Any) -> object:
    """The module of the function an event is compiling, or None."""
    data = ev.data
    if not isinstance(data, dict):
        return None
    if "module" in data:  # numba:run_pass
        return data["module"]
    py_func = getattr(data.get("dispatcher"), "py_func", None)  # numba:compile
    return getattr(py_func, "__module__", None)


def _announce() -> None:
    """Write MESSAGE to stderr, the first time only."""
    global _said
    with _lock:
        if _said:
            return
        _said = True
    if os.environ.get(QUIET_ENV, "") not in ("", "0"):
        return
    stream = sys.stderr
    if stream is None:  # pythonw, or stderr closed
        return
    try:
        stream.write(MESSAGE)
        stream.flush()
    except (OSError, ValueError):  # a closed or broken stream: the notice is not worth a crash
        pass


class _CompileNotice(event.Listener):
    """Announces the first compilation of one of xenheap's kernels."""

    def on_start(self, ev: Any) -> None:
        if not _said and _is_ours(_module_of(ev)):
            _announce()

    def on_end(self, ev: Any) -> None:
        pass


def install() -> None:
    """Listen for numba compiling xenheap's kernels (idempotent; importing xenheap does it)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    listener = _CompileNotice()
    for kind in _KINDS:
        try:
            event.register(kind, listener)
        except ValueError:  # an older numba without this event kind
            continue


install()
