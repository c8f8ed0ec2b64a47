"""The busy experiment's hogs: CPU-bound processes (tight Python loops at normal priority)
that keep every CPU busy beside the measured heap. Whatever happens, they are stopped."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Sequence

from xenheap.errors import XenHeapError

HOG_READY_TIMEOUT_S = 10.0
HOG_STOP_TIMEOUT_S = 2.0

# A hog: a tight loop, no numpy, ended by SIGTERM, by its deadline, or when its parent
# goes away (it is then re-parented), so that not even a killed parent leaves one behind.
HOG_CODE = """\
import os, sys, time
ppid, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
sys.stdout.write("r"); sys.stdout.close()
try:
    while os.getppid() == ppid and time.monotonic() < end:
        for _ in range(100000):
            pass
except KeyboardInterrupt:
    pass
"""


class BusyExperimentError(XenHeapError):
    """A side of the busy experiment failed or overran its time (the child was killed)."""


def start_hogs(count: int, lifetime: float) -> list[subprocess.Popen]:
    """Start ``count`` CPU-bound processes and wait until each is running.

    On any failure (or an interrupt) the ones already started are stopped before raising.
    """
    hogs: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            hogs.append(subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", HOG_CODE, str(os.getpid()), str(lifetime)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                start_new_session=True))  # the terminal's ^C is ours to handle, not theirs
        deadline = time.monotonic() + HOG_READY_TIMEOUT_S
        for hog in hogs:
            out = hog.stdout
            assert out is not None  # stdout=PIPE
            ready, _, _ = select.select([out], [], [], max(0.0, deadline - time.monotonic()))
            if not ready or out.read(1) != b"r":
                raise BusyExperimentError(f"hog process {hog.pid} did not start")
            out.close()
    except BaseException:
        stop_hogs(hogs)
        raise
    return hogs


def stop_hogs(hogs: Sequence[subprocess.Popen]) -> None:
    """Terminate the hogs and reap them (kill those that do not end in time)."""
    for hog in hogs:
        if hog.poll() is None:
            hog.terminate()
    for hog in hogs:
        try:
            hog.wait(HOG_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            hog.kill()
            hog.wait()
        if hog.stdout is not None and not hog.stdout.closed:
            hog.stdout.close()
