"""Spanning tree (aiokvm.net.stp) on simulated links, with injected time.

``Net`` wires ``Stp`` instances port to port, delivers every emitted frame to
the peer at once (breadth first, same instant) and advances time in 1/8 s
steps, ticking every bridge.  Every frame any bridge emits is checked (60
bytes, from the port's MAC, parseable) and logged for the assertions.
"""

from __future__ import annotations

import heapq
import random
from collections import deque

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aiokvm.errors import ConfigError
from aiokvm.net.frames import (
    STP_MULTICAST,
    ConfigBpdu,
    RstBpdu,
    TcnBpdu,
    bridge_id,
    build_bpdu,
    parse_bpdu,
    rst_flags,
)
from aiokvm.net.stp import HOLD_TIME, PortState, Stp

STEP = 0.125
HELLO, MAX_AGE, FWD = 2.0, 20.0, 15.0
FLAG_TC, FLAG_TCA = 0x01, 0x80


def mac(bridge: int, port: int = 0) -> bytes:
    return bytes([0x02, 0x00, 0x00, 0x00, bridge, port])


class Net:
    def __init__(self) -> None:
        self.bridges: dict[str, Stp] = {}
        self.index: dict[str, int] = {}
        self.wires: dict[tuple[str, str], tuple[str, str]] = {}
        self.links: list[tuple[str, str]] = []
        self.step_no = 0
        self.now = 0.0
        self.log: list[tuple[float, str, str, object]] = []   # (time, bridge, port, parsed BPDU)

    def add(self, name: str, *, priority: int = 32768, **kwargs) -> Stp:
        self.index[name] = len(self.index) + 1
        self.bridges[name] = Stp(mac(self.index[name]), priority=priority, **kwargs)
        return self.bridges[name]

    def port_mac(self, bridge: str, port: str) -> bytes:
        return mac(self.index[bridge], self.bridges[bridge].state()["ports"][port]["port_no"])

    def add_port(self, bridge: str, port: str, cost: int = 100) -> None:
        stp = self.bridges[bridge]
        n = len(stp.port_names()) + 1
        self.deliver(bridge, stp.add_port(port, n, mac=mac(self.index[bridge], n), path_cost=cost, now=self.now))

    def link(self, a: str, b: str, cost: int = 100, cost_b: int | None = None) -> None:
        """Port "a>b" on a and "b>a" on b; ``cost`` is a's port cost, ``cost_b`` b's (default the same)."""
        self.add_port(a, f"{a}>{b}", cost)
        self.add_port(b, f"{b}>{a}", cost if cost_b is None else cost_b)
        self.wires[(a, f"{a}>{b}")] = (b, f"{b}>{a}")
        self.wires[(b, f"{b}>{a}")] = (a, f"{a}>{b}")
        self.links.append((a, b))

    def unplug(self, a: str, b: str) -> None:
        """The wire goes silent; neither side sees a link change (a dead peer, a lossy path)."""
        del self.wires[(a, f"{a}>{b}")]
        del self.wires[(b, f"{b}>{a}")]
        self.links.remove((a, b) if (a, b) in self.links else (b, a))

    def cut(self, a: str, b: str) -> None:
        """The cable is pulled: both ends see link down."""
        self.unplug(a, b)
        self.deliver(a, self.bridges[a].set_port_enabled(f"{a}>{b}", False, self.now))
        self.deliver(b, self.bridges[b].set_port_enabled(f"{b}>{a}", False, self.now))

    def deliver(self, bridge: str, frames) -> None:
        queue = deque((bridge, port, frame) for port, frame in frames)
        handled = 0
        while queue:
            src, port, frame = queue.popleft()
            handled += 1
            assert handled < 10_000, "BPDU storm"
            assert len(frame) == 60
            assert frame[:6] == STP_MULTICAST
            assert frame[6:12] == self.port_mac(src, port)
            self.log.append((self.now, src, port, parse_bpdu(frame)))
            peer = self.wires.get((src, port))
            if peer is not None:
                dst, dst_port = peer
                queue.extend((dst, p, f) for p, f in self.bridges[dst].receive(dst_port, frame, self.now))

    def step(self) -> None:
        self.step_no += 1
        self.now = self.step_no * STEP
        for name, stp in self.bridges.items():
            self.deliver(name, stp.tick(self.now))

    def run_until(self, t: float) -> None:
        while self.now < t:
            self.step()

    def run_until_converged(self, root: str, limit: float) -> float:
        while problems(self, root):
            assert self.now < limit, problems(self, root)
            self.step()
        return self.now

    # -- views -----------------------------------------------------------------------------------
    def state(self, bridge: str, port: str) -> PortState:
        return self.bridges[bridge].port_state(port)

    def configs(self, bridge: str | None = None, port: str | None = None) -> list[tuple[float, ConfigBpdu]]:
        return [(t, b) for t, br, p, b in self.log
                if isinstance(b, ConfigBpdu) and bridge in (None, br) and port in (None, p)]

    def tcns(self) -> list[tuple[float, str, str]]:
        return [(t, br, p) for t, br, p, b in self.log if isinstance(b, TcnBpdu)]


