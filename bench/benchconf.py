"""Sizes and counts of the bench/ cases (smaller with XENHEAP_BENCH_QUICK=1)."""

from __future__ import annotations

import os

from xenheap.sizes import format_size
from xenheap.tools.bench import BUFFER_SIZES as FULL_BUFFER_SIZES
from xenheap.tools.bench import QUICK_BUFFER_SIZES
from xenheap.tools.workload import MiB

QUICK = os.environ.get("XENHEAP_BENCH_QUICK", "") not in ("", "0")

# Domain sizes for destroy and scrub cases: enough to see the trend, small enough for CI.
SIZES = [16 * MiB] if QUICK else [64 * MiB, 256 * MiB]
# The heap that buffers and allocation threads are served from.
SERVICE_HEAP = 64 * MiB if QUICK else 256 * MiB
ROUNDS = 1 if QUICK else 10
BUFFER_SIZES = QUICK_BUFFER_SIZES if QUICK else FULL_BUFFER_SIZES
ALLOC_OPS = 200 if QUICK else 10_000


def size_id(size: int) -> str:
    """``64 MiB`` as a test id: ``64MiB``."""
    return format_size(size).replace(" ", "").replace(".0", "")
