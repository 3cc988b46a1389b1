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

import asyncio
import struct

from aiokvm.devices.backends.memory import MemoryBackend
from aiokvm.errors import ConfigError, GuestMemoryError
from aiokvm.memory import GuestMemory


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


class _Ram(GuestMemory):
    """Guest memory that also remembers each access outside RAM: a device that
    catches the ``GuestMemoryError`` (virtio-blk fails the request) still gets caught."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.faults: list[tuple[int, int]] = []

    def _locate(self, addr: int, length: int):
        try:
            return super()._locate(addr, length)
        except GuestMemoryError:
            self.faults.append((addr, length))
            raise


def _memory(seed: bytes) -> _Ram:
    memory = _Ram(max(RAM, 2 << 20))  # the smallest machine; the fuzzer fills its first 64 KiB
    memory.write(0, seed[:RAM])
    return memory


class _Disk(MemoryBackend):
    """An in-memory disk that remembers each request reaching it outside the disk (the
    device must have refused it first), and takes ``delay`` loop turns per request so
    requests are in flight together and complete out of order."""

    def __init__(self, sectors: int, *, read_only: bool = False, delay: int = 0) -> None:
        super().__init__(sectors * 512, read_only=read_only, data=bytes(range(256)) * 2)
        self.delay, self.outside = delay, []

    def _see(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            self.outside.append((offset, length))

    async def _wait(self) -> None:
        for _ in range(self.delay):
            await asyncio.sleep(0)

    def readv_nowait(self, offset, buffers) -> bool:
        if self.delay:
            return False  # a task, in flight
        self._see(offset, sum(len(b) for b in buffers))
        return super().readv_nowait(offset, buffers)

    async def readv(self, offset, buffers) -> None:
        self._see(offset, sum(len(b) for b in buffers))
        await self._wait()
        await super().readv(offset, buffers)

    async def writev(self, offset, buffers) -> None:
        self._see(offset, sum(len(b) for b in buffers))
        await self._wait()
        await super().writev(offset, buffers)

    async def write_zeroes(self, offset, length, *, what="write zeroes") -> None:
        self._see(offset, length)
        await self._wait()
        await super().write_zeroes(offset, length, what=what)


def _run(main, seconds: float) -> None:
    """One input's coroutine on a fresh loop, bounded: a hang is a ``TimeoutError`` (a crash)."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(main, seconds))
    finally:
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.close()


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


_MB_MEMORY = None


def multiboot(data: bytes) -> None:
    """An arbitrary file offered as a Multiboot kernel (the first 8 KiB searched
    for a header), loaded with a module into 8 MiB of RAM: a one-line
    ``ConfigError`` or a load that stays inside RAM, nothing else."""
    global _MB_MEMORY
    from aiokvm import boot, loader
    from aiokvm import multiboot as mb
    from aiokvm.memory import GuestMemory

    if _MB_MEMORY is None:
        _MB_MEMORY = GuestMemory(8 << 20)  # one mapping for the campaign: loads overwrite what they need
    try:
        image = loader.parse_guest(data, "<fuzz>")
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    module = boot.BootModule(data[:64], "module args", "<fuzz-module>")
    try:
        entry = loader.load_guest(image, _MB_MEMORY, "cmdline", [module])
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert _MB_MEMORY.contains(entry.entry32)
    if entry.protocol == "multiboot":
        info = mb.parse_multiboot_info(_MB_MEMORY)
        assert info["cmdline"] == "<fuzz> cmdline" and len(info["modules"]) == 1


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

# virtio-blk: where the fuzzer's driver keeps its ring and buffers in guest RAM.
DESC, AVAIL, USED, DATA = 0x0, 0x1000, 0x2000, 0x3000


