"""Ethernet frames, VLAN tags and spanning-tree BPDUs as bytes, without I/O.

Layouts (all multi-byte fields big-endian):

* Ethernet: destination MAC (6), source MAC (6), then a 16-bit field.  As in
  Linux's ``eth_type_trans``, a value of 0x0600 or more is an EtherType
  (Ethernet II) and anything smaller is an IEEE 802.3 length, followed by an
  LLC header (DSAP, SSAP, control).
* VLAN tags sit between the source MAC and that field: TPID (0x8100 for
  802.1Q, 0x88a8 for an 802.1ad service tag) then TCI = PCP(3) DEI(1) VID(12).
  ``parse_ethernet`` walks at most two stacked tags (S-tag outside, C-tag
  inside); a third one is left as the frame's EtherType.
* BPDUs (IEEE 802.1D / 802.1w) are 802.3 frames with LLC 42 42 03, usually
  sent to 01:80:C2:00:00:00 from the port's own MAC.  Body: protocol id u16
  (0), version u8 (0 STP, 2 RSTP), type u8 (0x00 configuration, 0x80
  topology change notification, 0x02 rapid spanning tree).  Configuration and
  RST BPDUs go on with flags u8, root id (8), root path cost u32, bridge id
  (8), port id u16 and four times in 1/256 s (message age, max age, hello
  time, forward delay); RST BPDUs end with version-1 length u8 (0).  Body
  sizes: 35, 4 and 36 bytes.  Built frames are zero-padded to the 60-byte
  Ethernet minimum (the FCS is not included).

Bridge ids are 64-bit integers: a 16-bit priority above the 48-bit MAC, so
that numeric order is spanning-tree order (lower wins).

Every parser raises :class:`FrameError` (a ``ValueError``) on malformed
input and nothing else, whatever the bytes; builders raise ``ValueError``
for out-of-range arguments.
"""

from __future__ import annotations

import math
import string
import struct
from dataclasses import dataclass
from enum import IntEnum

MAC = bytes

ETH_ALEN = 6
ETH_HLEN = 14
ETH_ZLEN = 60  # minimum frame length without the FCS
ETH_P_802_3_MIN = 0x0600
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
VLAN_TPIDS = frozenset({ETH_P_8021Q, ETH_P_8021AD})
VLAN_HLEN = 4
MAX_TAGS = 2

BROADCAST = b"\xff" * 6
STP_MULTICAST = bytes.fromhex("0180c2000000")
LINK_LOCAL_PREFIX = bytes.fromhex("0180c20000")

LLC_SAP_BSPAN = 0x42
LLC_UI = 0x03
STP_LLC = bytes((LLC_SAP_BSPAN, LLC_SAP_BSPAN, LLC_UI))

BPDU_TYPE_CONFIG = 0x00
BPDU_TYPE_RST = 0x02
BPDU_TYPE_TCN = 0x80

CONFIG_BPDU_LEN = 35
TCN_BPDU_LEN = 4
RST_BPDU_LEN = 36

# Flag bits of configuration and RST BPDUs.
FLAG_TC = 0x01
FLAG_PROPOSAL = 0x02
FLAG_ROLE_SHIFT = 2
FLAG_ROLE_MASK = 0x0C
FLAG_LEARNING = 0x10
FLAG_FORWARDING = 0x20
FLAG_AGREEMENT = 0x40
FLAG_TCA = 0x80

_STP_TICKS = 256  # BPDU times count 1/256 s
_MAX_U16 = 0xFFFF
_MAX_U32 = 0xFFFF_FFFF
_MAX_U64 = 0xFFFF_FFFF_FFFF_FFFF

# The 32 bytes shared by configuration and RST BPDUs after the type byte:
# flags, root id, root path cost, bridge id, port id, four times.
_PRIORITY_VECTOR = struct.Struct(">BQIQHHHHH")


_HEX_DIGITS = frozenset(string.hexdigits)


class FrameError(ValueError):
    """Malformed frame bytes; the message says what is wrong."""


# --- MAC addresses ----------------------------------------------------------