def expected_costs(net: Net, root: str, states: dict[str, dict] | None = None) -> dict[str, int]:
    """Dijkstra over live links; reaching v from u costs v's port cost toward u."""
    states = states or {name: stp.state() for name, stp in net.bridges.items()}
    costs = {root: 0}
    heap = [(0, root)]
    while heap:
        d, u = heapq.heappop(heap)
        if d > costs[u]:
            continue
        for a, b in net.links:
            for x, y in ((a, b), (b, a)):
                if x != u:
                    continue
                nd = d + states[y]["ports"][f"{y}>{x}"]["path_cost"]
                if nd < costs.get(y, 1 << 62):
                    costs[y] = nd
                    heapq.heappush(heap, (nd, y))
    return costs


def problems(net: Net, root: str) -> list[str]:
    """Why the network is not (yet) a converged spanning tree rooted at ``root``; empty when it is."""
    out = []
    states = {name: stp.state() for name, stp in net.bridges.items()}
    root_id = states[root]["bridge_id"]
    if any(s["root_id"] != root_id for s in states.values()):
        return [f"{name} thinks the root is {s['root_id']}" for name, s in states.items() if s["root_id"] != root_id]
    costs = expected_costs(net, root, states)
    for name, s in states.items():
        if s["root_path_cost"] != costs[name]:
            out.append(f"{name} root path cost {s['root_path_cost']} != {costs[name]}")
        for port, ps in s["ports"].items():
            if ps["state"] not in ("forwarding", "blocking", "disabled"):
                out.append(f"{name} {port} is {ps['state']}")
    if out:
        return out
    # The active topology: links forwarding at both ends must form a spanning tree.
    active = [(a, b) for a, b in net.links
              if net.state(a, f"{a}>{b}") == PortState.FORWARDING and net.state(b, f"{b}>{a}") == PortState.FORWARDING]
    parent = {name: name for name in net.bridges}

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in active:
        ra, rb = find(a), find(b)
        if ra == rb:
            out.append(f"loop through {a}-{b}")
        parent[ra] = rb
    if len({find(x) for x in net.bridges}) != 1:
        out.append(f"partitioned: active links {active}")
    wired_ports = [(a, f"{a}>{b}") for a, b in net.links] + [(b, f"{b}>{a}") for a, b in net.links]
    blocked = [bp for bp in wired_ports if net.state(*bp) != PortState.FORWARDING]
    if len(blocked) != len(net.links) - len(net.bridges) + 1:
        out.append(f"blocked ports {blocked} for {len(net.links)} links, {len(net.bridges)} bridges")
    return out


def build(n: int, links: list[tuple[str, str]] | list[tuple[str, str, int, int]], **kwargs) -> Net:
    net = Net()
    for name in "ABCDEFGH"[:n]:
        net.add(name, **kwargs)
    for spec in links:
        net.link(*spec)
    return net


def assert_hold_respected(net: Net) -> None:
    last: dict[tuple[str, str], float] = {}
    for t, br, port, bpdu in net.log:
        if isinstance(bpdu, ConfigBpdu):
            if (br, port) in last:
                assert t - last[(br, port)] >= HOLD_TIME - 1e-9, (br, port, last[(br, port)], t)
            last[(br, port)] = t


# --- convergence ---------------------------------------------------------------------------------


def test_two_bridges_lower_id_is_root_and_both_forward_after_two_forward_delays():
    net = build(2, [("A", "B")])
    a, b = net.bridges["A"], net.bridges["B"]
    assert net.state("A", "A>B") == PortState.LISTENING
    net.run_until(2 * FWD - STEP)
    assert a.is_root() and not b.is_root()
    assert net.state("A", "A>B") == PortState.LEARNING
    assert net.state("B", "B>A") == PortState.LEARNING
    net.run_until(2 * FWD)
    assert net.state("A", "A>B") == PortState.FORWARDING
    assert net.state("B", "B>A") == PortState.FORWARDING
    s = b.state()
    assert s["bridge_id"] == "8000.020000000200"
    assert s["root_id"] == "8000.020000000100" == a.state()["bridge_id"]
    assert s["root_port"] == "B>A" and s["root_path_cost"] == 100
    assert s["ports"]["B>A"]["role"] == "root"
    assert s["ports"]["B>A"]["designated_bridge"] == "8000.020000000100"
    assert s["ports"]["B>A"]["port_id"] == (32 << 10) | 1
    assert a.state()["ports"]["A>B"]["role"] == "designated"
    assert a.state()["root_port"] is None
    assert not problems(net, "A")


