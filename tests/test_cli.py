"""The ``xenheap`` command line: output structure, figures that agree, one-line errors.

Timings are never asserted: only that the figures exist, are consistent with each other
(a ratio is the quotient of the printed times) and that the experiment's checks passed.
Sizes are small (64 MiB) so the whole module runs in seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest

from xenheap import cli, measure
from xenheap.errors import InvalidArgument
from xenheap.progress import ScrubProgress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = "64MiB"
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m xenheap.cli ARGS`` with stdout and stderr piped (so not a terminal)."""
    return subprocess.run([sys.executable, "-m", "xenheap.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, check=False)


def seconds(text: str) -> float:
    """``"3.4 ms"`` -> 0.0034."""
    value, unit = text.split()
    return float(value) * UNITS[unit]


def call_main(argv: list[str]) -> tuple[int, str, str]:
    """Run ``cli.main`` in this process: (exit status, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


def main_ok(argv: list[str]) -> str:
    """``cli.main`` in this process, which must succeed; returns its stdout."""
    code, out, err = call_main(argv)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def demo_json() -> dict:
    return json.loads(main_ok(["demo", "--size", SMALL, "--json"]))


# --- demo -----------------------------------------------------------------------------------
def test_demo_json_figures(demo_json: dict) -> None:
    assert demo_json["size_bytes"] == 64 * measure.MiB
    sync, idle = demo_json["modes"]["sync"], demo_json["modes"]["idle"]
    assert demo_json["destroy_ratio"] == pytest.approx(sync["destroy_s"] / idle["destroy_s"])
    for mode in (sync, idle):
        assert mode["domain_bytes"] == mode["heap_bytes"] == 64 * measure.MiB
        assert 0 < mode["destroy_s"] <= mode["clean_s"]
        assert mode["zeroed_bytes"] >= mode["domain_bytes"]
        assert mode["memset_bytes_per_s"] > 0 and mode["numpy_fill_bytes_per_s"] > 0
        assert mode["alloc_idle"]["n"] > 0
        assert mode["alloc_idle"]["p50_us"] <= mode["alloc_idle"]["p99_us"]
        assert mode["max_order_alloc"]["ok"], "dirty buddies must merge (the RFC's downside)"
        assert mode["max_order_alloc"]["bytes"] == 64 * measure.MiB
        leak = mode["leak_check"]
        assert leak["ok"] and leak["nonzero_bytes"] == 0 and leak["all_memory"]
        assert leak["bytes_checked"] == 64 * measure.MiB
    # Only "idle" has scrubbers: a busy phase, a scrubber rate, aborts counted.
    assert sync["alloc_busy"] is None and sync["scrubber_bytes_per_s"] is None
    assert idle["alloc_busy"]["n"] > 0 and idle["busy_aborts"] >= 0
    assert idle["scrubber_bytes_per_s"] > 0


def test_demo_table_as_printed_and_no_progress_when_piped() -> None:
    proc = run_cli("demo", "--size", SMALL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    # Progress is for terminals only: no carriage returns, escapes or progress text here.
    assert "\r" not in out and "\x1b" not in out and "scrubbed," not in out
    assert out.startswith("xenheap demo: destroy a 64.0 MiB domain")
    # Label and figures are separated by two spaces or more; figures hold single spaces.
    rows = {}
    for line in out.splitlines()[4:]:
        label, *cells = re.split(r"\s{2,}", line.strip())
        rows[label] = cells
    sync_s, idle_s = map(seconds, rows["destroy the domain"])
    ratio = float(rows["destroy time sync / idle"][0].rstrip("x"))
    # Each printed figure carries 3 significant digits: allow their rounding.
    assert ratio == pytest.approx(sync_s / idle_s, rel=0.02)
    assert rows["leak check: a new domain takes all 64.0 MiB"] == ["no byte leaked"] * 2
    assert all(cell.startswith("ok") for cell in rows[
        "order-14 alloc (64.0 MiB) right after destroy"])
    for label in ("all memory clean again, from destroy", "libc memset, same memory, same run",
                  "alloc latency p50 / p99, idle heap", "alloc latency p50 / p99, scrubber busy",
                  "aborts taken (scrubs stopped)"):
        assert label in rows


def test_demo_with_emulated_nodes_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_demo(size, nodes, progress):
        seen.update(size=size, nodes=nodes)
        raise InvalidArgument("stop here")  # the library's refusal: reported in one line

    monkeypatch.setattr(measure, "demo", fake_demo)
    code, _, err = call_main(["demo", "--size", "128MiB", "--nodes", "2"])
    assert seen == {"size": 128 * measure.MiB, "nodes": 2}
    assert code == 1 and err == "xenheap: error: stop here\n"


# --- bench ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_json(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str | None]:
    try:
        import matplotlib  # noqa: F401
        plot = str(tmp_path_factory.mktemp("plot") / "bench.png")
    except ImportError:
        plot = None
    args = ["bench", "--quick", "--json"] + (["--plot", plot] if plot else [])
    return json.loads(main_ok(args)), plot


def test_bench_json_figures(bench_json: tuple[dict, str | None]) -> None:
    result, _ = bench_json
    assert [r["size_bytes"] for r in result["destroy"]] == measure.default_bench_sizes(True)
    for row in result["destroy"]:
        assert row["destroy_ratio"] == pytest.approx(row["sync_destroy_s"]
                                                     / row["idle_destroy_s"])
        assert row["idle_clean_s"] >= row["idle_destroy_s"] > 0
    assert [r["size_bytes"] for r in result["buffers"]] == list(measure.BUFFER_SIZES)
    for row in result["buffers"]:
        assert set(row["us"]) == {"xenheap", "bytearray", "numpy.zeros", "mmap"}
        for peer, ratio in row["vs_xenheap"].items():
            assert ratio == pytest.approx(row["us"][peer] / row["us"]["xenheap"])
    assert [(r["nodes"], r["scrubbers"]) for r in result["scrub"]][-1] == (2, 2)
    for row in result["scrub"]:
        assert row["clean_bytes_per_s"] > 0 and row["memset_bytes_per_s"] > 0
    assert [r["threads"] for r in result["alloc_threads"]] == [1, 2, 4]
    assert all(r["ops_per_s"] > 0 for r in result["alloc_threads"])


def test_bench_tables_print_every_section(bench_json: tuple[dict, str | None]) -> None:
    text = cli.format_bench(bench_json[0])
    for heading in ("Destroy latency", "Zeroed buffer", "Scrub throughput",
                    "Allocation throughput"):
        assert heading in text
    assert "numpy.zeros" in text and "mmap" in text and "bytearray" in text


def test_bench_plot_written(bench_json: tuple[dict, str | None]) -> None:
    result, plot = bench_json
    if plot is None:
        pytest.skip("matplotlib is not installed")
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert result["plot"] == plot


def test_plot_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, out, err = call_main(["bench", "--quick", "--plot", str(tmp_path / "b.png")])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "pip install -e '.[plot]'" in err
    assert not (tmp_path / "b.png").exists()


# --- info -----------------------------------------------------------------------------------
def test_info() -> None:
    result = json.loads(main_ok(["info", "--json"]))
    assert set(result["capabilities"]) == {"mbind", "madv_hugepage", "sched_idle"}
    assert result["nodes"] and all("cpus" in n and "distances" in n for n in result["nodes"])
    assert result["memset_bytes_per_s"] > 0 and result["numba"]
    text = cli.format_info(result)
    assert "MADV_HUGEPAGE" in text and "SCHED_IDLE" in text and "mbind" in text


# --- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, fragment", [
    (["demo", "--size", "lots"], "cannot parse"),
    (["demo", "--size", "1000TiB"], "larger than this machine can spare"),
    (["demo", "--size", "1MiB"], "at least"),
    (["demo", "--nodes", "0"], "at least 1 node"),
    (["demo", "--nodes", "two"], "not a whole number"),
    (["bench", "--sizes", "64MiB", "12XB"], "unknown unit"),
    (["bench", "--sizes", "1000TiB"], "larger than this machine can spare"),
    (["bench", "--plot", "/nonexistent-dir/bench.png"], "cannot write there"),
    (["bench", "--plot", "/"], "is a directory"),
    ([], "required"),
    (["demo", "--frobnicate"], "unrecognized arguments"),
])
def test_bad_input_is_one_line(argv: list[str], fragment: str) -> None:
    code, out, err = call_main(argv)
    assert code == 2
    assert out == ""
    assert err.startswith("xenheap: error: ") and err.count("\n") == 1, err
    assert fragment in err
    assert "Traceback" not in err


def test_bad_input_in_a_real_process_has_no_traceback() -> None:
    proc = run_cli("demo", "--size", "12 parsecs")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_help_exits_cleanly() -> None:
    code, out, _ = call_main(["--help"])
    assert code == 0 and "demo" in out and "bench" in out and "info" in out


# --- progress -------------------------------------------------------------------------------
class _Terminal:
    """A stream that says it is a terminal and keeps what was written."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.text = ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("tty", [True, False])
def test_progress_only_on_a_terminal(tty: bool) -> None:
    stream = _Terminal(tty)
    progress = ScrubProgress(stream, repaint_s=0.0)
    # scrub="alloc": nothing cleans in the background, so the dirty pages are still there
    # when the progress line starts (no race with a fast scrubber), and the wait gives up.
    with measure.Heap("16MiB", scrub="alloc") as heap:
        guest, _, _ = measure.populated_domain(heap, "guest")
        guest.destroy()
        assert not measure.wait_until_clean(heap, progress)
    if tty:
        assert "0 B of 16.0 MiB scrubbed" in stream.text
        assert stream.text.endswith("\r\x1b[K")  # erased: the terminal keeps no trace
    else:
        assert stream.text == ""