def mac_from_str(s: str) -> bytes:
    """``"02:00:00:00:00:01"`` (or with ``-`` separators, any case) to 6 bytes."""
    parts = s.replace("-", ":").split(":")
    if len(parts) != ETH_ALEN or any(len(p) != 2 or not set(p) <= _HEX_DIGITS for p in parts):
        raise ValueError(f"not a MAC address: {s!r}")
    return bytes(int(p, 16) for p in parts)


def mac_to_str(b: bytes) -> str:
    """6 bytes to lower-case ``"02:00:00:00:00:01"``."""
    if len(b) != ETH_ALEN:
        raise ValueError(f"a MAC address is 6 bytes, got {len(b)}")
    return ":".join(f"{octet:02x}" for octet in b)


def is_multicast(mac: bytes) -> bool:
    """Group address (I/G bit set); broadcast is multicast too."""
    return bool(mac[0] & 0x01)


def is_broadcast(mac: bytes) -> bool:
    return bytes(mac) == BROADCAST


def is_link_local(mac: bytes) -> bool:
    """One of the 16 reserved 802.1D addresses 01:80:C2:00:00:00 .. 0F."""
    return bytes(mac[:5]) == LINK_LOCAL_PREFIX and len(mac) == ETH_ALEN and mac[5] & 0xF0 == 0


def _check_mac(name: str, mac: bytes) -> bytes:
    mac = bytes(mac)
    if len(mac) != ETH_ALEN:
        raise ValueError(f"{name} MAC must be 6 bytes, got {len(mac)}")
    return mac


# --- Ethernet and VLAN tags --------------------------------------------------


@dataclass(frozen=True)
class VlanTag:
    """One 802.1Q / 802.1ad tag: TPID and the three parts of the TCI."""

    tpid: int
    pcp: int
    dei: int
    vid: int

    def __post_init__(self) -> None:
        if not 0 <= self.tpid <= _MAX_U16:
            raise ValueError(f"TPID {self.tpid:#x} is not 16-bit")
        if not 0 <= self.pcp <= 7:
            raise ValueError(f"PCP {self.pcp} is not 0..7")
        if self.dei not in (0, 1):
            raise ValueError(f"DEI {self.dei} is not 0 or 1")
        if not 0 <= self.vid <= 0xFFF:
            raise ValueError(f"VID {self.vid} is not 0..4095")

    @property
    def tci(self) -> int:
        return self.pcp << 13 | self.dei << 12 | self.vid

    @classmethod
    def from_tci(cls, tpid: int, tci: int) -> VlanTag:
        return cls(tpid, tci >> 13, (tci >> 12) & 1, tci & 0xFFF)

    def to_bytes(self) -> bytes:
        return struct.pack(">HH", self.tpid, self.tci)


@dataclass(frozen=True)
class EthernetHeader:
    """A parsed header.  ``ethertype`` is None for 802.3 frames, which carry
    ``length`` instead; ``tags`` lists outermost first; the payload starts at
    ``header_len``."""

    dst: bytes
    src: bytes
    ethertype: int | None
    length: int | None
    tags: tuple[VlanTag, ...]
    header_len: int


def parse_ethernet(frame: bytes) -> EthernetHeader:
    """Parse the MACs, up to two VLAN tags and the EtherType / 802.3 length."""
    if len(frame) < ETH_HLEN:
        raise FrameError(f"runt frame: {len(frame)} bytes, an Ethernet header needs {ETH_HLEN}")
    offset = 2 * ETH_ALEN
    tags: list[VlanTag] = []
    (type_or_len,) = struct.unpack_from(">H", frame, offset)
    while type_or_len in VLAN_TPIDS and len(tags) < MAX_TAGS:
        if len(frame) < offset + VLAN_HLEN + 2:
            raise FrameError(f"VLAN tag cut short: {len(frame)} bytes, the tag needs {offset + VLAN_HLEN + 2}")
        tpid, tci, type_or_len = struct.unpack_from(">HHH", frame, offset)
        tags.append(VlanTag.from_tci(tpid, tci))
        offset += VLAN_HLEN
    header_len = offset + 2
    if type_or_len >= ETH_P_802_3_MIN:
        ethertype, length = type_or_len, None
    else:
        ethertype, length = None, type_or_len
    return EthernetHeader(bytes(frame[0:6]), bytes(frame[6:12]), ethertype, length, tuple(tags), header_len)


