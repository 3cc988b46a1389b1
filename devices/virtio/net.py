"""virtio-net: one receive and one transmit queue, frames in and out through a port.

The device moves Ethernet frames between the guest's rings and whatever it
is connected to (``connect(on_tx)``; a switch port, in ``aiokvm.net``):

- **Transmit** (queue 1): every available chain is read through a
  ``ChainReader`` (the 12-byte ``virtio_net_hdr``, then the frame), checked,
  and handed to ``on_tx(frame)``; the chains go back to the driver in one
  batch, with one interrupt decision.  A frame below 14 bytes or above
  MTU + 14 + 4 (one 802.1Q tag) is dropped as malformed; a header asking for
  an offload that was not negotiated too.  A frame whose source MAC is not
  the NIC's is counted (``tx_spoofed_mac_count``) and, with
  ``mac_filter=True``, dropped.
- **Receive** (queue 0): ``receive(frame)`` puts a frame into the guest's
  buffers.  Without MRG_RXBUF one chain takes header and frame; a chain too
  small for both goes back with length 0 and the frame is dropped, both
  counted.  With MRG_RXBUF a frame spans as many buffers as it needs, the
  first one carries the header with ``num_buffers``, and all of them become
  used together (``SplitQueue.push_many``).  When the guest has posted too
  few buffers the frame is **held** in a bounded queue, as QEMU and
  Firecracker hold, and delivered when the guest kicks the receive queue;
  past the bound, frames are dropped and counted.

Features: VERSION_1 (by the transport), MAC, STATUS (link up, and link
changes signalled with a config interrupt), MRG_RXBUF, MTU, EVENT_IDX and
INDIRECT_DESC.  No checksum or segmentation offloads: no port of the switch
carries a vnet header, so partial checksums and 64 KiB frames could not
leave the device (a driver that sets NEEDS_CSUM or a gso_type anyway sent a
malformed frame).

Threat model: the guest controls every descriptor, header and length.
Chains come validated from ``SplitQueue.pop``; a hostile ring met while
delivering a frame (outside any notify) puts the device in NEEDS_RESET
through ``interrupt.needs_reset``.  Every frame the device holds is bounded
in count and bytes; nothing the guest or a peer sends grows it further, and
every drop is counted.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

import structlog

from aiokvm.errors import ConfigError

from .chain import ChainReader, ChainWriter
from .device import F_EVENT_IDX, F_INDIRECT_DESC, InterruptKind
from .queue import VirtqueueError

log = structlog.get_logger("aiokvm.devices.virtio")

DEVICE_ID_NET = 1
RX_QUEUE, TX_QUEUE = 0, 1
QUEUE_SIZE = 256

# Feature bits (virtio 1.x, 5.1.3).
F_CSUM, F_GUEST_CSUM, F_MTU, F_MAC = 1 << 0, 1 << 1, 1 << 3, 1 << 5
F_MRG_RXBUF, F_STATUS = 1 << 15, 1 << 16

S_LINK_UP = 1

HDR = struct.Struct("<BBHHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
HDR_SIZE = HDR.size              # 12 with VERSION_1
HDR_F_NEEDS_CSUM = 1
GSO_NONE = 0
NUM_BUFFERS_OFFSET = 10

#: the receive header when one buffer holds the whole frame (no offloads, num_buffers 1)
_HDR_ONE_BUFFER = HDR.pack(0, GSO_NONE, 0, 0, 0, 0, 1)

ETH_HLEN = 14
VLAN_HLEN = 4
MIN_MTU, MAX_MTU = 68, 65535

#: frames held for a guest without receive buffers, and their bytes
RX_HOLD_FRAMES = 256
RX_HOLD_BYTES = 1 << 20


def parse_mac(mac: str | bytes) -> bytes:
    """``"02:00:00:00:00:0a"`` or 6 bytes; a unicast address, or ``ConfigError``."""
    if isinstance(mac, str):
        parts = mac.split(":")
        try:
            if len(parts) != 6 or any(len(p) != 2 for p in parts):
                raise ValueError
            raw = bytes(int(p, 16) for p in parts)
        except ValueError:
            raise ConfigError(f"MAC address {mac!r} is not six hex octets like 02:00:00:00:00:0a") from None
    else:
        raw = bytes(mac)
        if len(raw) != 6:
            raise ConfigError(f"a MAC address is 6 bytes, got {len(raw)}")
    if raw[0] & 1:
        raise ConfigError(f"MAC address {format_mac(raw)} is a multicast address; a NIC needs a unicast one")
    if raw == bytes(6):
        raise ConfigError("MAC address 00:00:00:00:00:00 is not usable")
    return raw


def format_mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


@dataclass
class NetCounters:
    """Counters of one NIC (names follow Firecracker's where they mean the same)."""

    rx_packets_count: int = 0
    rx_bytes_count: int = 0
    tx_packets_count: int = 0
    tx_bytes_count: int = 0
    rx_queue_event_count: int = 0      # receive-queue kicks
    tx_queue_event_count: int = 0      # transmit-queue kicks
    no_rx_avail_buffer: int = 0        # a frame found too few receive buffers (and was held)
    rx_held: int = 0                   # frames held right now
    rx_held_max: int = 0
    rx_dropped_queue_full: int = 0     # held queue at its bound
    rx_dropped_buffer_too_small: int = 0
    rx_dropped_link_down: int = 0
    rx_dropped_reset: int = 0          # held frames the driver's reset discarded
    rx_dropped_bad_ring: int = 0       # a hostile receive ring (the device goes to NEEDS_RESET)
    tx_malformed_frames: int = 0
    tx_spoofed_mac_count: int = 0
    tx_dropped_spoofed: int = 0        # ... of which dropped (mac_filter=True)
    tx_dropped_link_down: int = 0
    tx_dropped_unconnected: int = 0    # no port to send to
    link_changes: int = 0


class VirtioNet:
    """A virtio-net device.  ``connect(on_tx)`` gives it somewhere to send
    (``on_tx(frames)`` gets each transmit notify's frames as one list);
    ``receive_many(frames)`` and ``receive(frame)`` give the guest frames.
    Lives on the asyncio loop."""

    device_id = DEVICE_ID_NET
    kind = "virtio-net"
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, mac: str | bytes, *, mtu: int = 1500, mac_filter: bool = False,
                 rx_hold_frames: int = RX_HOLD_FRAMES, rx_hold_bytes: int = RX_HOLD_BYTES,
                 on_tx: Callable[[list[bytes]], None] | None = None) -> None:
        self.mac = parse_mac(mac)
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not MIN_MTU <= mtu <= MAX_MTU:
            raise ConfigError(f"MTU {mtu!r} is out of range [{MIN_MTU}, {MAX_MTU}]")
        if rx_hold_frames < 0 or rx_hold_bytes < 0:
            raise ConfigError("the receive hold bounds cannot be negative")
        self.mtu = mtu
        self.mac_filter = mac_filter
        self.max_frame = mtu + ETH_HLEN + VLAN_HLEN
        self.features = F_MAC | F_STATUS | F_MRG_RXBUF | F_MTU | F_EVENT_IDX | F_INDIRECT_DESC
        self.counters = NetCounters()
        self.log = log  # the device manager binds vm= and device=
        self.link_up = True
        self._on_tx = on_tx
        self._hold_frames, self._hold_bytes = rx_hold_frames, rx_hold_bytes
        self._held: deque[bytes] = deque()
        self._held_bytes = 0
        self._memory = None
        self._rxq = self._txq = None
        self._interrupt = None
        self._mrg = False
        self._status = False
        #: called when the device closes (its switch port lets go of it)
        self.on_close: list[Callable[[], None]] = []

    # -- wiring ---------------------------------------------------------------------------
    def connect(self, on_tx: Callable[[list[bytes]], None] | None) -> None:
        """Where transmitted frames go, a batch per notify (None: nowhere; they
        are counted and dropped)."""
        self._on_tx = on_tx

    def set_link(self, up: bool) -> None:
        """Link state as the guest sees it (STATUS); a change is a config interrupt."""
        up = bool(up)
        if up == self.link_up:
            return
        self.link_up = up
        self.counters.link_changes += 1
        if self._status and self._interrupt is not None:
            self._interrupt.trigger(InterruptKind.CONFIG_CHANGE)

    @property
    def active(self) -> bool:
        return self._rxq is not None or self._txq is not None

    # -- VirtioDevice ------------------------------------------------------------------------
    def _config(self) -> bytes:
        status = S_LINK_UP if self.link_up else 0
        return self.mac + struct.pack("<HHH", status, 1, self.mtu)  # mac, status, max_virtqueue_pairs, mtu

    def read_config(self, offset: int, size: int) -> int:
        config = self._config()
        if size not in (1, 2, 4, 8) or offset < 0 or offset + size > len(config):
            return 0
        return int.from_bytes(config[offset:offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        pass  # read-only with VERSION_1 (the MAC changes only through CTRL_MAC_ADDR, not offered)

    def activate(self, memory, queues, features: int, interrupt) -> None:
        self._memory = memory
        self._rxq, self._txq = queues[RX_QUEUE], queues[TX_QUEUE]
        self._interrupt = interrupt
        self._mrg = bool(features & F_MRG_RXBUF)
        self._status = bool(features & F_STATUS)
        if self._rxq is not None:
            self._rxq.set_notification(True)
        if self._txq is not None:
            self._txq.set_notification(True)
        self._flush_held()  # frames that arrived before the driver was ready

    def reset(self) -> None:
        self._rxq = self._txq = None
        self._interrupt = None
        self.counters.rx_dropped_reset += len(self._held)
        self._held.clear()
        self._held_bytes = 0
        self.counters.rx_held = 0
        return None  # nothing runs in the background: no fence

    def notify(self, queue: int) -> None:
        if queue == TX_QUEUE:
            self.counters.tx_queue_event_count += 1
            self._transmit()
        elif queue == RX_QUEUE:
            self.counters.rx_queue_event_count += 1
            self._flush_held()

    def metrics(self) -> dict:
        return {"kind": self.kind, "counters": asdict(self.counters)}

    async def aclose(self) -> None:
        self._on_tx = None
        callbacks, self.on_close = self.on_close, []
        for callback in callbacks:
            callback()

    # -- transmit ------------------------------------------------------------------------
    def _transmit(self) -> None:
        q = self._txq
        if q is None:
            return
        memory, counters, max_frame = self._memory, self.counters, self.max_frame
        frames: list[bytes] = []
        done: list[tuple[int, int]] = []
        while True:
            chain = q.pop()  # a VirtqueueError reaches the transport: NEEDS_RESET
            if chain is None:
                q.set_notification(True)  # the next add kicks; then look once more
                if q.has_available():
                    continue
                break
            done.append((chain.head, 0))  # a transmit chain has nothing for the device to write
            readable = chain.readable
            if len(readable) == 1:
                # Header and frame in one buffer (the common layout): one read, no cursor.
                addr, total = readable[0]
                length = total - HDR_SIZE
                if length < ETH_HLEN or length > max_frame:
                    counters.tx_malformed_frames += 1
                    continue
                data = memory.read(addr, total)
                flags, gso_type = data[0], data[1]
                frame = data[HDR_SIZE:]
            else:
                reader = ChainReader(memory, readable)
                length = reader.remaining - HDR_SIZE
                if length < ETH_HLEN or length > max_frame:
                    counters.tx_malformed_frames += 1
                    continue
                flags, gso_type = reader.read_struct(HDR)[:2]
                frame = None
            if flags & HDR_F_NEEDS_CSUM or gso_type != GSO_NONE:
                counters.tx_malformed_frames += 1  # offloads were not offered
                continue
            if frame is None:
                frame = reader.read(length)
            if frame[6:12] != self.mac:
                counters.tx_spoofed_mac_count += 1
                if self.mac_filter:
                    counters.tx_dropped_spoofed += 1
                    continue
            frames.append(frame)
        if done:
            q.push_many(done)
            if q.needs_notification():
                self._interrupt.trigger(InterruptKind.USED_BUFFER)
        if frames:
            self._send(frames)

    def _send(self, frames: list[bytes]) -> None:
        counters = self.counters
        if not self.link_up:
            counters.tx_dropped_link_down += len(frames)
            return
        if self._on_tx is None:
            counters.tx_dropped_unconnected += len(frames)
            return
        counters.tx_packets_count += len(frames)
        counters.tx_bytes_count += sum(map(len, frames))
        self._on_tx(frames)

    # -- receive -------------------------------------------------------------------------
    def receive(self, frame: bytes) -> bool:
        """Give the guest a frame.  True if it was delivered or held, False if dropped."""
        return self.receive_many([frame])[0] == 1

    def receive_many(self, frames: list[bytes]) -> tuple[int, int]:
        """Give the guest frames, in order: (frames, bytes) delivered or held;
        the rest were dropped and counted.  The used ring moves, and the
        driver is interrupted if it asked, once for the batch."""
        counters = self.counters
        if not self.link_up:
            counters.rx_dropped_link_down += len(frames)
            return 0, 0
        if self._held and self._rxq is not None:
            self._flush_held()  # order: frames held earlier go first
        accepted = accepted_bytes = 0
        used: list[tuple[int, int]] = []  # one-buffer deliveries, pushed together
        try:
            for frame in frames:
                if self._held or self._rxq is None:
                    result = self._hold(frame)
                else:
                    result = self._deliver(frame, used)
                    if result is None:
                        result = self._hold(frame)
                if result:
                    accepted += 1
                    accepted_bytes += len(frame)
        finally:
            self._publish_rx(used)
            self._signal_rx()
        return accepted, accepted_bytes

    def _hold(self, frame: bytes) -> bool:
        counters = self.counters
        counters.no_rx_avail_buffer += 1
        if len(self._held) >= self._hold_frames or self._held_bytes + len(frame) > self._hold_bytes:
            counters.rx_dropped_queue_full += 1
            return False
        self._held.append(frame)
        self._held_bytes += len(frame)
        counters.rx_held = len(self._held)
        counters.rx_held_max = max(counters.rx_held_max, counters.rx_held)
        return True

    def _flush_held(self) -> None:
        """Deliver held frames while the guest has buffers for them."""
        if self._rxq is None or not self._held:
            return
        delivered = 0
        used: list[tuple[int, int]] = []
        try:
            while self._held:
                result = self._deliver(self._held[0], used)
                if result is None:
                    break  # still no room: wait for the next kick
                if not self._held:
                    break  # a hostile ring: NEEDS_RESET's reset already dropped every held frame
                frame = self._held.popleft()
                self._held_bytes -= len(frame)
                delivered += 1
        finally:
            self.counters.rx_held = len(self._held)
            self._publish_rx(used)
            if delivered:
                self._signal_rx()

    def _publish_rx(self, used: list[tuple[int, int]]) -> None:
        """Make a batch's buffers used at once, in the order they were filled
        (so frames reach the guest in order)."""
        q = self._rxq
        if used and q is not None:  # None: the ring failed midway; the reset discards it all
            q.push_many(used)

    def _signal_rx(self) -> None:
        q = self._rxq
        if q is not None and q.needs_notification():
            self._interrupt.trigger(InterruptKind.USED_BUFFER)

    def _deliver(self, frame: bytes, used: list) -> bool | None:
        """Put one frame into receive buffers: True delivered, False dropped
        (a buffer too small), None when there are too few buffers (nothing
        consumed; the caller holds the frame).  The buffers it fills (or
        gives back empty) are appended to ``used`` for the caller to push."""
        q = self._rxq
        try:
            if self._mrg:
                return self._deliver_merged(q, frame, used)
            return self._deliver_single(q, frame, used)
        except VirtqueueError as exc:
            self.counters.rx_dropped_bad_ring += 1
            self._rxq = None  # the ring is hostile: stop using it until the reset
            self._interrupt.needs_reset(str(exc))
            return False

    def _pop_rx(self, q):
        chain = q.pop()
        if chain is None:
            q.set_notification(True)  # the next buffers the driver adds kick us
            if q.has_available():
                chain = q.pop()
        if chain is not None and chain.readable:
            # Receive buffers are the device's to write; QEMU calls this a
            # driver error too (virtio_error: no in buffers) rather than a drop.
            raise VirtqueueError(f"receive chain at head {chain.head} has a device-readable buffer")
        return chain

    def _deliver_into_one_buffer(self, q, chain, frame: bytes, used: list) -> bool:
        """The common case: the chain's first writable buffer takes header and frame."""
        addr, size = chain.writable[0]
        need = HDR_SIZE + len(frame)
        self._memory.view(addr, need)[:] = _HDR_ONE_BUFFER + frame
        used.append((chain.head, need))
        counters = self.counters
        counters.rx_packets_count += 1
        counters.rx_bytes_count += len(frame)
        return True

    def _deliver_single(self, q, frame: bytes, used: list) -> bool | None:
        chain = self._pop_rx(q)
        if chain is None:
            return None
        writable = chain.writable
        if writable and writable[0][1] >= HDR_SIZE + len(frame):
            return self._deliver_into_one_buffer(q, chain, frame, used)
        writer = ChainWriter(self._memory, chain.writable)
        need = HDR_SIZE + len(frame)
        if writer.remaining < need:
            used.append((chain.head, 0))
            self.counters.rx_dropped_buffer_too_small += 1
            return False
        writer.write(HDR.pack(0, GSO_NONE, 0, 0, 0, 0, 1))
        writer.write(frame)
        used.append((chain.head, need))
        self._count_rx(frame)
        return True

    def _deliver_merged(self, q, frame: bytes, used: list) -> bool | None:
        need = HDR_SIZE + len(frame)
        taken: list[tuple[object, ChainWriter, int]] = []  # (chain, writer, bytes it takes)
        while need > 0:
            chain = self._pop_rx(q)
            if not taken and chain is not None:
                writable = chain.writable
                if writable and writable[0][1] >= need:  # one buffer takes it all: num_buffers 1
                    return self._deliver_into_one_buffer(q, chain, frame, used)
            if chain is None:
                for earlier, _, _ in reversed(taken):  # not enough room: give them all back
                    q.unpop(earlier.head)
                return None
            writer = ChainWriter(self._memory, chain.writable)
            if not taken and writer.remaining < HDR_SIZE:
                used.append((chain.head, 0))  # the header must fit in the first buffer
                self.counters.rx_dropped_buffer_too_small += 1
                return False
            take = min(writer.remaining, need)
            taken.append((chain, writer, take))
            need -= take
        data = memoryview(HDR.pack(0, GSO_NONE, 0, 0, 0, 0, len(taken)) + frame)
        pos = 0
        for _chain, writer, take in taken:
            writer.write(data[pos:pos + take])
            pos += take
        used += [(chain.head, take) for chain, _, take in taken]  # used together: one push
        self._count_rx(frame)
        return True

    def _count_rx(self, frame: bytes) -> None:
        self.counters.rx_packets_count += 1
        self.counters.rx_bytes_count += len(frame)