class _BlkDriver:
    """A hostile virtio-blk driver: descriptor tables, request headers and avail
    entries from the input (mostly plausible shapes, so the fuzzer gets past the
    framing checks, with raw values mixed in)."""

    TYPES = (0, 1, 4, 8, 11, 13)  # IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES

    def __init__(self, src: Bytes, memory, qsize: int, sectors: int) -> None:
        self.src, self.memory, self.qsize, self.published = src, memory, qsize, 0
        headers = []
        for i in range(qsize):
            kind, a = src.int(1), src.int(2)
            addr = memory.size - (a & 0xFFF) if kind & 0x80 else DATA + a  # past RAM's end, or inside
            shape = kind >> 3 & 3
            if shape == 0:  # a request header
                rtype, sector = src.int(1), src.int(2) % (sectors + 8)
                if rtype & 0x40:
                    sector = (1 << 64) - 1 - sector
                rtype = self.TYPES[rtype % 8] if rtype % 8 < 6 else src.int(4)
                headers.append((addr, struct.pack("<IIQ", rtype, 0, sector)))
                length = 16
            elif shape == 1:  # data, whole sectors
                length = 512 * (src.int(1) % 9)
            else:  # a status byte, or any length
                length = 1 if shape == 2 else src.int(2)
            nxt = i + 1 if kind & 0x20 else src.int(1)
            memory.write(DESC + 16 * i, struct.pack("<QIHH", addr, length, kind & 7, nxt))
        memory.write(DATA, src.bytes(src.int(2) % 4096))  # what indirect tables and payloads hold
        for addr, header in headers:
            if memory.contains(addr, 16):
                memory.write(addr, header)
        memory.write(AVAIL, bytes(4 + 2 * qsize + 2))
        memory.write(USED, bytes(4 + 8 * qsize + 2))
        memory.write_u16(AVAIL + 4 + 2 * qsize, src.int(2))  # used_event

    def publish(self, count: int) -> None:
        """``count`` more heads on the avail ring (a head may be out of range or still held)."""
        for _ in range(count):
            head = self.src.int(1) % (self.qsize + 1)
            self.memory.write_u16(AVAIL + 4 + 2 * (self.published % self.qsize), head)
            self.published += 1
        self.memory.write_u16(AVAIL + 2, self.published & 0xFFFF)

    def used_idx(self) -> int:
        return self.memory.read_u16(USED + 2)


class _Irq:
    count = 0

    def trigger(self, kind=None) -> None:
        self.count += 1

    def needs_reset(self, why: str) -> None:
        pass


def _blk_checks(memory, disk, before: bytes) -> None:
    """What every virtio-blk input must leave true."""
    assert not memory.faults, memory.faults  # no access outside RAM, even one the device caught
    assert not disk.outside, disk.outside  # the device refused every request beyond the disk
    if disk.read_only:
        assert disk.contents == before  # a read-only image is untouched


def virtio_blk(data: bytes) -> None:
    """virtio-blk requests of any type, sector, length and chain shape, some in flight
    across a reset, through the device and an in-memory disk."""
    from aiokvm.devices.virtio.blk import VirtioBlk
    from aiokvm.devices.virtio.queue import SplitQueue, VirtqueueError

    src = Bytes(data)
    cfg, sectors = src.int(1), src.int(1) % 64 + 1
    qsize = 1 << (cfg & 3) + 1  # 2..16
    disk = _Disk(sectors, read_only=bool(cfg & 4), delay=cfg >> 5 & 3)
    before = disk.contents
    memory = _memory(b"")
    driver = _BlkDriver(src, memory, qsize, sectors)
    device = VirtioBlk(disk)

    async def main() -> None:
        try:
            queue = SplitQueue(memory, qsize, DESC, AVAIL, USED, event_idx=bool(cfg & 8), indirect=bool(cfg & 16))
        except VirtqueueError:
            return
        device.activate(memory, [queue], 0, _Irq())
        for _ in range(4):
            if not src.left:
                break
            step = src.int(1)
            driver.publish(step & 7)
            try:
                device.notify(0)
            except VirtqueueError:
                pass  # the transport's NEEDS_RESET
            for _ in range(step >> 3 & 3):
                await asyncio.sleep(0)
            if step & 0x80:  # reset with requests in flight: none completes into the old ring
                used = driver.used_idx()
                fence = device.reset()
                if fence is not None:
                    await fence
                assert driver.used_idx() == used
                break
        await device.drain()

    _run(main(), 2)
    _blk_checks(memory, disk, before)


