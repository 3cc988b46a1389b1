"""Ethernet / VLAN / BPDU codecs and pcap files: round trips, edge cases, fuzzing."""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiokvm.net.frames import (
    STP_MULTICAST,
    ConfigBpdu,
    EthernetHeader,
    FrameError,
    PortRole,
    RstBpdu,
    TcnBpdu,
    VlanTag,
    bridge_id,
    build_bpdu,
    build_ethernet,
    format_bridge_id,
    is_broadcast,
    is_link_local,
    is_multicast,
    mac_from_str,
    mac_to_str,
    outer_tag,
    parse_bpdu,
    parse_ethernet,
    pop_tag,
    push_tag,
    rewrite_tag,
    rst_flags,
    split_bridge_id,
)
from aiokvm.net.pcap import PcapError, PcapReader, PcapWriter

SRC = mac_from_str("02:00:00:00:00:01")
DST = mac_from_str("02:00:00:00:00:02")

macs = st.binary(min_size=6, max_size=6)
vlan_tags = st.builds(
    VlanTag,
    tpid=st.sampled_from([0x8100, 0x88A8]),
    pcp=st.integers(0, 7),
    dei=st.integers(0, 1),
    vid=st.integers(0, 4095),
)
ethertypes = st.integers(0x0600, 0xFFFF).filter(lambda t: t not in (0x8100, 0x88A8))
payloads = st.binary(max_size=200)
# Frames with at least a full Ethernet header.
frames = st.binary(min_size=14, max_size=200)
bpdu_times = st.integers(0, 0xFFFF).map(lambda ticks: ticks / 256)
u8 = st.integers(0, 0xFF)


def _vector_fields():
    return {
        "flags": u8,
        "root_id": st.integers(0, 2**64 - 1),
        "root_path_cost": st.integers(0, 2**32 - 1),
        "bridge_id": st.integers(0, 2**64 - 1),
        "port_id": st.integers(0, 0xFFFF),
        "message_age": bpdu_times,
        "max_age": bpdu_times,
        "hello_time": bpdu_times,
        "forward_delay": bpdu_times,
    }


config_bpdus = st.builds(ConfigBpdu, **_vector_fields(), version=u8)
rst_bpdus = st.builds(RstBpdu, **_vector_fields(), version=st.integers(2, 0xFF))
tcn_bpdus = st.builds(TcnBpdu, version=u8)
any_bpdu = st.one_of(config_bpdus, rst_bpdus, tcn_bpdus)


# --- MAC helpers ----------------------------------------------------------------


def test_mac_strings():
    assert mac_from_str("02:00:00:00:00:01") == bytes([2, 0, 0, 0, 0, 1])
    assert mac_from_str("AA-bb-CC-dd-EE-ff") == bytes.fromhex("aabbccddeeff")
    assert mac_to_str(bytes.fromhex("0180c200000e")) == "01:80:c2:00:00:0e"


@given(macs)
def test_mac_string_round_trip(mac):
    text = mac_to_str(mac)
    assert len(text) == 17
    assert mac_from_str(text) == mac
    assert mac_from_str(text.upper()) == mac


@pytest.mark.parametrize(
    "text", ["", "02:00:00:00:00", "02:00:00:00:00:01:03", "2:00:00:00:00:01", "02:00:00:00:00:0g", "+2:00:00:00:00:01",
             " 2:00:00:00:00:01", "020000000001"],
)
def test_mac_from_str_rejects(text):
    with pytest.raises(ValueError):
        mac_from_str(text)


def test_mac_to_str_rejects_wrong_length():
    with pytest.raises(ValueError):
        mac_to_str(b"\x00" * 5)


