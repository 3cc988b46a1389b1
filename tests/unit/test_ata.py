"""The ATA PIO register machine, driven like a textbook polling driver."""

from __future__ import annotations

import asyncio
import struct

import pytest

from aiokvm.devices.ata import ABRT, BSY, DRQ, ERR, IDNF, AtaDisk
from aiokvm.devices.backends.memory import MemoryBackend

DATA, ERROR, COUNT, LBA0, LBA1, LBA2, DEVICE, CMD = range(8)


class Driver:
    """Port accesses as a guest driver makes them (polling, nIEN set)."""

    def __init__(self, disk: AtaDisk) -> None:
        self.disk = disk
        self.ctrl = disk.control_port()
        self.ctrl.write(0, 1, 0x02)  # nIEN

    async def wait(self) -> int:
        for _ in range(10_000):
            status = self.disk.read(CMD, 1)
            if not status & BSY:
                return status
            await asyncio.sleep(0)
        raise AssertionError("BSY never cleared")

    def select(self, lba: int, count: int) -> None:
        self.disk.write(DEVICE, 1, 0xE0 | (lba >> 24) & 0xF)
        self.disk.write(COUNT, 1, count & 0xFF)
        self.disk.write(LBA0, 1, lba & 0xFF)
        self.disk.write(LBA1, 1, (lba >> 8) & 0xFF)
        self.disk.write(LBA2, 1, (lba >> 16) & 0xFF)

    async def read_sectors(self, lba: int, count: int, *, rep: bool) -> bytes:
        self.select(lba, count)
        self.disk.write(CMD, 1, 0x20)
        out = bytearray()
        for _ in range(count or 256):
            status = await self.wait()
            assert status & DRQ and not status & ERR
            if rep:
                out += self.disk.read_string(DATA, 2, 256)
            else:
                for _ in range(256):
                    out += struct.pack("<H", self.disk.read(DATA, 2))
        return bytes(out)

    async def write_sectors(self, lba: int, data: bytes, *, rep: bool) -> int:
        count = len(data) // 512
        self.select(lba, count)
        self.disk.write(CMD, 1, 0x30)
        for i in range(count):
            status = await self.wait()
            if status & ERR:
                return status
            assert status & DRQ
            chunk = data[i * 512:(i + 1) * 512]
            if rep:
                self.disk.write_string(DATA, 2, chunk)
            else:
                for j in range(0, 512, 2):
                    self.disk.write(DATA, 2, int.from_bytes(chunk[j:j + 2], "little"))
        return await self.wait()


def disk(sectors: int = 64, *, read_only: bool = False, data: bytes | None = None) -> AtaDisk:
    return AtaDisk(MemoryBackend(sectors * 512, read_only=read_only, data=data))


async def test_identify_reports_lba28_capacity():
    d = disk(1000)
    drv = Driver(d)
    drv.disk.write(DEVICE, 1, 0xA0)
    d.write(CMD, 1, 0xEC)
    status = await drv.wait()
    assert status & DRQ
    words = struct.unpack("<256H", d.read_string(DATA, 2, 256))
    assert words[60] | words[61] << 16 == 1000
    assert words[49] & 0x0200  # LBA
    model = bytes(b for i in range(27, 47) for b in struct.pack(">H", words[i])).decode().strip()
    assert model == "aiokvm ATA disk"
    assert not d.read(CMD, 1) & DRQ  # the 256 words are consumed


@pytest.mark.parametrize("rep", [False, True])
async def test_write_then_read_round_trips(rep):
    d = disk()
    drv = Driver(d)
    payload = bytes((i * 7 + 3) & 0xFF for i in range(512 * 5))
    status = await drv.write_sectors(9, payload, rep=rep)
    assert not status & ERR
    assert await drv.read_sectors(9, 5, rep=rep) == payload
    view = bytearray(5 * 512)
    await d.backend.readv(9 * 512, [memoryview(view)])
    assert bytes(view) == payload  # it reached the backend, at the right place


