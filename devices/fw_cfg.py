"""fw_cfg: QEMU's firmware configuration interface, port-I/O form.

The guest writes a 16-bit key to the selector port (0x510) and reads the
item's bytes one at a time from the data port (0x511); each selection
rewinds to the item's first byte.  This is the interface kvm-unit-tests
reads: the vCPU count (``NB_CPUS``, which SMP bring-up waits for), the RAM
size.  Items are little-endian, as QEMU stores them.  As in QEMU, an
unknown key, or reading past an item's end, reads as zero; data-port writes
are ignored (QEMU dropped the write channel in 2.4); the DMA interface
(0x514) is not offered, and ``FW_CFG_ID`` says so (bit 0 only).

Register machine, no I/O.  It runs inline in the vCPU threads; several
vCPUs may select and read at once (the guests take a lock, a hostile one
need not), so one lock covers the selection and its cursor: each access
sees a whole state, never another vCPU's half-done one.
"""

from __future__ import annotations

import struct
import threading

FW_CFG_PORT = 0x510
FW_CFG_PORT_SIZE = 2  # selector (16 bits, at +0) and data (8 bits, at +1)

SIGNATURE = 0x00
ID = 0x01
RAM_SIZE = 0x03
NOGRAPHIC = 0x04
NB_CPUS = 0x05
MAX_CPUS = 0x0F
FILE_DIR = 0x19

KEY_MASK = 0x3FFF  # the key without the write-channel (0x4000) and arch-local (0x8000) bits
ARCH_LOCAL = 0x8000  # x86's own items (ACPI tables, e820...) live in a second table: not offered
ID_TRADITIONAL = 1 << 0  # the port interface; bit 1 (DMA) stays clear


class FwCfg:
    """The items a guest may read, by key.  ``items`` override or extend the defaults."""

    kind = "fw_cfg"

    def __init__(self, *, cpus: int, ram_size: int, max_cpus: int | None = None,
                 items: dict[int, bytes] | None = None) -> None:
        self._items: dict[int, bytes] = {
            SIGNATURE: b"QEMU",
            ID: struct.pack("<I", ID_TRADITIONAL),
            RAM_SIZE: struct.pack("<Q", ram_size),
            NOGRAPHIC: struct.pack("<H", 1),
            NB_CPUS: struct.pack("<H", cpus),
            MAX_CPUS: struct.pack("<H", max_cpus or cpus),
            FILE_DIR: struct.pack(">I", 0),  # no files (the directory is big-endian)
        }
        self._items.update(items or {})
        self._lock = threading.Lock()
        self._selected = b""
        self._cursor = 0
        self.selects = 0
        self.unknown_selects = 0
        self.data_reads = 0
        self.invalid_accesses = 0

    def item(self, key: int) -> bytes:
        return self._items.get(key, b"")

    # QEMU's x86 port region (fw_cfg_comb_*) accepts any 1-byte access and
    # 2-byte writes, at either port: a byte read returns the next data byte,
    # a 2-byte write selects, a byte write is a data write (ignored since 2.4).
    # Anything else reads as zero, is counted, and changes nothing.
    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if size != 1:
                self.invalid_accesses += 1
                return 0
            self.data_reads += 1
            if self._cursor >= len(self._selected):
                return 0
            self._cursor += 1
            return self._selected[self._cursor - 1]

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if size != 2:
                self.invalid_accesses += 1  # data-port writes among them: QEMU ignores those too
                return
            self.selects += 1
            data = self._items.get(value & (KEY_MASK | ARCH_LOCAL))  # the write-channel bit is not part of it
            if data is None:
                self.unknown_selects += 1
            self._selected = data or b""
            self._cursor = 0

    def metrics(self) -> dict:
        return {"kind": self.kind, "counters": {"selects": self.selects, "unknown_selects": self.unknown_selects,
                                                "data_reads": self.data_reads,
                                                "invalid_accesses": self.invalid_accesses}}
