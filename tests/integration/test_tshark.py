"""Wireshark's dissectors as the judge of our frame and pcap encoders.

A pcap written by :class:`PcapWriter` with configuration, TCN and RST BPDUs,
802.1Q frames (VIDs 10 and 4094) and an 802.1ad + 802.1Q frame is read back
with ``tshark``; every field that tshark decodes must match what we built,
and nothing may be flagged malformed.  A deliberately broken BPDU checks that
the "malformed" detection itself works.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from aiokvm.net.frames import (
    ConfigBpdu,
    PortRole,
    RstBpdu,
    TcnBpdu,
    VlanTag,
    bridge_id,
    build_bpdu,
    build_ethernet,
    mac_from_str,
    rst_flags,
)
from aiokvm.net.pcap import PcapWriter

TSHARK = shutil.which("tshark")
pytestmark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed (.ci/run installs it)")

PORT_MAC = mac_from_str("02:00:00:00:00:01")
HOST_MAC = mac_from_str("02:00:00:00:00:02")
ROOT_A = mac_from_str("02:00:00:00:00:aa")
ROOT_B = mac_from_str("02:00:00:00:00:bb")
T0 = 1_700_000_000

# An IPv4 header (protocol 253, "for experimentation") with a correct checksum, padded to a minimum payload.
IPV4 = bytes.fromhex("4500 0014 0000 0000 40fd f5e9 c0000201 c0000202").ljust(46, b"\x00")

CONFIG = ConfigBpdu(0x81, bridge_id(0x1000, ROOT_A), 19, bridge_id(0x8000, PORT_MAC), 0x8001, 1.5, 20.0, 2.0, 15.0)
RST = RstBpdu(rst_flags(PortRole.DESIGNATED, proposal=True, learning=True), bridge_id(0x2000, ROOT_B), 4,
              bridge_id(0x8000, PORT_MAC), 0x8002, 0.0, 6.0, 1.0, 4.0)

FIELDS = [
    "frame.time_epoch", "frame.len", "frame.protocols", "eth.src", "eth.dst", "eth.len",
    "stp.protocol", "stp.version", "stp.type", "stp.flags", "stp.root.prio", "stp.root.hw", "stp.root.cost",
    "stp.bridge.prio", "stp.bridge.hw", "stp.port", "stp.msg_age", "stp.max_age", "stp.hello", "stp.forward",
    "stp.flags.port_role", "stp.flags.proposal", "stp.version_1_length",
    "ieee8021ad.id", "vlan.id", "vlan.priority", "vlan.etype", "ip.src",
    "_ws.expert.message", "_ws.malformed",
]


def _tshark(path: Path, *args: str) -> str:
    # As root tshark warns on stderr; that and nothing else goes there, and is ignored.
    proc = subprocess.run([TSHARK, "-n", "-r", str(path), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _fields(path: Path) -> list[dict[str, str]]:
    args = ["-T", "fields", "-E", "separator=/t", "-E", "occurrence=a", "-E", "aggregator=,"]
    for name in FIELDS:
        args += ["-e", name]
    rows = []
    for line in _tshark(path, *args).splitlines():
        values = line.split("\t")
        assert len(values) == len(FIELDS), line
        rows.append(dict(zip(FIELDS, values, strict=True)))
    return rows


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tshark") / "frames.pcap"
    with PcapWriter(path) as writer:
        writer.write(build_bpdu(CONFIG, src=PORT_MAC), T0 + 0.125)
        writer.write(build_bpdu(TcnBpdu(), src=PORT_MAC), T0 + 1.000001)
        writer.write(build_bpdu(RST, src=PORT_MAC), T0 + 2.5)
        writer.write(build_ethernet(HOST_MAC, PORT_MAC, 0x0800, IPV4, tags=(VlanTag(0x8100, 0, 0, 10),)), T0 + 3)
        writer.write(build_ethernet(HOST_MAC, PORT_MAC, 0x0800, IPV4, tags=(VlanTag(0x8100, 5, 0, 4094),)), T0 + 4)
        double = (VlanTag(0x88A8, 0, 0, 100), VlanTag(0x8100, 0, 0, 200))
        writer.write(build_ethernet(HOST_MAC, PORT_MAC, 0x0800, IPV4, tags=double), T0 + 5)
    return path


@pytest.fixture(scope="module")
def rows(capture) -> list[dict[str, str]]:
    rows = _fields(capture)
    assert len(rows) == 6
    return rows


def test_nothing_is_malformed(capture, rows):
    verbose = _tshark(capture, "-V")
    assert "Malformed" not in verbose
    assert "Expert Info" not in verbose
    for row in rows:
        assert row["_ws.malformed"] == "" and row["_ws.expert.message"] == "", row


def test_timestamps_and_lengths(rows):
    assert [row["frame.time_epoch"] for row in rows] == [
        "1700000000.125000000", "1700000001.000001000", "1700000002.500000000", "1700000003.000000000",
        "1700000004.000000000", "1700000005.000000000"]
    assert [row["frame.len"] for row in rows] == ["60", "60", "60", "64", "64", "68"]


def test_bpdus_are_stp_from_the_port_mac(rows):
    for row in rows[:3]:
        assert row["frame.protocols"] == "eth:llc:stp"
        assert row["eth.src"] == "02:00:00:00:00:01"
        assert row["eth.dst"] == "01:80:c2:00:00:00"
        assert row["stp.protocol"] == "0x0000"
    assert [row["eth.len"] for row in rows[:3]] == ["38", "7", "39"]
    assert [row["stp.type"] for row in rows[:3]] == ["0x00", "0x80", "0x02"]
    assert [row["stp.version"] for row in rows[:3]] == ["0", "0", "2"]


def test_config_bpdu_fields(rows):
    row = rows[0]
    assert row["stp.flags"] == "0x81"
    assert (row["stp.root.prio"], row["stp.root.hw"]) == ("4096", "02:00:00:00:00:aa")
    assert row["stp.root.cost"] == "19"
    assert (row["stp.bridge.prio"], row["stp.bridge.hw"]) == ("32768", "02:00:00:00:00:01")
    assert row["stp.port"] == "0x8001"
    times = [float(row[name]) for name in ("stp.msg_age", "stp.max_age", "stp.hello", "stp.forward")]
    assert times == [1.5, 20.0, 2.0, 15.0]


def test_tcn_bpdu_has_no_vector(rows):
    assert rows[1]["stp.root.hw"] == rows[1]["stp.flags"] == ""


def test_rst_bpdu_fields(rows):
    row = rows[2]
    assert row["stp.flags"] == "0x1e"
    assert row["stp.flags.port_role"] == str(int(PortRole.DESIGNATED))
    assert row["stp.flags.proposal"] in ("1", "True")
    assert (row["stp.root.prio"], row["stp.root.hw"]) == ("8192", "02:00:00:00:00:bb")
    assert row["stp.root.cost"] == "4"
    assert row["stp.port"] == "0x8002"
    times = [float(row[name]) for name in ("stp.msg_age", "stp.max_age", "stp.hello", "stp.forward")]
    assert times == [0.0, 6.0, 1.0, 4.0]
    assert row["stp.version_1_length"] == "0"


def test_vlan_frames(rows):
    single_10, single_4094, double = rows[3:]
    for row in (single_10, single_4094):
        assert row["frame.protocols"] == "eth:ethertype:vlan:ethertype:ip"
        assert row["ieee8021ad.id"] == ""
        assert row["vlan.etype"] == "0x0800"
        assert row["ip.src"] == "192.0.2.1"
    assert (single_10["vlan.id"], single_10["vlan.priority"]) == ("10", "0")
    assert (single_4094["vlan.id"], single_4094["vlan.priority"]) == ("4094", "5")
    assert double["frame.protocols"] == "eth:ethertype:ieee8021ad:ethertype:vlan:ethertype:ip"
    assert double["ieee8021ad.id"] == "100"
    assert double["vlan.id"] == "200"
    assert double["ip.src"] == "192.0.2.1"


def test_a_broken_bpdu_is_reported_malformed(tmp_path):
    """The control: the checks above would notice a bad encoding."""
    frame = build_bpdu(CONFIG, src=PORT_MAC)
    cut = frame[:12] + (3 + 20).to_bytes(2, "big") + frame[14:]  # the 802.3 length ends inside the root id
    path = tmp_path / "broken.pcap"
    with PcapWriter(path) as writer:
        writer.write(cut, T0)
    assert "Malformed" in _tshark(path, "-V")
    (row,) = _fields(path)
    assert row["_ws.malformed"] != ""