async def test_flush_cache():
    d = disk()
    drv = Driver(d)
    d.write(CMD, 1, 0xE7)
    status = await drv.wait()
    assert not status & ERR
    assert d.counters.flushes == 1


async def test_lba_past_the_end_is_idnf_and_nothing_moves():
    d = disk(16)
    drv = Driver(d)
    drv.select(15, 2)
    d.write(CMD, 1, 0x20)
    status = await drv.wait()
    assert status & ERR
    assert d.read(ERROR, 1) & IDNF
    assert d.counters.sectors_read == 0


async def test_write_to_read_only_disk_aborts_and_leaves_it_unchanged():
    original = bytes(range(256)) * 32
    d = disk(16, read_only=True, data=original)
    drv = Driver(d)
    status = await drv.write_sectors(0, b"\xaa" * 512, rep=True)
    assert status & ERR
    assert d.read(ERROR, 1) & ABRT
    assert await drv.read_sectors(0, 16, rep=True) == original


async def test_unknown_command_aborts():
    d = disk()
    drv = Driver(d)
    d.write(CMD, 1, 0x99)
    status = await drv.wait()
    assert status & ERR and d.read(ERROR, 1) & ABRT


async def test_count_zero_means_256_sectors():
    d = disk(300)
    drv = Driver(d)
    data = await drv.read_sectors(0, 0, rep=True)
    assert len(data) == 256 * 512


async def test_data_port_outside_a_transfer_is_harmless():
    d = disk()
    assert d.read(DATA, 2) == 0
    d.write(DATA, 2, 0x1234)
    assert d.read_string(DATA, 2, 4) == b"\0" * 8
    assert d.read(CMD, 1) & 0x40  # DRDY


async def test_slave_select_reads_as_no_device():
    d = disk()
    d.write(DEVICE, 1, 0xB0)
    assert d.read(CMD, 1) == 0


class SlowBackend(MemoryBackend):
    """Writes take a few loop turns, so a reset can land while one is in flight."""

    async def writev(self, offset, buffers):
        for _ in range(20):
            await asyncio.sleep(0)
        await super().writev(offset, buffers)


async def test_srst_falling_resets_even_when_srst_was_already_held():
    """Found by the chaos guest: SRST left set, a write started, then a
    driver's SRST-then-clear.  Before, only SRST's rising edge reset, so the
    driver's sequence reset nothing, its IDENTIFY was ignored as busy, and the
    stale write then completed over it (status 0x50, no DRQ)."""
    d = AtaDisk(SlowBackend(64 * 512))
    ctrl = d.control_port()
    ctrl.write(0, 1, 0x02)  # nIEN
    drv = Driver(d)
    drv.select(0, 1)
    d.write(CMD, 1, 0x30)  # WRITE SECTORS: one sector of data, then the backend works
    d.write_string(DATA, 2, b"\x5a" * 512)
    assert d.read(CMD, 1) & BSY
    ctrl.write(0, 1, 0x06)  # SRST held (as a hostile guest leaves it)...
    assert d.read(CMD, 1) & BSY  # ...the device is in reset
    ctrl.write(0, 1, 0x06)  # a driver's reset: SRST (no edge: it was set)...
    ctrl.write(0, 1, 0x02)  # ...then clear: the reset completes here
    assert d.read(CMD, 1) & (BSY | DRQ | ERR) == 0
    d.write(CMD, 1, 0xEC)  # IDENTIFY
    for _ in range(50):  # the cancelled write must not come back over it
        await asyncio.sleep(0)
    assert d.read(CMD, 1) & DRQ
    assert len(d.read_string(DATA, 2, 256)) == 512
    assert d.counters.sectors_written == 0


async def test_commands_are_ignored_while_srst_is_held():
    d = disk()
    ctrl = d.control_port()
    ctrl.write(0, 1, 0x06)
    d.write(CMD, 1, 0xEC)
    assert d.read(CMD, 1) & BSY and not d.read(CMD, 1) & DRQ
    ctrl.write(0, 1, 0x02)
    d.write(CMD, 1, 0xEC)
    assert d.read(CMD, 1) & DRQ
