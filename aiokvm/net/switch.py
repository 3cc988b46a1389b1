"""``Switch``: the asyncio host of a ``Bridge``.

The bridge (``bridge.py``) decides where a frame goes and never does I/O;
the switch gives it a clock and ports:

- a frame that comes in on a port goes to ``Bridge.receive(port, frame,
  now)`` with the loop's clock, and every ``(port, frame)`` it returns goes
  to that port's ``send()``, which never blocks and drops (counted) when its
  far side has no room;
- a timer calls ``Bridge.tick(now)`` (FDB ageing, STP hello/forward-delay
  timers) and sends what it returns (BPDUs);
- a port's link change goes to ``Bridge.set_port_link`` (STP reconverges,
  learned addresses on a dead port are flushed);
- ``capture(port, path)`` writes every frame in and out of one port to a
  pcap file until ``capture(port, None)``.

    sw = Switch("br0", stp=False, vlan_filtering=False)
    async with sw, Machine() as a, Machine() as b:
        a.add_nic(sw, mac="02:00:00:00:00:0a")
        b.add_nic(sw, mac="02:00:00:00:00:0b", vlan=10)

Many switches and machines share one loop; ``sw1.link(sw2)`` joins two
switches with an in-memory cable.  Closing a switch detaches its ports.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import structlog

from ..errors import ConfigError
from .bridge import Bridge, BridgeError
from .pcap import PcapWriter
from .ports import LinkPort, NicPort, SwitchPort, cable

log = structlog.get_logger("aiokvm.net.switch")

_switch_ids = itertools.count(1)

#: how often the bridge's timers run (STP needs sub-second, ageing does not)
TICK_S_STP = 0.1
TICK_S = 1.0


class Switch:
    """One software switch on the running event loop.  An async context manager."""

    def __init__(self, name: str | None = None, *, stp: bool = False, vlan_filtering: bool = False,
                 mac: str | None = None, **bridge_options) -> None:
        self.name = name or f"br{next(_switch_ids)}"
        n = next(_switch_ids)
        try:
            # Default bridge addresses come from their own locally administered
            # range (02:a0:0b:...), apart from the 02:00:00:... VMs usually get.
            self.bridge = Bridge(self.name, mac or f"02:a0:0b:{(n >> 16) & 0xFF:02x}:{(n >> 8) & 0xFF:02x}:"
                                 f"{n & 0xFF:02x}", stp=stp, vlan_filtering=vlan_filtering, **bridge_options)
        except (BridgeError, TypeError) as exc:
            raise ConfigError(f"switch {self.name}: {exc}") from None
        self.ports: dict[str, SwitchPort] = {}
        self._captures: dict[str, PcapWriter] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started_at = 0.0  # the loop's time at start(): the bridge's clock starts at 0 there
        self._tick_handle: asyncio.TimerHandle | None = None
        self._tick_s = TICK_S_STP if stp else TICK_S
        self._closed = False
        self._log = log.bind(switch=self.name)

    # -- lifecycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> Switch:
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def start(self) -> None:
        """Start the bridge's timers on the running loop (``async with`` does it)."""
        if self._loop is not None:
            return
        if self._closed:
            raise ConfigError(f"switch {self.name} is closed")
        self._loop = asyncio.get_running_loop()
        self._started_at = self._loop.time()
        self._schedule_tick()

    async def aclose(self) -> None:
        """Detach and close every port, stop the timers, close captures."""
        if self._closed:
            return
        self._closed = True
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        for name in list(self.ports):
            port = self.ports.pop(name)
            port.detach()
            await port.aclose()
        for writer in self._captures.values():
            writer.close()
        self._captures.clear()

    def _now(self) -> float:
        """Seconds since start(), the bridge's clock: entries made before it
        (the bridge's own address) are then not aged by the loop's epoch."""
        return self._loop.time() - self._started_at if self._loop is not None else 0.0

    def _schedule_tick(self) -> None:
        self._tick_handle = self._loop.call_later(self._tick_s, self._tick)

    def _tick(self) -> None:
        try:
            self._send(self.bridge.tick(self._now()))
        finally:
            if not self._closed:
                self._schedule_tick()

    # -- ports ----------------------------------------------------------------------------------
    def add_port(self, port: SwitchPort, *, vlan: int | None = None, tagged: tuple[int, ...] = (),
                 **flags) -> SwitchPort:
        """Attach ``port`` under ``port.name``.  ``vlan=V`` makes it an untagged
        member of VLAN V with PVID V (needs ``vlan_filtering=True``);
        ``tagged`` adds tagged memberships; ``flags`` go to ``Bridge.add_port``
        (path_cost, priority, learning, flood, hairpin, isolated, ...)."""
        if self._closed:
            raise ConfigError(f"switch {self.name} is closed")
        self.start()
        name = port.name
        if name in self.ports:
            raise ConfigError(f"switch {self.name} already has a port named {name!r}; give another port=")
        if (vlan is not None or tagged) and not self.bridge.vlan_filtering:
            raise ConfigError(f"switch {self.name}: VLANs on a port need Switch(vlan_filtering=True)")
        try:
            self.bridge.add_port(name, now=self._now(), **flags)
            if vlan is not None:
                if self.bridge.default_pvid and vlan != self.bridge.default_pvid:
                    self.bridge.vlan_del(name, self.bridge.default_pvid)
                self.bridge.vlan_add(name, vlan, pvid=True, untagged=True)
            for vid in tagged:
                self.bridge.vlan_add(name, vid)
        except (BridgeError, TypeError) as exc:
            if name in self.bridge.ports:
                self.bridge.remove_port(name)
            raise ConfigError(f"switch {self.name}, port {name}: {exc}") from None
        self.ports[name] = port
        port.attach(lambda frames, name=name: self._incoming(name, frames),
                    lambda up, name=name: self._send(self.bridge.set_port_link(name, up, self._now())))
        if not port.link_up:
            self._send(self.bridge.set_port_link(name, False, self._now()))
        self._log.info("port added", port=name, kind=port.kind, vlan=vlan)
        return port

    async def open_port(self, spec: str, **flags) -> SwitchPort:
        """Open a port to the outside from a spec (``tap:tap0``, ``stream:unix:PATH,server``,
        ``vxlan:42,remote=IP``...; see ``ports/spec.py``) and attach it.  ``ConfigError``
        with what to do if it cannot be opened; nothing is left half-made."""
        from .ports.spec import port_from_spec

        port, parsed = port_from_spec(spec)
        self.check_port_name(port.name)
        await port.open()
        try:
            return self.add_port(port, vlan=parsed.vlan, **flags)
        except BaseException:
            await port.aclose()
            raise

    def add_nic(self, device, *, port: str, vlan: int | None = None, **flags) -> NicPort:
        """A VM's virtio-net device as port ``port`` (what ``Machine.add_nic`` calls).
        The port goes away when the device closes (its machine closes)."""
        nic = self.add_port(NicPort(port, device), vlan=vlan, **flags)
        device.on_close.append(lambda: self._forget(nic))
        return nic

    def check_port_name(self, name: str) -> None:
        """``ConfigError`` unless ``name`` is free (checked before a machine takes a slot for it)."""
        if self._closed:
            raise ConfigError(f"switch {self.name} is closed")
        if name in self.ports:
            raise ConfigError(f"switch {self.name} already has a port named {name!r}; give another port=")

    def _forget(self, port: SwitchPort) -> None:
        """A port whose far side went away (a machine closed): remove it now."""
        if self.ports.get(port.name) is not port:
            return
        del self.ports[port.name]
        port.detach()
        self.capture(port.name, None)
        if port.name in self.bridge.ports:
            self._send(self.bridge.remove_port(port.name, self._now()))

    async def remove_port(self, name: str) -> None:
        port = self.ports.pop(name, None)
        if port is None:
            raise ConfigError(f"switch {self.name} has no port {name!r}")
        port.detach()
        self._send(self.bridge.remove_port(name, self._now()))
        self.capture(name, None)
        await port.aclose()

    def link(self, other: Switch, *, port: str | None = None, other_port: str | None = None,
             **flags) -> tuple[LinkPort, LinkPort]:
        """Join this switch and ``other`` with an in-memory cable; returns both ends."""
        a, b = cable(port or f"to-{other.name}", other_port or f"to-{self.name}")
        self.add_port(a, **flags)
        try:
            other.add_port(b, **flags)
        except BaseException:
            self.ports.pop(a.name, None)
            self.bridge.remove_port(a.name)
            raise
        return a, b

    # -- the frame path -------------------------------------------------------------------------
    def _incoming(self, name: str, frames: list[bytes]) -> None:
        """A batch from port ``name``: through the bridge frame by frame, then
        out to each port as one batch (a port's frames keep their order)."""
        writer = self._captures.get(name)
        if writer is not None:
            stamp = time.time()
            for frame in frames:
                writer.write(frame, stamp)
        receive, now = self.bridge.receive, self._now()
        if len(frames) == 1:
            self._send(receive(name, frames[0], now))
            return
        out: list[tuple[str, bytes]] = []
        for frame in frames:
            out += receive(name, frame, now)
        self._send(out)

    def _send(self, out: list[tuple[str, bytes]]) -> None:
        if not out:
            return
        if len(out) == 1:
            name, frame = out[0]
            self._send_to(name, [frame])
            return
        batches: dict[str, list[bytes]] = {}
        for name, frame in out:
            batch = batches.get(name)
            if batch is None:
                batches[name] = [frame]
            else:
                batch.append(frame)
        for name, frames in batches.items():
            self._send_to(name, frames)

    def _send_to(self, name: str, frames: list[bytes]) -> None:
        port = self.ports.get(name)
        if port is None:
            return
        writer = self._captures.get(name) if self._captures else None
        if writer is not None:
            stamp = time.time()
            for frame in frames:
                writer.write(frame, stamp)
        port.send_many(frames)

    # -- introspection and capture ---------------------------------------------------------------
    def capture(self, port: str, path) -> None:
        """Write every frame in and out of ``port`` to a pcap file at ``path``; None stops."""
        old = self._captures.pop(port, None)
        if old is not None:
            old.close()
        if path is None:
            return
        if port not in self.ports:
            raise ConfigError(f"switch {self.name} has no port {port!r} to capture")
        try:
            self._captures[port] = PcapWriter(path)
        except OSError as exc:
            raise ConfigError(f"cannot write a capture to {path}: {exc.strerror}") from None

    def fdb(self):
        return self.bridge.fdb(self._now())

    def vlans(self) -> dict:
        """Per port: its PVID and its VLANs (vid -> egress untagged), like ``bridge vlan show``."""
        return {name: {"pvid": p.pvid, "vlans": dict(sorted(p.vlans.items()))}
                for name, p in self.bridge.ports.items()}

    def stp_state(self) -> dict:
        return self.bridge.stp_state()

    def counters(self) -> dict:
        """The bridge's per-port and bridge-wide counters, and each port's own."""
        bridge = self.bridge.counters()
        return {"bridge": bridge["bridge"],
                "ports": {name: {"bridge": bridge["ports"].get(name, {}), **port.metrics()}
                          for name, port in self.ports.items()}}
