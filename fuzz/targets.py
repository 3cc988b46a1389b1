"""Fuzz targets: each takes arbitrary bytes and drives one parser or device
model the way a hostile guest or peer could.

The invariants every target checks (``run_one``):

- no exception escapes but the target's documented, typed errors;
- no access outside guest RAM: guest memory raises ``GuestMemoryError`` on
  one, which is not on any target's list, so a device that forgot a check
  is a crash here;
- bounded work: every input is small, and loops are capped by the target.

``fuzz/run.py`` runs them under atheris (coverage-guided); the corpora in
``fuzz/corpus/TARGET/`` are replayed by ``tests/tools/test_fuzz_corpus.py``
in every test run.
"""

from __future__ import annotations

from aiokvm.errors import ConfigError


class Bytes:
    """Takes values from the front of the input (what atheris's FuzzedDataProvider does,
    without needing atheris to replay a corpus)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def int(self, nbytes: int) -> int:
        chunk = self.data[self.pos:self.pos + nbytes]
        self.pos += nbytes
        return int.from_bytes(chunk.ljust(nbytes, b"\0"), "little")

    def bytes(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def rest(self) -> bytes:
        chunk = self.data[self.pos:]
        self.pos = len(self.data)
        return chunk

    @property
    def left(self) -> int:
        return max(len(self.data) - self.pos, 0)


RAM = 64 << 10


def _memory(seed: bytes):
    from aiokvm.memory import GuestMemory

    memory = GuestMemory(max(RAM, 2 << 20))  # the smallest machine; the fuzzer fills its first 64 KiB
    memory.write(0, seed[:RAM])
    return memory


# -- targets ------------------------------------------------------------------------------------
def virtqueue(data: bytes) -> None:
    """Chain walking and the chain cursors over arbitrary descriptor tables and rings."""
    from aiokvm.devices.virtio.chain import ChainBoundsError, ChainReader, ChainWriter
    from aiokvm.devices.virtio.queue import SplitQueue, VirtqueueError

    src = Bytes(data)
    size = 1 << (src.int(1) % 9)
    desc, avail, used = (src.int(2) & ~15 for _ in range(3))
    flags = src.int(1)
    memory = _memory(src.rest())
    try:
        q = SplitQueue(memory, size, desc, avail, used, event_idx=bool(flags & 1), indirect=bool(flags & 2),
                       max_chain=(flags >> 2) or None)
    except VirtqueueError:
        return
    try:
        for _ in range(64):
            chain = q.pop()
            if chain is None:
                break
            try:
                reader = ChainReader(memory, chain.readable)
                reader.read(min(reader.remaining, 4096))
                writer = ChainWriter(memory, chain.writable)
                writer.write(bytes(min(writer.remaining, 4096)))
            except ChainBoundsError:
                pass
            q.push(chain.head, 0)
        q.needs_notification()
    except VirtqueueError:
        pass


def mmio_net(data: bytes) -> None:
    """Register sequences on a virtio-net device's transport, with frames arriving meanwhile."""
    from aiokvm.devices.virtio import mmio
    from aiokvm.devices.virtio.net import VirtioNet

    src = Bytes(data)
    ops = Bytes(src.bytes(src.int(2) % 2048))  # the register accesses first, guest RAM from the rest
    memory = _memory(src.rest())
    src = ops
    sent = []
    device = VirtioNet("02:00:00:00:00:0a", on_tx=sent.extend, rx_hold_frames=8, rx_hold_bytes=16 << 10)
    transport = mmio.MmioTransport(device, memory, lambda: None)
    for _ in range(256):
        if src.left < 6:
            break
        op, offset, value = src.int(1), src.int(1) * 4, src.int(4)
        if op % 5 == 0:
            device.receive_many([src.bytes(op % 97 + 14)])  # a frame from the switch
        elif op % 5 == 1:
            transport.read(offset, (1, 2, 4)[op % 3])
        else:
            transport.write(offset, 4, value)  # a transport error is NEEDS_RESET, never an exception
    assert len(sent) <= 256 * 64


