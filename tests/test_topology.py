"""Tests of xenheap.topology on fake sysfs trees and emulated specs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from xenheap.errors import InvalidArgument
from xenheap.topology import (
    Node,
    Topology,
    emulated_topology,
    parse_cpulist,
    read_topology,
    resolve_topology,
)

ALLOWED = set(range(16))


def make_sysfs(root: Path, nodes: dict[int, tuple[str, str | None]]) -> str:
    """Build <root>/devices/system/node/node<N>/{cpulist,distance}; None skips distance."""
    base = root / "devices" / "system" / "node"
    base.mkdir(parents=True)
    # Entries a real sysfs has beside the node directories; they must be ignored.
    for name in ("online", "possible", "has_cpu", "uevent"):
        (base / name).write_text("0\n")
    (base / "power").mkdir()
    (base / "nodefoo").mkdir()
    (base / "node99").write_text("a file, not a node directory\n")
    for os_node, (cpulist, distance) in nodes.items():
        node_dir = base / f"node{os_node}"
        node_dir.mkdir()
        (node_dir / "cpulist").write_text(cpulist)
        if distance is not None:
            (node_dir / "distance").write_text(distance)
    return str(root)


@pytest.fixture
def four_nodes(tmp_path: Path) -> str:
    # Non-contiguous OS node numbers (0, 2, 3, 10) and a memory-only node (3).
    return make_sysfs(
        tmp_path,
        {
            10: ("12-15\n", "40 30 21 10\n"),
            0: ("0-3,8\n", "10 21 31 40\n"),
            2: ("4-7,9\n", "21 10 21 30\n"),
            3: ("\n", "31 21 10 21\n"),
        },
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("\n", []),
        ("0", [0]),
        ("0-3,8,10-11\n", [0, 1, 2, 3, 8, 10, 11]),
        ("8,0-1", [0, 1, 8]),
        ("5-5", [5]),
        (" 1 , 3 ", [1, 3]),
        ("0-2,1-3", [0, 1, 2, 3]),
        ("127", [127]),
    ],
)
def test_parse_cpulist(text: str, expected: list[int]) -> None:
    assert parse_cpulist(text) == expected


@pytest.mark.parametrize("bad", ["a", "1,", ",1", "3-1", "1-", "-1", "1--2", "0-7:2/4", "1 2"])
def test_parse_cpulist_rejects(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="cpulist"):
        parse_cpulist(bad)


def test_read_topology_renumbers_and_keeps_os_nodes(four_nodes: str) -> None:
    topo = read_topology(four_nodes, allowed=ALLOWED)
    assert not topo.emulated
    assert [n.id for n in topo.nodes] == [0, 1, 2, 3]
    assert [n.os_node for n in topo.nodes] == [0, 2, 3, 10]
    assert topo.nodes[0].cpus == (0, 1, 2, 3, 8)
    assert topo.nodes[1].cpus == (4, 5, 6, 7, 9)
    assert topo.nodes[2].cpus == ()  # memory-only node
    assert topo.nodes[3].cpus == (12, 13, 14, 15)
    assert topo.nodes[0].distances == (10, 21, 31, 40)
    assert topo.nodes[3].distances == (40, 30, 21, 10)
    assert topo.cpu_to_node() == {
        **{c: 0 for c in (0, 1, 2, 3, 8)},
        **{c: 1 for c in (4, 5, 6, 7, 9)},
        **{c: 3 for c in (12, 13, 14, 15)},
    }


def test_read_topology_restricts_to_allowed_cpus(four_nodes: str) -> None:
    topo = read_topology(four_nodes, allowed={1, 8, 9, 15, 100})
    assert [n.cpus for n in topo.nodes] == [(1, 8), (9,), (), (15,)]


def test_read_topology_default_allowed_is_affinity(four_nodes: str) -> None:
    affinity = os.sched_getaffinity(0)
    topo = read_topology(four_nodes)
    assert set(topo.cpu_to_node()) <= affinity


def test_read_topology_without_node_dir_falls_back(tmp_path: Path) -> None:
    topo = read_topology(str(tmp_path), allowed={3, 1, 2})
    assert topo == Topology(
        nodes=(Node(id=0, cpus=(1, 2, 3), distances=(10,), os_node=None),), emulated=False
    )
    default = read_topology(str(tmp_path / "missing"))
    assert default.nodes[0].cpus == tuple(sorted(os.sched_getaffinity(0)))


def test_read_topology_bad_distances_fall_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_sysfs(
        tmp_path,
        {0: ("0\n", "10 20\n"), 1: ("1\n", None), 4: ("2\n", "x y z\n")},
    )
    with caplog.at_level(logging.WARNING, logger="xenheap.topology"):
        topo = read_topology(root, allowed=ALLOWED)
    assert [n.distances for n in topo.nodes] == [(10, 20, 20), (20, 10, 20), (20, 20, 10)]
    assert len(caplog.records) == 3


def test_read_topology_bad_cpulist_names_file(tmp_path: Path) -> None:
    root = make_sysfs(tmp_path, {0: ("zero\n", "10\n")})
    with pytest.raises(InvalidArgument, match="node0"):
        read_topology(root, allowed=ALLOWED)


def test_read_topology_missing_cpulist_is_memory_only(tmp_path: Path) -> None:
    root = make_sysfs(tmp_path, {0: ("0-1\n", "10 20\n"), 1: ("", "20 10\n")})
    os.remove(os.path.join(root, "devices/system/node/node1/cpulist"))
    topo = read_topology(root, allowed=ALLOWED)
    assert topo.nodes[1].cpus == ()
    assert topo.nearest_with_cpus(1) == 0


def test_zone_order_and_nearest(four_nodes: str) -> None:
    topo = read_topology(four_nodes, allowed=ALLOWED)
    assert topo.zone_order(0) == [0, 1, 2, 3]
    assert topo.zone_order(3) == [3, 2, 1, 0]
    assert topo.zone_order(2) == [2, 1, 3, 0]  # 21 ties broken by id
    assert topo.nearest_with_cpus(0) == 0
    assert topo.nearest_with_cpus(2) == 1  # memory-only: nearest node with CPUs, tie by id
    with pytest.raises(InvalidArgument):
        topo.zone_order(4)
    with pytest.raises(InvalidArgument):
        topo.zone_order(-1)
    with pytest.raises(InvalidArgument):
        topo.nearest_with_cpus(True)


def test_zone_order_ties_by_id() -> None:
    topo = emulated_topology([[], [0], [], [1]], sysfs_root="/nonexistent", allowed={0, 1})
    # Distances from 2: 20 to 1 and 3, 30 to 0.
    assert topo.zone_order(2) == [2, 1, 3, 0]
    assert topo.nearest_with_cpus(2) == 1
    assert topo.nearest_with_cpus(0) == 1
    assert topo.nearest_with_cpus(3) == 3


def test_nearest_with_cpus_none_when_no_cpus() -> None:
    topo = emulated_topology([[], []], sysfs_root="/nonexistent", allowed={0})
    assert topo.nearest_with_cpus(0) is None
    assert topo.nearest_with_cpus(1) is None
    assert topo.cpu_to_node() == {}


def test_nearest_with_cpus_follows_distance_not_id() -> None:
    nodes = (
        Node(0, (0,), (10, 40, 40), None),
        Node(1, (), (40, 10, 15), None),
        Node(2, (1,), (40, 15, 10), None),
    )
    topo = Topology(nodes=nodes, emulated=False)
    assert topo.nearest_with_cpus(1) == 2
    assert topo.zone_order(1) == [1, 2, 0]


def test_topology_rejects_inconsistent_nodes() -> None:
    with pytest.raises(InvalidArgument):
        Topology(nodes=(), emulated=True)
    with pytest.raises(InvalidArgument):
        Topology(nodes=(Node(1, (), (10,), None),), emulated=True)
    with pytest.raises(InvalidArgument):
        Topology(nodes=(Node(0, (), (10, 20), None),), emulated=True)


def test_emulated_count_splits_contiguously(four_nodes: str) -> None:
    topo = emulated_topology(3, sysfs_root=four_nodes, allowed={0, 1, 2, 3, 4, 5, 6})
    assert topo.emulated
    assert [n.cpus for n in topo.nodes] == [(0, 1), (2, 3), (4, 5, 6)]
    assert [n.distances for n in topo.nodes] == [(10, 20, 30), (20, 10, 20), (30, 20, 10)]
    # The fake machine has OS nodes 0, 2, 3 and 10: emulated node 1 has no real counterpart.
    assert [n.os_node for n in topo.nodes] == [0, None, 2]


def test_emulated_more_nodes_than_cpus(tmp_path: Path) -> None:
    topo = emulated_topology(4, sysfs_root=str(tmp_path), allowed={5, 7})
    assert [n.cpus for n in topo.nodes] == [(), (5,), (), (7,)]
    assert sorted(topo.cpu_to_node()) == [5, 7]
    # No NUMA in the fake sysfs: nothing is bound.
    assert all(n.os_node is None for n in topo.nodes)


def test_emulated_single_node() -> None:
    topo = emulated_topology(1, sysfs_root="/nonexistent", allowed={0, 1})
    assert topo.nodes == (Node(0, (0, 1), (10,), None),)


def test_emulated_explicit_lists(four_nodes: str) -> None:
    topo = emulated_topology([[3, 1], [], (0,)], sysfs_root=four_nodes, allowed={0, 1, 2, 3})
    assert [n.cpus for n in topo.nodes] == [(1, 3), (), (0,)]
    assert [n.os_node for n in topo.nodes] == [0, None, 2]
    assert topo.cpu_to_node() == {1: 0, 3: 0, 0: 2}  # CPU 2 is allowed but unused


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (0, "at least 1"),
        (-2, "at least 1"),
        (65, "at most 64"),
        (10**7, "at most 64"),  # refused at once: building 10**7 nodes would stall
        ([[0]] * 65, "at most 64"),
        (True, "count"),
        (False, "count"),
        (2.0, "count"),
        (None, "count"),
        ("2", "count"),
        ([], "at least one node"),
        ((), "at least one node"),
        ([[0], [99]], "CPU 99"),
        ([[0, 1], [1]], "already in node 0"),
        ([[0, 0]], "already in node 0"),
        ([[0], ["1"]], "not an integer"),
        ([[0], [True]], "not an integer"),
        ([[0], [1.0]], "not an integer"),
        ([[0], 1], "list of CPUs"),
        ([[0], "1"], "list of CPUs"),
        ([[-1]], "CPU -1"),
    ],
)
def test_emulated_rejects_bad_spec(spec: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        emulated_topology(spec, sysfs_root="/nonexistent", allowed={0, 1, 2, 3})  # type: ignore[arg-type]


def test_emulated_default_allowed_is_affinity() -> None:
    affinity = sorted(os.sched_getaffinity(0))
    topo = emulated_topology(1, sysfs_root="/nonexistent")
    assert list(topo.nodes[0].cpus) == affinity
    with pytest.raises(InvalidArgument):
        emulated_topology([[max(affinity) + 1]], sysfs_root="/nonexistent")


def test_resolve_topology(four_nodes: str) -> None:
    real = resolve_topology(None, four_nodes, allowed=ALLOWED)
    assert not real.emulated
    assert real == read_topology(four_nodes, allowed=ALLOWED)
    emulated = resolve_topology(2, four_nodes, allowed={0, 1})
    assert emulated.emulated
    assert [n.cpus for n in emulated.nodes] == [(0,), (1,)]
    listed = resolve_topology([[1], [0]], four_nodes, allowed={0, 1})
    assert [n.cpus for n in listed.nodes] == [(1,), (0,)]


def test_read_real_machine() -> None:
    topo = read_topology()
    assert len(topo.nodes) >= 1
    assert set(topo.cpu_to_node()) <= os.sched_getaffinity(0)
    for node in topo.nodes:
        assert node.distances[node.id] == 10
