"""Guest loading: ELF parsing and the PVH boot protocol, as QEMU does it.

The guest is an ELF executable, either ELF64 x86-64 or ELF32 i386 (QEMU
boots both), with a ``Xen`` note of type 18 (``XEN_ELFNOTE_PHYS32_ENTRY``)
whose 4- or 8-byte descriptor is the 32-bit entry point.  Its PT_LOAD segments
are copied to their physical addresses, ``struct hvm_start_info`` (version 1:
command line and an e820-style memory map) is written to low memory, and
vCPU 0 starts in 32-bit protected mode with paging off and EBX pointing at the
start info.

Threat model: the image is untrusted input.  Every size and offset is checked
against the file length and guest RAM before anything is copied; any problem
is a one-line ``ConfigError``.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, GuestMemoryError
from .memory import GuestMemory

ELF_MAGIC = b"\x7fELF"
EI_NIDENT = 16
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_386 = 3
EM_X86_64 = 62
ET_EXEC = 2
PT_LOAD = 1
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18

# The header fields are in the same order in both classes, only wider in
# ELF64; the program header also moves p_flags (after p_type in ELF64).
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
EHDR32 = struct.Struct("<16sHHIIIIIHHHHHH")
PHDR32 = struct.Struct("<IIIIIIII")
NHDR = struct.Struct("<III")  # 4-byte words in both classes

HVM_START_MAGIC = 0x336EC578
HVM_START_INFO = struct.Struct("<IIIIQQQQII")
HVM_MEMMAP_ENTRY = struct.Struct("<QQII")
E820_RAM = 1
E820_RESERVED = 2

# Where the boot information goes (below the 1 MiB load address, away from
# the real-mode IVT/BDA and the SMP trampoline page the guest kit uses).
START_INFO_ADDR = 0x6000
MEMMAP_ADDR = 0x6040
MEMMAP_MAX_ENTRIES = (0x6800 - MEMMAP_ADDR) // HVM_MEMMAP_ENTRY.size
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x8000  # bytes including the NUL
BOOT_INFO_RANGES = ((START_INFO_ADDR, 0x7000), (CMDLINE_ADDR, CMDLINE_ADDR + CMDLINE_MAX))


@dataclass(frozen=True)
class ElfLayout:
    """What differs between the two accepted ELF classes."""

    bits: int
    machine: int
    machine_name: str
    ehdr: struct.Struct
    phdr: struct.Struct
    # Indices of p_type, p_offset, p_paddr, p_filesz, p_memsz in ``phdr``.
    phdr_fields: tuple[int, int, int, int, int]


ELF_LAYOUTS = {
    ELFCLASS64: ElfLayout(64, EM_X86_64, "x86-64", EHDR, PHDR, (0, 2, 4, 5, 6)),
    ELFCLASS32: ElfLayout(32, EM_386, "i386", EHDR32, PHDR32, (0, 1, 3, 4, 5)),
}


@dataclass(frozen=True)
class Segment:
    paddr: int
    offset: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class GuestImage:
    """What either boot protocol loads: segments from the file's bytes, and a 32-bit entry."""

    path: str
    entry32: int
    segments: tuple[Segment, ...]
    data: bytes = field(repr=False)

    @property
    def span(self) -> tuple[int, int]:
        return (min(s.paddr for s in self.segments), max(s.paddr + s.memsz for s in self.segments))


@dataclass(frozen=True)
class ElfImage(GuestImage):
    """A parsed PVH guest image."""

    bits: int = 64  # ELF class: 32 or 64


def image_error(path: str, why: str) -> ConfigError:
    """The one-line error for a malformed guest image."""
    return ConfigError(f"{path}: {why}")


@dataclass(frozen=True)
class ElfFile:
    """What both boot protocols read from an ELF: its class, entry and loadable segments."""

    bits: int
    entry: int  # e_entry (Multiboot's entry point; PVH has its own note)
    segments: tuple[Segment, ...]
    pvh_entry: int | None