def bridge(data: bytes) -> None:
    """Frames and BPDUs into a VLAN-filtering STP bridge, the clock moving."""
    from aiokvm.net import Bridge

    src = Bytes(data)
    br = Bridge("br0", "02:00:00:00:00:01", stp=True, vlan_filtering=True, fdb_max_learned=64)
    for name in ("p1", "p2", "p3"):
        br.add_port(name)
    br.vlan_add("p2", 10, pvid=True, untagged=True)
    br.vlan_add("p3", 10)
    now = 0.0
    for _ in range(128):
        if src.left < 3:
            break
        port, length = src.int(1) % 4, src.int(2) % 1600
        now += 0.25
        if port == 3:
            br.tick(now)
            continue
        br.receive(("p1", "p2", "p3")[port], src.bytes(length), now)
    assert len(br.fdb(now)) <= 64 + 3


def stream(data: bytes) -> None:
    """QEMU stream framing: arbitrary bytes, split arbitrarily, into one connection."""
    from aiokvm.net.ports.stream import QEMU_MAX_PACKET, StreamPort, _Connection

    class Transport:
        closed = False

        def close(self):
            self.closed = True

        def get_extra_info(self, name):
            return None

    got = []
    port = StreamPort("/nonexistent", server=True)
    port.incoming_many = got.extend
    conn = _Connection(port)
    conn.connection_made(Transport())
    src = Bytes(data)
    while src.left and conn.live:
        conn.data_received(src.bytes(src.int(1) % 64 + 1))
    assert all(14 <= len(f) <= QEMU_MAX_PACKET for f in got)
    assert len(conn.buffer) <= QEMU_MAX_PACKET + 4 + 64


def vde_request(data: bytes) -> None:
    """A VDE client's request, whatever it holds."""
    from aiokvm.net.vde_server import VdeServer

    server = VdeServer(switch=None, directory="/nonexistent")
    parsed = server._parse(data)
    if parsed is not None:
        number, path, description = parsed
        assert 0 <= number < 1 << 24 and path and len(description) <= 200


def vxlan(data: bytes) -> None:
    """A UDP payload arriving at a VXLAN port."""
    from aiokvm.net.ports.vxlan import HEADER_LEN, decapsulate

    frame, why = decapsulate(data, 42)
    assert (frame is None) == bool(why)
    if frame is not None:
        assert frame == data[HEADER_LEN:] and data[0] == 0x08


def elf(data: bytes) -> None:
    """An arbitrary file offered as a guest kernel."""
    from aiokvm.boot import parse_elf

    try:
        image = parse_elf(data, "<fuzz>")
    except ConfigError:
        return
    assert image.entry32 is not None


def serial(data: bytes) -> None:
    """Register sequences on the 16550 UART, with input piling up (its FIFO is capped)."""
    from aiokvm.devices.serial import Uart16550

    uart = Uart16550(on_output=lambda b: None, irq=lambda level: None)
    src = Bytes(data)
    while src.left >= 2:
        op, value = src.int(1), src.int(1)
        if op & 0x80:
            uart.read(op & 7)
        else:
            uart.write(op & 7, value)
        if op & 0x40:
            uart.feed(bytes([value]) * 64)
    assert 0 <= uart.rx_space <= uart.FIFO_SIZE  # the FIFO never grows past its size (CVE-2020-27173)


TARGETS = {f.__name__: f for f in (virtqueue, mmio_net, bridge, stream, vde_request, vxlan, elf, serial)}


def quiet() -> None:
    """Campaigns: the devices' log lines (one per rejected input) would drown the fuzzer's own."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))


def run_one(name: str, data: bytes) -> None:
    """One input through one target (what the fuzzer and the corpus replay both call)."""
    TARGETS[name](data)

