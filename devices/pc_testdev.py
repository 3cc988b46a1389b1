"""pc-testdev: QEMU's x86 test device (``hw/misc/pc-testdev.c``), which
kvm-unit-tests drives.

- ports 0xe0-0xe3: a 32-bit scratch register; an access of n bytes at
  0xe0+k touches bytes k..k+n-1 of it (the emulator test checks that
  string I/O and odd sizes reach it whole);
- ports 0xe8-0xeb: the same register, through a window QEMU serves a byte
  at a time (a wide access is split, the result the same);
- port 0xe4: a 32-bit write of a guest-physical address makes KVM drop its
  mapping of that page (``GuestMemory.invalidate_page``), so the guest's
  next access to it faults: the event-injection test needs that;
- ports 0x2000-0x2017: a byte write of v sets interrupt line n (0-23) to
  ``v != 0`` on the irqchip (QEMU's own stops at the 16 ISA lines);
- 64 KiB of MMIO scratch at 0xff000000, read and written as plain memory
  (accesses that run past its end are cut at the end).

Register machine, no I/O: the irqchip and the page flush are callables.  It
runs inline in the vCPU threads; a lock makes each access whole.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

SCRATCH_PORT = 0xE0
PORTS_SIZE = 0x0C  # 0xe0-0xe3 scratch, 0xe4-0xe7 flush, 0xe8-0xeb byte scratch
FLUSH_OFFSET = 0x04
BYTE_SCRATCH_OFFSET = 0x08
IRQ_PORT = 0x2000
IRQ_LINES = 24
IOMEM_BASE = 0xFF00_0000
IOMEM_SIZE = 0x1_0000


class PcTestdev:
    """The scratch and flush ports (attach at ``SCRATCH_PORT``, ``PORTS_SIZE``
    bytes); ``irq_port()`` and ``iomem()`` are its other two windows."""

    kind = "pc-testdev"

    def __init__(self, *, irq_line: Callable[[int, bool], None], flush_page: Callable[[int], bool]) -> None:
        self._irq_line = irq_line
        self._flush_page = flush_page
        self._lock = threading.Lock()
        self.scratch = 0
        self.iomem_buf = bytearray(IOMEM_SIZE)
        self.counters = {"scratch_accesses": 0, "page_flushes": 0, "flushes_refused": 0, "irq_writes": 0,
                         "iomem_accesses": 0, "invalid_accesses": 0}

    # -- the ports at 0xe0 ----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset >= BYTE_SCRATCH_OFFSET:
                offset -= BYTE_SCRATCH_OFFSET
            elif offset >= FLUSH_OFFSET:
                self.counters["invalid_accesses"] += 1  # the flush port is write-only
                return 0
            self.counters["scratch_accesses"] += 1
            shift, mask = self._field(offset, size)
            return (self.scratch & mask) >> shift

    def write(self, offset: int, size: int, value: int) -> None:
        if FLUSH_OFFSET <= offset < BYTE_SCRATCH_OFFSET:
            if offset != FLUSH_OFFSET or size != 4:
                with self._lock:
                    self.counters["invalid_accesses"] += 1
                return
            flushed = self._flush_page(value & 0xFFFF_F000)
            with self._lock:
                self.counters["page_flushes" if flushed else "flushes_refused"] += 1
            return
        with self._lock:
            if offset >= BYTE_SCRATCH_OFFSET:
                offset -= BYTE_SCRATCH_OFFSET
            self.counters["scratch_accesses"] += 1
            shift, mask = self._field(offset, size)
            self.scratch = (self.scratch & ~mask) | ((value << shift) & mask)

    @staticmethod
    def _field(offset: int, size: int) -> tuple[int, int]:
        shift = (offset & 3) * 8
        return shift, (((1 << (8 * size)) - 1) << shift) & 0xFFFF_FFFF

    # -- the other windows ------------------------------------------------------------------------
    def irq_port(self) -> _IrqPort:
        return _IrqPort(self)

    def iomem(self) -> _IoMem:
        return _IoMem(self)

    def metrics(self) -> dict:
        with self._lock:
            return {"kind": self.kind, "counters": dict(self.counters)}


class _IrqPort:
    """0x2000+n: a byte write sets line n."""

    kind = "pc-testdev-irq"

    def __init__(self, dev: PcTestdev) -> None:
        self._dev = dev

    def read(self, offset: int, size: int) -> int:
        with self._dev._lock:
            self._dev.counters["invalid_accesses"] += 1  # write-only, as in QEMU
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        dev = self._dev
        if size != 1 or not 0 <= offset < IRQ_LINES:
            with dev._lock:
                dev.counters["invalid_accesses"] += 1
            return
        with dev._lock:
            dev.counters["irq_writes"] += 1
        dev._irq_line(offset, bool(value & 0xFF))


class _IoMem:
    """0xff000000: 64 KiB of scratch memory behind MMIO exits."""

    kind = "pc-testdev-iomem"

    def __init__(self, dev: PcTestdev) -> None:
        self._dev = dev

    def read(self, offset: int, size: int) -> int:
        dev = self._dev
        with dev._lock:
            dev.counters["iomem_accesses"] += 1
            return int.from_bytes(dev.iomem_buf[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        dev = self._dev
        with dev._lock:
            dev.counters["iomem_accesses"] += 1
            end = min(offset + size, IOMEM_SIZE)
            if offset < end:
                dev.iomem_buf[offset:end] = value.to_bytes(size, "little")[:end - offset]