def test_priority_beats_mac():
    net = Net()
    net.add("A")
    net.add("B", priority=4096)
    net.link("A", "B")
    net.run_until(40)
    assert net.bridges["B"].is_root() and not net.bridges["A"].is_root()
    assert net.bridges["A"].state()["root_id"] == "1000.020000000200"
    assert not problems(net, "B")


def test_only_the_root_originates_and_relays_add_message_age():
    net = build(3, [("A", "B"), ("B", "C")])
    net.run_until(40)
    root_times = {t for t, _ in net.configs("A")}
    assert {t for t, _ in net.configs("B", "B>C")} <= root_times | {t + HOLD_TIME for t in root_times}
    assert not [t for t, _ in net.configs("C") if t > HELLO]   # a leaf with only its root port, once it knows
    late = [bpdu for t, bpdu in net.configs() if t > 10]
    assert {b.message_age for b in late if b.bridge_id == net.bridges["A"].bridge_id} == {0.0}
    assert {b.message_age for b in late if b.bridge_id == net.bridges["B"].bridge_id} == {1 / 256}
    assert all(b.root_id == net.bridges["A"].bridge_id for b in late)
    assert {b.root_path_cost for b in late if b.bridge_id == net.bridges["B"].bridge_id} == {100}


TOPOLOGIES = {
    "triangle": (3, [("A", "B"), ("B", "C"), ("C", "A")]),
    "ring4": (4, [("A", "B"), ("B", "C"), ("C", "D"), ("D", "A")]),
    "mesh4": (4, [("A", "B"), ("A", "C"), ("A", "D"), ("B", "C"), ("B", "D"), ("C", "D")]),
    "mesh4-costs": (4, [("A", "B", 100, 100), ("A", "C", 500, 500), ("A", "D", 100, 100),
                        ("B", "C", 100, 100), ("C", "D", 10, 10), ("B", "D", 50, 300)]),
    "ladder6": (6, [("A", "B"), ("B", "C"), ("D", "E"), ("E", "F"), ("A", "D"), ("B", "E"), ("C", "F")]),
}


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_converges_to_one_spanning_tree(name):
    n, links = TOPOLOGIES[name]
    net = build(n, links)
    t = net.run_until_converged("A", limit=2 * FWD + HELLO + 1)
    assert t <= 2 * FWD + HELLO
    net.run_until(200)
    assert not problems(net, "A")
    assert_hold_respected(net)
    if name == "mesh4-costs":
        # C reaches A through D (100 + 10) rather than directly (500) or via B (200).
        assert net.bridges["C"].state()["root_port"] == "C>D"
        assert net.bridges["C"].state()["root_path_cost"] == 110


def random_net(seed: int) -> tuple[Net, random.Random]:
    """A connected random graph of 2-7 bridges, random priorities and (asymmetric) port costs."""
    rnd = random.Random(seed)
    names = "ABCDEFG"[:rnd.randint(2, 7)]
    links = [(names[rnd.randrange(i)], names[i]) for i in range(1, len(names))]
    for _ in range(rnd.randint(0, len(names))):
        a, b = rnd.sample(names, 2)
        if (a, b) not in links and (b, a) not in links:
            links.append((a, b))
    net = Net()
    for name in names:
        net.add(name, priority=rnd.choice([4096, 32768, 61440]))
    for a, b in links:
        net.link(a, b, rnd.choice([1, 10, 100, 200]), rnd.choice([1, 10, 100, 200]))
    return net, rnd


def lowest(net: Net) -> str:
    return min(net.bridges, key=lambda name: net.bridges[name].bridge_id)


def connected_without(net: Net, link: tuple[str, str]) -> bool:
    rest = [x for x in net.links if x != link]
    seen = {next(iter(net.bridges))}
    grew = True
    while grew:
        grew = False
        for a, b in rest:
            if (a in seen) != (b in seen):
                seen |= {a, b}
                grew = True
    return len(seen) == len(net.bridges)


@pytest.mark.parametrize("seed", range(16))
def test_random_topologies_converge_and_reconverge(seed):
    net, rnd = random_net(seed)
    n = len(net.bridges)
    # Roles settle within a hello plus one hold time per hop (replies and relays are held), then 2 x fd.
    t = net.run_until_converged(lowest(net), limit=2 * FWD + HELLO + n * HOLD_TIME)
    net.run_until(t + 30)
    assert not problems(net, lowest(net))
    cuts = [link for link in net.links if connected_without(net, link)]
    if cuts:
        net.cut(*rnd.choice(cuts))
        cut_at = net.now
        t = net.run_until_converged(lowest(net), limit=cut_at + MAX_AGE + 2 * FWD)
        net.run_until(t + 30)
        assert not problems(net, lowest(net))
    new_root = rnd.choice(list(net.bridges))
    changed = net.now
    net.deliver(new_root, net.bridges[new_root].set_bridge_priority(0, net.now))
    t = net.run_until_converged(new_root, limit=changed + MAX_AGE + 2 * FWD)
    net.run_until(t + 30)
    assert not problems(net, new_root)
    assert_hold_respected(net)