def build_ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes, *, tags: tuple[VlanTag, ...] = ()) -> bytes:
    """Header (with ``tags``, outermost first) plus payload; no padding.

    ``ethertype`` below 0x0600 is written as is, making an 802.3 frame whose
    length field the caller chose."""
    dst = _check_mac("destination", dst)
    src = _check_mac("source", src)
    if not 0 <= ethertype <= _MAX_U16:
        raise ValueError(f"EtherType {ethertype:#x} is not 16-bit")
    return b"".join((dst, src, *(tag.to_bytes() for tag in tags), ethertype.to_bytes(2, "big"), bytes(payload)))


def _outer_tpid(frame: bytes) -> int:
    if len(frame) < ETH_HLEN:
        raise FrameError(f"runt frame: {len(frame)} bytes, an Ethernet header needs {ETH_HLEN}")
    return int.from_bytes(frame[12:14], "big")


def _tagged_outer(frame: bytes) -> VlanTag:
    tpid = _outer_tpid(frame)
    if tpid not in VLAN_TPIDS:
        raise FrameError(f"frame is not VLAN-tagged (type {tpid:#06x})")
    if len(frame) < ETH_HLEN + VLAN_HLEN:
        raise FrameError(f"VLAN tag cut short: {len(frame)} bytes, the tag needs {ETH_HLEN + VLAN_HLEN}")
    return VlanTag.from_tci(tpid, int.from_bytes(frame[14:16], "big"))


def outer_tag(frame: bytes) -> VlanTag | None:
    """The outermost tag if its TPID is 0x8100 or 0x88a8, else None."""
    if _outer_tpid(frame) not in VLAN_TPIDS:
        return None
    return _tagged_outer(frame)


def push_tag(frame: bytes, vid: int, *, tpid: int = ETH_P_8021Q, pcp: int = 0, dei: int = 0) -> bytes:
    """Insert a new outermost tag after the source MAC."""
    _outer_tpid(frame)
    tag = VlanTag(tpid, pcp, dei, vid)
    return bytes(frame[:12]) + tag.to_bytes() + bytes(frame[12:])


def pop_tag(frame: bytes) -> tuple[VlanTag, bytes]:
    """Remove the outermost tag; FrameError if the frame is untagged."""
    tag = _tagged_outer(frame)
    return tag, bytes(frame[:12]) + bytes(frame[16:])


def rewrite_tag(frame: bytes, vid: int, *, tpid: int | None = None, pcp: int | None = None) -> bytes:
    """Change the outermost tag's VID (and optionally TPID, PCP); DEI is kept."""
    old = _tagged_outer(frame)
    new = VlanTag(old.tpid if tpid is None else tpid, old.pcp if pcp is None else pcp, old.dei, vid)
    return bytes(frame[:12]) + new.to_bytes() + bytes(frame[16:])


# --- bridge ids --------------------------------------------------------------


def bridge_id(priority: int, mac: bytes) -> int:
    """The 64-bit id: 16-bit priority, then the MAC."""
    if not 0 <= priority <= _MAX_U16:
        raise ValueError(f"bridge priority {priority} is not 0..65535")
    return priority << 48 | int.from_bytes(_check_mac("bridge", mac), "big")


def split_bridge_id(bid: int) -> tuple[int, bytes]:
    """``(priority, mac)`` of a 64-bit bridge id."""
    if not 0 <= bid <= _MAX_U64:
        raise ValueError(f"bridge id {bid:#x} is not 64-bit")
    return bid >> 48, (bid & 0xFFFF_FFFF_FFFF).to_bytes(6, "big")