def test_mac_classes():
    assert is_broadcast(b"\xff" * 6) and is_multicast(b"\xff" * 6) and not is_link_local(b"\xff" * 6)
    assert is_multicast(mac_from_str("01:00:5e:00:00:01")) and not is_broadcast(mac_from_str("01:00:5e:00:00:01"))
    assert not is_multicast(SRC) and not is_broadcast(SRC) and not is_link_local(SRC)
    for last in range(16):
        assert is_link_local(bytes.fromhex("0180c20000") + bytes([last]))
    assert not is_link_local(mac_from_str("01:80:c2:00:00:10"))
    assert not is_link_local(mac_from_str("01:80:c2:00:00:21"))  # GARP range
    assert not is_link_local(mac_from_str("01:80:c2:00:01:00"))
    assert is_link_local(STP_MULTICAST)


# --- bridge ids --------------------------------------------------------------------


def test_bridge_id_formatting_like_sysfs():
    bid = bridge_id(0x8000, SRC)
    assert bid == 0x8000_0200_0000_0001
    assert format_bridge_id(bid) == "8000.020000000001"
    assert format_bridge_id(bridge_id(0, b"\xff" * 6)) == "0000.ffffffffffff"
    assert format_bridge_id(bridge_id(0xFFFF, bytes(6))) == "ffff.000000000000"


@given(st.integers(0, 0xFFFF), macs)
def test_bridge_id_round_trip(priority, mac):
    bid = bridge_id(priority, mac)
    assert split_bridge_id(bid) == (priority, mac)
    text = format_bridge_id(bid)
    assert text == f"{priority:04x}.{mac.hex()}"


@given(st.integers(0, 0xFFFE), macs, macs)
def test_bridge_id_order_is_priority_then_mac(priority, mac_a, mac_b):
    assert bridge_id(priority, mac_a) < bridge_id(priority + 1, mac_b)
    assert (bridge_id(priority, mac_a) < bridge_id(priority, mac_b)) == (mac_a < mac_b)


@pytest.mark.parametrize("priority, mac", [(-1, SRC), (0x10000, SRC), (0x8000, b"\x00" * 5)])
def test_bridge_id_rejects(priority, mac):
    with pytest.raises(ValueError):
        bridge_id(priority, mac)


def test_split_bridge_id_rejects_out_of_range():
    for bad in (-1, 2**64):
        with pytest.raises(ValueError):
            split_bridge_id(bad)


# --- Ethernet and VLAN tags ------------------------------------------------------------


@given(macs, macs, ethertypes, payloads, st.lists(vlan_tags, max_size=2).map(tuple))
def test_ethernet_round_trip(dst, src, ethertype, payload, tags):
    frame = build_ethernet(dst, src, ethertype, payload, tags=tags)
    header = parse_ethernet(frame)
    assert header == EthernetHeader(dst, src, ethertype, None, tags, 14 + 4 * len(tags))
    assert frame[header.header_len:] == payload
    assert outer_tag(frame) == (tags[0] if tags else None)


@given(macs, macs, st.integers(0, 0x05FF), payloads, st.lists(vlan_tags, max_size=2).map(tuple))
def test_802_3_length_frames(dst, src, length, payload, tags):
    header = parse_ethernet(build_ethernet(dst, src, length, payload, tags=tags))
    assert header.ethertype is None
    assert header.length == length
    assert header.tags == tags
    assert header.header_len == 14 + 4 * len(tags)


def test_0x0600_is_the_first_ethertype():
    assert parse_ethernet(build_ethernet(DST, SRC, 0x0600, b"")).ethertype == 0x0600
    assert parse_ethernet(build_ethernet(DST, SRC, 0x05FF, b"")).length == 0x05FF


def test_known_tagged_layout():
    frame = build_ethernet(DST, SRC, 0x0800, b"xyz", tags=(VlanTag(0x88A8, 5, 1, 100), VlanTag(0x8100, 3, 0, 4094)))
    assert frame.hex() == "020000000002" "020000000001" "88a8b064" "81006ffe" "0800" + b"xyz".hex()


def test_third_tag_stays_as_ethertype():
    inner = build_ethernet(DST, SRC, 0x0800, b"payload")
    frame = push_tag(push_tag(push_tag(inner, 1), 2), 3, tpid=0x88A8)
    header = parse_ethernet(frame)
    assert [tag.vid for tag in header.tags] == [3, 2]
    assert header.ethertype == 0x8100
    assert header.header_len == 22


