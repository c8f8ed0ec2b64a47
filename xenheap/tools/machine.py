"""The machine the figures come from: CPU model, CPUs, memory, how much of it the commands may
use, and what ``xenheap info`` reports (NUMA nodes, OS features, versions, memset bandwidth).
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass

import numba
import numpy as np
import psutil

import xenheap
from xenheap import prim
from xenheap.tools.baselines import coalesce, memset_bandwidth, scratch_regions
from xenheap.tools.workload import MiB
from xenheap.topology import read_topology

# How much faulted-in memory ``xenheap info`` times memset on.
INFO_MEMSET_BYTES = 256 * MiB


def available_memory() -> int:
    """Bytes of memory available to new allocations now (psutil's ``available``)."""
    return int(psutil.virtual_memory().available)


def size_limit(available: int | None = None) -> int:
    """The largest heap the commands accept: 3/4 of available memory (room for the rest)."""
    avail = available_memory() if available is None else available
    return avail * 3 // 4


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class MachineInfo:
    """Which machine the figures come from."""

    cpu: str  # the CPU model
    cpus: int  # CPUs this process may run on
    memory_bytes: int
    available_bytes: int


def machine_info() -> MachineInfo:
    """Which machine the figures come from: CPU model, usable CPUs, memory."""
    return MachineInfo(cpu=_cpu_model(), cpus=len(os.sched_getaffinity(0)),
                       memory_bytes=int(psutil.virtual_memory().total),
                       available_bytes=available_memory())


@dataclass
class NodeInfo:
    """One NUMA node as the heap sees it."""

    node: int
    os_node: int | None  # the OS's number for it (None: emulated)
    cpus: list[int]
    distances: list[int]


@dataclass
class Info:
    """What ``xenheap info`` reports."""

    version: str
    numba: str
    numpy: str
    python: str
    machine: MachineInfo
    nodes: list[NodeInfo]
    capabilities: dict[str, bool]  # "mbind", "madv_hugepage", "sched_idle": usable here
    memset_bytes_per_s: float | None  # one call over the whole scratch mapping
    memset_2mib_calls_bytes_per_s: float | None
    memset_measured_bytes: int


def info() -> Info:
    """The machine's nodes, what the OS offers, versions, and libc memset's bandwidth."""
    topology = read_topology()
    with scratch_regions(INFO_MEMSET_BYTES) as regions:
        memset_rate = memset_bandwidth(coalesce(regions), repeats=3)
        memset_2mib_rate = memset_bandwidth(regions, repeats=3)
    return Info(
        version=xenheap.__version__,
        numba=numba.__version__,
        numpy=np.__version__,
        python=sys.version.split()[0],
        machine=machine_info(),
        nodes=[NodeInfo(node=n.id, os_node=n.os_node, cpus=list(n.cpus),
                        distances=list(n.distances)) for n in topology.nodes],
        capabilities=prim.capabilities(),
        memset_bytes_per_s=memset_rate,
        memset_2mib_calls_bytes_per_s=memset_2mib_rate,
        memset_measured_bytes=INFO_MEMSET_BYTES,
    )