def format_bridge_id(bid: int) -> str:
    """As the kernel shows it in sysfs: ``8000.020000000001``."""
    priority, mac = split_bridge_id(bid)
    return f"{priority:04x}.{mac.hex()}"


# --- BPDUs -------------------------------------------------------------------


class PortRole(IntEnum):
    """The 2-bit port role in RST BPDU flags."""

    UNKNOWN = 0  # "master" in MSTP
    ALTERNATE_BACKUP = 1
    ROOT = 2
    DESIGNATED = 3


class _TcFlags:
    flags: int

    @property
    def topology_change(self) -> bool:
        return bool(self.flags & FLAG_TC)

    @property
    def topology_change_ack(self) -> bool:
        return bool(self.flags & FLAG_TCA)


@dataclass(frozen=True)
class ConfigBpdu(_TcFlags):
    """Configuration BPDU.  Ids are 64-bit ints, times in seconds.

    ``version`` is the protocol version byte as received (the kernel's STP
    ignores BPDUs whose version is not 0)."""

    flags: int
    root_id: int
    root_path_cost: int
    bridge_id: int
    port_id: int
    message_age: float
    max_age: float
    hello_time: float
    forward_delay: float
    version: int = 0


@dataclass(frozen=True)
class TcnBpdu:
    """Topology change notification BPDU: no fields besides the version."""

    version: int = 0


@dataclass(frozen=True)
class RstBpdu(_TcFlags):
    """Rapid spanning tree BPDU: the configuration fields with more flag bits."""

    flags: int
    root_id: int
    root_path_cost: int
    bridge_id: int
    port_id: int
    message_age: float
    max_age: float
    hello_time: float
    forward_delay: float
    version: int = 2

    @property
    def proposal(self) -> bool:
        return bool(self.flags & FLAG_PROPOSAL)

    @property
    def port_role(self) -> PortRole:
        return PortRole((self.flags & FLAG_ROLE_MASK) >> FLAG_ROLE_SHIFT)

    @property
    def learning(self) -> bool:
        return bool(self.flags & FLAG_LEARNING)

    @property
    def forwarding(self) -> bool:
        return bool(self.flags & FLAG_FORWARDING)

    @property
    def agreement(self) -> bool:
        return bool(self.flags & FLAG_AGREEMENT)


Bpdu = ConfigBpdu | TcnBpdu | RstBpdu


def rst_flags(
    role: PortRole | int,
    *,
    tc: bool = False,
    proposal: bool = False,
    learning: bool = False,
    forwarding: bool = False,
    agreement: bool = False,
    tca: bool = False,
) -> int:
    """Compose the flags byte of an RST BPDU."""
    if not 0 <= role <= 3:
        raise ValueError(f"port role {role} is not 0..3")
    bits = ((tc, FLAG_TC), (proposal, FLAG_PROPOSAL), (learning, FLAG_LEARNING), (forwarding, FLAG_FORWARDING),
            (agreement, FLAG_AGREEMENT), (tca, FLAG_TCA))
    return int(role) << FLAG_ROLE_SHIFT | sum(bit for on, bit in bits if on)


def _to_ticks(name: str, seconds: float) -> int:
    ticks = int(seconds * _STP_TICKS + 0.5) if math.isfinite(seconds) and seconds >= 0 else -1
    if not 0 <= ticks <= _MAX_U16:
        raise ValueError(f"{name} {seconds} s does not fit a BPDU time (0 .. {_MAX_U16 / _STP_TICKS} s)")
    return ticks


def _check_range(name: str, value: int, top: int) -> None:
    if not 0 <= value <= top:
        raise ValueError(f"{name} {value} is out of range 0..{top:#x}")