def test_root_with_two_ports_on_one_segment_blocks_the_higher_port_id():
    """Our own BPDU heard back (a hub, or two ports on one wire): the higher port id blocks."""
    net = Net()
    net.add("A")
    net.add_port("A", "p1")
    net.add_port("A", "p2")
    net.wires[("A", "p1")] = ("A", "p2")
    net.wires[("A", "p2")] = ("A", "p1")
    net.run_until(40)
    assert net.state("A", "p1") == PortState.FORWARDING
    assert net.state("A", "p2") == PortState.BLOCKING
    assert net.bridges["A"].state()["ports"]["p2"]["role"] == "alternate"


# --- failures and changes -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "cut", "slow"), [
    ("triangle", ("A", "B"), False),
    ("ring4", ("A", "B"), True),      # B becomes root; C holds the old root until max age
    ("ring4", ("C", "D"), False),     # the blocked link: nothing to do
    ("mesh4", ("A", "B"), False),
])
def test_cut_link_reconverges_within_max_age_plus_two_forward_delays(name, cut, slow):
    n, links = TOPOLOGIES[name]
    net = build(n, links)
    net.run_until(60)
    assert not problems(net, "A")
    net.cut(*cut)
    a, b = cut
    assert net.state(a, f"{a}>{b}") == PortState.DISABLED
    assert net.bridges[a].state()["ports"][f"{a}>{b}"]["role"] == "disabled"
    cut_at, cut_log = net.now, len(net.log)
    t = net.run_until_converged("A", limit=cut_at + MAX_AGE + 2 * FWD + 1)
    assert t - cut_at <= MAX_AGE + 2 * FWD
    if slow:
        assert t - cut_at > 2 * FWD                # the max-age path was needed
    net.run_until(t + 100)
    assert not problems(net, "A")
    assert_hold_respected(net)
    # Nothing is ever sent on a disabled port.
    assert not [1 for tt, br, p, _ in net.log[cut_log:] if (br, p) in ((a, f"{a}>{b}"), (b, f"{b}>{a}"))]


def test_link_back_up_rejoins():
    net = build(3, [("A", "B"), ("B", "C"), ("C", "A")])
    net.run_until(60)
    net.cut("A", "B")
    net.run_until(120)
    assert not problems(net, "A")
    net.deliver("A", net.bridges["A"].set_port_enabled("A>B", True, net.now))
    net.deliver("B", net.bridges["B"].set_port_enabled("B>A", True, net.now))
    net.wires[("A", "A>B")] = ("B", "B>A")
    net.wires[("B", "B>A")] = ("A", "A>B")
    net.links.append(("A", "B"))
    t = net.run_until_converged("A", limit=net.now + 2 * FWD + HELLO + 1)
    net.run_until(t + 60)
    assert not problems(net, "A")
    assert net.bridges["B"].state()["root_port"] == "B>A"


def test_silent_root_is_aged_out_after_max_age():
    net = build(2, [("A", "B")])
    net.run_until(60)
    last_heard = max(t for t, bpdu in net.configs("A"))
    net.unplug("A", "B")
    while not net.bridges["B"].is_root():
        net.step()
        assert net.now <= last_heard + MAX_AGE
    assert net.now > last_heard + MAX_AGE - HELLO
    # B now claims root on its port and sends hellos itself.
    net.run_until(net.now + 5)
    assert any(b.root_id == net.bridges["B"].bridge_id for t, b in net.configs("B"))


def test_lower_priority_moves_the_root():
    net = build(3, [("A", "B"), ("B", "C"), ("C", "A")])
    net.run_until(60)
    events = net.bridges["C"].tc_events
    changed_at = net.now
    net.deliver("C", net.bridges["C"].set_bridge_priority(4096, net.now))
    assert net.bridges["C"].is_root()
    assert net.bridges["C"].state()["bridge_id"] == "1000.020000000300"
    t = net.run_until_converged("C", limit=changed_at + 2 * FWD + HELLO + 1)
    assert t - changed_at <= 2 * FWD + HELLO
    assert {s.state()["root_id"] for s in net.bridges.values()} == {"1000.020000000300"}
    assert net.bridges["C"].tc_events > events
    net.run_until(t + 60)
    assert not problems(net, "C")