def parse_elf_file(data: bytes, path: str = "<image>") -> ElfFile:
    """Validate an ELF64 x86-64 or ELF32 i386 executable and list its PT_LOAD
    segments (and the PVH entry note, if any).  Raises ``ConfigError`` only."""
    if len(data) < 4 or data[:4] != ELF_MAGIC:
        raise image_error(path, "not an ELF file (bad magic); give an ELF64 x86-64 or ELF32 i386 PVH guest, "
                         "or a Multiboot image")
    if len(data) < EI_NIDENT:
        raise image_error(path, "truncated ELF header")
    layout = ELF_LAYOUTS.get(data[4])
    if layout is None:
        raise image_error(path, f"ELF class {data[4]} is neither 32-bit (1) nor 64-bit (2)")
    if data[5] != ELFDATA2LSB:
        raise image_error(path, "not a little-endian ELF")
    if len(data) < layout.ehdr.size:
        raise image_error(path, "truncated ELF header")
    (_ident, e_type, e_machine, _version, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, *_rest) = layout.ehdr.unpack_from(data, 0)
    if e_machine != layout.machine:
        raise image_error(path, f"{layout.bits}-bit ELF machine {e_machine} is not {layout.machine_name} "
                         f"({layout.machine})")
    if e_type != ET_EXEC:
        raise image_error(path, f"ELF type {e_type} is not an executable (ET_EXEC); link it statically")
    if e_phnum == 0:
        raise image_error(path, "ELF has no program headers")
    if e_phentsize != layout.phdr.size:
        raise image_error(path, f"ELF program header size {e_phentsize} is not {layout.phdr.size}")
    if e_phoff + e_phnum * layout.phdr.size > len(data):
        raise image_error(path, "truncated: program headers run past the end of the file")

    segments: list[Segment] = []
    entry32: int | None = None
    type_at, offset_at, paddr_at, filesz_at, memsz_at = layout.phdr_fields
    for i in range(e_phnum):
        fields = layout.phdr.unpack_from(data, e_phoff + i * layout.phdr.size)
        p_type, p_offset, p_paddr = fields[type_at], fields[offset_at], fields[paddr_at]
        p_filesz, p_memsz = fields[filesz_at], fields[memsz_at]
        if p_type == PT_LOAD:
            if p_filesz > p_memsz:
                raise image_error(path, f"segment {i}: file size {p_filesz:#x} exceeds memory size {p_memsz:#x}")
            if p_offset + p_filesz > len(data):
                raise image_error(path, f"truncated: segment {i} runs past the end of the file")
            if p_paddr + p_memsz > 1 << layout.bits:
                # Such a segment would wrap to address 0 (as in QEMU's sums): malformed, not loadable.
                raise image_error(path, f"segment {i} at {p_paddr:#x} (size {p_memsz:#x}) runs past the end "
                                 f"of the {layout.bits}-bit address space")
            if p_memsz:
                segments.append(Segment(p_paddr, p_offset, p_filesz, p_memsz))
        elif p_type == PT_NOTE:
            if p_offset + p_filesz > len(data):
                raise image_error(path, f"truncated: note segment {i} runs past the end of the file")
            found = _find_pvh_entry(data[p_offset:p_offset + p_filesz], path)
            if found is not None:
                entry32 = found
    if not segments:
        raise image_error(path, "ELF has no loadable (PT_LOAD) segments")
    return ElfFile(layout.bits, e_entry, tuple(segments), entry32)


def parse_elf(data: bytes, path: str = "<image>") -> ElfImage:
    """Parse and validate an ELF64 or ELF32 PVH image.  Raises ``ConfigError`` only."""
    elf = parse_elf_file(data, path)
    if elf.pvh_entry is None:
        raise image_error(path, "no PVH entry note (Xen note type 18, XEN_ELFNOTE_PHYS32_ENTRY) and no Multiboot "
                         "header; aiokvm boots guests by the PVH or the Multiboot v1 protocol")
    return ElfImage(path, elf.pvh_entry, elf.segments, data, elf.bits)


