"""``xenheap demo --busy N``: the busy-machine experiment (xenheap/tools/busy.py).

One bounded real run on a small heap (its JSON has both sides, every field, and the checks
passed; no hog and no child outlives it), usage errors, and the hog bookkeeping on an
interrupt. Timings are never asserted, only that they exist.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import psutil
import pytest

from xenheap.tools import busy, cli, report
from xenheap.tools.machine import MachineInfo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TIMEOUT_S = 240  # two children, each capped by busy.CHILD_TIMEOUT_S of its own


def gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def busy_run() -> dict:
    """``xenheap demo --busy 2 --size 64MiB --json``, run once for the module."""
    proc = subprocess.run([sys.executable, "-m", "xenheap.tools.cli", "demo", "--busy", "2",
                           "--size", "64MiB", "--json"], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    result = json.loads(proc.stdout)  # stdout is pure JSON
    result["_children_after"] = [p.pid for p in psutil.Process().children(recursive=True)]
    return result


def test_busy_run_reports_both_sides_with_every_field(busy_run: dict) -> None:
    assert busy_run["busy"] == 2 and busy_run["size_bytes"] == 64 << 20
    assert set(busy_run["sides"]) == {"idle", "busy"}
    for side in busy_run["sides"].values():
        for field in dataclasses.fields(busy.SideSummary):
            assert field.name in side, field.name
        assert side["destroy_ms"] is not None and side["alloc_2mib_max_ms"] is not None
        assert side["abort_wait_max_ms"] is not None and side["close_ms"] is not None
        assert side["clean_after_ms"] is not None or side["clean_timed_out"]
    assert sorted(r["side"] for r in busy_run["runs"]) == ["busy", "idle"]


def test_busy_run_checks_passed(busy_run: dict) -> None:
    for name, side in busy_run["sides"].items():
        assert side["all_zero"] is True, name
        assert side["all_pages_taken"] is True, name
        assert side["check_ok"] is True, name
        assert side["threads_left"] == 0, name
    for run in busy_run["runs"]:
        assert run["alloc_2mib_count"] == run["heap_bytes"] // (2 << 20)
        assert run["thread_names"] == []


def test_busy_run_heap_lacks_cap_sys_nice_under_setpriv(busy_run: dict) -> None:
    if busy_run["launcher"] != "setpriv":
        pytest.skip("not root, or no setpriv: the child ran as a plain process")
    assert all(r["cap_sys_nice"] is False for r in busy_run["runs"])


def test_busy_run_leaves_no_hog_or_child_behind(busy_run: dict) -> None:
    hogs = [pid for r in busy_run["runs"] for pid in r["hog_pids"]]
    assert len(hogs) == 2  # only the busy side has them
    assert all(r["hog_pids"] == [] for r in busy_run["runs"] if r["side"] == "idle")
    assert all(gone(pid) for pid in hogs)
    assert all(gone(r["pid"]) for r in busy_run["runs"])  # the measured children
    assert busy_run["_children_after"] == []


def typed(result: dict) -> busy.BusyResult:
    """The experiment's JSON read back into its dataclasses."""
    fields = {k: v for k, v in result.items() if not k.startswith("_")}
    fields.update(machine=MachineInfo(**result["machine"]),
                  sides={k: busy.SideSummary(**v) for k, v in result["sides"].items()},
                  runs=[busy.SideRun(**r) for r in result["runs"]])
    return busy.BusyResult(**fields)


def test_busy_json_is_the_typed_result(busy_run: dict) -> None:
    fields = {k: v for k, v in busy_run.items() if not k.startswith("_")}
    assert dataclasses.asdict(typed(busy_run)) == fields


def test_busy_table_has_every_row_and_both_columns(busy_run: dict) -> None:
    text = report.format_busy(typed(busy_run))
    header = text.splitlines()[2]
    assert "idle" in header and "busy (2 hogs)" in header
    for label in ("destroy ms", "clean-after ms", "longest abort wait ms",
                  "longest 2 MiB alloc ms", "scrub CPU s", "close ms", "threads left",
                  "all zero", "check ok"):
        line = next(x for x in text.splitlines() if x.startswith(label))
        assert len(line[len(label):].split()) >= 2, line
    for label in ("all zero", "check ok"):
        line = next(x for x in text.splitlines() if x.startswith(label))
        assert line.split()[-2:] == ["yes", "yes"], line


@pytest.mark.parametrize("value", ["-1", "0", "x", "100000"])
def test_busy_usage_errors_exit_2(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--busy", value]) == cli.EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("xenheap: error:") and "--busy" in err and len(err.splitlines()) == 1


def test_busy_usage_error_from_the_command_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "xenheap.tools.cli", "demo", "--busy", "-1"],
                          capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert proc.returncode == 2 and proc.stdout == ""


def test_hogs_are_stopped_when_the_measured_side_is_interrupted(monkeypatch) -> None:
    started: list[int] = []
    real_start = busy.start_hogs

    def start(count: int, lifetime: float):
        hogs = real_start(count, lifetime)
        started.extend(h.pid for h in hogs)
        assert all(not gone(pid) for pid in started)  # running while the side runs
        return hogs

    def interrupted(cmd, label, timeout=busy.CHILD_TIMEOUT_S):
        if label == "busy":
            raise KeyboardInterrupt
        return busy.SideResult(**{f.name: None for f in dataclasses.fields(busy.SideResult)})

    monkeypatch.setattr(busy, "start_hogs", start)
    monkeypatch.setattr(busy, "run_child", interrupted)
    with pytest.raises(KeyboardInterrupt):
        busy.run(64 << 20, busy=2)
    assert len(started) == 2
    assert all(gone(pid) for pid in started)


def test_child_runs_without_cap_sys_nice_as_root() -> None:
    cmd, launcher = busy.child_command(64 << 20, 2)
    assert cmd[-4:] == ["--size", str(64 << 20), "--nodes", "2"]
    if os.geteuid() == 0 and os.path.exists(busy.SETPRIV):
        assert launcher == "setpriv" and cmd[0] == busy.SETPRIV
        assert "--inh-caps=-sys_nice" in cmd and "--bounding-set=-sys_nice" in cmd
    else:
        assert launcher == "plain" and cmd[0] == sys.executable


def test_median_counts_a_timeout_as_longest() -> None:
    assert busy.median_or_none([3.0, 1.0, 2.0]) == 2.0
    assert busy.median_or_none([1.0, None, 2.0]) == 2.0
    assert busy.median_or_none([1.0, None, None]) is None
    assert busy.median_or_none([1.0, 3.0]) == 2.0
    assert busy.median_or_none([1.0, None]) is None
