"""Live progress of background scrubbing, on stderr, for people watching a long command.

The figures come from ``Heap.stats()`` polled by the thread that waits (the scrubbers keep
their counters in the heap's arrays, so reading them costs no coordination): bytes scrubbed
since ``begin``, the rate so far, and the time left at that rate.

Where it goes:
- progress is written to ``stream``, stderr by default, never to stdout, so that what a
  command prints (a table, JSON) stays clean in a pipe or a file;
- by default it is shown only when that stream is a terminal; ``enabled=True`` asks for it
  anywhere, ``enabled=False`` nowhere;
- on a terminal it is one line rewritten in place with a carriage return and erased by
  ``end``, so the terminal ends up showing only what the command prints afterwards;
  elsewhere (asked for explicitly) it is plain lines, at most one a second, with no
  carriage returns or escape sequences, as a log wants.

A rate is shown only once at least ``MIN_RATE_INTERVAL_S`` has passed and some bytes were
scrubbed: over a few microseconds a counter that moved by a few MiB gives absurd figures
(tens of TB/s), so below that the line shows "-" instead. A stream that fails (a closed
pipe, a terminal gone) turns progress off rather than stopping the work it reports on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from xenheap.sizes import format_size

if TYPE_CHECKING:
    from xenheap.heap import Heap
    from xenheap.stats import HeapStats

__all__ = ["MIN_RATE_INTERVAL_S", "ScrubProgress", "format_rate", "format_seconds",
           "rate_over"]

# A repaint interval short enough to look live, long enough that stats() (tens of us) and
# the terminal cost nothing next to the work being watched.
REPAINT_S = 0.1
# Between plain lines when the stream is not a terminal (a log file): fewer, longer apart.
LOG_REPAINT_S = 1.0
# The shortest interval a rate is computed over. Shorter ones hold too few counter updates
# (and too much of the cost of reading the clock and the counters) to mean anything.
MIN_RATE_INTERVAL_S = 0.05
_ERASE = "\r\x1b[K"


def format_rate(bytes_per_second: float | None) -> str:
    """``"38.2 GB/s"``: decimal units, as memory bandwidth is usually quoted; ``"-"`` for None."""
    if bytes_per_second is None:
        return "-"
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


def rate_over(nbytes: float, seconds: float,
              min_seconds: float = MIN_RATE_INTERVAL_S) -> float | None:
    """``nbytes / seconds``, or None when nothing was done or the interval is too short."""
    if nbytes <= 0 or seconds < min_seconds or seconds <= 0:
        return None
    return nbytes / seconds


def _scrubbed_pages(stats: HeapStats) -> int:
    # Pages zeroed by the scrubbers and by allocators that took dirty chunks, or dropped
    # (not in RAM): all clean.
    return sum(n["scrubbed_pages"] + n["alloc_scrubbed_pages"] + n["unmapped_pages"]
               for n in stats["nodes"])


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):  # a closed stream
        return False


class ScrubProgress:
    """Scrub progress on ``stream`` (stderr by default): on a terminal, or when asked.

    ``enabled``: None (the default) shows progress only when ``stream`` is a terminal; True
    always; False never. ``repaint_s``: the least time between two updates (default 0.1 s
    on a terminal, 1 s elsewhere). ``clock``: seconds, monotonic (tests pass their own).
    """

    def __init__(self, stream: TextIO | None = None, repaint_s: float | None = None,
                 enabled: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = _is_terminal(self.stream)  # rewrite one line in place
        # No stream at all (the process started with stderr closed): nothing to show it on.
        self.enabled = (self.stream is not None
                        and (self.live if enabled is None else bool(enabled)))
        if repaint_s is None:
            repaint_s = REPAINT_S if self.live else LOG_REPAINT_S
        self.repaint_s = repaint_s
        self._clock = clock
        self._label = ""
        self._shown = False
        self._started = 0.0
        self._last_paint = float("-inf")
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
        self._started = self._clock()
        self._last_paint = float("-inf")
        self._dirty0 = stats["dirty_pages"]
        self._scrubbed0 = _scrubbed_pages(stats)
        if self._dirty0:
            self.update(heap, force=True)

    def line(self, stats: HeapStats, now: float) -> str:
        """The progress line for ``stats`` (a ``heap.stats()``) at time ``now``."""
        page = stats["page_size"]
        done = max(0, _scrubbed_pages(stats) - self._scrubbed0) * page
        left = stats["dirty_pages"] * page
        total = max(self._dirty0 * page, done + left)
        rate = rate_over(done, now - self._started)
        text = f"{self._label}: {format_size(done)} of {format_size(total)} scrubbed, "
        if rate is None:  # too early, or nothing done yet: no figure rather than a wild one
            return text + "rate -"
        return text + f"{format_rate(rate)}, {format_seconds(left / rate)} left"

    def update(self, heap: Heap, force: bool = False) -> None:
        """Repaint from ``heap.stats()`` if ``repaint_s`` has passed (or ``force``)."""
        if not self.enabled:
            return
        now = self._clock()
        if not force and now - self._last_paint < self.repaint_s:
            return
        self._paint(self.line(heap.stats(), now))
        self._last_paint = now

    def end(self) -> None:
        """Erase the line (on a terminal), leaving the cursor where the line began."""
        if self.enabled and self.live and self._shown:
            self._write(_ERASE)
        self._shown = False

    def _paint(self, text: str) -> None:
        if not self.enabled:
            return
        self._write(_ERASE + text if self.live else text + "\n")
        self._shown = True

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # the reader went away: stop reporting, keep working
            self.enabled = False
