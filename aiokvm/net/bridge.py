"""A sans-I/O model of the Linux bridge: FDB, flood controls, VLAN filtering, STP.

    br = Bridge("br0", mac="02:00:00:00:00:01")
    br.add_port("p1"); br.add_port("p2")
    out = br.receive("p1", frame, now)   # [(egress port, frame bytes), ...]
    out = br.tick(now)                   # ageing and STP timers

Nothing here does I/O or reads a clock: frames come in as bytes with a
timestamp, and frames to send come out as ``(port, bytes)``.  Behaviour
follows net/bridge (br_input.c, br_forward.c, br_fdb.c, br_vlan.c):

ingress, in order: length checks; drop a non-unicast or zero source MAC;
link-local 01:80:C2:00:00:0X (:00 to STP when it runs, else forwarded; :01
dropped; others forwarded only if set in ``group_fwd_mask``); port state
(learning or forwarding); VLAN ingress (with filtering: the tag's VID, or the
PVID for untagged, priority-tagged and other-TPID frames; no PVID or not a
member: drop); learn the source; a learning port stops there; forward
(broadcast to ``bcast_flood`` ports, multicast to ``mcast_flood`` ports,
known unicast to its port, unknown unicast to ``flood`` ports).  Egress: not
back to the ingress port unless hairpin, never isolated to isolated, only
forwarding ports that are members of the VID, tagged or untagged per port.

Threat model: every frame is hostile.  ``receive`` and ``tick`` never raise
on frame content: runts, giants over 9018 bytes, bad source MACs and
malformed BPDUs are dropped and counted per port and reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .frames import (
    BROADCAST,
    ETH_HLEN,
    ETH_P_8021AD,
    ETH_P_8021Q,
    LINK_LOCAL_PREFIX,
    bridge_id,
    format_bridge_id,
    is_multicast,
    mac_from_str,
    mac_to_str,
)
from .stp import PortState, Stp

MIN_FRAME = ETH_HLEN    # an Ethernet header
MAX_FRAME = 9018        # jumbo payload 9000 + header + one tag
ZERO_MAC = b"\0" * 6
DEFAULT_PATH_COST = 100  # the kernel's cost for a 10 Mb/s (or unknown speed) port


class BridgeError(ValueError):
    """A caller asked for something the bridge cannot do (unknown port, bad VID...)."""


@dataclass
class Port:
    """One bridge port and its flags (all changeable at run time)."""

    name: str
    port_no: int
    mac: bytes
    priority: int = 32
    path_cost: int = DEFAULT_PATH_COST
    learning: bool = True
    flood: bool = True
    mcast_flood: bool = True
    bcast_flood: bool = True
    hairpin: bool = False
    isolated: bool = False
    link_up: bool = True
    admin_up: bool = True
    #: VLAN membership: vid -> egress untagged?
    vlans: dict[int, bool] = field(default_factory=dict)
    pvid: int | None = None
    rx: int = 0
    tx: int = 0
    drops: Counter = field(default_factory=Counter)

    @property
    def up(self) -> bool:
        return self.link_up and self.admin_up


@dataclass
class FdbEntry:
    mac: bytes
    vid: int
    port: str | None          # None: the bridge itself (local / permanent)
    kind: str                 # "learned", "static", "permanent", "extern_learn"
    sticky: bool = False
    updated: float = 0.0

    @property
    def ages(self) -> bool:
        return self.kind == "learned"


@dataclass(frozen=True)
class FdbView:
    """One row of ``Bridge.fdb()``."""

    mac: str
    vid: int
    port: str | None
    kind: str
    sticky: bool
    age: float


_FORWARDING = PortState.FORWARDING  # one global lookup on the per-frame path
# How a received frame is tagged, for _egress.
_UNTAGGED, _OWN_TAG, _PRIORITY_TAG = 0, 1, 2


class Bridge:
    """One software bridge.  All times are seconds, injected by the caller."""

    def __init__(
        self,
        name: str,
        mac: str | bytes = "02:00:00:00:00:01",
        *,
        ageing_time: float = 300.0,
        stp: bool = False,
        vlan_filtering: bool = False,
        priority: int = 32768,
        hello_time: float = 2.0,
        max_age: float = 20.0,
        forward_delay: float = 15.0,
        vlan_protocol: int = ETH_P_8021Q,
        default_pvid: int = 1,
        group_fwd_mask: int = 0,
        fdb_max_learned: int = 0,
        accept_rst: bool = False,
        now: float = 0.0,
    ) -> None:
        self.name = name
        self.mac = mac_from_str(mac) if isinstance(mac, str) else bytes(mac)
        if len(self.mac) != 6 or is_multicast(self.mac):
            raise BridgeError(f"{name}: bridge MAC must be a unicast 6-byte address")
        if vlan_protocol not in (ETH_P_8021Q, ETH_P_8021AD):
            raise BridgeError("vlan_protocol must be 0x8100 (802.1Q) or 0x88a8 (802.1ad)")
        if not 0 <= default_pvid <= 4094:
            raise BridgeError("default_pvid must be 0 (none) to 4094")
        if group_fwd_mask & 0x7:
            raise BridgeError("group_fwd_mask cannot forward 01:80:C2:00:00:00-02 (as in Linux)")
        self.ageing_time = ageing_time
        self.vlan_filtering = vlan_filtering
        self.vlan_protocol = vlan_protocol
        self._tpid_bytes = vlan_protocol.to_bytes(2, "big")
        self.default_pvid = default_pvid
        self.group_fwd_mask = group_fwd_mask
        self.fdb_max_learned = fdb_max_learned
        self.ports: dict[str, Port] = {}
        self._fdb: dict[tuple[bytes, int], FdbEntry] = {}
        self._learned = 0
        self._next_port_no = 1
        # accept_rst=False is the kernel's behaviour: br_stp_rcv drops every
        # BPDU whose version is not 0, so RST BPDUs are ignored (counted).
        # True processes them as config BPDUs, as 802.1D-2004 asks of a
        # legacy bridge.
        self.stp = Stp(self.mac, priority=priority, hello_time=hello_time, max_age=max_age,
                       forward_delay=forward_delay, enabled=stp, accept_rst=accept_rst)
        self.stp_enabled = stp
        self.priority = priority
        self.forward_delay = forward_delay
        self.drops: Counter = Counter()   # bridge-wide: learning limit and the like
        # The bridge's own address: a permanent entry, delivered "to the host".
        self._fdb[(self.mac, 0)] = FdbEntry(self.mac, 0, None, "permanent", updated=now)
        #: addresses delivered to the host in every VLAN: the bridge's and its ports'
        self._local_macs: set[bytes] = {self.mac}

    # -- ports ---------------------------------------------------------------------------
    def add_port(
        self, name: str, *, path_cost: int | None = None, priority: int = 32, learning: bool = True,
        flood: bool = True, mcast_flood: bool = True, bcast_flood: bool = True, hairpin: bool = False,
        isolated: bool = False, mac: str | bytes | None = None, now: float = 0.0,
    ) -> Port:
        if name in self.ports:
            raise BridgeError(f"{self.name}: port {name} already exists")
        if not 0 <= priority <= 63:
            raise BridgeError("port priority must be 0-63")
        port_no = self._next_port_no
        self._next_port_no += 1
        if port_no > 1023:
            raise BridgeError("at most 1023 ports per bridge")
        if mac is None:
            port_mac = bytes([0x02, 0x00, 0x5E, (port_no >> 8) & 0xFF, port_no & 0xFF, 0x01])
        else:
            port_mac = mac_from_str(mac) if isinstance(mac, str) else bytes(mac)
        port = Port(name, port_no, port_mac, priority=priority,
                    path_cost=path_cost if path_cost is not None else DEFAULT_PATH_COST,
                    learning=learning, flood=flood, mcast_flood=mcast_flood, bcast_flood=bcast_flood,
                    hairpin=hairpin, isolated=isolated)
        if self.default_pvid:
            port.vlans[self.default_pvid] = True
            port.pvid = self.default_pvid
        # STP validates what it keeps (path cost); it goes first, so a refused
        # port leaves nothing behind here.
        self.stp.add_port(name, port_no, mac=port_mac, priority=priority, path_cost=port.path_cost, now=now)
        self.ports[name] = port
        # Like the kernel, each port's own address is a local (permanent) entry.
        self._fdb[(port_mac, 0)] = FdbEntry(port_mac, 0, name, "permanent", updated=now)
        self._local_macs.add(port_mac)
        return port

    def remove_port(self, name: str, now: float = 0.0) -> list[tuple[str, bytes]]:
        self._port(name)
        out = self.stp.remove_port(name, now)
        port = self.ports.pop(name)
        self._local_macs.discard(port.mac)
        self._flush(lambda e: e.port == name)
        return out

    def set_port(self, name: str, *, now: float = 0.0, **flags) -> list[tuple[str, bytes]]:
        """Change port flags at run time: learning, flood, mcast_flood, bcast_flood,
        hairpin, isolated, priority, path_cost."""
        port = self._port(name)
        out: list[tuple[str, bytes]] = []
        for key, value in flags.items():
            if key in ("learning", "flood", "mcast_flood", "bcast_flood", "hairpin", "isolated"):
                setattr(port, key, bool(value))
            elif key == "priority":
                if not 0 <= value <= 63:
                    raise BridgeError("port priority must be 0-63")
                out += self.stp.set_port_priority(name, value, now)
                port.priority = value
            elif key == "path_cost":
                out += self.stp.set_port_path_cost(name, value, now)  # raises on a bad cost: port unchanged
                port.path_cost = value
            else:
                raise BridgeError(f"unknown port flag {key!r}")
        return out

    def set_port_link(self, name: str, up: bool, now: float = 0.0) -> list[tuple[str, bytes]]:
        """Carrier change.  A port going down forgets what it learned."""
        port = self._port(name)
        port.link_up = up
        return self._port_updown(port, now)

    def set_port_admin(self, name: str, up: bool, now: float = 0.0) -> list[tuple[str, bytes]]:
        port = self._port(name)
        port.admin_up = up
        return self._port_updown(port, now)

    def _port_updown(self, port: Port, now: float) -> list[tuple[str, bytes]]:
        if not port.up:
            self._flush(lambda e: e.port == port.name and e.kind == "learned")
        return self.stp.set_port_enabled(port.name, port.up, now)

    def set_bridge_priority(self, priority: int, now: float = 0.0) -> list[tuple[str, bytes]]:
        self.priority = priority
        return self.stp.set_bridge_priority(priority, now)

    def _port(self, name: str) -> Port:
        try:
            return self.ports[name]
        except KeyError:
            raise BridgeError(f"{self.name}: no port named {name!r}") from None

    def port_state(self, name: str) -> PortState:
        return self._forwarding_state(self._port(name))

    # -- VLANs -------------------------------------------------------------------------------
    def vlan_add(self, port: str, vid: int, *, pvid: bool = False, untagged: bool = False) -> None:
        """Like ``bridge vlan add dev PORT vid VID [pvid] [untagged]``."""
        p = self._port(port)
        if not 1 <= vid <= 4094:
            raise BridgeError(f"VID {vid} is not in 1-4094")
        p.vlans[vid] = untagged
        if pvid:
            p.pvid = vid
        elif p.pvid == vid:
            p.pvid = None  # re-adding without pvid clears it, as iproute2 does

    def vlan_del(self, port: str, vid: int) -> None:
        p = self._port(port)
        p.vlans.pop(vid, None)
        if p.pvid == vid:
            p.pvid = None
        self._flush(lambda e: e.port == port and e.vid == vid and e.kind == "learned")

    # -- FDB -----------------------------------------------------------------------------------
    def fdb_add(self, mac: str | bytes, port: str | None, *, vid: int = 0, static: bool = True,
                sticky: bool = False, extern_learn: bool = False, permanent: bool = False, now: float = 0.0) -> None:
        """Like ``bridge fdb add MAC dev PORT [vlan VID] [static|permanent] [sticky] [extern_learn]``."""
        mac_b = mac_from_str(mac) if isinstance(mac, str) else bytes(mac)
        if port is not None:
            self._port(port)
        kind = "permanent" if permanent else "extern_learn" if extern_learn else "static" if static else "learned"
        old = self._fdb.get((mac_b, vid))
        if old is not None and old.kind == "learned":
            self._learned -= 1
        if kind == "learned":
            self._learned += 1
        self._fdb[(mac_b, vid)] = FdbEntry(mac_b, vid, port, kind, sticky, now)

    def fdb_del(self, mac: str | bytes, *, vid: int = 0) -> None:
        mac_b = mac_from_str(mac) if isinstance(mac, str) else bytes(mac)
        entry = self._fdb.pop((mac_b, vid), None)
        if entry is not None and entry.kind == "learned":
            self._learned -= 1

    def fdb(self, now: float = 0.0) -> list[FdbView]:
        return [FdbView(mac_to_str(e.mac), e.vid, e.port, e.kind, e.sticky, max(now - e.updated, 0.0))
                for e in sorted(self._fdb.values(), key=lambda e: (e.port or "", e.vid, e.mac))]

    def format_fdb(self, now: float = 0.0) -> str:
        """Render the FDB like ``bridge fdb show``."""
        lines = []
        for e in self.fdb(now):
            dev = e.port if e.port is not None else self.name
            parts = [e.mac, "dev", dev]
            if e.vid:
                parts += ["vlan", str(e.vid)]
            if e.kind == "extern_learn":
                parts.append("extern_learn")
            if e.sticky:
                parts.append("sticky")
            if e.port is not None:
                parts += ["master", self.name]
            if e.kind in ("permanent", "static"):
                parts.append(e.kind)
            lines.append(" ".join(parts))
        return "\n".join(lines) + ("\n" if lines else "")

    def _flush(self, predicate) -> None:
        for key in [k for k, e in self._fdb.items() if predicate(e)]:
            if self._fdb[key].kind == "learned":
                self._learned -= 1
            del self._fdb[key]

    def _hold_time(self) -> float:
        # During a topology change the kernel ages entries after twice the
        # operating (root's) forward delay (__br_set_topology_change).
        if self.stp_enabled and self.stp.topology_change:
            return 2 * self.stp.forward_delay
        return self.ageing_time

    def _learn(self, port: Port, mac: bytes, vid: int, now: float) -> None:
        key = (mac, vid)
        entry = self._fdb.get(key)
        if entry is None:
            if self.fdb_max_learned and self._learned >= self.fdb_max_learned:
                self.drops["fdb_max_learned"] += 1
                return
            self._fdb[key] = FdbEntry(mac, vid, port.name, "learned", updated=now)
            self._learned += 1
            return
        if entry.port != port.name:
            # As br_fdb_update: local entries and sticky ones stay; anything
            # else (static included) moves, and an extern_learn entry that
            # moves becomes an ordinary learned one.
            if entry.sticky or entry.kind == "permanent" or entry.port is None:
                port.drops["move_refused"] += 1  # the frame goes on; the entry stays
                return
            entry.port = port.name
            if entry.kind == "extern_learn":
                entry.kind = "learned"
                self._learned += 1
        entry.updated = now

    # -- the data path ---------------------------------------------------------------------------
    def _forwarding_state(self, port: Port) -> PortState:
        if not port.up:
            return PortState.DISABLED
        if not self.stp_enabled:
            return PortState.FORWARDING
        return self.stp.port_state(port.name)

    def receive(self, port_name: str, frame: bytes, now: float) -> list[tuple[str, bytes]]:
        # The hot path slices the header instead of building parsed objects:
        # this is the per-frame cost the bridge benchmark measures.
        port = self.ports.get(port_name)
        if port is None:
            raise BridgeError(f"{self.name}: no port named {port_name!r}")
        port.rx += 1
        if not (port.link_up and port.admin_up):  # Port.up, without the property call
            port.drops["link_down"] += 1
            return []
        stp_enabled = self.stp_enabled
        vlan_filtering = self.vlan_filtering
        size = len(frame)
        if size < MIN_FRAME:
            port.drops["runt"] += 1
            return []
        if size > MAX_FRAME:
            port.drops["giant"] += 1
            return []
        dst = frame[0:6]
        src = frame[6:12]
        if src[0] & 1 or src == ZERO_MAC:
            port.drops["bad_src"] += 1
            return []

        if dst[0] & 1 and dst[:5] == LINK_LOCAL_PREFIX and dst[5] & 0xF0 == 0:
            low = dst[5]
            if low == 0x01:
                port.drops["pause"] += 1
                return []
            consumed = (low == 0x00 and stp_enabled) or (low != 0x00 and not self.group_fwd_mask & (1 << low))
            if consumed:
                # Passed up locally, not forwarded; the kernel still learns
                # the source (__br_handle_local_finish).
                self._learn_local(port, frame, src, now)
                if low == 0x00:
                    return self._count_tx(self.stp.receive(port_name, frame, now))
                port.drops["link_local"] += 1
                return []
            # Otherwise forwarded: BPDUs with STP off, groups in group_fwd_mask.

        # port.up was checked above; without STP an up port forwards.
        state = _FORWARDING
        if stp_enabled:
            state = self.stp.port_state(port_name)
            if state is not _FORWARDING and state is not PortState.LEARNING:
                port.drops["port_state"] += 1
                return []

        vid = 0
        pcp = 0
        tag = _UNTAGGED
        if vlan_filtering:
            tagged = frame[12:14] == self._tpid_bytes
            if tagged:
                if size < 18:
                    port.drops["runt"] += 1
                    return []
                tci = frame[14] << 8 | frame[15]
                vid, pcp = tci & 0x0FFF, tci >> 12  # PCP and DEI travel on
                tag = _OWN_TAG if vid else _PRIORITY_TAG
            if not vid:  # untagged, other TPID, or priority-tagged (VID 0)
                if port.pvid is None:
                    port.drops["no_pvid"] += 1
                    return []
                vid = port.pvid
            if vid not in port.vlans:
                port.drops["vlan_ingress"] += 1
                return []

        if port.learning:
            seen = self._fdb.get((src, vid))
            if seen is not None and seen.port == port_name and seen.kind == "learned":
                seen.updated = now  # the common case: a known host talking again
            else:
                self._learn(port, src, vid, now)
        if state is not _FORWARDING:  # LEARNING: learn, never forward
            port.drops["learning_state"] += 1
            return []

        if dst[0] & 1:
            if dst == BROADCAST:
                targets = [p for p in self.ports.values() if p.bcast_flood]
            else:
                targets = [p for p in self.ports.values() if p.mcast_flood]
        else:
            entry = self._fdb.get((dst, vid))
            if dst in self._local_macs or (entry is not None and entry.kind == "permanent"):
                port.drops["to_host"] += 1  # a local address: delivered to the host, not forwarded
                return []
            if entry is not None and (entry.kind != "learned" or now - entry.updated < (
                    self._hold_time() if stp_enabled else self.ageing_time)):
                target = self.ports.get(entry.port)
                if (target is not None and target is not port and not vlan_filtering
                        and target.link_up and target.admin_up and not (port.isolated and target.isolated)
                        and (not stp_enabled or self.stp.port_state(target.name) is _FORWARDING)):
                    target.tx += 1  # known unicast, no VLANs: the fast path
                    return [(target.name, frame)]
                targets = [target] if target is not None else []
            else:
                targets = [p for p in self.ports.values() if p.flood]
        return self._egress(port, targets, frame, vid, pcp, tag)

    def _learn_local(self, port: Port, frame: bytes, src: bytes, now: float) -> None:
        if not port.learning:
            return
        state = self.stp.port_state(port.name) if self.stp_enabled else PortState.FORWARDING
        if state is not PortState.FORWARDING and state is not PortState.LEARNING:
            return
        vid = 0
        if self.vlan_filtering:
            vid = (frame[14] << 8 | frame[15]) & 0x0FFF if frame[12:14] == self._tpid_bytes and len(frame) >= 18 else 0
            vid = vid or (port.pvid or 0)
            if vid not in port.vlans:
                return
        self._learn(port, src, vid, now)

    def _egress(self, ingress: Port, targets: list[Port], frame: bytes, vid: int, pcp: int,
                tag: int = 0) -> list[tuple[str, bytes]]:
        """``frame`` as received; ``tag`` says whether it carries an 802.1Q tag
        (_OWN_TAG: exactly the one a tagged egress would write; _PRIORITY_TAG:
        VID 0, to be replaced).  Tags are stripped or built only for the ports
        that need it."""
        # Once per flooded frame per port: no property or method calls on the way.
        out: list[tuple[str, bytes]] = []
        inner = frame if tag == _UNTAGGED else None  # the frame without its tag
        filtering = self.vlan_filtering
        port_state = self.stp.port_state if self.stp_enabled else None
        isolated = ingress.isolated
        for p in targets:
            if p is ingress and not p.hairpin:
                continue
            if isolated and p.isolated:
                continue
            if not (p.link_up and p.admin_up):
                continue
            if port_state is not None and port_state(p.name) is not _FORWARDING:
                continue
            data = frame
            if filtering:
                untagged = p.vlans.get(vid)
                if untagged is None:
                    continue  # not a member of this VLAN
                if untagged or tag != _OWN_TAG:
                    if inner is None:
                        inner = frame[:12] + frame[16:]
                    data = inner
                    if not untagged:
                        data = inner[:12] + self._tpid_bytes + ((pcp << 12) | vid).to_bytes(2, "big") + inner[12:]
            p.tx += 1
            out.append((p.name, data))
        return out

    def _count_tx(self, out: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        for name, _ in out:
            port = self.ports.get(name)
            if port is not None:
                port.tx += 1
        return out

    # -- timers ---------------------------------------------------------------------------------------
    def tick(self, now: float) -> list[tuple[str, bytes]]:
        """Age the FDB and run the STP timers that expired by ``now``."""
        hold = self._hold_time()
        self._flush(lambda e: e.ages and now - e.updated >= hold)
        if not self.stp_enabled:
            return []
        return self._count_tx(self.stp.tick(now))

    # -- introspection ---------------------------------------------------------------------------------
    def stp_state(self) -> dict:
        if self.stp_enabled:
            return self.stp.state()
        own = format_bridge_id(bridge_id(self.priority, self.mac))
        return {
            "bridge_id": own, "root_id": own, "root_port": None, "root_path_cost": 0, "topology_change": False,
            "ports": {name: {"role": "designated" if p.up else "disabled",
                             "state": self.port_state(name).value, "designated_bridge": own,
                             "designated_port": p.priority << 10 | p.port_no, "port_id": p.priority << 10 | p.port_no,
                             "path_cost": p.path_cost}
                      for name, p in self.ports.items()},
        }

    def counters(self) -> dict:
        return {
            "bridge": dict(self.drops),
            "ports": {name: {"rx": p.rx, "tx": p.tx, "drops": dict(p.drops)} for name, p in self.ports.items()},
        }