def _encode_body(bpdu: Bpdu) -> bytes:
    _check_range("protocol version", bpdu.version, 0xFF)
    if isinstance(bpdu, TcnBpdu):
        return struct.pack(">HBB", 0, bpdu.version, BPDU_TYPE_TCN)
    if isinstance(bpdu, RstBpdu):
        kind, tail = BPDU_TYPE_RST, b"\x00"  # version 1 length
    elif isinstance(bpdu, ConfigBpdu):
        kind, tail = BPDU_TYPE_CONFIG, b""
    else:
        raise TypeError(f"not a BPDU: {bpdu!r}")
    _check_range("flags", bpdu.flags, 0xFF)
    _check_range("root id", bpdu.root_id, _MAX_U64)
    _check_range("root path cost", bpdu.root_path_cost, _MAX_U32)
    _check_range("bridge id", bpdu.bridge_id, _MAX_U64)
    _check_range("port id", bpdu.port_id, _MAX_U16)
    vector = _PRIORITY_VECTOR.pack(
        bpdu.flags, bpdu.root_id, bpdu.root_path_cost, bpdu.bridge_id, bpdu.port_id,
        _to_ticks("message age", bpdu.message_age), _to_ticks("max age", bpdu.max_age),
        _to_ticks("hello time", bpdu.hello_time), _to_ticks("forward delay", bpdu.forward_delay),
    )
    return struct.pack(">HBB", 0, bpdu.version, kind) + vector + tail


def build_bpdu(bpdu: Bpdu, *, src: bytes, dst: bytes = STP_MULTICAST) -> bytes:
    """A whole frame: STP group address, ``src`` (the port's MAC), 802.3 length,
    LLC 42 42 03, the BPDU, zero padding to 60 bytes."""
    llc_pdu = STP_LLC + _encode_body(bpdu)
    frame = build_ethernet(dst, src, len(llc_pdu), llc_pdu)
    return frame.ljust(ETH_ZLEN, b"\x00")


def parse_bpdu(frame: bytes) -> Bpdu:
    """Decode the BPDU in a whole (untagged) Ethernet frame.

    Validation follows IEEE 802.1D-2004 9.3.4: protocol id 0; a configuration
    BPDU needs 35 bytes, a TCN 4, an RST BPDU 36 and protocol version 2 or
    more (later versions, e.g. MSTP's 3, are read as RST).  Bytes beyond that
    are ignored.  The destination MAC is not checked (the kernel's group
    address is configurable); the caller decides."""
    eth = parse_ethernet(frame)
    if eth.tags:
        raise FrameError("not a BPDU: the frame is VLAN-tagged")
    if eth.length is None:
        raise FrameError(f"not a BPDU: Ethernet II frame (type {eth.ethertype:#06x}), BPDUs use an 802.3 length")
    start = eth.header_len
    available = len(frame) - start
    if eth.length > available:
        raise FrameError(f"802.3 length {eth.length} exceeds the {available} bytes after the header")
    if eth.length < len(STP_LLC) + TCN_BPDU_LEN:
        raise FrameError(f"802.3 length {eth.length} is too short for LLC and a BPDU")
    llc = bytes(frame[start:start + 3])
    if llc != STP_LLC:
        raise FrameError(f"not a BPDU: LLC {llc.hex(' ')}, expected 42 42 03")
    body = bytes(frame[start + 3:start + eth.length])
    protocol, version, kind = struct.unpack_from(">HBB", body)
    if protocol != 0:
        raise FrameError(f"BPDU protocol id {protocol:#06x}, expected 0")
    if kind == BPDU_TYPE_TCN:
        return TcnBpdu(version)
    if kind == BPDU_TYPE_CONFIG:
        cls, need = ConfigBpdu, CONFIG_BPDU_LEN
    elif kind == BPDU_TYPE_RST:
        if version < 2:
            raise FrameError(f"RST BPDU with protocol version {version}, needs 2 or more")
        cls, need = RstBpdu, RST_BPDU_LEN
    else:
        raise FrameError(f"unknown BPDU type {kind:#04x}")
    if len(body) < need:
        raise FrameError(f"{cls.__name__} needs {need} bytes, got {len(body)}")
    flags, root, cost, bridge, port, age, max_age, hello, delay = _PRIORITY_VECTOR.unpack_from(body, 4)
    return cls(flags, root, cost, bridge, port, age / _STP_TICKS, max_age / _STP_TICKS, hello / _STP_TICKS,
               delay / _STP_TICKS, version)
