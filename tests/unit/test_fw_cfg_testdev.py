"""fw_cfg and pc-testdev as register machines: what QEMU's do, byte for byte,
and hostile accesses counted, never raised; both hammered from threads."""

from __future__ import annotations

import struct
import threading

from aiokvm.devices.fw_cfg import NB_CPUS, RAM_SIZE, FwCfg
from aiokvm.devices.pc_testdev import IOMEM_SIZE, IRQ_LINES, PcTestdev


def read_item(dev: FwCfg, key: int, n: int) -> bytes:
    dev.write(0, 2, key)
    return bytes(dev.read(1, 1) for _ in range(n))


def test_fw_cfg_items_as_kvm_unit_tests_read_them():
    dev = FwCfg(cpus=3, ram_size=128 << 20)
    assert read_item(dev, 0x00, 4) == b"QEMU"
    assert struct.unpack("<I", read_item(dev, 0x01, 4))[0] == 1  # port interface, no DMA
    assert struct.unpack("<H", read_item(dev, NB_CPUS, 2))[0] == 3
    assert struct.unpack("<Q", read_item(dev, RAM_SIZE, 8))[0] == 128 << 20
    # Past the end, unknown keys, the arch-local table: zeros.
    assert read_item(dev, NB_CPUS, 4)[2:] == b"\0\0"
    assert read_item(dev, 0x11, 8) == bytes(8) and read_item(dev, 0x8000, 4) == bytes(4)
    assert dev.unknown_selects == 2
    # The write-channel bit is not part of the key.
    assert read_item(dev, 0x4000 | NB_CPUS, 2) == b"\x03\0"


def test_fw_cfg_each_selection_rewinds_and_other_accesses_change_nothing():
    dev = FwCfg(cpus=1, ram_size=1 << 20, items={0x30: b"abcdef"})
    assert read_item(dev, 0x30, 3) == b"abc"
    dev.write(1, 1, 0x55)  # a byte write is a data write: ignored
    dev.write(0, 1, 0x00)  # ... at the selector too: not a selection
    dev.write(0, 4, 0x30)  # not an access QEMU's region takes
    assert dev.read(1, 2) == 0 and dev.read(0, 4) == 0  # nor are these
    assert dev.read(0, 1) == ord("d")  # QEMU: a byte read at either port reads data
    dev.write(1, 2, 0x30)  # ... and a 16-bit write at either port selects
    assert bytes(dev.read(1, 1) for _ in range(6)) == b"abcdef"
    assert dev.invalid_accesses == 5
    assert dev.metrics()["counters"]["selects"] == 2


def test_fw_cfg_concurrent_selectors_never_see_a_torn_state():
    dev = FwCfg(cpus=2, ram_size=1 << 20, items={0x30: b"A" * 64, 0x31: b"B" * 64})
    errors = []

    def hammer(key: int, want: int) -> None:
        for _ in range(2000):
            dev.write(0, 2, key)
            value = dev.read(1, 1)
            if value not in (ord("A"), ord("B"), 0):
                errors.append(value)

    threads = [threading.Thread(target=hammer, args=(0x30 + i % 2, i)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and dev.selects == 8000 and dev.data_reads == 8000


def make_testdev():
    lines, flushed = [], []
    dev = PcTestdev(irq_line=lambda n, level: lines.append((n, level)),
                    flush_page=lambda addr: flushed.append(addr) or addr < 0x1000000)
    return dev, lines, flushed


def test_scratch_register_by_any_width_and_through_the_byte_window():
    dev, _, _ = make_testdev()
    dev.write(0, 4, 0x11223344)
    assert dev.read(0, 4) == 0x11223344 and dev.read(1, 2) == 0x2233 and dev.read(3, 1) == 0x11
    dev.write(2, 1, 0xAA)
    assert dev.read(0, 4) == 0x11AA3344
    assert dev.read(8, 4) == 0x11AA3344 and dev.read(9, 1) == 0x33  # 0xe8 shares the register
    dev.write(0xB, 1, 0x00)
    assert dev.read(0, 4) == 0x00AA3344
    dev.write(3, 4, 0xFFFFFFFF)  # runs past the register: only its top byte is there
    assert dev.read(0, 4) == 0xFFAA3344


def test_flush_port_takes_a_32_bit_address_and_counts_refusals():
    dev, _, flushed = make_testdev()
    dev.write(4, 4, 0x123456)
    dev.write(4, 4, 0xFFFFF000)  # outside RAM: refused, counted
    dev.write(4, 2, 0x1000)  # wrong width: not a flush
    assert flushed == [0x123000, 0xFFFFF000]
    assert dev.read(4, 4) == 0
    counters = dev.metrics()["counters"]
    assert counters["page_flushes"] == 1 and counters["flushes_refused"] == 1 and counters["invalid_accesses"] == 2


def test_irq_port_sets_lines_and_refuses_the_rest():
    dev, lines, _ = make_testdev()
    irq = dev.irq_port()
    irq.write(0x0E, 1, 1)
    irq.write(0x0E, 1, 0)
    irq.write(23, 1, 0x80)
    irq.write(IRQ_LINES, 1, 1)  # past the lines
    irq.write(0, 2, 1)  # not a byte
    assert irq.read(0, 1) == 0
    assert lines == [(14, True), (14, False), (23, True)]
    assert dev.metrics()["counters"]["invalid_accesses"] == 3


def test_iomem_is_plain_memory_cut_at_its_end():
    dev, _, _ = make_testdev()
    mem = dev.iomem()
    mem.write(0x100, 8, 0x0102030405060708)
    assert mem.read(0x100, 8) == 0x0102030405060708 and mem.read(0x104, 2) == 0x0304
    mem.write(IOMEM_SIZE - 2, 4, 0xAABBCCDD)
    assert mem.read(IOMEM_SIZE - 2, 4) == 0xCCDD
