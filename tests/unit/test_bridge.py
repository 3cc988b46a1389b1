"""The bridge's forwarding behaviour, rebuilt from the kernel's own selftests
(tools/testing/selftests/net/forwarding/bridge_*.sh, lib.sh learning_test /
flood_test, no_forwarding.sh) as fast unit tests with injected time."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiokvm.errors import ConfigError
from aiokvm.net.bridge import Bridge, BridgeError
from aiokvm.net.frames import mac_from_str, parse_ethernet, push_tag

A = mac_from_str("02:00:00:00:00:0a")
B = mac_from_str("02:00:00:00:00:0b")
C = mac_from_str("02:00:00:00:00:0c")
BCAST = b"\xff" * 6
MCAST = mac_from_str("01:00:5e:01:02:03")


def eth(dst: bytes, src: bytes, payload: bytes = b"x" * 46, ethertype: int = 0x0800) -> bytes:
    return dst + src + ethertype.to_bytes(2, "big") + payload


def bridge(*ports: str, **kw) -> Bridge:
    br = Bridge("br0", mac="02:00:00:00:00:01", **kw)
    for p in ports:
        br.add_port(p)
    return br


def egress(out) -> list[str]:
    return sorted(port for port, _ in out)


# -- learning and ageing ---------------------------------------------------------------------

def test_learning_then_known_unicast_goes_to_one_port():
    br = bridge("p1", "p2", "p3")
    assert egress(br.receive("p1", eth(B, A), 0)) == ["p2", "p3"]  # unknown: flooded
    assert egress(br.receive("p2", eth(A, B), 1)) == ["p1"]         # A learned on p1
    assert egress(br.receive("p1", eth(B, A), 2)) == ["p2"]


def test_learning_off_keeps_flooding():
    br = bridge("p1", "p2", "p3")
    br.set_port("p1", learning=False)
    br.receive("p1", eth(B, A), 0)
    assert egress(br.receive("p2", eth(A, B), 1)) == ["p1", "p3"]
    assert all(e.mac != "02:00:00:00:00:0a" for e in br.fdb())


def test_ageing_removes_learned_entries():
    br = bridge("p1", "p2", "p3", ageing_time=10.0)
    br.receive("p1", eth(B, A), 0)
    br.tick(9.9)
    assert egress(br.receive("p2", eth(A, B), 9.9)) == ["p1"]
    br.tick(20.0)
    assert egress(br.receive("p3", eth(A, C), 20.0)) == ["p1", "p2"]  # aged out: flooded again


def test_mac_moves_between_ports():
    br = bridge("p1", "p2", "p3")
    br.receive("p1", eth(B, A), 0)
    br.receive("p2", eth(B, A), 1)  # A moved to p2
    assert egress(br.receive("p3", eth(A, C), 2)) == ["p2"]


def test_sticky_entry_does_not_move():
    br = bridge("p1", "p2", "p3")
    br.fdb_add(A, "p1", static=True, sticky=True)
    br.receive("p2", eth(B, A), 0)
    assert egress(br.receive("p3", eth(A, C), 1)) == ["p1"]
    assert br.ports["p2"].drops["move_refused"] == 1


def test_extern_learn_entries_roam_but_do_not_age():
    br = bridge("p1", "p2", "p3", ageing_time=10.0)
    br.fdb_add(A, "p1", extern_learn=True)
    br.tick(100.0)
    assert egress(br.receive("p3", eth(A, C), 100.0)) == ["p1"]
    br.receive("p2", eth(B, A), 101.0)
    assert egress(br.receive("p3", eth(A, C), 102.0)) == ["p2"]
    # Having roamed it is an ordinary learned entry (as in the kernel): it ages.
    br.tick(120.0)
    assert egress(br.receive("p3", eth(A, C), 120.0)) == ["p1", "p2"]


def test_static_entries_move_but_sticky_ones_do_not():
    br = bridge("p1", "p2", "p3")
    br.fdb_add(A, "p1", static=True)
    br.receive("p2", eth(B, A), 0)
    view = next(e for e in br.fdb() if e.mac == "02:00:00:00:00:0a")
    assert (view.port, view.kind) == ("p2", "static")


def test_port_addresses_and_permanent_entries_go_to_the_host():
    br = bridge("p1", "p2", "p3")
    port_mac = br.ports["p2"].mac
    assert br.receive("p1", eth(port_mac, A), 0) == []
    br.fdb_add(C, "p3", permanent=True)
    assert br.receive("p1", eth(C, A), 1) == []
    assert br.ports["p1"].drops["to_host"] == 2


def test_link_local_frames_are_not_forwarded_but_teach_the_source():
    br = bridge("p1", "p2", "p3")
    assert br.receive("p1", eth(mac_from_str("01:80:c2:00:00:0e"), A), 0) == []
    assert egress(br.receive("p2", eth(A, B), 1)) == ["p1"]  # A was learned from the LLDP frame


def test_fdb_max_learned_caps_dynamic_entries():
    br = bridge("p1", "p2", fdb_max_learned=2)
    for i in range(5):
        br.receive("p1", eth(BCAST, mac_from_str(f"02:00:00:00:01:{i:02x}")), i)
    learned = [e for e in br.fdb() if e.kind == "learned"]
    assert len(learned) == 2
    assert br.drops["fdb_max_learned"] == 3
    br.fdb_add(C, "p2")  # static entries are not capped
    assert any(e.mac == "02:00:00:00:00:0c" for e in br.fdb())


def test_format_fdb_looks_like_bridge_fdb_show():
    br = bridge("p1", "p2", vlan_filtering=True)
    br.receive("p1", eth(B, A), 0)
    br.fdb_add(C, "p2", vid=1, sticky=True)
    text = br.format_fdb()
    assert "02:00:00:00:00:0a dev p1 vlan 1 master br0\n" in text
    assert "02:00:00:00:00:0c dev p2 vlan 1 sticky master br0 static\n" in text
    assert "02:00:00:00:00:01 dev br0 permanent\n" in text


# -- flooding controls ---------------------------------------------------------------------------

def test_unknown_unicast_flood_off():
    br = bridge("p1", "p2", "p3")
    br.set_port("p3", flood=False)
    assert egress(br.receive("p1", eth(B, A), 0)) == ["p2"]
    assert egress(br.receive("p1", eth(BCAST, A), 0)) == ["p2", "p3"]  # broadcast unaffected


def test_mcast_flood_off_and_bcast_flood_off():
    br = bridge("p1", "p2", "p3")
    br.set_port("p2", mcast_flood=False)
    br.set_port("p3", bcast_flood=False)
    assert egress(br.receive("p1", eth(MCAST, A), 0)) == ["p3"]
    assert egress(br.receive("p1", eth(BCAST, A), 0)) == ["p2"]


def test_hairpin_allows_reflection():
    br = bridge("p1", "p2")
    br.receive("p1", eth(BCAST, B), 0)
    br.receive("p1", eth(BCAST, A), 0)
    assert br.receive("p1", eth(B, A), 1) == []  # B is behind p1: no reflection
    br.set_port("p1", hairpin=True)
    assert egress(br.receive("p1", eth(B, A), 2)) == ["p1"]


def test_isolated_ports_never_talk_to_each_other():
    br = bridge("p1", "p2", "p3")
    br.set_port("p1", isolated=True)
    br.set_port("p2", isolated=True)
    assert egress(br.receive("p1", eth(BCAST, A), 0)) == ["p3"]
    assert egress(br.receive("p3", eth(BCAST, C), 0)) == ["p1", "p2"]


# -- ingress checks --------------------------------------------------------------------------------

@pytest.mark.parametrize(("frame", "reason"), [
    (b"\x01" * 10, "runt"),
    (eth(BCAST, A, b"x" * 9100), "giant"),
    (eth(B, MCAST), "bad_src"),
    (eth(B, b"\0" * 6), "bad_src"),
    (eth(mac_from_str("01:80:c2:00:00:01"), A), "pause"),
    (eth(mac_from_str("01:80:c2:00:00:0e"), A), "link_local"),
])
def test_bad_frames_are_dropped_and_counted(frame, reason):
    br = bridge("p1", "p2")
    assert br.receive("p1", frame, 0) == []
    assert br.ports["p1"].drops[reason] == 1


def test_group_fwd_mask_forwards_selected_link_local_groups():
    br = bridge("p1", "p2", group_fwd_mask=1 << 0xE)
    assert egress(br.receive("p1", eth(mac_from_str("01:80:c2:00:00:0e"), A), 0)) == ["p2"]


def test_bpdus_are_forwarded_when_stp_is_off():
    br = bridge("p1", "p2")
    bpdu_dst = mac_from_str("01:80:c2:00:00:00")
    assert egress(br.receive("p1", eth(bpdu_dst, A, b"\x42\x42\x03" + b"\0" * 43, 0x0026), 0)) == ["p2"]


GARBAGE_DST = st.sampled_from([B, BCAST, MCAST, b"\x01\x80\xc2\x00\x00\x00", b"\x01\x80\xc2\x00\x00\x0e"])


@settings(max_examples=300)
@given(st.binary(max_size=200), st.one_of(GARBAGE_DST, st.binary(min_size=6, max_size=6)),
       st.sampled_from(["p1", "p2"]), st.booleans(), st.booleans(), st.floats(0, 1e6))
def test_receive_never_raises_on_garbage(rest, dst, port, stp, vlan, now):
    # A valid source and a chosen or random destination in front of random
    # bytes, so that frames get past the runt and source checks and into VLAN
    # ingress, learning, forwarding, flooding and the BPDU parser; with STP
    # on, the ports are forwarding first.
    br = bridge("p1", "p2", vlan_filtering=vlan, stp=stp)
    if stp:
        br.tick(now)
        br.tick(now + 31)
    frame = dst + A + rest
    out = br.receive(port, frame, now + 31)
    assert all(name in ("p1", "p2") and isinstance(data, bytes) for name, data in out)
    br.tick(now + 32)


def test_a_refused_path_cost_leaves_the_bridge_as_it_was():
    br = bridge("p1")
    with pytest.raises(ConfigError):
        br.add_port("p2", path_cost=0)
    assert "p2" not in br.ports
    assert egress(br.receive("p1", eth(BCAST, A), 0)) == []  # nothing half-added to flood to
    with pytest.raises(ConfigError):
        br.set_port("p1", path_cost=0)
    assert br.ports["p1"].path_cost == br.stp.state()["ports"]["p1"]["path_cost"]


def test_unknown_port_is_a_caller_error():
    with pytest.raises(BridgeError):
        bridge("p1").receive("nope", eth(B, A), 0)


# -- VLAN filtering ----------------------------------------------------------------------------------

def vlan_bridge() -> Bridge:
    br = bridge("p1", "p2", "p3", vlan_filtering=True)
    for p in ("p1", "p2", "p3"):
        br.vlan_add(p, 10)
    return br


def test_tagged_frames_stay_in_their_vlan_and_egress_follows_port_policy():
    br = vlan_bridge()
    br.vlan_del("p3", 1)  # p3 only in VLAN 10 (tagged)
    br.vlan_add("p2", 10, untagged=True)
    out = dict(br.receive("p1", push_tag(eth(BCAST, A), 10), 0))
    assert sorted(out) == ["p2", "p3"]
    assert parse_ethernet(out["p2"]).tags == ()            # untagged on p2
    assert parse_ethernet(out["p3"]).tags[0].vid == 10     # tagged on p3
    out = dict(br.receive("p1", eth(BCAST, A), 1))          # untagged → pvid 1
    assert sorted(out) == ["p2"]                            # p3 is not in VLAN 1


def test_no_leakage_between_vlans():
    br = vlan_bridge()
    br.receive("p2", push_tag(eth(BCAST, B), 10), 0)       # B learned in VLAN 10
    out = br.receive("p1", eth(B, A), 1)                     # VLAN 1: B unknown there
    assert egress(out) == ["p2", "p3"]                       # flooded in VLAN 1, not sent to p2 only
    assert all(parse_ethernet(f).tags == () for _, f in out)


def test_deleting_a_vid_keeps_pvid_traffic_working():
    br = vlan_bridge()
    br.vlan_del("p1", 10)
    assert egress(br.receive("p1", eth(BCAST, A), 0)) == ["p2", "p3"]
    assert br.receive("p1", push_tag(eth(BCAST, A), 10), 1) == []
    assert br.ports["p1"].drops["vlan_ingress"] == 1


def test_other_tpid_is_treated_as_untagged():
    br = vlan_bridge()
    frame = push_tag(eth(BCAST, A), 10, tpid=0x88A8)
    out = dict(br.receive("p1", frame, 0))
    assert sorted(out) == ["p2", "p3"]                       # forwarded in the pvid VLAN 1
    assert parse_ethernet(out["p2"]).tags[0].tpid == 0x88A8  # the foreign tag is payload


def test_priority_tagged_vid_0_takes_the_pvid():
    br = vlan_bridge()
    out = dict(br.receive("p1", push_tag(eth(BCAST, A), 0, pcp=5), 0))
    assert sorted(out) == ["p2", "p3"]
    assert parse_ethernet(out["p2"]).tags == ()  # VLAN 1 is untagged on p2


@settings(max_examples=200, deadline=None)
@given(ingress=st.sampled_from(["untagged", "tagged", "priority"]), pcp=st.integers(0, 15),
       p2_untagged=st.booleans(), p3_untagged=st.booleans(), known=st.booleans())
def test_egress_frames_are_byte_exact_for_every_tagging(ingress, pcp, p2_untagged, p3_untagged, known):
    # VLAN 10 is the pvid of p1; p2 and p3 are members, each tagged or untagged.
    br = bridge("p1", "p2", "p3", vlan_filtering=True)
    br.vlan_add("p1", 10, pvid=True)
    for port, untagged in (("p2", p2_untagged), ("p3", p3_untagged)):
        br.vlan_add(port, 10, untagged=untagged)
    if known:  # B behind p2: known unicast rather than a flood
        br.receive("p2", push_tag(eth(BCAST, B), 10), 0)
    plain = eth(B if known else BCAST, A, payload=bytes(range(46)))
    prio, dei = pcp & 7, pcp >> 3
    sent = {"untagged": plain, "tagged": push_tag(plain, 10, pcp=prio, dei=dei),
            "priority": push_tag(plain, 0, pcp=prio, dei=dei)}[ingress]
    # PCP and DEI travel with the frame; an untagged frame gets PCP 0.
    tci = (0 if ingress == "untagged" else prio << 13 | dei << 12) | 10
    tagged_out = plain[:12] + b"\x81\x00" + tci.to_bytes(2, "big") + plain[12:]
    out = dict(br.receive("p1", sent, 1))
    expected = {"p2": plain if p2_untagged else tagged_out}
    if not known:
        expected["p3"] = plain if p3_untagged else tagged_out
    assert out == expected


def test_no_pvid_drops_untagged():
    br = vlan_bridge()
    br.vlan_add("p1", 1)  # member of VLAN 1, but no longer its pvid
    assert br.receive("p1", eth(BCAST, A), 0) == []
    assert br.ports["p1"].drops["no_pvid"] == 1
    assert egress(br.receive("p1", push_tag(eth(BCAST, A), 10), 1)) == ["p2", "p3"]


def test_fdb_is_per_vlan():
    br = vlan_bridge()
    br.receive("p1", push_tag(eth(BCAST, A), 10), 0)
    br.receive("p2", eth(BCAST, A), 1)  # same MAC in VLAN 1 behind p2
    vids = {(e.vid, e.port) for e in br.fdb() if e.mac == "02:00:00:00:00:0a"}
    assert vids == {(10, "p1"), (1, "p2")}


def test_8021ad_bridge_uses_the_service_tag():
    br = bridge("p1", "p2", vlan_filtering=True, vlan_protocol=0x88A8)
    br.vlan_add("p1", 100)
    br.vlan_add("p2", 100)
    out = dict(br.receive("p1", push_tag(eth(BCAST, A), 100, tpid=0x88A8), 0))
    assert parse_ethernet(out["p2"]).tags[0].tpid == 0x88A8


def test_two_bridges_never_leak():
    br1, br2 = bridge("a1", "a2"), bridge("b1", "b2")
    br1.receive("a1", eth(BCAST, A), 0)
    assert all(e.kind == "permanent" for e in br2.fdb())  # only its own local addresses
    assert egress(br2.receive("b1", eth(A, B), 1)) == ["b2"]


def test_link_down_port_neither_sends_nor_receives():
    br = bridge("p1", "p2", "p3")
    br.set_port_link("p3", False, now=0)
    assert egress(br.receive("p1", eth(BCAST, A), 0)) == ["p2"]
    assert br.receive("p3", eth(BCAST, C), 0) == []
