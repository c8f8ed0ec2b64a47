"""NUMA topology: the machine's nodes from sysfs, or emulated nodes over the allowed CPUs."""

from __future__ import annotations

import logging
import numbers
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from native_kernels.layout import MAX_NODES
from xenheap import prim
from xenheap.errors import InvalidArgument

__all__ = [
    "Node",
    "Topology",
    "emulated_topology",
    "parse_cpulist",
    "read_topology",
    "resolve_topology",
]

log = logging.getLogger(__name__)

LOCAL_DISTANCE = 10  # SLIT distance of a node to itself
REMOTE_DISTANCE = 20  # SLIT default for a remote node, used when sysfs gives no distances

_NODE_DIR_RE = re.compile(r"node(\d+)")
_CPU_RANGE_RE = re.compile(r"(\d+)(?:-(\d+))?")


@dataclass(frozen=True)
class Node:
    """One node of the heap: its CPUs, its distances and the OS node backing it."""

    id: int
    cpus: tuple[int, ...]
    distances: tuple[int, ...]
    os_node: int | None


@dataclass(frozen=True)
class Topology:
    """The heap's nodes, indexed by ``Node.id`` (0..n-1)."""

    nodes: tuple[Node, ...]
    emulated: bool

    def __post_init__(self) -> None:
        if not self.nodes:
            raise InvalidArgument("a topology needs at least one node")
        n = len(self.nodes)
        for index, node in enumerate(self.nodes):
            if node.id != index:
                raise InvalidArgument(f"node at index {index} has id {node.id}")
            if len(node.distances) != n:
                raise InvalidArgument(
                    f"node {index} has {len(node.distances)} distances for {n} nodes"
                )

    def _check_node(self, node: int) -> None:
        if isinstance(node, bool) or not isinstance(node, numbers.Integral):
            raise InvalidArgument(f"node must be an integer, got {node!r}")
        if not 0 <= node < len(self.nodes):
            raise InvalidArgument(f"node {node} out of range (0..{len(self.nodes) - 1})")

    def zone_order(self, node: int) -> list[int]:
        """``node`` first, then every other node by increasing distance from it, ties by id."""
        self._check_node(node)
        row = self.nodes[node].distances
        return sorted(range(len(self.nodes)), key=lambda j: (j != node, row[j], j))

    def nearest_with_cpus(self, node: int) -> int | None:
        """``node`` if it has CPUs, else the nearest node that has; None if no node has any."""
        for candidate in self.zone_order(node):
            if self.nodes[candidate].cpus:
                return candidate
        return None

    def cpu_to_node(self) -> dict[int, int]:
        """Map every CPU of the topology to the id of its node."""
        return {cpu: node.id for node in self.nodes for cpu in node.cpus}


def parse_cpulist(text: str) -> list[int]:
    """Parse a kernel cpulist such as ``"0-3,8,10-11\\n"`` into sorted CPU numbers."""
    if not isinstance(text, str):
        raise InvalidArgument(f"cpulist must be a string, got {text!r}")
    stripped = text.strip()
    if not stripped:
        return []
    cpus: set[int] = set()
    for part in stripped.split(","):
        match = _CPU_RANGE_RE.fullmatch(part.strip())
        if match is None:
            raise InvalidArgument(f"bad cpulist {text!r}: cannot parse {part!r}")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise InvalidArgument(f"bad cpulist {text!r}: range {part!r} runs backwards")
        cpus.update(range(first, last + 1))
    return sorted(cpus)


def _allowed_cpus(allowed: set[int] | None) -> set[int]:
    return prim.allowed_cpus() if allowed is None else set(allowed)


def _default_distances(index: int, count: int) -> tuple[int, ...]:
    return tuple(LOCAL_DISTANCE if j == index else REMOTE_DISTANCE for j in range(count))


def _read_distances(path: str, index: int, count: int) -> tuple[int, ...]:
    """The node's distance row; SLIT defaults (with a warning) when missing or malformed."""
    try:
        with open(path, encoding="ascii") as f:
            row = tuple(int(field) for field in f.read().split())
    except (OSError, ValueError) as exc:
        log.warning("cannot read NUMA distances from %s (%s); assuming defaults", path, exc)
        return _default_distances(index, count)
    if len(row) != count:
        # Distances only make sense if they line up with the nodes we found.
        log.warning("%s lists %d distances for %d nodes; assuming defaults", path, len(row), count)
        return _default_distances(index, count)
    return row


