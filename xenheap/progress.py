"""Live progress of background scrubbing on a terminal, and nothing at all elsewhere.

The figures come from ``Heap.stats()`` polled by the thread that waits (the scrubbers keep
their counters in the heap's arrays, so reading them costs no coordination): bytes scrubbed
since ``begin``, the rate so far, and the time left at that rate. Output is a single line
rewritten in place with a carriage return and erased by ``end``, so a terminal ends up
showing only what the command prints afterwards. When the stream is not a terminal (a pipe,
a file, a test's capture) every method is a no-op: logs and JSON stay clean.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

from xenheap.sizes import format_size

if TYPE_CHECKING:
    from xenheap.heap import Heap

__all__ = ["ScrubProgress", "format_rate", "format_seconds"]

# A repaint interval short enough to look live, long enough that stats() (tens of us) and
# the terminal cost nothing next to the work being watched.
REPAINT_S = 0.1
_ERASE = "\r\x1b[K"


def format_rate(bytes_per_second: float) -> str:
    """``"38.2 GB/s"``: decimal units, as memory bandwidth is usually quoted."""
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_second >= scale:
            return f"{bytes_per_second / scale:.1f} {unit}"
    return f"{bytes_per_second:.0f} B/s"


def format_seconds(seconds: float) -> str:
    """A duration with a unit that keeps 2-3 significant digits: ``"410 us"``, ``"1.25 s"``."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def _scrubbed_pages(stats: dict) -> int:
    # Pages zeroed by the scrubbers and by allocators that took dirty chunks: both clean.
    return sum(n["scrubbed_pages"] + n["alloc_scrubbed_pages"] for n in stats["nodes"])


class ScrubProgress:
    """One self-erasing status line on ``stream`` (stdout by default), only on a terminal."""

    def __init__(self, stream: TextIO | None = None, repaint_s: float = REPAINT_S) -> None:
        self.stream = stream if stream is not None else sys.stdout
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty())
        self.repaint_s = repaint_s
        self._label = ""
        self._shown = False
        self._started = 0.0
        self._last_paint = 0.0
        self._dirty0 = 0
        self._scrubbed0 = 0

    def stage(self, text: str) -> None:
        """Show what the command is doing now (a bench step, say) until the next update."""
        self._label = text
        self._paint(text)

    def begin(self, heap: Heap, label: str = "scrubbing") -> None:
        """Start watching ``heap``'s dirty pages drain."""
        if not self.enabled:
            return
        stats = heap.stats()
        self._label = label
        self._started = time.monotonic()
        self._last_paint = 0.0
        self._dirty0 = stats["dirty_pages"]
        self._scrubbed0 = _scrubbed_pages(stats)
        if self._dirty0:
            self.update(heap, force=True)

    def update(self, heap: Heap, force: bool = False) -> None:
        """Repaint from ``heap.stats()`` if ``repaint_s`` has passed (or ``force``)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_paint < self.repaint_s:
            return
        stats = heap.stats()
        page = stats["page_size"]
        done = max(0, _scrubbed_pages(stats) - self._scrubbed0) * page
        left = stats["dirty_pages"] * page
        total = max(self._dirty0 * page, done + left)
        elapsed = now - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = format_seconds(left / rate) if rate > 0 else "?"
        self._paint(f"{self._label}: {format_size(done)} of {format_size(total)} scrubbed, "
                    f"{format_rate(rate)}, {eta} left")
        self._last_paint = now

    def end(self) -> None:
        """Erase the line, leaving the cursor where the line began."""
        if self.enabled and self._shown:
            self.stream.write(_ERASE)
            self.stream.flush()
            self._shown = False

    def _paint(self, text: str) -> None:
        if not self.enabled:
            return
        self.stream.write(_ERASE + text)
        self.stream.flush()
        self._shown = True