def test_other_tpids_are_not_tags():
    frame = build_ethernet(DST, SRC, 0x9100, b"\x00\x0a\x08\x00")
    assert parse_ethernet(frame).tags == ()
    assert parse_ethernet(frame).ethertype == 0x9100
    assert outer_tag(frame) is None
    with pytest.raises(FrameError, match="not VLAN-tagged"):
        pop_tag(frame)
    with pytest.raises(FrameError):
        rewrite_tag(frame, 5)


@pytest.mark.parametrize("size", range(14))
def test_runts_raise(size):
    frame = bytes(range(size))
    with pytest.raises(FrameError, match="runt"):
        parse_ethernet(frame)
    for op in (outer_tag, pop_tag, parse_bpdu, lambda f: push_tag(f, 1), lambda f: rewrite_tag(f, 1)):
        with pytest.raises(FrameError):
            op(frame)


@pytest.mark.parametrize("tpid", [0x8100, 0x88A8])
def test_cut_tags_raise(tpid):
    one = build_ethernet(DST, SRC, tpid, b"\x00\x0a")  # 16 bytes: TCI but no inner type
    with pytest.raises(FrameError, match="cut"):
        parse_ethernet(one)
    assert parse_ethernet(one + b"\x08\x00").tags == (VlanTag(tpid, 0, 0, 10),)
    two = build_ethernet(DST, SRC, 0x88A8, b"\x00\x0a" + tpid.to_bytes(2, "big") + b"\x00\x14")  # 20 bytes
    with pytest.raises(FrameError, match="cut"):
        parse_ethernet(two)
    assert [t.vid for t in parse_ethernet(two + b"\x08\x00").tags] == [10, 20]
    with pytest.raises(FrameError):
        outer_tag(build_ethernet(DST, SRC, tpid, b"\x00"))  # 15 bytes: TCI cut


@given(frames, vlan_tags)
def test_push_then_pop_is_identity(frame, tag):
    tagged = push_tag(frame, tag.vid, tpid=tag.tpid, pcp=tag.pcp, dei=tag.dei)
    assert len(tagged) == len(frame) + 4
    assert outer_tag(tagged) == tag
    assert pop_tag(tagged) == (tag, frame)


@given(macs, macs, ethertypes, payloads, st.lists(vlan_tags, min_size=1, max_size=2).map(tuple))
def test_pop_then_push_is_identity(dst, src, ethertype, payload, tags):
    frame = build_ethernet(dst, src, ethertype, payload, tags=tags)
    tag, rest = pop_tag(frame)
    assert tag == tags[0]
    assert parse_ethernet(rest).tags == tags[1:]
    assert push_tag(rest, tag.vid, tpid=tag.tpid, pcp=tag.pcp, dei=tag.dei) == frame


@given(frames, vlan_tags, st.integers(0, 4095), st.sampled_from([None, 0x8100, 0x88A8]),
       st.one_of(st.none(), st.integers(0, 7)))
def test_rewrite_tag(frame, tag, vid, tpid, pcp):
    tagged = push_tag(frame, tag.vid, tpid=tag.tpid, pcp=tag.pcp, dei=tag.dei)
    rewritten = rewrite_tag(tagged, vid, tpid=tpid, pcp=pcp)
    expected = VlanTag(tag.tpid if tpid is None else tpid, tag.pcp if pcp is None else pcp, tag.dei, vid)
    assert outer_tag(rewritten) == expected
    assert pop_tag(rewritten)[1] == frame
    assert rewrite_tag(tagged, tag.vid) == tagged
    assert rewrite_tag(rewritten, tag.vid, tpid=tag.tpid, pcp=tag.pcp) == tagged


def test_rewrite_only_touches_the_outer_tag():
    inner = VlanTag(0x8100, 0, 0, 20)
    frame = build_ethernet(DST, SRC, 0x0800, b"data", tags=(VlanTag(0x88A8, 1, 0, 10), inner))
    header = parse_ethernet(rewrite_tag(frame, 30))
    assert header.tags == (VlanTag(0x88A8, 1, 0, 30), inner)