def _find_pvh_entry(notes: bytes, path: str) -> int | None:
    pos = 0
    while pos + NHDR.size <= len(notes):
        namesz, descsz, ntype = NHDR.unpack_from(notes, pos)
        pos += NHDR.size
        name_end = pos + namesz
        desc_start = pos + ((namesz + 3) & ~3)
        desc_end = desc_start + descsz
        if name_end > len(notes) or desc_end > len(notes):
            raise image_error(path, "truncated ELF note")
        name = notes[pos:name_end].rstrip(b"\0")
        if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
            if descsz == 4:
                return struct.unpack_from("<I", notes, desc_start)[0]
            if descsz == 8:
                value = struct.unpack_from("<Q", notes, desc_start)[0]
                if value >= 1 << 32:
                    raise image_error(path, f"PVH entry {value:#x} is above 4 GiB")
                return value
            raise image_error(path, f"PVH entry note has a {descsz}-byte descriptor (need 4 or 8)")
        pos = desc_start + ((descsz + 3) & ~3)
    return None


#: larger than any guest the loader accepts (it must fit in guest RAM anyway)
MAX_IMAGE_BYTES = 1 << 32


def read_elf(path: str | Path) -> ElfImage:
    """Read and parse a PVH guest image."""
    return parse_elf(read_image_bytes(path, "guest image"), str(path))


def read_image_bytes(path: str | Path, what: str = "guest image") -> bytes:
    """Read a guest image or a boot module.  Only regular files: a FIFO or a
    device would block or never end, so they are refused before any read."""
    path = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        hint = "; give a path or a bundled guest name" if what == "guest image" else ""
        raise ConfigError(f"{path}: no such {what}{hint}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a {what}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{path}: is a directory, not a {what}")
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: is not a regular file; give a file as the {what}")
        if st.st_size > MAX_IMAGE_BYTES:
            raise ConfigError(f"{path}: {st.st_size} bytes is too large for a {what}")
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from None
    finally:
        os.close(fd)


def load_image(image: GuestImage, memory: GuestMemory, *, protocol: str = "PVH") -> None:
    """Copy PT_LOAD segments (or a Multiboot image's one) into guest RAM, zero-filling .bss."""
    for seg in image.segments:
        if not memory.contains(seg.paddr, seg.memsz):
            raise ConfigError(
                f"{image.path}: segment [{seg.paddr:#x}, {seg.paddr + seg.memsz:#x}) lies outside "
                f"guest RAM ({memory.size // (1 << 20)}M); give more memory or relink the guest"
            )
        for lo, hi in BOOT_INFO_RANGES:
            if seg.paddr < hi and lo < seg.paddr + seg.memsz:
                raise ConfigError(
                    f"{image.path}: segment at {seg.paddr:#x} overlaps the {protocol} boot info at [{lo:#x}, {hi:#x})"
                )
        view = memory.view(seg.paddr, seg.memsz)
        view[:seg.filesz] = image.data[seg.offset:seg.offset + seg.filesz]
        view[seg.filesz:] = bytes(seg.memsz - seg.filesz)
    if not memory.contains(image.entry32, 1):
        raise ConfigError(f"{image.path}: {protocol} entry {image.entry32:#x} is outside guest RAM")


@dataclass(frozen=True)
class BootModule:
    """A file handed to the guest beside its image (``--initrd``): Multiboot
    modules, PVH's module list.  ``string`` is what the guest reads as the
    module's command line (QEMU gives the ``-initrd`` text itself)."""

    data: bytes = field(repr=False)
    string: str
    path: str


@dataclass(frozen=True)
class PlacedModule:
    start: int
    end: int  # exclusive, as Multiboot's mod_end
    string_addr: int


PAGE = 4096


def read_module(spec: str | Path) -> BootModule:
    """``FILE`` or ``FILE ARGS`` (QEMU's Multiboot ``-initrd`` form): the
    whole text is the module's string, the first word its file."""
    text = str(spec)
    file = text.split(" ", 1)[0]
    if not file:
        raise ConfigError(f"module {text!r}: give a file name first")
    return BootModule(read_image_bytes(file, "boot module"), text, file)


