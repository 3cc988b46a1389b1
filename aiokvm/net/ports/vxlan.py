"""A VXLAN tunnel endpoint (RFC 7348) as a switch port: one L2 segment
stretched across hosts over UDP.

- **Framing:** 8 bytes before the inner frame: flags 0x08, three reserved
  bytes, the 24-bit VNI, one reserved byte.  A packet with any other flag or
  reserved bit set is dropped and counted (``bad_header``), as Linux does;
  one for another VNI too (``other_vni``).
- **UDP:** the port binds ``local`` (port 4789 by default; Linux's own
  default, 8472, is a ``local=IP:8472`` away) and sends to the same port on
  the remotes unless ``dst_port`` says otherwise.  Checksums go out as zero
  (``SO_NO_CHECK``) and zero is accepted.  Every packet leaves from the
  bound port: a flow-hashed source port buys ECMP spreading, which one
  socket cannot do and a test bench does not need.
- **Forwarding:** inner source MAC → outer source IP is learned from what
  comes in (replies go to that IP at ``dst_port``, as Linux does) and aged
  like the FDB (``ageing_s``, 300 by default); unknown, broadcast and
  multicast destinations are flooded to the static ``remotes``.  At most
  ``max_learned`` entries: past it nothing new is learned (counted).
- ``netns=NS`` makes the UDP socket inside a named network namespace (the
  underlay is there; the switch stays on this loop).
"""

from __future__ import annotations

import socket

from ...errors import ConfigError
from ..netns import run_in_netns
from .fd import READ_SIZE, FramedFdPort, errno_name

VXLAN_PORT = 4789
LINUX_VXLAN_PORT = 8472
HEADER_LEN = 8
FLAG_VNI = 0x08
SO_NO_CHECK = 11
AGEING_S = 300.0
MAX_LEARNED = 4096


def vxlan_header(vni: int) -> bytes:
    return bytes((FLAG_VNI, 0, 0, 0)) + vni.to_bytes(3, "big") + b"\x00"


def decapsulate(data: bytes, vni: int) -> tuple[bytes | None, str]:
    """The inner frame of a VXLAN packet for ``vni``, or (None, why it is dropped)."""
    if len(data) < HEADER_LEN:
        return None, "runt"
    if data[0] != FLAG_VNI or data[1] or data[2] or data[3] or data[7]:
        return None, "bad_header"  # Linux drops any other flag or reserved bit
    if int.from_bytes(data[4:7], "big") != vni:
        return None, "other_vni"
    return data[HEADER_LEN:], ""


class VxlanPort(FramedFdPort):
    kind = "vxlan"

    def __init__(self, vni: int, *, local: tuple[str, int] = ("0.0.0.0", VXLAN_PORT), remotes: list[str] = (),
                 dst_port: int | None = None, name: str | None = None, ageing_s: float = AGEING_S,
                 max_learned: int = MAX_LEARNED, netns: str | None = None, **kw) -> None:
        if isinstance(vni, bool) or not isinstance(vni, int) or not 0 <= vni < 1 << 24:
            raise ConfigError(f"VXLAN VNI {vni!r} is out of range [0, 16777215]")
        super().__init__(name or f"vxlan{vni}", **kw)
        self.vni = vni
        self.local = local
        self.dst_port = dst_port if dst_port is not None else local[1]
        self.remotes = [str(ip) for ip in remotes]
        self.netns = netns
        self.ageing_s = ageing_s
        self.max_learned = max_learned
        self._header = vxlan_header(vni)
        self._learned: dict[bytes, tuple[str, float]] = {}  # inner MAC -> (VTEP IP, last seen)
        self._sock: socket.socket | None = None
        self.flooded = 0

    @property
    def describe(self) -> str:
        remotes = "".join(f",remote={ip}" for ip in self.remotes)
        return f"vxlan:{self.vni},local={self.local[0]}:{self.local[1]}{remotes}"

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
            sock.bind(self.local)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot bind VXLAN port {self.local[0]}:{self.local[1]}: {exc.strerror or exc}"
                              " (another VTEP there, or not this host's address? give local=IP:PORT)") from None
        return sock

    async def open(self) -> VxlanPort:
        # The underlay socket lives in the namespace it is made in (netns=: another one).
        sock = run_in_netns(self.netns, self._bind)
        self._sock = sock
        self._start_io(sock.fileno(), sock)
        return self

    @property
    def bound_port(self) -> int | None:
        return None if self._sock is None else self._sock.getsockname()[1]

    def _recv(self) -> bytes | None:
        data, (ip, _port) = self._sock.recvfrom(READ_SIZE)
        frame, dropped = decapsulate(data, self.vni)
        if frame is None:
            self.counters.drops[dropped] += 1
            return None
        if len(frame) >= 12 and not frame[6] & 1:  # learn unicast sources only
            self._learn(frame[6:12], ip)
        return frame

    def _learn(self, mac: bytes, ip: str) -> None:
        learned = self._learned
        now = self._loop.time()
        if mac not in learned and len(learned) >= self.max_learned:
            self._expire(now)
            if len(learned) >= self.max_learned:
                self.counters.drops["learn_limit"] += 1  # forwarded still; just not learned
                return
        learned[mac] = (ip, now)

    def _expire(self, now: float) -> None:
        for mac in [m for m, (_, seen) in self._learned.items() if now - seen > self.ageing_s]:
            del self._learned[mac]

    def _targets(self, frame: bytes) -> list[str]:
        if not frame[0] & 1:
            entry = self._learned.get(frame[:6])
            if entry is not None:
                if self._loop.time() - entry[1] <= self.ageing_s:
                    return [entry[0]]
                del self._learned[frame[:6]]
        self.flooded += 1
        return self.remotes

    def send(self, frame: bytes) -> bool:
        counters = self.counters
        if self._sock is None:
            counters.drops["link_down"] += 1
            return False
        targets = self._targets(frame)
        if not targets:
            counters.drops["no_remote"] += 1
            return False
        packet = self._header + frame
        sent = False
        for ip in targets:
            try:
                self._sock.sendto(packet, (ip, self.dst_port))
                sent = True
            except OSError as exc:  # EAGAIN included: UDP has no one to wait for
                self._count_error("write", exc)
                counters.drops[f"write_{errno_name(exc)}"] += 1
        if sent:
            self._sent(frame)
        return sent

    def learned(self) -> dict[str, str]:
        """Inner MAC → VTEP IP, what is learned and not aged out."""
        now = self._loop.time() if self._loop is not None else 0.0
        return {mac.hex(":"): ip for mac, (ip, seen) in self._learned.items() if now - seen <= self.ageing_s}

    def metrics(self) -> dict:
        return {**super().metrics(), "peer": self.describe, "learned": len(self._learned), "flooded": self.flooded}

    async def aclose(self) -> None:
        self._close_io()
        self._sock = None
        await super().aclose()