def test_path_cost_change_moves_the_root_port():
    net = build(3, [("A", "B"), ("B", "C"), ("C", "A")])
    net.run_until(60)
    assert net.bridges["C"].state()["root_port"] == "C>A"
    net.deliver("C", net.bridges["C"].set_port_path_cost("C>A", 1000, net.now))
    assert net.bridges["C"].state()["root_port"] == "C>B"
    t = net.run_until_converged("A", limit=net.now + 2 * FWD + HELLO + 1)
    net.run_until(t + 30)
    assert not problems(net, "A")
    assert net.bridges["C"].state()["root_path_cost"] == 200


def test_port_priority_breaks_ties_between_parallel_links():
    net = Net()
    net.add("A")
    net.add("B")
    net.add_port("A", "a1")
    net.add_port("A", "a2")
    net.add_port("B", "b1")
    net.add_port("B", "b2")
    for x, y in (("a1", "b1"), ("a2", "b2")):
        net.wires[("A", x)] = ("B", y)
        net.wires[("B", y)] = ("A", x)
    net.run_until(40)
    assert net.bridges["B"].state()["root_port"] == "b1"       # lower designated port id on A
    assert net.state("B", "b2") == PortState.BLOCKING
    net.deliver("A", net.bridges["A"].set_port_priority("a2", 1, net.now))
    net.run_until(net.now + 40)
    assert net.bridges["B"].state()["root_port"] == "b2"
    assert net.state("B", "b1") == PortState.BLOCKING
    assert net.bridges["A"].state()["ports"]["a2"]["port_id"] == (1 << 10) | 2


def test_set_timers_on_root_reach_the_other_bridges():
    net = build(2, [("A", "B")])
    net.run_until(40)
    net.deliver("A", net.bridges["A"].set_timers(hello_time=1.0, max_age=10.0, forward_delay=4.0, now=net.now))
    net.run_until(net.now + 3)
    s = net.bridges["B"].state()
    assert (s["hello_time"], s["max_age"], s["forward_delay"]) == (1.0, 10.0, 4.0)
    a_times = sorted(t for t, _ in net.configs("A") if t > 41)
    assert all(y - x == pytest.approx(1.0) for x, y in zip(a_times, a_times[1:], strict=False))
    # A new port on B now goes forwarding after 2 x 4 s, the root's forward delay.
    net.add_port("B", "tap")
    start = net.now
    net.run_until(start + 8)
    assert net.state("B", "tap") == PortState.FORWARDING
    assert net.bridges["B"].bridge_forward_delay == FWD


# --- topology change --------------------------------------------------------------------------------


def test_tcn_from_a_leaf_reaches_the_root_and_tc_floods_back():
    net = build(3, [("A", "B"), ("B", "C")])
    net.run_until(80)
    assert not any(s.topology_change for s in net.bridges.values())
    before = {name: s.tc_events for name, s in net.bridges.items()}
    log_from = len(net.log)
    net.add_port("C", "tap")                    # a new VM port on the leaf bridge
    added = net.now
    net.run_until(added + 2 * FWD - STEP)
    assert not net.tcns()[log_from:] and not any(s.topology_change for s in net.bridges.values())
    net.step()
    changed = net.now
    assert net.state("C", "tap") == PortState.FORWARDING
    new = net.log[log_from:]
    tcns = [(t, br, p) for t, br, p, b in new if isinstance(b, TcnBpdu)]
    assert tcns == [(changed, "C", "C>B"), (changed, "B", "B>A")]
    assert net.bridges["A"].topology_change
    # Everyone runs with TC set for the root's max_age + forward_delay.
    net.run_until(changed + 2)
    while net.now < changed + MAX_AGE + FWD - STEP:
        assert all(s.topology_change for s in net.bridges.values()), net.now
        net.step()
    net.run_until(changed + MAX_AGE + FWD)
    assert not net.bridges["A"].topology_change
    net.run_until(changed + MAX_AGE + FWD + HELLO + STEP)
    assert not any(s.topology_change for s in net.bridges.values())
    # Each notification was acknowledged (TCA toward the sender) and never repeated.
    after = net.log[log_from:]
    assert [1 for t, br, p, b in after if isinstance(b, TcnBpdu)] == [1, 1]
    tca = [(br, p) for t, br, p, b in after if isinstance(b, ConfigBpdu) and b.flags & FLAG_TCA]
    assert ("A", "A>B") in tca and ("B", "B>C") in tca
    assert all(t - changed <= HOLD_TIME for t, br, p, b in after if isinstance(b, ConfigBpdu) and b.flags & FLAG_TCA)
    assert not any(s.state()["topology_change_detected"] for s in net.bridges.values())
    assert all(s.tc_events > before[name] for name, s in net.bridges.items())
    assert_hold_respected(net)


