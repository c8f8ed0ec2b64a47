"""Run every bench/ case once, small, with timing off: the benchmarks must not rot."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_suite_runs_once() -> None:
    env = dict(os.environ, XENHEAP_BENCH_QUICK="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.join(REPO, "bench"), "--benchmark-disable",
         "-q", "-p", "no:cacheprovider", "-x"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "error" not in proc.stdout.lower()