def read_topology(sysfs_root: str = "/sys", allowed: set[int] | None = None) -> Topology:
    """Read the machine's NUMA nodes from ``<sysfs_root>/devices/system/node``.

    Nodes are renumbered 0..n-1 in OS node order (``os_node`` keeps the OS number) and their
    CPUs restricted to ``allowed`` (default: this process's affinity). Without NUMA
    information in sysfs, one unbound node holds all allowed CPUs.
    """
    cpus_allowed = _allowed_cpus(allowed)
    base = os.path.join(sysfs_root, "devices", "system", "node")
    os_nodes: list[int] = []
    try:
        entries = os.listdir(base)
    except OSError:
        entries = []
    for entry in entries:
        match = _NODE_DIR_RE.fullmatch(entry)
        if match is not None and os.path.isdir(os.path.join(base, entry)):
            os_nodes.append(int(match.group(1)))
    os_nodes.sort()

    if not os_nodes:
        log.debug("no NUMA nodes under %s; using one node", base)
        only = Node(
            id=0, cpus=tuple(sorted(cpus_allowed)), distances=(LOCAL_DISTANCE,), os_node=None
        )
        return Topology(nodes=(only,), emulated=False)

    nodes = []
    for index, os_node in enumerate(os_nodes):
        node_dir = os.path.join(base, f"node{os_node}")
        try:
            with open(os.path.join(node_dir, "cpulist"), encoding="ascii") as f:
                cpulist = f.read()
        except OSError:
            cpulist = ""  # memory-only nodes may lack the file on old kernels
        try:
            cpus = parse_cpulist(cpulist)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{node_dir}/cpulist: {exc}") from exc
        distances = _read_distances(os.path.join(node_dir, "distance"), index, len(os_nodes))
        nodes.append(
            Node(
                id=index,
                cpus=tuple(cpu for cpu in cpus if cpu in cpus_allowed),
                distances=distances,
                os_node=os_node,
            )
        )
    return Topology(nodes=tuple(nodes), emulated=False)


def _check_count(spec: object) -> int:
    if isinstance(spec, bool) or not isinstance(spec, numbers.Integral):
        raise InvalidArgument(f"nodes must be a node count or a list of CPU lists, got {spec!r}")
    count = int(spec)
    if count < 1:
        raise InvalidArgument(f"the number of emulated nodes must be at least 1, got {count}")
    if count > MAX_NODES:  # before any per-node work: a huge count must not stall
        raise InvalidArgument(f"at most {MAX_NODES} emulated nodes, got {count}")
    return count


def _split_cpus(spec: Sequence[Sequence[int]], cpus_allowed: set[int]) -> list[list[int]]:
    """Validate an explicit list of CPU lists and return it as lists of ints."""
    if len(spec) == 0:
        raise InvalidArgument("an emulated topology needs at least one node, got an empty list")
    if len(spec) > MAX_NODES:  # before any per-node work: a huge list must not stall
        raise InvalidArgument(f"at most {MAX_NODES} emulated nodes, got {len(spec)}")
    seen: dict[int, int] = {}
    groups: list[list[int]] = []
    for index, group in enumerate(spec):
        if isinstance(group, (str, bytes)) or not isinstance(group, Sequence):
            raise InvalidArgument(f"emulated node {index}: expected a list of CPUs, got {group!r}")
        cpus: list[int] = []
        for cpu in group:
            if isinstance(cpu, bool) or not isinstance(cpu, numbers.Integral):
                raise InvalidArgument(f"emulated node {index}: CPU {cpu!r} is not an integer")
            cpu = int(cpu)
            if cpu not in cpus_allowed:
                raise InvalidArgument(
                    f"emulated node {index}: CPU {cpu} is not available "
                    f"(allowed: {sorted(cpus_allowed)})"
                )
            if cpu in seen:
                raise InvalidArgument(
                    f"emulated node {index}: CPU {cpu} is already in node {seen[cpu]}"
                )
            seen[cpu] = index
            cpus.append(cpu)
        groups.append(sorted(cpus))
    return groups


def emulated_topology(
    spec: int | Sequence[Sequence[int]],
    sysfs_root: str = "/sys",
    allowed: set[int] | None = None,
) -> Topology:
    """Build emulated nodes: ``spec`` is a node count or one CPU list per node.

    A count splits the allowed CPUs contiguously (some nodes get none when there are more
    nodes than CPUs). Distances are 10 to itself and ``10 + 10 * |i - j|`` to others.
    Emulated node i is bound to OS node i when the machine has one, else not bound.
    """
    cpus_allowed = _allowed_cpus(allowed)
    if isinstance(spec, (str, bytes)):
        raise InvalidArgument(f"nodes must be a node count or a list of CPU lists, got {spec!r}")
    if isinstance(spec, Sequence):
        groups = _split_cpus(spec, cpus_allowed)
    else:
        count = _check_count(spec)
        ordered = sorted(cpus_allowed)
        total = len(ordered)
        groups = [ordered[i * total // count : (i + 1) * total // count] for i in range(count)]

    real = read_topology(sysfs_root, allowed=cpus_allowed)
    real_os_nodes = {node.os_node for node in real.nodes if node.os_node is not None}
    n = len(groups)
    nodes = tuple(
        Node(
            id=i,
            cpus=tuple(groups[i]),
            distances=tuple(LOCAL_DISTANCE + 10 * abs(i - j) for j in range(n)),
            os_node=i if i in real_os_nodes else None,
        )
        for i in range(n)
    )
    return Topology(nodes=nodes, emulated=True)


def resolve_topology(
    nodes: int | Sequence[Sequence[int]] | None,
    sysfs_root: str = "/sys",
    *,
    allowed: set[int] | None = None,
) -> Topology:
    """The machine's topology for ``None``, else the emulated topology ``nodes`` describes."""
    if nodes is None:
        return read_topology(sysfs_root, allowed=allowed)
    return emulated_topology(nodes, sysfs_root, allowed=allowed)