def mmio_blk(data: bytes) -> None:
    """Register sequences on a virtio-blk device's transport: half-set queues at DRIVER_OK,
    resets with requests in flight (held Status writes), kicks at any time."""
    from aiokvm.devices.virtio import mmio
    from aiokvm.devices.virtio.blk import VirtioBlk

    src = Bytes(data)
    cfg, sectors = src.int(1), src.int(1) % 64 + 1
    qsize = 1 << (cfg & 3) + 1
    disk = _Disk(sectors, read_only=bool(cfg & 4), delay=cfg >> 5 & 3)
    before = disk.contents
    ops = Bytes(src.bytes(src.int(2) % 2048))  # the register accesses first, the ring from the rest
    memory = _memory(b"")
    driver = _BlkDriver(src, memory, qsize, sectors)
    t = mmio.MmioTransport(VirtioBlk(disk), memory, lambda: None)
    steps = (0, mmio.ACKNOWLEDGE, mmio.ACKNOWLEDGE | mmio.DRIVER, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK,
             mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK | mmio.DRIVER_OK)
    queue_regs = ((mmio.QUEUE_NUM, qsize), (mmio.QUEUE_DESC_LOW, DESC), (mmio.QUEUE_DRIVER_LOW, AVAIL),
                  (mmio.QUEUE_DEVICE_LOW, USED), (mmio.QUEUE_READY, 1))
    held = []  # Status writes the transport holds (a vCPU waiting in its exit)

    async def main() -> None:
        for _ in range(256):
            if ops.left < 2:
                break
            op, arg = ops.int(1), ops.int(1)
            kind = op & 7
            if kind == 0:
                t.read(arg * 4, (1, 2, 4, 8)[op >> 3 & 3])
            elif kind == 1:
                t.write(arg * 4, 2 if op & 0x80 else 4, ops.int(4))
            elif kind == 2:
                fence = t.write(mmio.STATUS, 4, steps[arg % 5] if arg < 250 else ops.int(1))
                if fence is not None:
                    held.append(fence)
            elif kind == 3:
                sel = arg & 1
                t.write(mmio.DRIVER_FEATURES_SEL, 4, sel)
                word = t.offered >> 32 * sel & 0xFFFF_FFFF
                t.write(mmio.DRIVER_FEATURES, 4, word if op & 0x80 else ops.int(4))
            elif kind == 4:  # some of a queue's registers: a half-set queue if DRIVER_OK comes next
                t.write(mmio.QUEUE_SEL, 4, arg >> 6)
                for bit, (reg, value) in enumerate(queue_regs):
                    if arg >> bit & 1:
                        t.write(reg, 4, ops.int(2) if op & 0x80 and bit == 0 else value)
            elif kind == 5:
                driver.publish(arg & 15)
                if op & 0x80:
                    t.write(mmio.QUEUE_NOTIFY, 4, 0)
            elif kind == 6:
                t.write(mmio.QUEUE_NOTIFY, 4, arg & 1)
            else:
                if op & 0x80 and held:
                    await held.pop(0)  # the held vCPU goes on once the old generation drained
                for _ in range(arg & 7):
                    await asyncio.sleep(0)
        await t.device.drain()
        await asyncio.gather(*held)

    _run(main(), 2)
    _blk_checks(memory, disk, before)


def ata(data: bytes) -> None:
    """Port I/O on the legacy ATA disk: registers, commands, data-port reads and
    writes of any size and count (``rep insw``/``outsw``), resets mid-command."""
    from aiokvm.devices.ata import AtaDisk

    src = Bytes(data)
    cfg, sectors = src.int(1), src.int(1) % 64 + 1
    disk = _Disk(sectors, read_only=bool(cfg & 1), delay=cfg >> 1 & 3)
    before = disk.contents
    ata = AtaDisk(disk, irq=lambda level: None)
    ctrl = ata.control_port()
    commands = (0x20, 0x21, 0x30, 0x31, 0xEC, 0xE7, 0xEA)

    async def main() -> None:
        for _ in range(512):
            if src.left < 2:
                break
            op, arg = src.int(1), src.int(1)
            kind, size, port = op & 7, (1, 2, 4)[(op >> 3 & 3) % 3], arg & 7 if op & 0x80 else 0
            if kind == 0:
                assert 0 <= ata.read(arg & 7, size) < 1 << 8 * size
            elif kind == 1:
                ata.write(arg & 7, size, src.int(size))
            elif kind == 2:  # rep insw: one exit, many elements
                count = src.int(2) % 1024
                assert len(ata.read_string(port, size, count)) == size * count
            elif kind == 3:  # rep outsw
                n = size * (src.int(2) % 1024)
                ata.write_string(port, size, src.bytes(n).ljust(n, b"\0"))
            elif kind == 4:
                ctrl.write(0, 1, arg)
            elif kind == 5:
                ctrl.read(0, 1)
            elif kind == 6:  # a command as a driver issues it: device, count, LBA, then the command
                lba = src.int(4) & 0x0FFF_FFFF if op & 0x80 else src.int(1) % (sectors + 4)
                for reg, value in ((6, 0xE0 | lba >> 24), (2, src.int(1)), (3, lba), (4, lba >> 8), (5, lba >> 16)):
                    ata.write(reg, 1, value & 0xFF)
                ata.write(7, 1, commands[arg % 8] if arg % 8 < 7 else src.int(1))
            else:
                for _ in range(arg & 7):
                    await asyncio.sleep(0)
            assert len(ata._buffer) <= 256 * 512  # the transfer buffer stays bounded
        await ata.drain()

    _run(main(), 2)
    assert not disk.outside, disk.outside
    if disk.read_only:
        assert disk.contents == before