@pytest.mark.parametrize("kwargs", [{"vid": 4096}, {"vid": -1}, {"vid": 1, "pcp": 8}, {"vid": 1, "dei": 2},
                                    {"vid": 1, "tpid": 0x10000}])
def test_tag_values_are_checked(kwargs):
    frame = build_ethernet(DST, SRC, 0x0800, b"")
    with pytest.raises(ValueError):
        push_tag(frame, **kwargs)


def test_build_ethernet_checks_arguments():
    with pytest.raises(ValueError):
        build_ethernet(b"\x00" * 5, SRC, 0x0800, b"")
    with pytest.raises(ValueError):
        build_ethernet(DST, SRC + b"\x00", 0x0800, b"")
    with pytest.raises(ValueError):
        build_ethernet(DST, SRC, 0x10000, b"")


@settings(max_examples=500)
@given(st.binary(max_size=80))
def test_fuzz_ethernet_and_tag_helpers_raise_only_frame_error(data):
    for op in (parse_ethernet, outer_tag, pop_tag, lambda f: rewrite_tag(f, 7), lambda f: push_tag(f, 7)):
        try:
            op(data)
        except FrameError:
            pass


# --- BPDUs ----------------------------------------------------------------------------


def _linux_config_bpdu(**changes) -> ConfigBpdu:
    fields = {
        "flags": 0, "root_id": bridge_id(0x8000, SRC), "root_path_cost": 0, "bridge_id": bridge_id(0x8000, SRC),
        "port_id": 0x8001, "message_age": 0.0, "max_age": 20.0, "hello_time": 2.0, "forward_delay": 15.0,
    }
    fields.update(changes)
    return ConfigBpdu(**fields)


def test_config_bpdu_known_bytes():
    frame = build_bpdu(_linux_config_bpdu(), src=SRC)
    expected = bytes.fromhex(
        "0180c2000000" "020000000001" "0026" "424203"
        "0000" "00" "00" "00" "8000020000000001" "00000000" "8000020000000001" "8001"
        "0000" "1400" "0200" "0f00"
    )
    assert frame == expected.ljust(60, b"\x00")


def test_tcn_and_rst_known_bytes():
    tcn = build_bpdu(TcnBpdu(), src=SRC)
    assert tcn == bytes.fromhex("0180c2000000" "020000000001" "0007" "424203" "0000" "00" "80").ljust(60, b"\x00")
    rst = RstBpdu(rst_flags(PortRole.DESIGNATED, proposal=True), bridge_id(0x1000, DST), 4, bridge_id(0x8000, SRC),
                  0x8002, 1.0, 20.0, 2.0, 15.0)
    assert rst.version == 2
    frame = build_bpdu(rst, src=SRC)
    assert frame[12:14] == (39).to_bytes(2, "big")
    assert frame[14:17 + 36] == bytes.fromhex(
        "424203" "0000" "02" "02" "0e" "1000020000000002" "00000004" "8000020000000001" "8002"
        "0100" "1400" "0200" "0f00" "00"
    )
    assert frame[17 + 36:] == bytes(60 - 17 - 36)


@given(any_bpdu, macs)
def test_bpdu_round_trip(bpdu, src):
    frame = build_bpdu(bpdu, src=src)
    assert len(frame) == 60
    header = parse_ethernet(frame)
    assert (header.dst, header.src, header.ethertype, header.tags) == (STP_MULTICAST, src, None, ())
    assert header.length == {ConfigBpdu: 38, TcnBpdu: 7, RstBpdu: 39}[type(bpdu)]
    assert frame[14:17] == b"\x42\x42\x03"
    assert parse_bpdu(frame) == bpdu
    assert type(parse_bpdu(frame)) is type(bpdu)


