"""The ``xenheap`` command line: output structure, figures that agree, one-line errors,
and behaviour in pipes and files (stdout holds results only, progress goes to stderr, a
closed pipe ends quietly, usage errors exit 2).

Timings are never asserted: only that the figures exist, are consistent with each other
(a ratio is the quotient of the printed times) and that the experiment's checks passed.
Sizes are small (16-64 MiB) so the whole module runs in seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pty
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

from xenheap import Heap
from xenheap.block import Block
from xenheap.errors import InvalidArgument
from xenheap.tools import baselines, bench, cli, demo, machine, plot, report, workload
from xenheap.tools.progress import MIN_RATE_INTERVAL_S, ScrubProgress, format_rate
from xenheap.tools.workload import MiB

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = "64MiB"
TINY = "16MiB"  # for runs that test the plumbing, not the figures
ERASE = "\r\x1b[K"
# What a run must never leave on stderr. (Not "stderr is empty": a warning logged by a heap
# that another process left the machine too busy to close in time is not this test's matter.)
NOISE = ("Traceback", "BrokenPipeError", "Exception ignored", "xenheap: error")


def assert_quiet(stderr: str) -> None:
    for text in NOISE:
        assert text not in stderr, stderr
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m xenheap.tools.cli ARGS`` with stdout and stderr piped (so not a terminal)."""
    return subprocess.run([sys.executable, "-m", "xenheap.tools.cli", *args], capture_output=True,
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


def run_typed(module, argv: list[str], function: str = "run") -> tuple[dict, object]:
    """``cli.main(argv)``, which must succeed: its JSON and the typed result behind it (kept
    from ``module.function`` as the command called it)."""
    kept = []
    real = getattr(module, function)

    def run(*args, **kwargs):
        kept.append(real(*args, **kwargs))
        return kept[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, function, run)
        result = json.loads(main_ok(argv))
    assert len(kept) == 1
    return result, kept[0]


@pytest.fixture(scope="module")
def demo_run() -> tuple[dict, demo.DemoResult]:
    return run_typed(demo, ["demo", "--size", SMALL, "--json"])


@pytest.fixture(scope="module")
def demo_json(demo_run: tuple[dict, demo.DemoResult]) -> dict:
    return demo_run[0]


# --- demo -----------------------------------------------------------------------------------
def test_demo_json_is_the_typed_result(demo_run: tuple[dict, demo.DemoResult]) -> None:
    result, typed = demo_run
    assert isinstance(typed, demo.DemoResult)
    assert result == json.loads(json.dumps(dataclasses.asdict(typed)))


def test_demo_json_figures(demo_json: dict) -> None:
    assert demo_json["size_bytes"] == 64 * MiB
    sync, idle = demo_json["modes"]["sync"], demo_json["modes"]["idle"]
    assert demo_json["destroy_ratio"] == pytest.approx(sync["destroy_s"] / idle["destroy_s"])
    for mode in (sync, idle):
        assert mode["domain_bytes"] == mode["heap_bytes"] == 64 * MiB
        assert 0 < mode["destroy_s"] <= mode["clean_s"]
        assert mode["zeroed_bytes"] >= mode["domain_bytes"]
        assert mode["memset_bytes_per_s"] > 0 and mode["numpy_fill_bytes_per_s"] > 0
        assert mode["alloc_idle"]["n"] > 0
        assert mode["alloc_idle"]["p50_us"] <= mode["alloc_idle"]["p99_us"]
        assert mode["max_order_alloc"]["ok"], "dirty and clean buddies must merge"
        assert mode["max_order_alloc"]["bytes"] == 64 * MiB
        leak = mode["leak_check"]
        assert leak["ok"] and leak["nonzero_bytes"] == 0 and leak["all_memory"]
        assert leak["bytes_checked"] == 64 * MiB
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

    monkeypatch.setattr(demo, "run", fake_demo)
    code, _, err = call_main(["demo", "--size", "128MiB", "--nodes", "2"])
    assert seen == {"size": 128 * MiB, "nodes": 2}
    assert code == 1 and err == "xenheap: error: stop here\n"


# --- bench ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[dict, bench.BenchResult, str | None]:
    try:
        import matplotlib  # noqa: F401
        plot = str(tmp_path_factory.mktemp("plot") / "bench.png")
    except ImportError:
        plot = None
    args = ["bench", "--quick", "--json"] + (["--plot", plot] if plot else [])
    result, typed = run_typed(bench, args)
    assert isinstance(typed, bench.BenchResult)
    return result, typed, plot


@pytest.fixture(scope="module")
def bench_json(bench_run: tuple[dict, bench.BenchResult, str | None]) -> tuple[dict, str | None]:
    return bench_run[0], bench_run[2]


def test_bench_json_figures(bench_json: tuple[dict, str | None]) -> None:
    result, _ = bench_json
    assert [r["size_bytes"] for r in result["destroy"]] == bench.default_sizes(True)
    for row in result["destroy"]:
        assert row["destroy_ratio"] == pytest.approx(row["sync_destroy_s"]
                                                     / row["idle_destroy_s"])
        assert row["idle_clean_s"] >= row["idle_destroy_s"] > 0
    assert [r["size_bytes"] for r in result["buffers"]] == list(bench.QUICK_BUFFER_SIZES)
    for row in result["buffers"]:
        assert set(row["us"]) == {"xenheap", "bytearray", "numpy.zeros", "mmap",
                                  "xenheap zero=False", "numpy.empty"}
        for peer, ratio in row["vs_xenheap"].items():
            assert ratio == pytest.approx(row["us"][peer] / row["us"]["xenheap"])
    assert [(r["nodes"], r["scrubbers"]) for r in result["scrub"]][-1] == (2, 2)
    for row in result["scrub"]:
        assert row["clean_bytes_per_s"] > 0 and row["memset_bytes_per_s"] > 0
    assert [r["threads"] for r in result["alloc_threads"]] == [1, 2, 4]
    assert all(r["ops_per_s"] > 0 for r in result["alloc_threads"])


def test_bench_json_is_the_typed_result_and_the_plot(
        bench_run: tuple[dict, bench.BenchResult, str | None]) -> None:
    result, typed, plot = bench_run
    expected = json.loads(json.dumps(dataclasses.asdict(typed)))
    if plot is not None:
        expected["plot"] = plot  # the one key the command adds: where the plot went
    assert result == expected


def test_bench_tables_print_every_section(
        bench_run: tuple[dict, bench.BenchResult, str | None]) -> None:
    text = report.format_bench(bench_run[1])
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


@pytest.fixture
def bench_result_at_once(monkeypatch: pytest.MonkeyPatch,
                         bench_run: tuple[dict, bench.BenchResult, str | None]
                         ) -> bench.BenchResult:
    """``bench.run`` returns the module's bench result at once: for tests of the plot."""
    pytest.importorskip("matplotlib")
    typed = bench_run[1]
    monkeypatch.setattr(bench, "run", lambda *args, **kwargs: typed)
    return typed


@pytest.mark.parametrize("name", ["bench", "bench."])
def test_a_plot_without_extension_is_a_png_at_exactly_that_path(
        bench_result_at_once: bench.BenchResult, tmp_path, name: str) -> None:
    path = tmp_path / name
    out = main_ok(["bench", "--quick", "--plot", str(path)])
    assert out.rstrip("\n").endswith(f"plot written to {path}")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == [name]  # and nothing else (matplotlib would add ".png")
    result = json.loads(main_ok(["bench", "--quick", "--json", "--plot", str(path)]))
    assert result["plot"] == str(path)


def test_a_plot_format_that_cannot_be_written_fails_before_the_bench(
        monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """.pgf needs xelatex, here not on the PATH: refused before a minute of benchmarks."""
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("PATH", str(tmp_path))

    def run(*args, **kwargs):
        pytest.fail("the bench ran")

    monkeypatch.setattr(bench, "run", run)
    code, out, err = call_main(["bench", "--quick", "--plot", str(tmp_path / "b.pgf")])
    assert code == 2 and out == ""
    assert err.startswith(f"xenheap: error: --plot {tmp_path / 'b.pgf'}: matplotlib cannot "
                          "write .pgf files here: ")
    assert err.count("\n") == 1
    assert not (tmp_path / "b.pgf").exists()


def test_a_plot_that_fails_after_the_bench_still_prints_the_figures(
        bench_result_at_once: bench.BenchResult, monkeypatch: pytest.MonkeyPatch,
        tmp_path) -> None:
    def plot_bench(*args, **kwargs):
        raise RuntimeError("the disk\nis full")

    monkeypatch.setattr(plot, "plot_bench", plot_bench)
    code, out, err = call_main(["bench", "--quick", "--plot", str(tmp_path / "b.png")])
    assert code == 1
    assert out == report.format_bench(bench_result_at_once) + "\n"  # no "plot written"
    assert err == (f"xenheap: error: --plot {tmp_path / 'b.png'}: RuntimeError: the disk "
                   "is full\n")


# --- info -----------------------------------------------------------------------------------
def test_info() -> None:
    result, typed = run_typed(machine, ["info", "--json"], "info")
    assert isinstance(typed, machine.Info)
    assert result == json.loads(json.dumps(dataclasses.asdict(typed)))
    assert set(result["capabilities"]) == {"mbind", "madv_hugepage", "sched_idle"}
    assert result["nodes"] and all("cpus" in n and "distances" in n for n in result["nodes"])
    assert result["memset_bytes_per_s"] > 0 and result["numba"]
    text = report.format_info(typed)
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
    (["demo", "--frobnicate"], "unrecognized arguments"),
    (["demo", "--nodes", "65"], "at most 64 nodes"),
    (["demo", "--nodes", "1000000"], "at most 64 nodes"),
    (["frobnicate"], "invalid choice"),
    (["demo", "--progress=yes"], "ignored explicit argument"),
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


def test_no_command_prints_the_commands_on_stderr_and_exits_2() -> None:
    proc = run_cli(timeout=30)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("usage: xenheap")
    for command in ("demo", "bench", "info"):
        assert re.search(rf"^\s+{command}\s+\S", proc.stderr, re.M), proc.stderr
    assert "Traceback" not in proc.stderr


def test_too_many_nodes_is_a_usage_error_in_a_real_process() -> None:
    # 512 MiB passes the size check, so only the node count can refuse it (it used to reach
    # the library and exit 1).
    proc = run_cli("demo", "--nodes", "65", "--size", "512MiB", timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == ("xenheap: error: argument --nodes: a heap has at most 64 nodes, "
                           "got 65\n")


@pytest.mark.parametrize("argv, quoted", [
    # One byte short of the minimum: rounded sizes alone would say "4.0 MiB" for both.
    (["demo", "--size", "4194303"], ["--size 4194303 bytes (4.0 MiB)", "4194304 bytes"]),
    (["demo", "--size", "12MiB", "--nodes", "4"],
     ["12582912 bytes", "16777216 bytes", "4194304 bytes (4.0 MiB) per node"]),
    (["demo", "--size", "100"], ["--size 100 bytes:"]),
    (["bench", "--sizes", "64MiB", "1000"], ["--sizes 1000 bytes:"]),
    (["demo", "--size", "1000TiB"], ["1099511627776000 bytes (1000 TiB)", "at most "]),
])
def test_size_errors_quote_bytes(argv: list[str], quoted: list[str]) -> None:
    code, out, err = call_main(argv)
    assert code == 2 and out == ""
    for text in quoted:
        assert text in err, err
    if "1000TiB" not in argv:
        assert "at least" in err


@pytest.mark.parametrize("argv", [
    ["demo", "--size", "999999999999999999999999TiB"],  # its size in MiB overflowed a float
    ["demo", "--size", "9" * 4200],
    ["demo", "--size", "9" * 4299 + "TiB"],  # more bytes than digits str() will write
    ["bench", "--sizes", "64MiB", "9" * 400],
    ["demo", "--size", str(1 << 64)],  # cli.MAX_SIZE
])
def test_huge_sizes_are_one_line_usage_errors(argv: list[str]) -> None:
    code, out, err = call_main(argv)
    assert code == 2 and out == ""
    assert err.startswith("xenheap: error: argument --size") and err.count("\n") == 1, err
    assert "more than any machine has" in err and len(err) < 200


def test_a_size_of_more_digits_than_int_reads_is_a_short_usage_error() -> None:
    code, out, err = call_main(["demo", "--size", "9" * 5000])
    assert code == 2 and out == ""
    assert err.startswith("xenheap: error: argument --size: size: cannot parse '999")
    assert err.count("\n") == 1 and len(err) < 200, err


def test_a_huge_size_in_a_real_process_has_no_traceback() -> None:
    proc = run_cli("demo", "--size", "9" * 4200, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_the_largest_size_still_gets_the_size_check() -> None:
    code, _, err = call_main(["demo", "--size", str(cli.MAX_SIZE - 1)])
    assert code == 2 and "larger than this machine can spare" in err
    assert f"{cli.MAX_SIZE - 1} bytes (16777216 TiB)" in err


# --- pipes and files ------------------------------------------------------------------------
def test_a_closed_stdout_ends_quietly() -> None:
    """``xenheap demo | head -1`` where the reader is gone before the table is written."""
    proc = subprocess.Popen([sys.executable, "-m", "xenheap.tools.cli", "demo", "--size", TINY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    proc.stdout.close()  # the reader leaves at once: the first write finds no reader
    try:
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.stderr.close()
    assert code == cli.EXIT_BROKEN_PIPE == 141
    assert_quiet(err)  # no traceback, no "Exception ignored", no error line


def test_head_reads_the_first_line_and_all_ends_well() -> None:
    proc = subprocess.run(
        ["sh", "-c", f'"{sys.executable}" -m xenheap.tools.cli demo --size {TINY} | head -1'],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert proc.returncode == 0
    assert proc.stdout.startswith("xenheap demo: destroy a 16.0 MiB domain")
    assert proc.stdout.count("\n") == 1
    assert_quiet(proc.stderr)
    assert "scrubbed" not in proc.stderr and "demo (" not in proc.stderr  # no progress


def _run_with_terminal_stderr(args: list[str], stdout_path: str) -> tuple[int, str]:
    """Run ``python -m xenheap.tools.cli ARGS`` with stdout to a file and stderr on a terminal
    (a pseudo-terminal); returns the exit status and what the terminal received."""
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal's last writer
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        with open(stdout_path, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "xenheap.tools.cli", *args],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=slave,
                                    cwd=REPO)
        os.close(slave)
        slave = -1
        code = proc.wait(timeout=120)
        reader.join(10)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


def test_json_to_a_file_is_pure_and_progress_still_shows_on_a_terminal(tmp_path) -> None:
    path = str(tmp_path / "demo.json")
    code, terminal = _run_with_terminal_stderr(["demo", "--size", TINY, "--json"], path)
    assert code == 0, terminal
    with open(path, encoding="utf-8") as f:
        text = f.read()
    result = json.loads(text)  # the whole file is one JSON document
    assert result["size_bytes"] == 16 * MiB
    assert "\r" not in text and "\x1b" not in text
    # The progress went to the terminal, one line rewritten in place, and was erased.
    assert ERASE + "demo (sync): populating and writing the domain" in terminal
    assert ERASE + "demo (idle): allocating while the scrubber is busy" in terminal
    last_stage = terminal.rfind("demo (idle): highest-order allocation")
    assert 0 <= last_stage < terminal.rfind(ERASE)  # erased after the last stage
    assert_quiet(terminal)


def test_no_progress_keeps_the_terminal_silent(tmp_path) -> None:
    path = str(tmp_path / "demo.txt")
    code, terminal = _run_with_terminal_stderr(["demo", "--size", TINY, "--no-progress"], path)
    assert code == 0, terminal
    assert "demo (" not in terminal and ERASE not in terminal
    assert_quiet(terminal)
    with open(path, encoding="utf-8") as f:
        assert f.read().startswith("xenheap demo: destroy a 16.0 MiB domain")


def test_progress_asked_for_in_a_pipe_is_plain_lines_on_stderr() -> None:
    proc = run_cli("demo", "--size", TINY, "--json", "--progress")
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)  # stdout stays pure JSON
    lines = proc.stderr.splitlines()
    assert "demo (sync): populating and writing the domain" in lines
    assert "demo (idle): highest-order allocation and leak check" in lines
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr
    assert_quiet(proc.stderr)


@pytest.mark.parametrize("argv", [["info"], ["--version"]])
def test_stdout_closed_from_the_start_is_one_line_on_stderr(argv: list[str]) -> None:
    """``xenheap info >&-``: no stdout at all (sys.stdout is None), so nothing to run."""
    args = " ".join(argv)
    proc = subprocess.run(["sh", "-c", f'"{sys.executable}" -m xenheap.tools.cli {args} >&-'],
                          capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert proc.returncode == 1
    assert proc.stderr == "xenheap: error: stdout is closed: nowhere to print\n"


def test_stderr_closed_from_the_start_keeps_the_error_off_stdout() -> None:
    proc = subprocess.run(
        ["sh", "-c", f'"{sys.executable}" -m xenheap.tools.cli demo --size 1 2>&-'],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert proc.returncode == 2
    assert proc.stdout == ""


def test_an_error_for_a_reader_gone_ends_quietly_with_its_status() -> None:
    """``xenheap demo --size 1 2>&1 | true``: the error line finds no reader."""
    proc = subprocess.Popen([sys.executable, "-m", "xenheap.tools.cli", "demo", "--size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    proc.stdout.close()  # the reader leaves at once: the error line finds none
    try:
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    assert code == cli.EXIT_USAGE  # not 1, from a BrokenPipeError's traceback


def test_an_interrupt_while_the_commands_load_exits_130() -> None:
    """Ctrl-C while the command's modules are imported (here: xenheap.tools.machine) ends as
    a later one does. (The ``xenheap`` package itself loads before any handler can be.)"""
    script = """if True:
        import runpy, sys
        import xenheap

        class Interrupt:
            def find_spec(self, name, path=None, target=None):
                if name == "xenheap.tools.machine":
                    raise KeyboardInterrupt
                return None

        sys.meta_path.insert(0, Interrupt())
        sys.argv = ["xenheap", "info"]
        runpy.run_module("xenheap.tools.cli", run_name="__main__")
    """
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=REPO, check=False)
    assert proc.returncode == cli.EXIT_INTERRUPTED, proc.stderr
    assert proc.stderr == "xenheap: error: interrupted\n"


def _interrupt(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt


class _FillInterrupted(np.ndarray):
    """An array whose fill() is interrupted, as by Ctrl-C (staticmethod: like numpy's own C
    method, no Python frame holds the array while the interrupt goes up)."""

    fill = staticmethod(_interrupt)


class _NumpyFillInterrupted:
    """numpy, but frombuffer() gives arrays whose fill() is interrupted."""

    def __getattr__(self, name: str) -> object:
        return getattr(np, name)

    @staticmethod
    def frombuffer(buffer: object, dtype: object) -> np.ndarray:
        return np.frombuffer(buffer, dtype=dtype).view(_FillInterrupted)


def test_an_interrupt_while_scratch_memory_fills_exits_130(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``xenheap info``: Ctrl-C while its scratch mapping is faulted in must not turn into a
    BufferError (closing the mapping while the array over it is alive)."""
    monkeypatch.setattr(baselines, "np", _NumpyFillInterrupted())
    code, out, err = call_main(["info"])
    assert (code, out, err) == (130, "", "xenheap: error: interrupted\n")


class _AnyInterrupted(np.ndarray):
    """An array whose any() is interrupted, as by Ctrl-C, in a Python frame that holds the
    array (as numpy's own any() has one, ``numpy.core._methods._any``)."""

    def any(self, *args: object, **kwargs: object) -> bool:
        raise KeyboardInterrupt


def test_an_interrupted_demo_leaves_no_view_of_its_heap(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Ctrl-C in the demo's leak check: the heap closes as the interrupt goes through it, and
    no view of its memory may be left in the frames the traceback keeps (the arena would
    warn, on the terminal, that it was closed while views were alive)."""
    real_array = Block.array
    monkeypatch.setattr(Block, "array", lambda blk, dtype="uint8":
                        real_array(blk, dtype).view(_AnyInterrupted))
    with pytest.raises(KeyboardInterrupt):
        demo.run_mode("sync", 16 * MiB)
    assert "views of it are alive" not in caplog.text


@pytest.mark.parametrize("argv, error, code, message", [
    (["demo", "--size", TINY], KeyboardInterrupt(), 130, "interrupted"),
    (["demo", "--size", TINY], InvalidArgument("refused"), 1, "refused"),
    (["bench", "--quick"], KeyboardInterrupt(), 130, "interrupted"),
])
def test_a_failure_erases_the_progress_line_before_its_message(
        monkeypatch: pytest.MonkeyPatch, argv: list[str], error: BaseException, code: int,
        message: str) -> None:
    module = demo if argv[0] == "demo" else bench

    def run(*args, **kwargs):
        progress = kwargs.get("progress", args[-1])
        progress.stage("working")
        raise error

    monkeypatch.setattr(module, "run", run)
    terminal = _Terminal(True)
    monkeypatch.setattr(sys, "stderr", terminal)
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(argv) == code
    assert terminal.text == f"{ERASE}working{ERASE}xenheap: error: {message}\n"


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
    with Heap("16MiB", scrub="alloc") as heap:
        guest, _, _ = workload.populated_domain(heap, "guest")
        guest.destroy()
        assert not workload.wait_until_clean(heap, progress)
    if tty:
        assert "0 B of 16.0 MiB scrubbed, rate -" in stream.text  # nothing done: no rate
        assert stream.text.endswith("\r\x1b[K")  # erased: the terminal keeps no trace
    else:
        assert stream.text == ""


def test_progress_defaults_to_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _Terminal(True)
    monkeypatch.setattr(sys, "stderr", fake)
    progress = ScrubProgress()
    assert progress.stream is fake and progress.enabled and progress.live
    progress.stage("working")
    assert fake.text == "\r\x1b[Kworking"


def test_progress_forced_on_a_plain_stream_writes_lines() -> None:
    stream = _Terminal(False)
    progress = ScrubProgress(stream, enabled=True)
    assert progress.enabled and not progress.live
    progress.stage("one")
    progress.stage("two")
    progress.end()
    assert stream.text == "one\ntwo\n"


class _FakeHeap:
    """Just enough of a Heap for the progress line: stats() as the test sets them."""

    def __init__(self) -> None:
        self.dirty = 4096
        self.scrubbed = 0

    def stats(self) -> dict:
        return {"page_size": 4096, "dirty_pages": self.dirty,
                "nodes": [{"scrubbed_pages": self.scrubbed, "alloc_scrubbed_pages": 0,
                           "unmapped_pages": 0}]}


def test_progress_shows_no_rate_over_a_tiny_interval() -> None:
    """8 MiB scrubbed within 10 us would read as 839 GB/s: too short an interval to say."""
    now = [100.0]
    stream = _Terminal(True)
    progress = ScrubProgress(stream, repaint_s=0.0, clock=lambda: now[0])
    heap = _FakeHeap()
    progress.begin(heap)  # 16 MiB dirty
    heap.scrubbed, heap.dirty = 2048, 2048
    now[0] += 10e-6
    progress.update(heap)
    assert stream.text.endswith("scrubbing: 8.0 MiB of 16.0 MiB scrubbed, rate -")
    assert "GB/s" not in stream.text and "MB/s" not in stream.text
    # Half a second on, the same bytes give a real rate and a time left.
    now[0] += 0.5
    progress.update(heap)
    assert stream.text.endswith("8.0 MiB of 16.0 MiB scrubbed, 16.8 MB/s, 500 ms left")


def test_rates_need_something_measured() -> None:
    assert format_rate(None) == "-"
    assert workload.rate(0, 1.0) is None  # nothing done
    assert workload.rate(1 << 30, 0.0) is None
    assert workload.rate(1 << 30, workload.MIN_TIMED_S / 10) is None  # too short to mean much
    assert workload.rate(1 << 30, 1.0) == 1 << 30
    assert MIN_RATE_INTERVAL_S >= workload.MIN_TIMED_S


def test_tables_show_a_dash_for_a_missing_rate(demo_run: tuple[dict, demo.DemoResult]) -> None:
    typed = demo_run[1]
    modes = {"idle": dataclasses.replace(typed.modes["idle"], clean_bytes_per_s=None),
             "sync": dataclasses.replace(typed.modes["sync"], memset_bytes_per_s=None)}
    result = dataclasses.replace(typed, modes=modes)
    rows = {re.split(r"\s{2,}", line.strip())[0]: re.split(r"\s{2,}", line.strip())[1:]
            for line in report.format_demo(result).splitlines()[4:]}
    assert rows["zeroing rate, destroy to clean"][1] == "-"
    assert rows["libc memset, same memory, same run"][0] == "-"


def test_progress_stops_quietly_when_its_stream_breaks() -> None:
    class Broken(_Terminal):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    progress = ScrubProgress(Broken(True))
    progress.stage("working")  # must not raise
    assert not progress.enabled


# --- the library apart from its tools -------------------------------------------------------
def test_the_library_never_imports_its_tools() -> None:
    """xenheap/tools/ builds on the library; no library module imports it (xenheap/serve.py,
    the old name of ``python -m xenheap.tools.serve``, is not library but a forwarding shim)."""
    library = os.path.join(REPO, "xenheap")
    imports_tools = re.compile(r"^\s*(from|import)\s+(xenheap\.tools|\.tools)\b"
                               r"|^\s*from\s+(xenheap|\.)\s+import\s+[^#\n]*\btools\b", re.M)
    offenders = []
    for name in sorted(os.listdir(library)):
        if name.endswith(".py") and name != "serve.py":
            with open(os.path.join(library, name), encoding="utf-8") as f:
                if imports_tools.search(f.read()):
                    offenders.append(name)
    assert offenders == []
    proc = subprocess.run([sys.executable, "-c", "import sys, xenheap; print(sorted(m for m in "
                           "sys.modules if m.startswith('xenheap.tools')))"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc


def test_progress_without_stderr_is_off_and_harmless(monkeypatch: pytest.MonkeyPatch) -> None:
    """Started with stderr closed (sys.stderr is None), ``--progress`` has nothing to show
    it on: it is off, and a stage does not fail the command."""
    monkeypatch.setattr(sys, "stderr", None)
    progress = ScrubProgress(enabled=True)
    assert not progress.enabled
    progress.stage("working")
    progress.end()