def test_unacknowledged_tcn_is_repeated_every_hello():
    b = Stp(mac(2))
    b.add_port("up", 1, mac=mac(2, 1), now=0.0)
    root = bridge_id(0, mac(1))
    cfg = build_bpdu(ConfigBpdu(0, root, 0, root, 0x8001, 0.0, MAX_AGE, HELLO, FWD), src=mac(1, 1))
    b.receive("up", cfg, 0.5)
    assert b.root_port == "up"
    b.add_port("tap", 2, mac=mac(2, 2), now=1.0)
    tcns = []
    t = 1.0
    while t < 40:
        t += STEP
        if t % HELLO == 0.5 % HELLO:        # keep the root's information fresh, without TCA
            b.receive("up", cfg, t)
        tcns += [t for port, f in b.tick(t) if isinstance(parse_bpdu(f), TcnBpdu) and port == "up"]
    assert tcns[0] == 30.0     # "up" reaches forwarding while "tap" is designated; "tap" at 31 adds none
    assert [y - x for x, y in zip(tcns, tcns[1:], strict=False)] == [HELLO] * (len(tcns) - 1)
    ack = build_bpdu(ConfigBpdu(FLAG_TC | FLAG_TCA, root, 0, root, 0x8001, 0.0, MAX_AGE, HELLO, FWD), src=mac(1, 1))
    b.receive("up", ack, 40.0)
    assert b.topology_change
    assert not [f for port, f in b.tick(50.0) if isinstance(parse_bpdu(f), TcnBpdu)]


def test_tcn_on_a_non_designated_port_is_ignored():
    net = build(2, [("A", "B")])
    net.run_until(40)
    events = net.bridges["B"].tc_events
    # B>A is B's root port: a TCN there changes nothing.
    assert net.bridges["B"].receive("B>A", build_bpdu(TcnBpdu(), src=mac(1, 1)), net.now) == []
    assert net.bridges["B"].tc_events == events
    assert not net.bridges["B"].state()["topology_change_detected"]


def test_forwarding_port_that_must_block_is_a_topology_change():
    net = build(3, [("A", "B"), ("B", "C"), ("C", "A")])
    net.run_until(80)
    assert not any(s.topology_change for s in net.bridges.values())
    assert net.state("C", "C>A") == PortState.FORWARDING
    log_from = len(net.log)
    net.deliver("C", net.bridges["C"].set_port_path_cost("C>A", 1000, net.now))
    # C>A loses the root port role to C>B and A is designated there: forwarding -> blocking.
    assert net.state("C", "C>A") == PortState.BLOCKING
    assert [(br, p) for t, br, p, b in net.log[log_from:] if isinstance(b, TcnBpdu)] == [("C", "C>B"), ("B", "B>A")]
    assert net.bridges["A"].topology_change
    net.run_until(net.now + HELLO)
    assert all(s.topology_change for s in net.bridges.values())


def test_link_down_alone_is_not_a_topology_change():
    """As in the kernel: disabling a port flushes its own FDB entries (the bridge's job) but starts no TC,
    and the alternate port that takes over as root port is not designated anywhere, so neither does it."""
    net = build(3, [("A", "B"), ("B", "C"), ("C", "A")])
    net.run_until(80)
    events = {name: s.tc_events for name, s in net.bridges.items()}
    net.cut("A", "C")
    net.run_until(net.now + 2 * FWD + 1)
    assert not problems(net, "A")
    assert not any(s.topology_change for s in net.bridges.values())
    assert {name: s.tc_events for name, s in net.bridges.items()} == events


# --- BPDU handling ---------------------------------------------------------------------------------


def single(**kwargs) -> Stp:
    s = Stp(mac(9), **kwargs)
    s.add_port("p", 1, mac=mac(9, 1), now=0.0)
    return s


def better_rst(message_age: float = 1 / 256) -> bytes:
    root = bridge_id(0, mac(1))
    return build_bpdu(RstBpdu(rst_flags(3, forwarding=True, learning=True), root, 0, root, 0x8001,
                              message_age, MAX_AGE, HELLO, FWD), src=mac(1, 1))


def test_rst_bpdu_is_processed_as_config():
    s = single()
    assert s.is_root()
    assert s.receive("p", better_rst(), 1.0) == []
    assert not s.is_root()
    assert s.state()["root_id"] == "0000.020000000100"
    assert s.root_port == "p" and s.state()["root_path_cost"] == 100
    assert s.state()["ports"]["p"]["role"] == "root"
    assert not s.errors


def test_rst_bpdu_can_be_ignored_like_the_kernel():
    s = single(accept_rst=False)
    s.receive("p", better_rst(), 1.0)
    assert s.is_root()
    assert s.ignored[("p", "version")] == 1