@given(st.one_of(config_bpdus, rst_bpdus))
def test_tc_flag_accessors(bpdu):
    assert bpdu.topology_change == bool(bpdu.flags & 0x01)
    assert bpdu.topology_change_ack == bool(bpdu.flags & 0x80)


@given(st.sampled_from(PortRole), st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.booleans(),
       st.booleans())
def test_rst_flag_accessors(role, tc, proposal, learning, forwarding, agreement, tca):
    flags = rst_flags(role, tc=tc, proposal=proposal, learning=learning, forwarding=forwarding, agreement=agreement,
                      tca=tca)
    assert flags == (tc | proposal << 1 | role << 2 | learning << 4 | forwarding << 5 | agreement << 6 | tca << 7)
    bpdu = parse_bpdu(build_bpdu(RstBpdu(flags, 0, 0, 0, 0, 0.0, 20.0, 2.0, 15.0), src=SRC))
    assert (bpdu.port_role, bpdu.topology_change, bpdu.proposal, bpdu.learning, bpdu.forwarding, bpdu.agreement,
            bpdu.topology_change_ack) == (role, tc, proposal, learning, forwarding, agreement, tca)


def test_rst_is_not_a_config_bpdu():
    rst = parse_bpdu(build_bpdu(RstBpdu(0, 0, 0, 0, 0, 0.0, 20.0, 2.0, 15.0), src=SRC))
    assert not isinstance(rst, ConfigBpdu)


def test_bpdu_times_round_to_the_nearest_256th():
    bpdu = _linux_config_bpdu(message_age=2.001, max_age=1 / 512, hello_time=0.001, forward_delay=255.998)
    parsed = parse_bpdu(build_bpdu(bpdu, src=SRC))
    assert parsed.message_age == 2.0
    assert parsed.max_age == 1 / 256  # half a tick rounds up
    assert parsed.hello_time == 0.0
    assert parsed.forward_delay == 0xFFFF / 256


@pytest.mark.parametrize(
    "changes",
    [{"message_age": -0.01}, {"max_age": 256.0}, {"hello_time": float("inf")}, {"forward_delay": float("nan")},
     {"flags": 256}, {"root_id": 2**64}, {"root_path_cost": -1}, {"root_path_cost": 2**32}, {"bridge_id": -1},
     {"port_id": 0x10000}, {"version": 256}],
)
def test_build_bpdu_rejects_out_of_range(changes):
    with pytest.raises(ValueError):
        build_bpdu(_linux_config_bpdu(**changes), src=SRC)


def test_build_bpdu_rejects_bad_source():
    with pytest.raises(ValueError):
        build_bpdu(TcnBpdu(), src=b"\x02")


def test_mstp_bpdu_reads_as_rst():
    body = build_bpdu(RstBpdu(0x7C, 1, 2, 3, 4, 0.0, 20.0, 2.0, 15.0, version=3), src=SRC)[17:17 + 36]
    llc_pdu = b"\x42\x42\x03" + body + b"\x00\x40" + bytes(64)  # version 3 length and an MST part
    frame = build_ethernet(STP_MULTICAST, SRC, len(llc_pdu), llc_pdu)
    bpdu = parse_bpdu(frame)
    assert isinstance(bpdu, RstBpdu) and bpdu.version == 3 and bpdu.port_role is PortRole.DESIGNATED


def test_bpdu_ignores_padding_and_trailing_bytes():
    frame = build_bpdu(TcnBpdu(), src=SRC)
    assert parse_bpdu(frame + b"\xff" * 100) == TcnBpdu()
    config = build_bpdu(_linux_config_bpdu(), src=SRC)
    longer = config[:12] + (39).to_bytes(2, "big") + config[14:]  # one byte of slack inside the length
    assert parse_bpdu(longer) == _linux_config_bpdu()


def _bpdu_frame(llc_pdu: bytes, *, length: int | None = None) -> bytes:
    frame = build_ethernet(STP_MULTICAST, SRC, len(llc_pdu) if length is None else length, llc_pdu)
    return frame.ljust(60, b"\x00")