def place_modules(memory: GuestMemory, image_end: int, modules, strings_start: int) -> list[PlacedModule]:
    """Put each module at the first page-aligned spot after the image (as QEMU
    does) that avoids the boot info and the low-memory holes; their strings
    go after the command line, in the boot-strings area."""
    avoid = [*BOOT_INFO_RANGES, (EBDA_START, HIGH_MEMORY)]
    placed: list[PlacedModule] = []
    at = image_end
    string_at = strings_start
    for module in modules:
        at = (at + PAGE - 1) & ~(PAGE - 1)
        length = len(module.data)
        moved = True
        while moved:
            moved = False
            for lo, hi in avoid:
                if at < hi and lo < at + max(length, 1):
                    at = (hi + PAGE - 1) & ~(PAGE - 1)
                    moved = True
        if at + length > 1 << 32 or not memory.contains(at, max(length, 1)):
            raise ConfigError(f"{module.path}: a {length}-byte module does not fit in guest RAM after the image "
                              f"(at {at:#x}); give more memory")
        raw = module.string.encode() + b"\0"
        if b"\0" in raw[:-1]:
            raise ConfigError(f"{module.path}: module string contains a NUL byte")
        if string_at + len(raw) > CMDLINE_ADDR + CMDLINE_MAX:
            raise ConfigError(f"the command line and module strings exceed {CMDLINE_MAX} bytes")
        memory.write(at, module.data)
        memory.write(string_at, raw)
        placed.append(PlacedModule(at, at + length, string_at))
        at += length
        string_at += len(raw)
    return placed


def write_cmdline(memory: GuestMemory, cmdline: str) -> int:
    """Write the NUL-terminated command line at ``CMDLINE_ADDR``; returns where the next string may go."""
    raw = cmdline.encode() + b"\0"
    if len(raw) > CMDLINE_MAX:
        raise ConfigError(f"command line is {len(raw) - 1} bytes; the limit is {CMDLINE_MAX - 1}")
    if b"\0" in raw[:-1]:
        raise ConfigError("command line contains a NUL byte")
    memory.write(CMDLINE_ADDR, raw)
    return CMDLINE_ADDR + len(raw)


# Holes QEMU microvm's memory map reports (measured with QEMU 7.2): the EBDA,
# the BIOS area, and the pages KVM uses for the identity map and TSS.
EBDA_START = 0x9FC00
LOW_RAM_END = 0xA0000
BIOS_START = 0xF0000
HIGH_MEMORY = 0x100000
KVM_PRIVATE_START = 0xFEFFC000
KVM_PRIVATE_SIZE = 0x4000


def e820_map(memory: GuestMemory) -> list[tuple[int, int, int]]:
    """The memory map QEMU microvm gives a PVH guest, sorted by address.

    Guests that sum the RAM entries see the same size under both VMMs.
    """
    entries: list[tuple[int, int, int]] = []
    for start, size in memory.ram_ranges():
        if start == 0:
            entries.append((0, EBDA_START, E820_RAM))
            entries.append((EBDA_START, LOW_RAM_END - EBDA_START, E820_RESERVED))
            entries.append((BIOS_START, HIGH_MEMORY - BIOS_START, E820_RESERVED))
            if size > HIGH_MEMORY:
                entries.append((HIGH_MEMORY, size - HIGH_MEMORY, E820_RAM))
        else:
            entries.append((start, size, E820_RAM))
    entries.append((KVM_PRIVATE_START, KVM_PRIVATE_SIZE, E820_RESERVED))
    return sorted(entries)


HVM_MODLIST_ENTRY = struct.Struct("<QQQQ")  # paddr, size, cmdline_paddr, reserved
MODLIST_ADDR = 0x6800
MODLIST_MAX_ENTRIES = (0x7000 - MODLIST_ADDR) // HVM_MODLIST_ENTRY.size


