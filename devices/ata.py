"""ATA PIO disk on the legacy primary channel (0x1f0-0x1f7, 0x3f6, IRQ 14).

The disk the seed document describes: every word of data crosses an exit
(``in``/``out`` per word), or one exit per sector with ``rep insw``/``rep
outsw`` (KVM batches string I/O; the bus hands the whole string to
``read_string``/``write_string``).

Commands: IDENTIFY DEVICE (0xEC), READ SECTORS (0x20), WRITE SECTORS (0x30),
FLUSH CACHE (0xE7, and 0xEA), LBA28 only.  Anything else aborts (ERR, ABRT).
Status/error/BSY/DRQ follow the ATA protocol closely enough for a textbook
polling driver: BSY while the backend works, DRQ while a sector is ready to
move, ERR with IDNF for an LBA past the end, ABRT for a write to a read-only
disk.  The register machine is synchronous; backend I/O runs as asyncio
tasks on the loop (the device is loop-hosted) and the guest polls BSY.

Threat model: the guest controls every register.  LBA and count are checked
against capacity before any I/O; data-port accesses outside a DRQ phase read
as zero and are dropped; the transfer buffer is bounded (256 sectors).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import structlog

from .backends.base import SECTOR_SIZE, BackendIOError, count_backend_error

log = structlog.get_logger("aiokvm.devices.ata")

ATA_BASE = 0x1F0
ATA_CTRL = 0x3F6
ATA_IRQ = 14
SECTOR = SECTOR_SIZE

# Status bits.
BSY, DRDY, DF, DSC, DRQ, ERR = 0x80, 0x40, 0x20, 0x10, 0x08, 0x01
# Error bits.
ABRT, IDNF = 0x04, 0x10
# Device control bits.
NIEN, SRST = 0x02, 0x04

CMD_READ, CMD_READ_NR, CMD_WRITE, CMD_WRITE_NR = 0x20, 0x21, 0x30, 0x31
CMD_IDENTIFY, CMD_FLUSH, CMD_FLUSH_EXT = 0xEC, 0xE7, 0xEA
LBA28_MAX = 0x0FFF_FFFF


@dataclass
class AtaCounters:
    commands: int = 0
    sectors_read: int = 0
    sectors_written: int = 0
    flushes: int = 0
    aborted: int = 0
    data_words: int = 0
    backend_errors: dict[str, int] = field(default_factory=dict)  # by errno name


def _ata_string(text: str, length: int) -> bytes:
    """ATA identify strings: space padded, bytes swapped within each word."""
    raw = text.encode("ascii", "replace")[:length].ljust(length, b" ")
    return bytes(b for i in range(0, length, 2) for b in (raw[i + 1], raw[i]))


class AtaDisk:
    """The primary-channel master.  Register it at 0x1f0 (8 ports) and
    ``control_port()`` at 0x3f6 (1 port)."""

    kind = "ata"

    def __init__(self, backend, irq: Callable[[bool], None] | None = None) -> None:
        if backend.size % SECTOR:
            raise ValueError("backend size must be a multiple of 512")
        self.backend = backend
        self.capacity = backend.size // SECTOR
        self.read_only = bool(backend.read_only)
        self._irq = irq
        self.counters = AtaCounters()
        self.log = log  # the device manager binds vm= and device=
        self._tasks: set[asyncio.Task] = set()
        self._identify = self._build_identify()
        self._reset()

    # -- state -------------------------------------------------------------------
    def _reset(self) -> None:
        self.status = DRDY | DSC
        self.error = 1  # diagnostic: no error
        self.features = 0
        self.count = 1
        self.lba = [1, 0, 0]
        self.device = 0xA0
        self.control = 0
        self._buffer = bytearray()
        self._pos = 0
        self._op: int | None = None
        self._next_lba = 0
        self._remaining = 0
        self._irq_pending = False
        self._set_irq(False)
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()

    def _slave_selected(self) -> bool:
        return bool(self.device & 0x10)

    def _set_irq(self, level: bool) -> None:
        self._irq_pending = level
        if self._irq is not None:
            self._irq(level and not self.control & NIEN)

    def _interrupt(self) -> None:
        self._set_irq(True)

    def _lba28(self) -> int:
        return (self.device & 0x0F) << 24 | self.lba[2] << 16 | self.lba[1] << 8 | self.lba[0]

    def _backend_failed(self, exc: BackendIOError) -> None:
        # The command aborts (the guest sees ERR).  Counted by errno and logged
        # once per kind: a dead backend fails every command the guest retries.
        if count_backend_error(self.counters.backend_errors, exc):
            self.log.warning("ATA backend error: the command aborts", error=str(exc),
                             count=sum(self.counters.backend_errors.values()))
        self._abort(ABRT)

    def _abort(self, error: int = ABRT) -> None:
        self.counters.aborted += 1
        self.error = error
        self.status = DRDY | DSC | ERR
        self._op = None
        self._interrupt()

    # -- register file -------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return self._read_data(size)
        if self._slave_selected():
            return 0  # no slave: a driver sees an empty status and moves on
        if offset == 1:
            return self.error
        if offset == 2:
            return self.count & 0xFF
        if offset in (3, 4, 5):
            return self.lba[offset - 3]
        if offset == 6:
            return self.device
        if offset == 7:
            self._set_irq(False)  # reading the status register acknowledges the interrupt
            return self.status
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self._write_data(size, value)
            return
        value &= 0xFF
        if offset == 1:
            self.features = value
        elif offset == 2:
            self.count = value
        elif offset in (3, 4, 5):
            self.lba[offset - 3] = value
        elif offset == 6:
            self.device = value | 0xA0
        elif offset == 7 and not self._slave_selected():
            self._command(value)

    def control_read(self, offset: int, size: int) -> int:
        return 0 if self._slave_selected() else self.status  # alternate status: no ack

    def control_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if value & SRST and not self.control & SRST:
            # SRST rising: drop what is in flight; the device stays busy (and
            # ignores commands) for as long as the host holds SRST.
            self._reset()
            self.status = BSY | DSC
        elif self.control & SRST and not value & SRST:
            # SRST falling completes the reset, as in QEMU's ide_ctrl_write: a
            # driver's 1-then-0 sequence resets the device even when SRST was
            # already held (the chaos guest left it set; a stale write then
            # completed over the next IDENTIFY).
            self._reset()
        self.control = value
        self._set_irq(self._irq_pending)

    def control_port(self) -> _Control:
        return _Control(self)

    # -- commands --------------------------------------------------------------------------
    def _command(self, command: int) -> None:
        if self.status & BSY:
            return  # commands while busy are ignored, as on real drives
        self.counters.commands += 1
        self.error = 0
        self._set_irq(False)
        count = self.count or 256
        if command == CMD_IDENTIFY:
            self._start_data_in(bytearray(self._identify), op=command)
        elif command in (CMD_READ, CMD_READ_NR):
            lba = self._lba28()
            if lba + count > self.capacity:
                self._abort(IDNF | ABRT)
                return
            self._op, self._next_lba, self._remaining = command, lba, count
            self._spawn(self._read_sectors(lba, count))
        elif command in (CMD_WRITE, CMD_WRITE_NR):
            lba = self._lba28()
            if self.read_only:
                self._abort(ABRT)
                return
            if lba + count > self.capacity:
                self._abort(IDNF | ABRT)
                return
            self._op, self._next_lba, self._remaining = command, lba, count
            self._buffer = bytearray(SECTOR)
            self._pos = 0
            self.status = DRDY | DSC | DRQ  # PIO data-out: the first sector needs no interrupt
        elif command in (CMD_FLUSH, CMD_FLUSH_EXT):
            self._op = command
            self._spawn(self._flush())
        else:
            self._abort(ABRT)

    def _spawn(self, coro) -> None:
        self.status = BSY | DSC
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_data_in(self, data: bytearray, op: int) -> None:
        self._buffer = data
        self._pos = 0
        self._op = op
        self.status = DRDY | DSC | DRQ
        self._interrupt()

    async def _read_sectors(self, lba: int, count: int) -> None:
        data = bytearray(count * SECTOR)
        try:
            await self.backend.readv(lba * SECTOR, [memoryview(data)])
        except BackendIOError as exc:
            self._backend_failed(exc)
            return
        self.counters.sectors_read += count
        self._start_data_in(data, CMD_READ)

    async def _write_sector(self, lba: int, sector: bytes) -> None:
        try:
            await self.backend.writev(lba * SECTOR, [memoryview(sector)])
        except BackendIOError as exc:
            self._backend_failed(exc)
            return
        self.counters.sectors_written += 1
        self._remaining -= 1
        self._next_lba += 1
        if self._remaining:
            self._buffer = bytearray(SECTOR)
            self._pos = 0
            self.status = DRDY | DSC | DRQ
        else:
            self._op = None
            self.status = DRDY | DSC
        self._interrupt()

    async def _flush(self) -> None:
        try:
            await self.backend.flush()
        except BackendIOError as exc:
            self._backend_failed(exc)
            return
        self.counters.flushes += 1
        self._op = None
        self.status = DRDY | DSC
        self._interrupt()

    # -- the data port -----------------------------------------------------------------------
    def _read_data(self, size: int) -> int:
        if not self.status & DRQ or self._op is None or self._op in (CMD_WRITE, CMD_WRITE_NR):
            return 0
        chunk = bytes(self._buffer[self._pos:self._pos + size])
        self._advance_in(len(chunk))
        return int.from_bytes(chunk.ljust(size, b"\0"), "little")

    def read_string(self, offset: int, size: int, count: int) -> bytes:
        """``rep insw``: ``count`` elements in one call (data port only)."""
        if offset != 0:
            return b"".join(self.read(offset, size).to_bytes(size, "little") for _ in range(count))
        out = bytearray()
        want = size * count
        while len(out) < want and self.status & DRQ and self._op not in (None, CMD_WRITE, CMD_WRITE_NR):
            # Stop at a sector boundary: the next sector may not be ready yet.
            boundary = SECTOR - (self._pos % SECTOR) if self._op != CMD_IDENTIFY else len(self._buffer) - self._pos
            take = min(want - len(out), boundary, len(self._buffer) - self._pos)
            out += self._buffer[self._pos:self._pos + take]
            self._advance_in(take)
        return bytes(out.ljust(want, b"\0"))

    def _advance_in(self, n: int) -> None:
        self.counters.data_words += n // 2
        self._pos += n
        if self._pos >= len(self._buffer):
            self._buffer = bytearray()
            self._pos = 0
            self._op = None
            self.status = DRDY | DSC
        elif self._op in (CMD_READ, CMD_READ_NR) and self._pos % SECTOR == 0:
            self._interrupt()  # the next sector is ready (already read): DRQ stays set

    def _write_data(self, size: int, value: int) -> None:
        if not self.status & DRQ or self._op not in (CMD_WRITE, CMD_WRITE_NR):
            return
        self._accept(value.to_bytes(size, "little"))

    def write_string(self, offset: int, size: int, data: bytes) -> None:
        """``rep outsw``: all elements in one call (data port only)."""
        if offset != 0:
            for i in range(0, len(data), size):
                self.write(offset, size, int.from_bytes(data[i:i + size], "little"))
            return
        pos = 0
        while pos < len(data) and self.status & DRQ and self._op in (CMD_WRITE, CMD_WRITE_NR):
            take = min(len(data) - pos, SECTOR - self._pos)
            self._accept(data[pos:pos + take])
            pos += take

    def _accept(self, data: bytes) -> None:
        n = min(len(data), SECTOR - self._pos)
        self._buffer[self._pos:self._pos + n] = data[:n]
        self._pos += n
        self.counters.data_words += n // 2
        if self._pos >= SECTOR:
            sector = bytes(self._buffer)
            self._spawn(self._write_sector(self._next_lba, sector))

    # -- IDENTIFY ----------------------------------------------------------------------------
    def _build_identify(self) -> bytes:
        words = [0] * 256
        sectors = min(self.capacity, LBA28_MAX)
        cylinders = min(sectors // (16 * 63), 16383)
        words[0] = 0x0040                 # fixed, non-removable ATA device
        words[1], words[3], words[6] = cylinders, 16, 63
        words[47] = 0x8000                # READ/WRITE MULTIPLE: not supported (0 sectors)
        words[49] = 0x0200                # LBA supported
        words[51] = 0x0200                # PIO timing mode 2
        words[53] = 0x0001                # words 54-58 valid
        words[54], words[55], words[56] = cylinders, 16, 63
        chs = cylinders * 16 * 63
        words[57], words[58] = chs & 0xFFFF, chs >> 16
        words[60], words[61] = sectors & 0xFFFF, sectors >> 16
        words[80] = 0x007E                # ATA/ATAPI-1..6
        words[82] = 0x4000
        words[83] = 0x4000 | 0x1000       # FLUSH CACHE supported
        words[84] = 0x4000
        words[85] = 0x4000
        words[86] = 0x1000                # FLUSH CACHE enabled
        words[87] = 0x4000
        data = bytearray(struct.pack("<256H", *words))
        serial = getattr(self.backend, "serial", "aiokvm") or "aiokvm"
        data[20:40] = _ata_string(serial, 20)
        data[46:54] = _ata_string("0.1", 8)
        data[54:94] = _ata_string("aiokvm ATA disk", 40)
        return bytes(data)

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def metrics(self) -> dict:
        return {"kind": self.kind, "counters": asdict(self.counters)}

    async def aclose(self) -> None:
        """Wait for commands in flight, then close the backend."""
        await self.drain()
        await self.backend.close()


class _Control:
    """The 0x3f6 port (alternate status / device control) as its own bus device."""

    def __init__(self, disk: AtaDisk) -> None:
        self.disk = disk

    def read(self, offset: int, size: int) -> int:
        return self.disk.control_read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.disk.control_write(offset, size, value)