CONFIG_BODY = build_bpdu(_linux_config_bpdu(), src=SRC)[17:17 + 35]
RST_BODY = build_bpdu(RstBpdu(0, 0, 0, 0, 0, 0.0, 20.0, 2.0, 15.0), src=SRC)[17:17 + 36]


@pytest.mark.parametrize(
    "frame, message",
    [
        (_bpdu_frame(b"\x42\x42\x13" + CONFIG_BODY), "LLC"),
        (_bpdu_frame(b"\xaa\xaa\x03" + CONFIG_BODY), "LLC"),
        (_bpdu_frame(b"\x42\x43\x03" + CONFIG_BODY), "LLC"),
        (_bpdu_frame(b"\x42\x42\x03" + CONFIG_BODY[:34]), "needs 35"),
        (_bpdu_frame(b"\x42\x42\x03" + RST_BODY[:35]), "needs 36"),
        (_bpdu_frame(b"\x42\x42\x03" + b"\x00\x00\x00"), "too short"),
        (_bpdu_frame(b"\x42\x42\x03" + b"\x00\x01" + CONFIG_BODY[2:]), "protocol id"),
        (_bpdu_frame(b"\x42\x42\x03" + b"\x00\x00\x00\x01" + CONFIG_BODY[4:]), "unknown BPDU type"),
        (_bpdu_frame(b"\x42\x42\x03" + b"\x00\x00\x00\x81"), "unknown BPDU type"),
        (_bpdu_frame(b"\x42\x42\x03" + b"\x00\x00\x01\x02" + RST_BODY[4:]), "protocol version 1"),
        (_bpdu_frame(b"\x42\x42\x03" + CONFIG_BODY, length=100), "exceeds"),
        (build_ethernet(STP_MULTICAST, SRC, 0x0800, b"\x42\x42\x03" + CONFIG_BODY), "Ethernet II"),
        (push_tag(build_bpdu(TcnBpdu(), src=SRC), 1), "tagged"),
        (build_bpdu(_linux_config_bpdu(), src=SRC)[:50], "exceeds"),
    ],
)
def test_malformed_bpdus_raise(frame, message):
    with pytest.raises(FrameError, match=message):
        parse_bpdu(frame)


def test_config_bpdu_keeps_any_version():
    body = CONFIG_BODY[:2] + b"\x02" + CONFIG_BODY[3:]
    assert parse_bpdu(_bpdu_frame(b"\x42\x42\x03" + body)) == _linux_config_bpdu(version=2)


@settings(max_examples=500)
@given(st.binary(max_size=80))
def test_fuzz_parse_bpdu_random_bytes(data):
    try:
        parse_bpdu(data)
    except FrameError:
        pass


@settings(max_examples=500)
@given(any_bpdu, st.lists(st.tuples(st.integers(0, 59), u8), max_size=6), st.integers(0, 60))
def test_fuzz_parse_bpdu_mutated_frames(bpdu, edits, cut):
    frame = bytearray(build_bpdu(bpdu, src=SRC))
    for position, value in edits:
        frame[position] = value
    try:
        parsed = parse_bpdu(bytes(frame[:cut]))
    except FrameError:
        return
    assert isinstance(parsed, ConfigBpdu | TcnBpdu | RstBpdu)


# --- pcap ------------------------------------------------------------------------------

records = st.lists(st.tuples(st.binary(max_size=300), st.integers(0, 2**31 * 1_000_000)), max_size=10)


@given(records)
def test_pcap_round_trip(recs):
    buf = io.BytesIO()
    with PcapWriter(buf) as writer:
        for frame, micros in recs:
            writer.write(frame, micros / 1_000_000)
    assert not buf.closed  # a caller's file object stays open
    buf.seek(0)
    reader = PcapReader(buf)
    assert (reader.byte_order, reader.nanosecond, reader.version, reader.snaplen, reader.linktype) == (
        "<", False, (2, 4), 262144, 1)
    got = list(reader)
    assert [frame for _, frame in got] == [frame for frame, _ in recs]
    assert [round(ts * 1_000_000) for ts, _ in got] == [micros for _, micros in recs]


