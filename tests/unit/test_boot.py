"""ELF/PVH parsing and loading, including hostile images."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiokvm import guests
from aiokvm.boot import (
    CMDLINE_ADDR,
    EHDR,
    EHDR32,
    HVM_START_MAGIC,
    NHDR,
    PHDR,
    PHDR32,
    PT_LOAD,
    PT_NOTE,
    START_INFO_ADDR,
    load_image,
    parse_elf,
    parse_start_info,
    read_elf,
    write_start_info,
)
from aiokvm.errors import ConfigError
from aiokvm.memory import GuestMemory, MiB


def make_elf(*, bits=64, entry=0x100000, paddr=0x100000, payload=b"\xf4" * 16, memsz=None, note=True,
             note_desc=None, machine=None, klass=None, etype=2, extra_phdrs=()) -> bytes:
    """A minimal PVH ELF64 (or ELF32 with ``bits=32``): one PT_LOAD and (optionally) one PT_NOTE."""
    desc = note_desc if note_desc is not None else struct.pack("<I", entry)
    notes = NHDR.pack(4, len(desc), 18) + b"Xen\0" + desc + b"\0" * (-len(desc) % 4)
    phdrs = [(PT_LOAD, payload, paddr, memsz if memsz is not None else len(payload))]
    if note:
        phdrs.append((PT_NOTE, notes, 0, len(notes)))
    phdrs.extend(extra_phdrs)
    ehdr, phdr = (EHDR, PHDR) if bits == 64 else (EHDR32, PHDR32)
    phoff = ehdr.size
    data_off = phoff + phdr.size * len(phdrs)
    table, blobs = b"", b""
    for ptype, blob, addr, msz in phdrs:
        offset = data_off + len(blobs)
        if bits == 64:
            table += PHDR.pack(ptype, 5, offset, addr, addr, len(blob), msz, 16)
        else:  # Elf32_Phdr has p_flags after p_memsz
            table += PHDR32.pack(ptype, offset, addr, addr, len(blob), msz, 5, 16)
        blobs += blob
    klass = klass if klass is not None else (2 if bits == 64 else 1)
    machine = machine if machine is not None else (62 if bits == 64 else 3)
    ident = b"\x7fELF" + bytes([klass, 1, 1]) + b"\0" * 9
    header = ehdr.pack(ident, etype, machine, 1, entry, phoff, 0, 0, ehdr.size, phdr.size, len(phdrs), 0, 0, 0)
    return header + table + blobs


both_classes = pytest.mark.parametrize("bits", [64, 32])


@both_classes
def test_minimal_image_parses(bits):
    image = parse_elf(make_elf(bits=bits))
    assert image.bits == bits
    assert image.entry32 == 0x100000
    assert image.segments[0].paddr == 0x100000


@both_classes
def test_eight_byte_entry_note_like_linux(bits):
    image = parse_elf(make_elf(bits=bits, note_desc=struct.pack("<Q", 0x1000F0)))
    assert image.entry32 == 0x1000F0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"note": False}, "no PVH entry note"),
    ({"machine": 3}, "64-bit ELF machine 3 is not x86-64"),
    ({"bits": 32, "machine": 62}, "32-bit ELF machine 62 is not i386"),
    ({"klass": 1}, "32-bit ELF machine 62 is not i386"),  # an ELF64 body read as ELF32
    ({"bits": 32, "klass": 2}, "64-bit ELF machine 3 is not x86-64"),  # an ELF32 body read as ELF64
    ({"klass": 3}, "ELF class 3 is neither"),
    ({"bits": 32, "klass": 0}, "ELF class 0 is neither"),
    ({"etype": 3}, "not an executable"),
    ({"bits": 32, "etype": 1}, "not an executable"),
    ({"note_desc": b"\x01\x02"}, "descriptor"),
    ({"bits": 32, "note_desc": b"\x01\x02\x03"}, "descriptor"),
    ({"note_desc": struct.pack("<Q", 1 << 33)}, "above 4 GiB"),
    ({"bits": 32, "note_desc": struct.pack("<Q", 1 << 32)}, "above 4 GiB"),
    ({"memsz": 4}, "exceeds memory size"),
    ({"bits": 32, "memsz": 4}, "exceeds memory size"),
    ({"bits": 32, "note": False}, "no PVH entry note"),
    ({"bits": 32, "paddr": 0xFFFFFFF8}, "past the end of the 32-bit address space"),
    ({"paddr": (1 << 64) - 8}, "past the end of the 64-bit address space"),
])
def test_malformed_images_get_one_line_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_elf(make_elf(**kwargs))
    assert "\n" not in str(info.value)


@both_classes
def test_not_elf_and_truncated(bits):
    with pytest.raises(ConfigError, match="not an ELF"):
        parse_elf(b"#!/bin/sh\necho hi\n")
    with pytest.raises(ConfigError, match="not an ELF"):
        parse_elf(b"")
    good = make_elf(bits=bits)
    for cut in (5, 15, 40):  # inside e_ident, then inside the (shorter for ELF32) header
        with pytest.raises(ConfigError, match="truncated"):
            parse_elf(good[:cut])
    with pytest.raises(ConfigError, match="truncated"):
        parse_elf(good[:-3])


@both_classes
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_corruption_is_config_error_or_valid(bits, data):
    good = make_elf(bits=bits)
    blob = bytearray(good)
    for _ in range(data.draw(st.integers(0, 8))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    blob = bytes(blob[:cut])
    try:
        image = parse_elf(blob)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    # Whatever parses must also load safely or be refused cleanly.
    with GuestMemory("4M") as mem:
        try:
            load_image(image, mem)
        except ConfigError:
            pass


@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_parser(blob):
    try:
        parse_elf(blob)
    except ConfigError:
        pass


@both_classes
@given(body=st.binary(max_size=512))
def test_random_bytes_after_a_valid_ident_never_crash_the_parser(bits, body):
    # Past the magic and class byte, so the class-specific header and program header parsing is what gets fuzzed.
    ident = make_elf(bits=bits)[:16]
    try:
        parse_elf(ident + body)
    except ConfigError as exc:
        assert "\n" not in str(exc)


@both_classes
def test_segments_outside_ram_are_refused(bits):
    with GuestMemory("4M") as mem:
        with pytest.raises(ConfigError, match="outside guest RAM"):
            load_image(parse_elf(make_elf(bits=bits, paddr=0x3FFFF8, entry=0x3FFFF8)), mem)
        with pytest.raises(ConfigError, match="outside guest RAM"):
            load_image(parse_elf(make_elf(bits=bits, paddr=0xFEE00000, entry=0x100000)), mem)
        with pytest.raises(ConfigError, match="boot info"):
            load_image(parse_elf(make_elf(bits=bits, paddr=0x6000, entry=0x6000)), mem)
        with pytest.raises(ConfigError, match="entry 0x500000 is outside guest RAM"):
            load_image(parse_elf(make_elf(bits=bits, entry=0x500000)), mem)


@both_classes
def test_load_copies_and_zero_fills(bits):
    with GuestMemory("4M") as mem:
        mem.write(0x100000, b"\xaa" * 64)
        load_image(parse_elf(make_elf(bits=bits, payload=b"\x90\x90", memsz=32)), mem)
        assert mem.read(0x100000, 4) == b"\x90\x90\x00\x00"
        assert mem.read(0x100000 + 32, 1) == b"\xaa"  # beyond memsz untouched


def test_start_info_roundtrip():
    with GuestMemory("64M") as mem:
        addr = write_start_info(mem, "n=10 port=0x80")
        assert addr == START_INFO_ADDR
        info = parse_start_info(mem, addr)
        assert info["magic"] == HVM_START_MAGIC
        assert info["version"] == 1
        assert info["cmdline"] == "n=10 port=0x80"
        assert info["memmap"] == [
            (0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xF0000, 0x10000, 2),
            (0x100000, 64 * MiB - 0x100000, 1), (0xFEFFC000, 0x4000, 2),
        ]
        assert mem.read_u64(START_INFO_ADDR + 24) == CMDLINE_ADDR


def test_overlong_or_nul_cmdline_is_refused():
    with GuestMemory("4M") as mem:
        with pytest.raises(ConfigError, match="limit"):
            write_start_info(mem, "x" * 40000)
        with pytest.raises(ConfigError, match="NUL"):
            write_start_info(mem, "a\0b")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConfigError, match="no such guest image"):
        read_elf(tmp_path / "nope.elf")
    with pytest.raises(ConfigError, match="directory"):
        read_elf(tmp_path)


@pytest.mark.parametrize("name", ["hello", "smp", "exitloop", "triplefault", "unclaimed"])
def test_bundled_guests_parse(name):
    image = read_elf(guests.path(name))
    lo, hi = image.span
    assert lo >= 0x100000
    assert lo <= image.entry32 < hi


def test_unknown_bundled_guest_names_the_choices():
    with pytest.raises(ConfigError, match="hello"):
        guests.resolve("no-such-guest")
