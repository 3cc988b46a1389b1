"""Differential test: aiokvm's bridge model against the host kernel's bridge.

Each case builds a kernel bridge ``br0`` in a fresh network namespace with
three veth pairs (``vN`` enslaved, ``tN`` the far end), injects frames on the
``tN`` ends with AF_PACKET sockets (tests/netns_bridge_helper.py runs inside
the namespace) and records which ``tN`` received what.  The same steps run
through ``aiokvm.net.bridge.Bridge`` with ports ``p1..p3`` standing for
``v1..v3``; per injected frame the receiving ports and the exact bytes
(VLAN tags included) must match.

The STP tests run the model bridge in real time inside the namespace, its one
port bound to ``t1``, against a kernel bridge running 802.1D STP on ``v1``.

Only traffic inside the namespaces created here: test frames use the local
experimental EtherType 0x88B5 and locally administered MACs, and IPv6 is off
in the namespace so the kernel sends nothing of its own.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from aiokvm.net.bridge import Bridge

pytestmark = [pytest.mark.root]

HELPER = Path(__file__).with_name("netns_bridge_helper.py")
ETHERTYPE = 0x88B5          # IEEE 802 local experimental EtherType 1
NPORTS = 3
BR_MAC = "02:00:00:00:00:01"


def v_mac(n: int) -> str:
    return f"02:00:00:00:01:{n:02x}"


def t_mac(n: int) -> str:
    return f"02:00:00:00:02:{n:02x}"


A, B, C, D = (bytes.fromhex(f"02aa000000{n:02x}") for n in (0xA, 0xB, 0xC, 0xD))
BCAST = b"\xff" * 6
MCAST = bytes.fromhex("030000000001")   # a group address that is neither IP nor link-local
STP_GROUP = bytes.fromhex("0180c2000000")
PAUSE = bytes.fromhex("0180c2000001")
PAE = bytes.fromhex("0180c2000003")      # 802.1X; link-local, not forwarded by default
LLDP = bytes.fromhex("0180c200000e")


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


_seq = itertools.count(1)


def frame(dst: bytes, src: bytes, *tags: tuple[int, int]) -> bytes:
    """Dst, src, VLAN tags given as (TPID, TCI) outermost first, EtherType 0x88B5 and a
    numbered 46-byte payload (so that no frame is a runt, with or without tags)."""
    payload = b"aiokvm-bridge-diff" + next(_seq).to_bytes(4, "big")
    head = dst + src + b"".join(struct.pack(">HH", tpid, tci) for tpid, tci in tags)
    return head + ETHERTYPE.to_bytes(2, "big") + payload.ljust(46, b"\0")


def q(vid: int, pcp: int = 0, dei: int = 0) -> tuple[int, int]:
    return (0x8100, pcp << 13 | dei << 12 | vid)


def ad(vid: int) -> tuple[int, int]:
    return (0x88A8, vid)


# --- the steps of a case: each has a kernel side and a model side ------------------------------------


@dataclass
class Cmd:
    argv: list[str]                       # run inside the namespace
    model: Callable[[Bridge], object]     # the same change on the model


@dataclass
class Send:
    port: int                             # 1..NPORTS: out of tN, into vN / pN
    data: bytes
    note: str


@dataclass
class Wait:
    seconds: float                        # real time for the kernel, model time for the model


def port_cmd(n: int, *flags: str) -> list[str]:
    return ["bridge", "link", "set", "dev", f"v{n}", *flags]


def vlan(action: str, n: int, vid: int, *flags: str) -> list[str]:
    return ["bridge", "vlan", action, "dev", f"v{n}", "vid", str(vid), *flags]


def vlan_add(n: int, vid: int, pvid: bool = False, untagged: bool = False) -> Cmd:
    flags = [f for f, on in (("pvid", pvid), ("untagged", untagged)) if on]
    return Cmd(vlan("add", n, vid, *flags), lambda br: br.vlan_add(f"p{n}", vid, pvid=pvid, untagged=untagged))


def vlan_del(n: int, vid: int) -> Cmd:
    return Cmd(vlan("del", n, vid), lambda br: br.vlan_del(f"p{n}", vid))


def set_flag(n: int, flag: str, on: bool) -> Cmd:
    return Cmd(port_cmd(n, flag, "on" if on else "off"), lambda br: br.set_port(f"p{n}", **{flag: on}))


def fdb_add(mac_: bytes, n: int, *flags: str) -> Cmd:
    model_flags = {"static": {"static": True}, "permanent": {"permanent": True},
                   "extern_learn": {"extern_learn": True}}[flags[0]]
    sticky = "sticky" in flags
    return Cmd(["bridge", "fdb", "add", mac_.hex(":"), "dev", f"v{n}", "master", *flags],
               lambda br: br.fdb_add(mac_, f"p{n}", sticky=sticky, **model_flags))


AGEING_1S = Cmd(["ip", "link", "set", "br0", "type", "bridge", "ageing_time", "100"],
                lambda br: setattr(br, "ageing_time", 1.0))
AGED = 1.6  # seconds: past the 1 s ageing time, with room for the kernel's FDB gc work to run

VLAN_FILTERING = Cmd(["ip", "link", "set", "br0", "type", "bridge", "vlan_filtering", "1"],
                     lambda br: setattr(br, "vlan_filtering", True))


CASES: dict[str, list] = {
    "learning": [
        Send(1, frame(BCAST, A), "A->bcast from t1 floods, learns A@1"),
        Send(2, frame(A, B), "B->A from t2: A is known, only t1"),
        Send(1, frame(B, A), "A->B from t1: B is known, only t2"),
        Send(3, frame(D, C), "C->D: unknown unicast floods"),
        Send(3, frame(A, C), "C->A known"),
        Send(1, frame(A, C), "C moved to t1; C->A: known on the ingress port, dropped"),
        Send(2, frame(C, B), "B->C goes to C's new port"),
        Send(2, frame(MCAST, B), "multicast floods"),
        Send(3, frame(BCAST, A), "A moves to t3"),
        Send(2, frame(A, B), "B->A follows the move"),
    ],
    "learning_off": [
        set_flag(1, "learning", False),
        Send(1, frame(BCAST, A), "A->bcast from t1 (not learned)"),
        Send(2, frame(A, B), "B->A: A unknown, floods"),
        Send(1, frame(B, A), "A->B: B learned on v2"),
        Send(3, frame(A, C), "C->A still unknown"),
    ],
    "flood_off": [
        set_flag(3, "flood", False),
        Send(1, frame(BCAST, A), "broadcast still reaches t3"),
        Send(1, frame(D, A), "unknown unicast skips t3"),
        Send(1, frame(MCAST, A), "multicast still reaches t3"),
        Send(3, frame(BCAST, C), "learn C on v3"),
        Send(1, frame(C, A), "known unicast to a flood-off port"),
        Send(2, frame(D, B), "unknown unicast from t2"),
    ],
    "mcast_flood_off": [
        set_flag(2, "mcast_flood", False),
        Send(1, frame(MCAST, A), "multicast skips t2"),
        Send(1, frame(BCAST, A), "broadcast reaches t2"),
        Send(1, frame(D, A), "unknown unicast reaches t2"),
        Send(3, frame(STP_GROUP, C), "01:80:C2:00:00:00 with STP off is forwarded as multicast"),
        Send(2, frame(MCAST, B), "multicast from the mcast_flood-off port itself"),
    ],
    "bcast_flood_off": [
        set_flag(2, "bcast_flood", False),
        Send(1, frame(BCAST, A), "broadcast skips t2"),
        Send(1, frame(MCAST, A), "multicast reaches t2"),
        Send(1, frame(D, A), "unknown unicast reaches t2"),
    ],
    "hairpin": [
        set_flag(1, "hairpin", True),
        Send(1, frame(BCAST, A), "broadcast comes back to t1"),
        Send(2, frame(BCAST, B), "learn B"),
        Send(1, frame(A, B), "B->A from t1: known on the hairpin port, goes back"),
        Send(2, frame(A, B), "B->A from t2"),
    ],
    "isolation": [
        set_flag(1, "isolated", True),
        set_flag(2, "isolated", True),
        Send(1, frame(BCAST, A), "isolated t1 -> only t3"),
        Send(2, frame(BCAST, B), "isolated t2 -> only t3"),
        Send(3, frame(BCAST, C), "t3 -> both"),
        Send(1, frame(B, A), "A->B known, isolated to isolated: nothing"),
        Send(1, frame(C, A), "A->C"),
        Send(3, frame(A, C), "C->A"),
        Send(2, frame(D, B), "unknown unicast from isolated t2"),
        Send(2, frame(MCAST, B), "multicast from isolated t2"),
    ],
    "vlan_filtering": [
        VLAN_FILTERING,
        # v1: access port of VID 10.  v2: VID 1 pvid untagged (default), 10 and 20 tagged.
        # v3: 10 tagged, 20 untagged, no pvid at all.
        vlan_add(1, 10, pvid=True, untagged=True),
        vlan_del(1, 1),
        vlan_add(2, 10),
        vlan_add(2, 20),
        vlan_add(3, 10),
        vlan_add(3, 20, untagged=True),
        vlan_del(3, 1),
        Send(1, frame(BCAST, A), "untagged on the access port -> VID 10, tagged on t2 and t3"),
        Send(1, frame(BCAST, A, q(10, pcp=3)), "tagged 10 on an untagged member: accepted, PCP kept"),
        Send(1, frame(BCAST, A, q(20)), "VID 20 is not a member of v1: dropped"),
        Send(1, frame(BCAST, A, q(0, pcp=5)), "priority-tagged (VID 0) -> pvid 10, PCP 5 kept"),
        Send(1, frame(BCAST, A, ad(20)), "802.1ad tag on an 802.1Q bridge: untagged -> pvid, S-tag stays inside"),
        Send(2, frame(BCAST, B), "untagged on t2 -> VID 1, no other member"),
        Send(2, frame(BCAST, B, q(10)), "VID 10 from t2: untagged to t1, tagged to t3"),
        Send(2, frame(BCAST, B, q(20)), "VID 20 from t2: untagged to t3 only"),
        Send(3, frame(BCAST, C), "no pvid on v3: untagged dropped"),
        Send(3, frame(BCAST, C, q(0)), "no pvid on v3: priority-tagged dropped"),
        Send(3, frame(BCAST, C, q(20)), "learn C in VID 20 on v3"),
        Send(2, frame(C, B, q(20)), "B->C in VID 20: known"),
        Send(2, frame(C, B, q(10)), "B->C in VID 10: unknown there, floods within VID 10"),
        Send(1, frame(B, A), "A->B in VID 10: known on v2, tagged"),
        Send(3, frame(A, C, q(10)), "C->A in VID 10: known on v1, untagged"),
        Send(3, frame(A, C, q(4095)), "VID 4095: dropped"),
        Send(2, frame(A, B, q(10), q(30)), "QinQ 8100/8100: the outer VID decides, inner stays"),
    ],
    "tagged_no_filtering": [
        Send(1, frame(BCAST, A, q(10, pcp=5, dei=1)), "tagged frame through a VLAN-unaware bridge, untouched"),
        Send(2, frame(A, B), "learning ignores the tag: A is known"),
        Send(2, frame(BCAST, B, ad(20), q(30)), "QinQ 88a8/8100 untouched"),
        Send(1, frame(B, A, q(4095)), "VID 4095 is just bytes here"),
    ],
    "ageing": [
        AGEING_1S,
        Send(1, frame(BCAST, A), "learn A"),
        Send(2, frame(A, B), "A known"),
        Wait(AGED),
        Send(2, frame(A, B), "A aged out: floods"),
        Send(1, frame(B, A), "B was refreshed 1.6 s ago: aged out too"),
    ],
    "group_fwd_mask": [
        Cmd(["ip", "link", "set", "br0", "type", "bridge", "group_fwd_mask", "0x4008"],
            lambda br: setattr(br, "group_fwd_mask", 0x4008)),
        Send(1, frame(PAE, A), "01:80:C2:00:00:03 with bit 3 set: forwarded"),
        Send(1, frame(LLDP, A), "LLDP with bit 14 set: forwarded"),
        Send(1, frame(bytes.fromhex("0180c2000005"), A), "01:80:C2:00:00:05, bit not set: consumed"),
        Send(2, frame(A, B), "A learned from the forwarded link-local frames"),
    ],
    "fdb_sticky": [
        fdb_add(D, 3, "static", "sticky"),
        Send(1, frame(D, A), "to a static sticky entry on v3"),
        Send(1, frame(BCAST, D), "D shows up on v1"),
        Send(2, frame(D, B), "the sticky entry has not moved"),
    ],
    # The probes below look at corners where the model and the kernel may part ways.  On Linux 6.18
    # the kernel learns from consumed link-local frames, moves static (non-sticky) entries, treats
    # `permanent` as a local (host) entry, drops extern_learn once an entry roams (it then ages) and
    # has a local entry for every port's MAC.
    "vlan_dei": [
        VLAN_FILTERING,
        vlan_add(1, 10, pvid=True, untagged=True),
        vlan_add(2, 10),
        vlan_add(3, 10),
        Send(2, frame(BCAST, B, q(10, pcp=6, dei=1)), "DEI set on a tagged frame egressing tagged"),
    ],
    "linklocal_learning": [
        Send(1, frame(PAE, A), "01:80:C2:00:00:03 from A: not forwarded"),
        Send(2, frame(A, B), "B->A: was A learned from the link-local frame?"),
        Send(3, frame(LLDP, C), "LLDP from C: not forwarded"),
        Send(2, frame(C, B), "B->C: was C learned from LLDP?"),
        Send(3, frame(PAUSE, D), "pause frame from D: dropped"),
        Send(2, frame(D, B), "B->D: was D learned from the pause frame?"),
    ],
    "fdb_static_move": [
        fdb_add(D, 3, "static"),
        Send(1, frame(D, A), "to a static entry on v3"),
        Send(1, frame(BCAST, D), "D shows up on v1"),
        Send(2, frame(D, B), "did the static (not sticky) entry move to v1?"),
    ],
    "fdb_permanent": [
        fdb_add(D, 3, "permanent"),
        Send(1, frame(D, A), "to a permanent entry on v3 (the kernel makes it a local, host-bound entry)"),
        Send(2, frame(D, B), "again from t2"),
    ],
    "fdb_extern_learn": [
        AGEING_1S,
        fdb_add(D, 3, "extern_learn"),
        Send(1, frame(D, A), "to an extern_learn entry on v3"),
        Wait(AGED),
        Send(1, frame(D, A), "extern_learn entries do not age"),
        Send(2, frame(BCAST, D), "D shows up on v2: the entry roams"),
        Send(1, frame(D, A), "to D on its new port"),
        Wait(AGED),
        Send(1, frame(D, A), "after roaming: does the entry age now?"),
    ],
    "local_macs": [
        Send(1, frame(mac(BR_MAC), A), "to the bridge's own MAC: delivered to the host only"),
        Send(1, frame(mac(v_mac(2)), A), "to port v2's MAC: a local FDB entry in the kernel"),
        Send(2, frame(mac(v_mac(2)), B), "to v2's MAC from t2"),
    ],
    "local_macs_vlan": [
        VLAN_FILTERING,
        Send(1, frame(mac(BR_MAC), A), "to the bridge's MAC in VID 1 (vlan_filtering)"),
        Send(1, frame(mac(BR_MAC), A, q(1)), "to the bridge's MAC, tagged VID 1"),
    ],
}


# --- the namespace ---------------------------------------------------------------------------------

_ns_counter = itertools.count()


def sh(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def check(*argv: str) -> None:
    proc = sh(*argv)
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr.strip()}"


@pytest.fixture
def netns():
    """A fresh, empty network namespace with IPv6 off; deleted afterwards whatever happens."""
    name = f"aiokvm-br-{os.getpid()}-{next(_ns_counter)}"
    proc = sh("ip", "netns", "add", name)
    if proc.returncode:
        pytest.skip(f"ip netns add failed: {proc.stderr.strip()}")
    try:
        for key in ("all", "default"):
            check("ip", "netns", "exec", name, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
        yield name
    finally:
        sh("ip", "netns", "del", name)


def ip(ns: str, *args: str) -> None:
    check("ip", "-n", ns, *args)


def make_bridge(ns: str, nports: int, *bridge_opts: str) -> None:
    ip(ns, "link", "add", "br0", "address", BR_MAC, "type", "bridge", *bridge_opts)
    for n in range(1, nports + 1):
        ip(ns, "link", "add", f"v{n}", "address", v_mac(n), "type", "veth", "peer", "name", f"t{n}",
           "address", t_mac(n))
        ip(ns, "link", "set", f"v{n}", "master", "br0")
    ip(ns, "link", "set", "br0", "up")
    for n in range(1, nports + 1):
        ip(ns, "link", "set", f"v{n}", "up")
        ip(ns, "link", "set", f"t{n}", "up")


def need_vlan_filtering(ns: str) -> None:
    """Skip unless the kernel has CONFIG_BRIDGE_VLAN_FILTERING (it answers EOPNOTSUPP without)."""
    proc = sh("ip", "-n", ns, "link", "add", "brprobe", "type", "bridge", "vlan_filtering", "1")
    if proc.returncode:
        pytest.skip(f"the host kernel's bridge has no VLAN filtering: {proc.stderr.strip()}")
    ip(ns, "link", "del", "brprobe")


def run_helper(ns: str, script: dict, timeout: float = 60) -> dict:
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, str(HELPER)], input=json.dumps(script),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert "error" not in answer, answer["error"]
    return answer


# --- comparing ---------------------------------------------------------------------------------------


def describe(data: bytes) -> str:
    """dst<-src [tags] for a test frame, enough to read a mismatch."""
    tags = []
    offset = 12
    while data[offset:offset + 2] in (b"\x81\x00", b"\x88\xa8"):
        tpid, tci = struct.unpack_from(">HH", data, offset)
        tags.append(f"{tpid:04x}:vid{tci & 0xFFF}/pcp{tci >> 13}/dei{tci >> 12 & 1}")
        offset += 4
    return f"{data[:6].hex(':')}<-{data[6:12].hex(':')}" + (f" [{' '.join(tags)}]" if tags else " untagged")


def render(rx: dict[str, list[bytes]]) -> str:
    if not rx:
        return "nothing"
    return "; ".join(f"{port}: {', '.join(describe(f) for f in frames)}" for port, frames in sorted(rx.items()))


def model_run(steps: list) -> list[dict[str, list[bytes]]]:
    br = Bridge("br0", mac=BR_MAC)
    for n in range(1, NPORTS + 1):
        br.add_port(f"p{n}", mac=v_mac(n))
    results = []
    now = 1.0
    for step in steps:
        now += 0.05
        if isinstance(step, Cmd):
            step.model(br)
            continue
        if isinstance(step, Wait):
            now += step.seconds
            br.tick(now)
            continue
        rx: dict[str, list[bytes]] = {}
        for port, data in br.receive(f"p{step.port}", step.data, now):
            rx.setdefault("t" + port[1:], []).append(bytes(data))
        results.append({port: sorted(frames) for port, frames in rx.items()})
    return results


def kernel_step(step) -> dict:
    if isinstance(step, Cmd):
        return {"cmd": step.argv}
    if isinstance(step, Wait):
        return {"sleep": step.seconds}
    return {"send": f"t{step.port}", "frame": step.data.hex()}


def kernel_run(ns: str, steps: list) -> list[dict[str, list[bytes]]]:
    script = {
        "mode": "forward",
        "ports": [f"t{n}" for n in range(1, NPORTS + 1)],
        "ethertype": ETHERTYPE,
        "settle": 0.04,
        "steps": [kernel_step(s) for s in steps],
    }
    answer = run_helper(ns, script)
    assert answer["stray"] == 0, "test frames arrived outside their step's window"
    return [{port: sorted(bytes.fromhex(f) for f in frames) for port, frames in rx.items()}
            for rx in answer["results"]]


@pytest.mark.parametrize("case", list(CASES))
def test_forwarding_matches_kernel(netns, case):
    steps = CASES[case]
    if VLAN_FILTERING in steps:
        need_vlan_filtering(netns)
    make_bridge(netns, NPORTS)
    kernel = kernel_run(netns, steps)
    model = model_run(steps)
    sends = [s for s in steps if isinstance(s, Send)]
    assert len(kernel) == len(model) == len(sends)
    mismatches = [
        f"#{i} t{s.port} {describe(s.data)} ({s.note}):\n    kernel: {render(k)}\n    model:  {render(m)}"
        for i, (s, k, m) in enumerate(zip(sends, kernel, model, strict=True)) if k != m
    ]
    assert not mismatches, f"{case}: the model differs from the kernel bridge\n" + "\n".join(mismatches)


# --- STP against the kernel ------------------------------------------------------------------------------

OUR_MAC = "02:00:00:00:00:77"
STP_TIMES = {"hello_time": 1.0, "max_age": 6.0, "forward_delay": 4.0}


def stp_run(ns: str, kernel_priority: int, our_priority: int, duration: float) -> dict:
    make_bridge(ns, 1, "stp_state", "1", "priority", str(kernel_priority), "forward_delay", "400",
                "hello_time", "100", "max_age", "600")
    script = {"mode": "stp", "port": "t1", "port_mac": t_mac(1), "duration": duration, "snapshots": [3.0],
              "tick": 0.05, "bridge": {"mac": OUR_MAC, "priority": our_priority, **STP_TIMES}}
    return run_helper(ns, script, timeout=duration + 30)


def our_id(priority: int) -> str:
    return f"{priority:04x}.{OUR_MAC.replace(':', '')}"


def kernel_id(priority: int) -> str:
    return f"{priority:04x}.{BR_MAC.replace(':', '')}"


def transitions(timeline: list) -> dict[str, float]:
    """First time each state was seen: {"learning": 4.03, ...}."""
    first: dict[str, float] = {}
    for at, state in timeline:
        first.setdefault(state, at)
    return first


def check_timeline(answer: dict) -> None:
    """Both ends of the link are root or designated ports: listening -> learning -> forwarding, one
    forward_delay per step.  The model's clock starts with the helper; the kernel's port came up a
    little earlier, and its 4 s timers can fire up to 64 jiffies late (timer wheel granularity), so
    only its learning -> forwarding step is timed."""
    delay = STP_TIMES["forward_delay"]
    model, kernel = (transitions(answer["timeline"][side]) for side in ("model", "kernel"))
    assert list(model) == ["listening", "learning", "forwarding"], answer["timeline"]
    assert delay - 0.05 <= model["learning"] <= delay + 0.3, answer["timeline"]
    assert 2 * delay - 0.05 <= model["forwarding"] <= 2 * delay + 0.3, answer["timeline"]
    assert list(kernel)[-2:] == ["learning", "forwarding"], answer["timeline"]
    assert delay - 0.1 <= kernel["forwarding"] - kernel["learning"] <= delay + 0.4, answer["timeline"]


def reference_root_bpdu(priority: int, mac_: str, port_mac: str) -> bytes:
    """The first configuration BPDU the model sends as a root bridge with one port."""
    br = Bridge("ref", mac=mac_, priority=priority, stp=True, **STP_TIMES)
    br.add_port("p1", mac=port_mac)
    for k in range(100):
        out = br.tick(k * 0.05)
        if out:
            return out[0][1]
    raise AssertionError("the model sent no BPDU as root within 5 s")


def test_stp_we_are_root(netns):
    answer = stp_run(netns, kernel_priority=32768, our_priority=4096, duration=10.0)
    at3, end = answer["snapshots"]
    assert at3["kernel"]["bridge_id"] == kernel_id(32768)
    assert at3["kernel"]["root_id"] == our_id(4096), answer
    assert at3["kernel"]["root_port"] == "1", answer
    assert at3["kernel"]["port_designated_bridge"] == our_id(4096), answer
    assert at3["model"]["root_id"] == our_id(4096), answer
    assert at3["model"]["root_port"] is None
    assert at3["model"]["ports"]["p1"]["role"] == "designated"
    assert end["model"]["ports"]["p1"]["state"] == "forwarding", answer["timeline"]
    assert end["kernel"]["port_state"] == "forwarding", answer["timeline"]
    # Our port went forwarding while designated: a topology change, which the kernel hears from us.
    assert end["model"]["topology_change"] and end["kernel"]["topology_change"] == "1", answer
    check_timeline(answer)
    assert not answer["stp_errors"] and not answer["stp_ignored"], answer


def test_stp_kernel_is_root(netns):
    answer = stp_run(netns, kernel_priority=4096, our_priority=32768, duration=10.0)
    at3, end = answer["snapshots"]
    assert at3["kernel"]["bridge_id"] == kernel_id(4096)
    assert at3["kernel"]["root_id"] == kernel_id(4096), answer
    assert at3["model"]["root_id"] == at3["kernel"]["bridge_id"], answer
    assert at3["model"]["root_port"] == "p1", answer
    assert at3["model"]["ports"]["p1"]["role"] == "root"
    assert at3["model"]["ports"]["p1"]["designated_bridge"] == kernel_id(4096)
    assert end["model"]["ports"]["p1"]["state"] == "forwarding", answer["timeline"]
    assert end["kernel"]["port_state"] == "forwarding", answer["timeline"]
    # The kernel, as root, flags the topology change of its port going forwarding; we copy TC.
    assert end["kernel"]["topology_change"] == "1" and end["model"]["topology_change"], answer
    assert answer["sent"] == 0, "a non-root bridge with only a root port sends no BPDU"
    check_timeline(answer)
    assert not answer["stp_errors"] and not answer["stp_ignored"], answer
    # Byte for byte, the kernel's first configuration BPDU is what the model sends in its place,
    # except that the kernel does not pad to 60 bytes (52 on the wire through veth).
    kernel_bpdu = bytes.fromhex(answer["first_received"][0])
    ours = reference_root_bpdu(4096, BR_MAC, v_mac(1))
    assert kernel_bpdu == ours[:len(kernel_bpdu)], (kernel_bpdu.hex(), ours.hex())
    assert ours[len(kernel_bpdu):] == bytes(len(ours) - len(kernel_bpdu))