def test_pcap_file_layout(tmp_path):
    path = tmp_path / "a.pcap"
    with PcapWriter(path) as writer:
        writer.write(b"\x01\x02\x03", 1.5)
        writer.write(b"\x04", 2.9999999)  # rounds up into the next second
    data = path.read_bytes()
    assert data[:24] == struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)
    assert data[24:40] == struct.pack("<IIII", 1, 500_000, 3, 3)
    assert data[43:59] == struct.pack("<IIII", 3, 0, 1, 1)
    with PcapReader(str(path)) as reader:
        assert list(reader) == [(1.5, b"\x01\x02\x03"), (3.0, b"\x04")]


def test_pcap_snaplen_cuts_frames():
    buf = io.BytesIO()
    writer = PcapWriter(buf, snaplen=16)
    writer.write(bytes(range(60)), 0.0)
    writer.close()
    assert buf.getvalue()[24:40] == struct.pack("<IIII", 0, 0, 16, 60)
    buf.seek(0)
    assert list(PcapReader(buf)) == [(0.0, bytes(range(16)))]


def test_pcap_writer_rejects():
    writer = PcapWriter(io.BytesIO())
    for bad in (-1.0, 2.0**32, float("nan")):
        with pytest.raises(ValueError):
            writer.write(b"", bad)
    writer.close()
    with pytest.raises(ValueError):
        writer.write(b"", 0.0)


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("nanosecond", [False, True])
def test_pcap_reader_byte_orders_and_resolutions(order, nanosecond):
    magic = 0xA1B23C4D if nanosecond else 0xA1B2C3D4
    fraction = 250_000_000 if nanosecond else 250_000
    data = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, 1)
    data += struct.pack(order + "IIII", 1_700_000_000, fraction, 4, 64) + b"abcd"
    reader = PcapReader(io.BytesIO(data))
    assert reader.byte_order == order and reader.nanosecond is nanosecond and reader.snaplen == 65535
    assert list(reader) == [(1_700_000_000.25, b"abcd")]


def _sample_pcap() -> bytes:
    buf = io.BytesIO()
    with PcapWriter(buf) as writer:
        writer.write(build_bpdu(TcnBpdu(), src=SRC), 10.0)
        writer.write(b"\xaa" * 20, 11.0)
    return buf.getvalue()


SAMPLE = _sample_pcap()
RECORD_ENDS = {24, 24 + 16 + 60, len(SAMPLE)}


@pytest.mark.parametrize("cut", [n for n in range(len(SAMPLE)) if n not in RECORD_ENDS])
def test_truncated_pcap_raises(cut):
    with pytest.raises(PcapError, match="truncated") as info:
        list(PcapReader(io.BytesIO(SAMPLE[:cut])))
    assert "\n" not in str(info.value)


def test_pcap_cut_at_record_boundary_is_a_shorter_file():
    assert len(list(PcapReader(io.BytesIO(SAMPLE[:24])))) == 0
    assert len(list(PcapReader(io.BytesIO(SAMPLE[:100])))) == 1


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x0a\x0d\x0d\x0a" + bytes(20), "magic"),  # pcapng
        (struct.pack("<IHHiIII", 0xA1B2C3D4, 1, 0, 0, 0, 65535, 1), "version"),
        (SAMPLE[:24] + struct.pack("<IIII", 0, 1_000_000, 0, 0), "microseconds"),
        (SAMPLE[:24] + struct.pack("<IIII", 0, 0, 2**31, 2**31), "captured length"),
    ],
)
def test_malformed_pcap_raises(data, message):
    with pytest.raises(PcapError, match=message) as info:
        list(PcapReader(io.BytesIO(data)))
    assert "\n" not in str(info.value)


def test_pcap_reader_closes_its_own_file_on_a_bad_header(tmp_path):
    path = tmp_path / "bad.pcap"
    path.write_bytes(b"nope")
    with pytest.raises(PcapError):
        PcapReader(path)