class _Wire:
    """The NBD client's half of the connection: keeps what the client sends; once
    closed, drops writes and fails ``drain`` as a lost asyncio connection does."""

    def __init__(self) -> None:
        self.sent, self.closed = bytearray(), False

    def write(self, data) -> None:
        if not self.closed:
            self.sent += data

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.write(chunk)

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("Connection lost")

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    async def wait_closed(self) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default


class _Peer(asyncio.StreamReader):
    """The server's bytes, as the client reads them; no read may ask for more than
    the client's own bound (a length the server claims must not size a buffer)."""

    def __init__(self, bound: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bound = bound

    async def readexactly(self, n: int) -> bytes:
        assert 0 <= n <= self.bound, n
        return await super().readexactly(n)


def _pick(src: Bytes, index: int, choices: tuple, nbytes: int) -> int:
    """``choices[index]``; ``None`` there means a raw value of ``nbytes`` from the input."""
    value = choices[index]
    return src.int(nbytes) if value is None else value


def _nbd_server_bytes(src: Bytes, nbd, sectors: int) -> tuple[bytes, bytes]:
    """A server's handshake (greeting, option replies, an export-name answer) and its
    replies (simple, structured, errors, wrong cookies, payloads), templates with
    fuzzed fields and raw bytes mixed in."""
    cfg = src.int(1)
    size = sectors * 512 + (src.int(2) if cfg & 8 else 0)
    hello = src.bytes(18) if cfg & 1 else struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, src.int(1) & 3)
    handshake = bytearray(hello)
    for _ in range(src.int(1) % 8):
        k = src.int(1)
        magic = src.int(8) if k & 0x80 else nbd.OPTION_REPLY_MAGIC
        option = src.int(4) if k & 0x40 else nbd.OPT_GO
        reply = _pick(src, k & 7, (nbd.REP_ACK, nbd.REP_INFO, nbd.REP_INFO, nbd.REP_INFO, nbd.REP_ERR_UNSUP,
                                   nbd.REP_ERROR_BIT + 6, nbd.REP_ERROR_BIT + 5, None), 4)
        info = k >> 3 & 3
        if reply != nbd.REP_INFO:
            body = src.bytes(src.int(1))
        elif info == 0:
            body = struct.pack(">HQH", nbd.INFO_EXPORT, size, src.int(2))
        elif info == 1:
            body = struct.pack(">HIII", nbd.INFO_BLOCK_SIZE, 1 << src.int(1) % 18, src.int(4), src.int(4))
        else:
            body = struct.pack(">H", src.int(2)) + src.bytes(src.int(1) % 16)
        length = src.int(4) if k & 0x20 and info == 3 else len(body)
        handshake += struct.pack(">QIII", magic, option, reply, length) + body
    if cfg & 2:  # the answer to NBD_OPT_EXPORT_NAME, with or without the 124 zeroes
        handshake += struct.pack(">QH", size, src.int(2)) + bytes(124 if cfg & 4 else 0)
    replies = bytearray()
    for _ in range(src.int(1) % 16):
        k = src.int(1)
        magic = _pick(src, k & 3, (nbd.SIMPLE_REPLY_MAGIC, nbd.SIMPLE_REPLY_MAGIC, nbd.STRUCTURED_REPLY_MAGIC, None), 4)
        error = _pick(src, k >> 2 & 7, (0, 0, 0, 5, 28, 108, 22, None), 4)
        cookie = k >> 5 if k >> 5 else src.int(8)  # the client's cookies count from 1
        replies += struct.pack(">IIQ", magic, error, cookie) + src.bytes(src.int(2) % 8704)
    return bytes(handshake), bytes(replies)