@pytest.mark.parametrize("frame", [
    b"",
    b"\x01\x80\xc2\x00\x00\x00",
    bytes(60),
    better_rst()[:20],
    better_rst()[:14] + b"\xaa\xaa\x03" + better_rst()[17:],                   # SNAP, not STP LLC
    better_rst()[:17] + b"\x00\x01" + better_rst()[19:],                        # protocol id 1
    better_rst()[:20] + b"\x07" + better_rst()[21:],                            # unknown BPDU type
    better_rst()[:12] + b"\x00\x10" + better_rst()[14:],                        # length too short for a config
    build_bpdu(TcnBpdu(), src=mac(1, 1))[:12] + b"\x08\x00" + bytes(46),        # Ethernet II
])
def test_malformed_bpdus_are_counted_not_raised(frame):
    s = single()
    assert s.receive("p", frame, 1.0) == []
    assert s.errors["p"] == 1
    assert s.is_root()


def test_well_formed_but_unacceptable_bpdus_are_ignored():
    s = single()
    other_dst = b"\x01\x80\xc2\x00\x00\x0e" + better_rst()[6:]
    s.receive("p", other_dst, 1.0)
    assert s.ignored[("p", "destination")] == 1
    root = bridge_id(0, mac(1))
    too_old = build_bpdu(ConfigBpdu(0, root, 0, root, 0x8001, 21.0, MAX_AGE, HELLO, FWD), src=mac(1, 1))
    s.receive("p", too_old, 1.0)
    assert s.ignored[("p", "message_age")] == 1
    s.set_port_enabled("p", False, 1.0)
    s.receive("p", better_rst(), 1.0)
    assert s.ignored[("p", "port_disabled")] == 1
    assert s.is_root() and not s.errors
    assert s.receive("gone", better_rst(), 1.0) == []       # a port removed while a frame was in flight


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_receive_never_raises(data):
    s = single()
    s.receive("p", data, 1.0)
    s.receive("p", better_rst()[:len(data)] + data, 1.0)
    s.tick(5.0)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([ConfigBpdu, RstBpdu]),
    st.integers(0, 0xFF),
    st.integers(0, (1 << 64) - 1),
    st.integers(0, (1 << 32) - 1),
    st.integers(0, (1 << 64) - 1),
    st.integers(0, 0xFFFF),
    st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=4),
)
@example(ConfigBpdu, 0, 0, 0xFFFF_FFFF, 0, 0x8001, [0, 20 * 256, 2 * 256, 15 * 256])   # cost + 100 wraps
def test_any_well_formed_bpdu_is_survived(kind, flags, root, cost, bridge, port, ticks):
    """Extreme field values (cost near 2**32, zero times, ages above max age) never make receive or tick raise."""
    s = single()
    s.add_port("q", 2, mac=mac(9, 2), now=0.0)
    times = [x / 256 for x in ticks]
    frame = build_bpdu(kind(flags, root, cost, bridge, port, *times), src=mac(1, 1))
    for t in (1.0, 1.5, 3.0):
        for port_name, f in s.receive("p", frame, t) + s.receive("q", frame, t) + s.tick(t + 0.25):
            assert len(f) == 60 and port_name in ("p", "q")
    assert all(len(f) == 60 for _, f in s.tick(600.0))
    assert not s.errors


def test_message_age_limits_the_information_lifetime():
    s = single()
    s.receive("p", better_rst(message_age=15.0), 1.0)
    assert not s.is_root()
    s.tick(5.9)
    assert not s.is_root()
    s.tick(6.0)                                  # recorded at 1.0, expires after 20 - 15 s
    assert s.is_root()


# --- hold timer ------------------------------------------------------------------------------------


def test_hold_timer_allows_one_config_per_second_per_port():
    s = single()
    s.tick(40.0)                                  # root, designated, forwarding
    worse = bridge_id(40000, mac(1))
    inferior = build_bpdu(ConfigBpdu(0, worse, 0, worse, 0x8001, 0.0, MAX_AGE, HELLO, FWD), src=mac(1, 1))
    sent = []
    t = 40.0
    while t < 46.0:
        t += STEP
        sent += [(t, parse_bpdu(f)) for port, f in s.receive("p", inferior, t) + s.tick(t)]
    times = [t for t, b in sent]
    assert all(isinstance(b, ConfigBpdu) and b.root_id == s.bridge_id for t, b in sent)
    assert all(y - x >= HOLD_TIME for x, y in zip(times, times[1:], strict=False))
    # Each held reply goes out as soon as the hold ends: one per second.
    assert times == [40.125 + i for i in range(6)]
    assert s.state()["ports"]["p"]["config_pending"]


