"""Guest RAM: anonymous mmap regions with bounds-checked access.

Every access names a guest-physical address and a length.  An access that is
not wholly inside one RAM region raises ``GuestMemoryError``; nothing here can
reach host memory outside the regions, whatever the guest put in a descriptor.

Threat model: addresses and lengths come from the guest (descriptors, DMA
pointers).  The bound that holds is ``region.start <= addr`` and
``addr + length <= region.end``, checked with Python integers (no overflow).
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass

from .errors import ConfigError, GuestMemoryError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# QEMU microvm (7.2, measured) keeps at most 3 GiB of RAM below 4 GiB and puts
# the rest above 4 GiB, leaving the MMIO hole (virtio-mmio at 0xfeb00000,
# IOAPIC, LAPIC) free.
BELOW_4G_LIMIT = 0xC000_0000
HIGH_RAM_START = 0x1_0000_0000
MIN_MEMORY = 2 * MiB

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}


def parse_size(value: int | str) -> int:
    """Parse ``64M``, ``1G``, ``512MiB`` or an int (bytes).  Binary units."""
    if isinstance(value, bool):
        raise ConfigError(f"invalid memory size {value!r}: give bytes or e.g. 64M, 1G")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(str(value))
        if not match:
            raise ConfigError(f"invalid memory size {value!r}: use a number with K, M or G, e.g. 64M")
        size = int(match.group(1)) * _UNITS[match.group(2).upper()]
    return size


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def validate_memory_size(size: int) -> int:
    if size < MIN_MEMORY:
        raise ConfigError(f"memory size {size} bytes is too small: give at least 2M")
    if size % (4 * KiB):
        raise ConfigError(f"memory size {size} bytes is not a multiple of 4K")
    limit = host_memory_bytes()
    if size > limit:
        raise ConfigError(
            f"memory size {size // MiB}M exceeds host RAM ({limit // MiB}M): ask for less"
        )
    return size


@dataclass(frozen=True)
class MemoryRegion:
    """One contiguous guest-physical RAM range backed by an anonymous mmap."""

    start: int
    size: int
    mapping: mmap.mmap

    @property
    def end(self) -> int:
        return self.start + self.size


class GuestMemory:
    """Guest RAM, laid out like QEMU microvm: low RAM from 0, the rest above 4 GiB."""

    def __init__(self, size: int | str) -> None:
        size = validate_memory_size(parse_size(size))
        self.size = size
        low = min(size, BELOW_4G_LIMIT)
        layout = [(0, low)]
        if size > low:
            layout.append((HIGH_RAM_START, size - low))
        self.regions: list[MemoryRegion] = []
        self._views: list[memoryview] = []
        try:
            for start, length in layout:
                mapping = mmap.mmap(
                    -1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0),
                    prot=mmap.PROT_READ | mmap.PROT_WRITE,
                )
                self.regions.append(MemoryRegion(start, length, mapping))
                self._views.append(memoryview(mapping))
        except OSError as exc:
            self.close()
            raise ConfigError(f"cannot allocate {size // MiB}M of guest memory: {exc.strerror}") from None
        self._bounds = [(r.start, r.end, v) for r, v in zip(self.regions, self._views, strict=True)]

    # -- lookup ---------------------------------------------------------------
    def _locate(self, addr: int, length: int) -> tuple[memoryview, int]:
        # On every device access: plain tuples, no property calls.
        if length >= 0 and addr >= 0:
            for start, end, view in self._bounds:
                if start <= addr and addr + length <= end:
                    return view, addr - start
        raise GuestMemoryError(addr, length)

    def contains(self, addr: int, length: int = 1) -> bool:
        # Checked for every descriptor a driver hands over: a plain loop, no generator.
        if addr < 0 or length < 0:
            return False
        for start, end, _ in self._bounds:  # noqa: SIM110 - any(genexpr) is the slow form this avoids
            if start <= addr and addr + length <= end:
                return True
        return False

    def ram_ranges(self) -> list[tuple[int, int]]:
        """``(start, size)`` of each RAM range, for the e820 map."""
        return [(r.start, r.size) for r in self.regions]

    # -- access -----------------------------------------------------------------
    def view(self, addr: int, length: int) -> memoryview:
        """Zero-copy, writable view of ``[addr, addr+length)``."""
        view, offset = self._locate(addr, length)
        return view[offset:offset + length]

    def read(self, addr: int, length: int) -> bytes:
        view, offset = self._locate(addr, length)
        return bytes(view[offset:offset + length])

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        view, offset = self._locate(addr, length)
        view[offset:offset + length] = data

    def read_u8(self, addr: int) -> int:
        view, offset = self._locate(addr, 1)
        return view[offset]

    def read_u16(self, addr: int) -> int:
        view, offset = self._locate(addr, 2)
        return struct.unpack_from("<H", view, offset)[0]

    def read_u32(self, addr: int) -> int:
        view, offset = self._locate(addr, 4)
        return struct.unpack_from("<I", view, offset)[0]

    def read_u64(self, addr: int) -> int:
        view, offset = self._locate(addr, 8)
        return struct.unpack_from("<Q", view, offset)[0]

    # Stores into guest RAM must never pass through an intermediate value: a
    # vCPU on another core may be reading the same word (a ring index).
    # struct.pack_into zero-fills its target before packing, which a guest
    # polling the word sees as a transient 0 (measured here); a slice
    # assignment is one memcpy of the final bytes.
    def write_u16(self, addr: int, value: int) -> None:
        view, offset = self._locate(addr, 2)
        view[offset:offset + 2] = (value & 0xFFFF).to_bytes(2, "little")

    def write_u32(self, addr: int, value: int) -> None:
        view, offset = self._locate(addr, 4)
        view[offset:offset + 4] = (value & 0xFFFF_FFFF).to_bytes(4, "little")

    def write_u64(self, addr: int, value: int) -> None:
        view, offset = self._locate(addr, 8)
        view[offset:offset + 8] = (value & (2**64 - 1)).to_bytes(8, "little")

    def host_address(self, region: MemoryRegion) -> int:
        """Host virtual address of a region's mapping (for KVM_SET_USER_MEMORY_REGION)."""
        from .kvm import ffi

        return int(ffi.cast("uintptr_t", ffi.from_buffer(region.mapping)))

    def invalidate_page(self, addr: int) -> bool:
        """Make KVM drop its mapping of the guest page holding ``addr`` (what
        pc-testdev's flush port asks for); the guest's next touch faults it in.

        QEMU takes the page away (PROT_NONE) and gives it back.  Here the
        page gains PROT_EXEC and loses it again: a protection change all the
        same, so the kernel's MMU notifier tells KVM to unmap it, but host
        threads that read or write the page in between (device models on the
        loop) never fault.  Returns False for an address outside RAM.
        """
        if not self.contains(addr & ~0xFFF, 0x1000):
            return False
        for region in self.regions:
            if region.start <= addr < region.end:
                host = self.host_address(region) + ((addr & ~0xFFF) - region.start)
                mprotect = _libc_mprotect()
                rw = mmap.PROT_READ | mmap.PROT_WRITE
                if mprotect(host, 0x1000, rw | _PROT_EXEC) != 0:
                    return False  # a W^X policy refuses it: nothing changed
                return mprotect(host, 0x1000, rw) == 0
        return False  # pragma: no cover - contains() said it is RAM

    def close(self) -> None:
        self._bounds = []
        for view in self._views:
            view.release()
        self._views = []
        for region in self.regions:
            try:
                region.mapping.close()
            except BufferError:
                pass  # a device still holds a view; freed with the last reference
        self.regions = []

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_PROT_EXEC = 0x4
_mprotect = None


def _libc_mprotect():
    global _mprotect
    if _mprotect is None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        libc.mprotect.restype = ctypes.c_int
        _mprotect = libc.mprotect
    return _mprotect