def write_start_info(memory: GuestMemory, cmdline: str, modules=(), image_end: int = HIGH_MEMORY) -> int:
    """Write ``hvm_start_info`` v1, the memory map, the command line and the
    modules (``BootModule``, placed after ``image_end``).

    Returns the start info's guest-physical address (EBX at entry).
    """
    memmap = e820_map(memory)
    if len(memmap) > MEMMAP_MAX_ENTRIES:  # pragma: no cover - two regions at most today
        raise ConfigError("too many memory map entries")
    if len(modules) > MODLIST_MAX_ENTRIES:
        raise ConfigError(f"{len(modules)} modules; PVH boot here takes at most {MODLIST_MAX_ENTRIES}")
    try:
        strings_at = write_cmdline(memory, cmdline)
        placed = place_modules(memory, image_end, modules, strings_at)
        for i, (start, size, kind) in enumerate(memmap):
            memory.write(MEMMAP_ADDR + i * HVM_MEMMAP_ENTRY.size, HVM_MEMMAP_ENTRY.pack(start, size, kind, 0))
        for i, mod in enumerate(placed):
            memory.write(MODLIST_ADDR + i * HVM_MODLIST_ENTRY.size,
                         HVM_MODLIST_ENTRY.pack(mod.start, mod.end - mod.start, mod.string_addr, 0))
        memory.write(START_INFO_ADDR, HVM_START_INFO.pack(
            HVM_START_MAGIC, 1, 0, len(placed), MODLIST_ADDR if placed else 0, CMDLINE_ADDR, 0, MEMMAP_ADDR,
            len(memmap), 0,
        ))
    except GuestMemoryError:  # pragma: no cover - memory is at least 2 MiB
        raise ConfigError("guest memory too small for the PVH boot info") from None
    return START_INFO_ADDR


def parse_start_info(memory: GuestMemory, addr: int) -> dict:
    """Read back a start info block (for tests and debugging)."""
    (magic, version, flags, nr_modules, modlist, cmdline_paddr, _rsdp, memmap_paddr,
     memmap_entries, _res) = HVM_START_INFO.unpack(memory.read(addr, HVM_START_INFO.size))
    entries = [HVM_MEMMAP_ENTRY.unpack(memory.read(memmap_paddr + i * HVM_MEMMAP_ENTRY.size, HVM_MEMMAP_ENTRY.size))[:3]
               for i in range(memmap_entries)]
    modules = []
    for i in range(nr_modules):
        paddr, size, string, _ = HVM_MODLIST_ENTRY.unpack(memory.read(modlist + i * HVM_MODLIST_ENTRY.size,
                                                                      HVM_MODLIST_ENTRY.size))
        modules.append({"start": paddr, "size": size, "string": read_cstring(memory, string)})
    return {"magic": magic, "version": version, "flags": flags, "nr_modules": nr_modules,
            "cmdline": read_cstring(memory, cmdline_paddr), "memmap": entries, "modules": modules}


def read_cstring(memory: GuestMemory, addr: int, limit: int = CMDLINE_MAX) -> str:
    """A NUL-terminated string from guest RAM (tests and debugging)."""
    raw = bytearray()
    while len(raw) < limit and (b := memory.read_u8(addr + len(raw))) != 0:
        raw.append(b)
    return raw.decode(errors="replace")


def pvh_initial_state(vcpu, entry32: int, start_info: int, eax: int = 0) -> None:
    """Put a vCPU in the PVH entry state: 32-bit protected mode, paging off,
    EBX the boot info.  Multiboot's entry state is the same with ``eax`` its magic."""
    sregs = vcpu.get_sregs()
    code = {"base": 0, "limit": 0xFFFFFFFF, "selector": 0x08, "type": 0xB, "present": 1,
            "dpl": 0, "db": 1, "s": 1, "l": 0, "g": 1, "avl": 0, "unusable": 0}
    data = dict(code, selector=0x10, type=0x3)
    for name in ("cs",):
        _set_segment(getattr(sregs, name), code)
    for name in ("ds", "es", "fs", "gs", "ss"):
        _set_segment(getattr(sregs, name), data)
    # A valid 32-bit TSS (busy) as the protocol requires; the guest loads its own.
    _set_segment(sregs.tr, {"base": 0, "limit": 0x67, "selector": 0x18, "type": 0xB, "present": 1,
                            "dpl": 0, "db": 0, "s": 0, "l": 0, "g": 0, "avl": 0, "unusable": 0})
    sregs.cr0 = 0x11  # PE | ET
    sregs.cr3 = 0
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    for reg in ("rcx", "rdx", "rsi", "rdi", "rsp", "rbp"):
        setattr(regs, reg, 0)
    regs.rax = eax
    regs.rbx = start_info
    regs.rip = entry32
    regs.rflags = 0x2  # IF, TF, VM clear
    vcpu.set_regs(regs)


def _set_segment(seg, values: dict) -> None:
    for key, value in values.items():
        setattr(seg, key, value)
