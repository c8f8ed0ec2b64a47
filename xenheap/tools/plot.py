"""``xenheap bench --plot``: the destroy sweep and the buffer comparison, drawn with
matplotlib (the optional "plot" extra), which the caller imports and passes in."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from xenheap.sizes import format_size
from xenheap.tools.report import machine_line
from xenheap.tools.workload import MiB

if TYPE_CHECKING:
    from xenheap.tools.bench import BenchResult


def plot_bench(result: BenchResult, path: str, plt: Any, plot_format: str) -> None:
    """Destroy latency against size (log-log, both modes) and the buffer comparison,
    written in ``plot_format`` ("png", "svg", ...) to exactly ``path``.

    ``plt`` is matplotlib's pyplot, on a backend that writes files.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    destroy = result.destroy
    sizes = [r.size_bytes / MiB for r in destroy]
    left.loglog(sizes, [r.sync_destroy_s for r in destroy], "o-", label='destroy, scrub="sync"')
    left.loglog(sizes, [r.idle_destroy_s for r in destroy], "s-", label='destroy, scrub="idle"')
    left.loglog(sizes, [r.idle_clean_s for r in destroy], "s--",
                label='all clean again, scrub="idle"')
    left.set_xticks(sizes, [format_size(r.size_bytes) for r in destroy])
    left.set_xticks([], minor=True)  # log axes add unlabelled minor ticks: the sizes suffice
    left.set_xlabel("domain size")
    left.set_ylabel("seconds")
    left.set_title("Destroying a domain")
    left.grid(True, which="both", alpha=0.3)
    left.legend()

    buffers = result.buffers
    peers = list(buffers[0].us)
    width = 0.8 / len(peers)
    for i, name in enumerate(peers):
        xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(buffers))]
        right.bar(xs, [b.us[name] for b in buffers], width, label=name)
    right.set_xticks(range(len(buffers)))
    right.set_xticklabels([format_size(b.size_bytes) for b in buffers])
    right.set_yscale("log")
    right.set_ylabel("microseconds per buffer (median)")
    right.set_title("Zeroed buffer: obtain, write once, release")
    right.grid(True, axis="y", which="both", alpha=0.3)
    right.legend()
    fig.suptitle(f"xenheap on {machine_line(result.machine)}")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120, format=plot_format)
    finally:
        plt.close(fig)
