"""Whole bridges running STP in the in-memory link simulator (aiokvm.testing)."""

from __future__ import annotations

import itertools

import pytest

from aiokvm.net.bridge import Bridge
from aiokvm.net.frames import mac_from_str
from aiokvm.testing import LinkSimulator

HOST = mac_from_str("02:00:00:00:aa:01")
OTHER = mac_from_str("02:00:00:00:bb:01")
CONVERGE = 2 * 15.0 + 10  # two forward delays plus BPDU propagation


def broadcast(src: bytes = HOST) -> bytes:
    return b"\xff" * 6 + src + b"\x88\xb5" + b"hello".ljust(46, b"\0")


def count(received: list[bytes]) -> int:
    """Test frames a host got (hosts also hear the BPDUs of their port)."""
    return sum(1 for f in received if f[12:14] == b"\x88\xb5")


def make_network(n: int, links: list[tuple[int, int]], priorities: dict[int, int] | None = None):
    """n bridges, wired per ``links``; each bridge also has a host port "h"."""
    priorities = priorities or {}
    sim = LinkSimulator()
    bridges = [Bridge(f"br{i}", mac=f"02:00:00:00:00:{i + 1:02x}", stp=True, priority=priorities.get(i, 32768))
               for i in range(n)]
    ports = {i: 0 for i in range(n)}
    wires = []
    for a, b in links:
        ports[a] += 1
        ports[b] += 1
        pa, pb = f"to{b}", f"to{a}"
        bridges[a].add_port(pa)
        bridges[b].add_port(pb)
        sim.connect(bridges[a], pa, bridges[b], pb)
        wires.append((a, pa, b, pb))
    hosts = []
    for br in bridges:
        br.add_port("h")
        hosts.append(sim.attach_host(br, "h"))
    return sim, bridges, hosts, wires


def blocked_links(bridges, wires) -> int:
    """Links on which at least one end does not forward (a link cut out of the tree)."""
    return sum(1 for a, pa, b, pb in wires
               if bridges[a].stp_state()["ports"][pa]["state"] != "forwarding"
               or bridges[b].stp_state()["ports"][pb]["state"] != "forwarding")


def roots(bridges) -> set[str]:
    return {br.stp_state()["root_id"] for br in bridges}


RING3 = [(0, 1), (1, 2), (2, 0)]
RING4 = [(0, 1), (1, 2), (2, 3), (3, 0)]
MESH4 = list(itertools.combinations(range(4), 2))


@pytest.mark.parametrize(("n", "links"), [(3, RING3), (4, RING4), (4, MESH4)])
def test_converges_to_one_root_with_exactly_the_redundant_links_blocked(n, links):
    sim, bridges, hosts, wires = make_network(n, links)
    sim.run(CONVERGE)
    assert roots(bridges) == {bridges[0].stp_state()["bridge_id"]}  # the lowest MAC wins
    assert blocked_links(bridges, wires) == len(links) - n + 1
    # No loops: a broadcast from a host reaches every other host exactly once.
    sim.inject(bridges[1], "h", broadcast())
    assert [count(h) for i, h in enumerate(hosts) if i != 1] == [1] * (n - 1)
    assert count(hosts[1]) == 0


def test_cutting_a_link_reconverges_within_max_age_plus_two_forward_delays():
    sim, bridges, hosts, wires = make_network(4, RING4)
    sim.run(CONVERGE)
    # Cut a forwarding link of the tree: the blocked one must take over.
    a, pa, b, pb = next(w for w in wires if bridges[w[0]].stp_state()["ports"][w[1]]["state"] == "forwarding"
                        and bridges[w[2]].stp_state()["ports"][w[3]]["state"] == "forwarding")
    sim.disconnect(bridges[a], pa)
    sim.run(20.0 + 2 * 15.0)
    sim.inject(bridges[0], "h", broadcast())
    assert [count(h) for h in hosts[1:]] == [1, 1, 1]  # everyone reachable again, once


def test_lowering_a_priority_moves_the_root():
    sim, bridges, hosts, wires = make_network(3, RING3)
    sim.run(CONVERGE)
    assert roots(bridges) == {bridges[0].stp_state()["bridge_id"]}
    sim._deliver(bridges[2].set_bridge_priority(4096, sim.now), bridges[2])
    sim.run(CONVERGE)
    assert roots(bridges) == {bridges[2].stp_state()["bridge_id"]}
    assert bridges[2].stp_state()["root_id"].startswith("1000.")


def test_topology_change_shortens_fdb_ageing():
    sim, bridges, hosts, wires = make_network(2, [(0, 1)])
    sim.run(CONVERGE)
    leaf = bridges[1]
    sim.inject(leaf, "h", broadcast(OTHER))
    assert any(e.mac == "02:00:00:00:bb:01" for e in leaf.fdb(sim.now))
    events = leaf.stp.tc_events + bridges[0].stp.tc_events
    leaf.add_port("late")  # a new port going forwarding is a topology change
    sim.run(2 * 15.0 + 2.0)  # listening + learning, then forwarding
    assert leaf.stp.tc_events + bridges[0].stp.tc_events > events
    sim.run(2 * 15.0 + 5)  # 2 x forward_delay, far short of ageing_time (300 s)
    assert not any(e.mac == "02:00:00:00:bb:01" and e.kind == "learned" for e in leaf.fdb(sim.now))


def test_without_stp_a_ring_storms():
    """The control for the loop check above: the simulator does detect loops."""
    sim = LinkSimulator(max_frames=5000)
    bridges = [Bridge(f"br{i}", mac=f"02:00:00:00:00:{i + 1:02x}") for i in range(3)]
    for a, b in RING3:
        bridges[a].add_port(f"to{b}")
        bridges[b].add_port(f"to{a}")
        sim.connect(bridges[a], f"to{b}", bridges[b], f"to{a}")
    bridges[0].add_port("h")
    with pytest.raises(RuntimeError, match="storm"):
        sim.inject(bridges[0], "h", broadcast())
