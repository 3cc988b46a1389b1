"""The Multiboot v1 boot protocol, as QEMU's ``-kernel`` does it.

A Multiboot image carries a 12-byte header (magic 0x1BADB002, flags,
checksum; the three sum to 0 mod 2**32) 4-byte aligned in its first 8 KiB.
Without flag 16 the loader reads the file as an ELF32 and copies its PT_LOAD
segments by physical address; with flag 16 (the "a.out kludge") the header
itself says where the file goes.  The guest starts in 32-bit protected mode,
paging off, with EAX = 0x2BADB002 and EBX = the Multiboot information
structure: memory sizes, the command line, the modules and the memory map.

This is how kvm-unit-tests' x86 ``.flat`` files boot (ELF32 containers
around 64-bit code).  As QEMU does, the command line the guest reads starts
with the image's path (the tests take it as argv[0]), modules go
page-aligned after the image, each with its string.  Boot data stays in
the same low pages as PVH's (``boot.BOOT_INFO_RANGES``): clear of the
image, of page 0 (the AP trampoline of kvm-unit-tests) and of real-mode
images at 32 KiB.

Threat model: the image is untrusted input; every field is checked against
the file and guest RAM; every problem is a one-line ``ConfigError``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .boot import (
    CMDLINE_ADDR,
    E820_RAM,
    HIGH_MEMORY,
    GuestImage,
    Segment,
    e820_map,
    image_error,
    parse_elf_file,
    place_modules,
    read_cstring,
    write_cmdline,
)
from .errors import ConfigError, GuestMemoryError
from .memory import GuestMemory

HEADER_MAGIC = 0x1BADB002
BOOT_MAGIC = 0x2BADB002  # EAX at entry
SEARCH_BYTES = 8192

FLAG_PAGE_ALIGN = 1 << 0  # modules page-aligned: always so here
FLAG_MEMORY_INFO = 1 << 1  # mem_lower/upper and the map: always given
FLAG_VIDEO_MODE = 1 << 2  # a video mode wish: there is no display, so it is ignored (as QEMU does)
FLAG_ADDRESSES = 1 << 16  # the a.out kludge: the header's own load addresses
REQUIRED_MASK = 0xFFFF  # bits 0-15: a loader must refuse those it does not know
KNOWN_REQUIRED = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE

HEADER = struct.Struct("<III")
ADDRESSES = struct.Struct("<IIIII")  # header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr

# The information structure (Multiboot 0.6.96 section 3.3), up to the boot loader name.
INFO = struct.Struct("<IIIIIII16xII12xI")  # flags mem_lower mem_upper boot_device cmdline mods_count mods_addr
#                                             (syms) mmap_length mmap_addr (drives, config) boot_loader_name
INFO_SIZE = 88  # with the APM and VBE fields, left zero
INFO_MEMORY, INFO_BOOT_DEVICE, INFO_CMDLINE, INFO_MODS = 1 << 0, 1 << 1, 1 << 2, 1 << 3
INFO_MMAP, INFO_LOADER_NAME = 1 << 6, 1 << 9
BOOT_DEVICE = 0x8000FFFF  # "BIOS disk 0x80, no partition": what QEMU writes
MODULE = struct.Struct("<IIII")  # mod_start, mod_end, string, reserved
MMAP_ENTRY = struct.Struct("<IQQI")  # size (20: the bytes after this field), base, length, type

# Where it goes: the same low pages PVH uses (boot.BOOT_INFO_RANGES).
INFO_ADDR = 0x6000
LOADER_NAME_ADDR = 0x6060
MODS_ADDR = 0x6100
MODS_MAX = (0x6400 - MODS_ADDR) // MODULE.size
MMAP_ADDR = 0x6400
MMAP_MAX = (0x7000 - MMAP_ADDR) // MMAP_ENTRY.size
LOADER_NAME = b"aiokvm\0"


@dataclass(frozen=True)
class MultibootImage(GuestImage):
    """A parsed Multiboot v1 image."""

    flags: int = 0
    header_offset: int = 0
    bits: int = 32


def find_header(data: bytes) -> int | None:
    """Offset of the first valid Multiboot header in the first 8 KiB, or None.

    As QEMU: offsets below 8192 - 48, so that the whole header with its
    address fields lies in the searched bytes."""
    limit = min(len(data) - HEADER.size, SEARCH_BYTES - 48 - 1)
    for offset in range(0, limit + 1, 4):
        magic, flags, checksum = HEADER.unpack_from(data, offset)
        if magic == HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return offset
    return None


def parse_multiboot(data: bytes, path: str = "<image>") -> MultibootImage:
    """Parse a Multiboot v1 image.  Raises ``ConfigError`` only."""
    offset = find_header(data)
    if offset is None:
        raise image_error(path, "no Multiboot header (magic 0x1BADB002 with a valid checksum) in the first 8 KiB")
    flags = HEADER.unpack_from(data, offset)[1]
    unknown = flags & REQUIRED_MASK & ~KNOWN_REQUIRED
    if unknown:
        raise image_error(path, f"Multiboot header requires features {unknown:#x} this loader does not provide "
                         f"(it knows page alignment, memory info and the video-mode wish)")
    if flags & FLAG_ADDRESSES:
        return _parse_addresses(data, path, offset, flags)
    elf = parse_elf_file(data, path)
    if elf.bits != 32:
        raise image_error(path, "a Multiboot ELF must be ELF32 (i386); wrap 64-bit code in an ELF32 container "
                         "as kvm-unit-tests does (objcopy -O elf32-i386)")
    if elf.entry >= 1 << 32:  # pragma: no cover - an ELF32 field cannot hold more
        raise image_error(path, f"entry {elf.entry:#x} is above 4 GiB")
    return MultibootImage(path, elf.entry, elf.segments, data, flags, offset)


def _parse_addresses(data: bytes, path: str, offset: int, flags: int) -> MultibootImage:
    if offset + HEADER.size + ADDRESSES.size > len(data):
        raise image_error(path, "truncated Multiboot header: flag 16 needs its five address fields")
    header_addr, load_addr, load_end, bss_end, entry = ADDRESSES.unpack_from(data, offset + HEADER.size)
    if header_addr < load_addr or header_addr - load_addr > offset:
        raise image_error(path, f"Multiboot header_addr {header_addr:#x} and load_addr {load_addr:#x} put the "
                         f"load start before the file's start")
    file_start = offset - (header_addr - load_addr)
    if load_end == 0:
        load_end = load_addr + len(data) - file_start
    if load_end < load_addr or load_end - load_addr > len(data) - file_start:
        raise image_error(path, f"Multiboot load_end_addr {load_end:#x} is before load_addr or past the end "
                                f"of the file")
    if bss_end == 0:
        bss_end = load_end
    if bss_end < load_end:
        raise image_error(path, f"Multiboot bss_end_addr {bss_end:#x} is before load_end_addr {load_end:#x}")
    if bss_end == load_addr:
        raise image_error(path, "Multiboot header loads nothing (load_addr == load_end_addr == bss_end_addr)")
    segment = Segment(load_addr, file_start, load_end - load_addr, bss_end - load_addr)
    return MultibootImage(path, entry, (segment,), data, flags, offset)


def memory_sizes(memory: GuestMemory) -> tuple[int, int]:
    """``mem_lower`` and ``mem_upper`` in KiB: RAM below 640 KiB (less the
    EBDA, as the map says) and contiguous RAM from 1 MiB."""
    lower = upper = 0
    for start, size, kind in e820_map(memory):
        if kind != E820_RAM:
            continue
        if start == 0:
            lower = size // 1024
        elif start == HIGH_MEMORY:
            upper = size // 1024
    return lower, upper


def write_multiboot_info(memory: GuestMemory, cmdline: str, modules=(), image_end: int = HIGH_MEMORY) -> int:
    """Write the information structure, the command line, the modules and the
    memory map.  Returns the structure's address (EBX at entry)."""
    if len(modules) > MODS_MAX:
        raise ConfigError(f"{len(modules)} modules; Multiboot boot here takes at most {MODS_MAX}")
    memmap = e820_map(memory)
    if len(memmap) > MMAP_MAX:  # pragma: no cover - two regions at most today
        raise ConfigError("too many memory map entries")
    lower, upper = memory_sizes(memory)
    try:
        strings_at = write_cmdline(memory, cmdline)
        placed = place_modules(memory, image_end, modules, strings_at)
        for i, mod in enumerate(placed):
            memory.write(MODS_ADDR + i * MODULE.size, MODULE.pack(mod.start, mod.end, mod.string_addr, 0))
        for i, (start, size, kind) in enumerate(memmap):
            memory.write(MMAP_ADDR + i * MMAP_ENTRY.size, MMAP_ENTRY.pack(MMAP_ENTRY.size - 4, start, size, kind))
        memory.write(LOADER_NAME_ADDR, LOADER_NAME)
        flags = INFO_MEMORY | INFO_BOOT_DEVICE | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME
        info = bytearray(INFO_SIZE)
        INFO.pack_into(info, 0, flags, lower, upper, BOOT_DEVICE, CMDLINE_ADDR, len(placed),
                       MODS_ADDR, len(memmap) * MMAP_ENTRY.size, MMAP_ADDR, LOADER_NAME_ADDR)
        memory.write(INFO_ADDR, bytes(info))
    except GuestMemoryError:  # pragma: no cover - memory is at least 2 MiB
        raise ConfigError("guest memory too small for the Multiboot boot info") from None
    return INFO_ADDR


def parse_multiboot_info(memory: GuestMemory, addr: int = INFO_ADDR) -> dict:
    """Read back an information structure (tests and debugging)."""
    (flags, lower, upper, _dev, cmdline, mods_count, mods_addr, mmap_length, mmap_addr,
     loader) = INFO.unpack(memory.read(addr, INFO.size))
    modules = []
    for i in range(mods_count):
        start, end, string, _ = MODULE.unpack(memory.read(mods_addr + i * MODULE.size, MODULE.size))
        modules.append({"start": start, "end": end, "string": read_cstring(memory, string)})
    mmap = []
    at = mmap_addr
    while at < mmap_addr + mmap_length:
        size, base, length, kind = MMAP_ENTRY.unpack(memory.read(at, MMAP_ENTRY.size))
        mmap.append((base, length, kind))
        at += size + 4
    return {"flags": flags, "mem_lower": lower, "mem_upper": upper, "cmdline": read_cstring(memory, cmdline),
            "modules": modules, "mmap": mmap, "loader": read_cstring(memory, loader)}