def nbd_client(data: bytes) -> None:
    """The NBD client against a hostile server: any handshake, option replies and
    transmission replies, arriving in pieces, with requests in flight."""
    from aiokvm.devices.backends import nbd
    from aiokvm.devices.backends.base import BackendIOError

    src = Bytes(data)
    cfg, sectors = src.int(1), src.int(1) % 64 + 1
    handshake, replies = _nbd_server_bytes(src, nbd, sectors)
    requests = [(src.int(1), src.int(2), src.int(2)) for _ in range(src.int(1) % 8)]
    chunk = cfg % 64 + 1  # the server's bytes arrive in pieces of this size
    address = nbd.NbdAddress(export="disk", socket_path="/fuzz")
    wire = _Wire()

    async def feed(reader, stream: bytes) -> None:
        for at in range(0, len(stream), chunk):
            reader.feed_data(stream[at:at + chunk])
            await asyncio.sleep(0)
        await asyncio.sleep(0)

    async def request(backend, k: int, offset: int, length: int) -> None:
        if not k & 0x80:  # aligned and inside a small disk, mostly
            offset, length = offset % sectors * 512, length % 65 * 512
        verb = k % 5
        if verb == 0:
            await backend.readv(offset, [memoryview(bytearray(length))])
        elif verb == 1:
            await backend.writev(offset, [memoryview(bytes(length))])
        elif verb == 2:
            await backend.flush()
        elif verb == 3:
            await backend.discard(offset, length)
        else:
            await backend.write_zeroes(offset, length)

    async def main() -> None:
        reader = _Peer(nbd.MAX_OPTION_REPLY, limit=nbd.STREAM_LIMIT)
        shake = asyncio.get_running_loop().create_task(nbd._handshake(reader, wire, address))
        await feed(reader, handshake)
        if not shake.done():
            reader.feed_eof()  # the server stops talking mid-handshake
        try:
            info = await shake
        except (nbd._HandshakeError, ConfigError, asyncio.IncompleteReadError, OSError):
            return  # what connect() turns into a ConfigError
        if info.size % 512:
            return  # connect() refuses it
        start = len(wire.sent)
        backend = nbd.NbdBackend("nbd+unix:///disk?socket=/fuzz", address, reader, wire, info,
                                 read_only=bool(cfg & 0x80))
        reader.bound = 64 * 512  # from now on, only a read's payload: at most a request's own length
        work = asyncio.gather(*(request(backend, *r) for r in requests), return_exceptions=True)
        for _ in range(3):  # the requests' tasks, then their pieces' tasks, send
            await asyncio.sleep(0)
        # However small a maximum payload the server claims, a transfer's pieces go out a window at a time.
        assert _check_nbd_requests(nbd, wire.sent[start:], info.size, backend.max_payload) <= (
            nbd.SPLIT_WINDOW * len(requests))
        await feed(reader, replies)
        reader.feed_eof()
        for result in await work:
            if result is not None and not isinstance(result, BackendIOError):
                raise result
        await backend.close()
        _check_nbd_requests(nbd, wire.sent[start:], info.size, backend.max_payload)

    _run(main(), 1)


def _check_nbd_requests(nbd, sent: bytes, size: int, max_payload: int) -> int:
    """Every request the client sent is well formed and inside the export; how many."""
    at = count = 0
    while at < len(sent):
        magic, flags, command, _cookie, offset, length = nbd.REQUEST.unpack_from(sent, at)
        assert magic == nbd.REQUEST_MAGIC and command in nbd.CMD_NAMES
        if command != nbd.CMD_DISC and command != nbd.CMD_FLUSH:
            assert offset + length <= size and length <= max_payload, (command, offset, length)
        at += nbd.REQUEST.size + (length if command == nbd.CMD_WRITE else 0)
        count += 1
    return count


TARGETS = {f.__name__: f for f in (virtqueue, mmio_net, bridge, stream, vde_request, vxlan, elf, multiboot, serial,
                                            virtio_blk, mmio_blk, ata, nbd_client)}


def quiet() -> None:
    """Campaigns: the devices' log lines (one per rejected input) would drown the fuzzer's own."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))


def run_one(name: str, data: bytes) -> None:
    """One input through one target (what the fuzzer and the corpus replay both call)."""
    TARGETS[name](data)