def test_tca_waits_for_the_hold_timer():
    s = single()
    for k in range(1, 321):
        s.tick(k * STEP)                           # the hello at 40.0 starts the hold
    out = s.receive("p", build_bpdu(TcnBpdu(), src=mac(1, 1)), 40.25)
    assert out == []
    assert s.topology_change
    out = s.tick(41.0)
    assert len(out) == 1
    bpdu = parse_bpdu(out[0][1])
    assert bpdu.flags == FLAG_TC | FLAG_TCA


# --- lifecycle and validation --------------------------------------------------------------------


def test_stp_off_forwards_at_once_and_stays_silent():
    s = Stp(mac(1), enabled=False)
    s.add_port("p", 1, mac=mac(1, 1), now=0.0)
    s.add_port("q", 2, mac=mac(1, 2), now=0.0)
    assert s.port_state("p") == PortState.FORWARDING
    assert s.tick(100.0) == []
    assert s.receive("p", better_rst(), 100.0) == []
    assert s.ignored[("p", "stp_off")] == 1
    assert s.set_port_enabled("p", False, 100.0) == []
    assert s.port_state("p") == PortState.DISABLED
    s.set_enabled(True, 101.0)
    assert s.port_state("q") == PortState.LISTENING
    assert s.port_state("p") == PortState.DISABLED
    assert s.tick(103.0)                           # hellos again
    s.tick(131.0)
    assert s.port_state("q") == PortState.FORWARDING
    s.set_enabled(False, 140.0)
    s.set_port_enabled("p", True, 140.0)
    assert s.port_state("p") == PortState.FORWARDING
    assert s.tick(200.0) == []


def test_remove_root_port_reselects():
    net = build(3, [("A", "B"), ("B", "C"), ("C", "A")])
    net.run_until(60)
    b = net.bridges["B"]
    assert b.root_port == "B>A"
    net.unplug("A", "B")
    net.deliver("B", b.remove_port("B>A", net.now))
    assert "B>A" not in b.state()["ports"]
    with pytest.raises(KeyError):
        b.port_state("B>A")
    # B was designated on its only other port, so it knows no other way to A and claims root; C keeps
    # what B said before (worse news from the same bridge does not supersede) until max age.
    assert b.is_root()
    removed = net.now
    while b.root_port != "B>C":
        net.step()
        assert net.now <= removed + MAX_AGE
    t = net.run_until_converged("A", limit=removed + MAX_AGE + 2 * FWD + 1)
    assert t - removed <= MAX_AGE + 2 * FWD


def test_add_port_down_then_up():
    s = Stp(mac(1))
    s.add_port("p", 1, mac=mac(1, 1), now=0.0, enabled=False)
    assert s.port_state("p") == PortState.DISABLED
    assert s.state()["ports"]["p"]["role"] == "disabled"
    s.set_port_enabled("p", True, 1.0)
    assert s.port_state("p") == PortState.LISTENING
    s.tick(16.0)
    assert s.port_state("p") == PortState.LEARNING
    assert s.next_deadline() is not None


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"port_no": 0}, "port number"),
    ({"port_no": 1024}, "port number"),
    ({"priority": 64}, "port priority"),
    ({"path_cost": 0}, "path cost"),
    ({"path_cost": 65536}, "path cost"),
    ({"mac": b"\x00" * 5}, "6 bytes"),
])
def test_bad_port_arguments(kwargs, match):
    s = Stp(mac(1))
    args = {"port_no": 1, "mac": mac(1, 1), "priority": 32, "path_cost": 100} | kwargs
    with pytest.raises(ConfigError, match=match):
        s.add_port("p", args.pop("port_no"), now=0.0, **args)


def test_bad_bridge_arguments():
    with pytest.raises(ConfigError):
        Stp(mac(1), priority=70000)
    with pytest.raises(ConfigError):
        Stp(mac(1), hello_time=0.5)
    with pytest.raises(ConfigError):
        Stp(mac(1), max_age=41)
    with pytest.raises(ConfigError):
        Stp(mac(1), forward_delay=1)
    quiet = Stp(mac(1), forward_delay=0, enabled=False)      # allowed without STP, as in Linux
    quiet.set_enabled(True, 0.0)
    assert quiet.bridge_forward_delay == 2.0                 # clamped when STP starts
    s = Stp(mac(1))
    s.add_port("p", 1, mac=mac(1, 1), now=0.0)
    with pytest.raises(ConfigError, match="already exists"):
        s.add_port("p", 2, mac=mac(1, 2), now=0.0)
    with pytest.raises(ConfigError, match="in use"):
        s.add_port("q", 1, mac=mac(1, 2), now=0.0)
    with pytest.raises(ConfigError):
        s.set_timers(forward_delay=31, now=0.0)
    with pytest.raises(KeyError):
        s.set_port_enabled("nope", True, 0.0)
