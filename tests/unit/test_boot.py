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
    HVM_START_MAGIC,
    NHDR,
    PHDR,
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


def make_elf(*, entry=0x100000, paddr=0x100000, payload=b"\xf4" * 16, memsz=None, note=True,
             note_desc=None, machine=62, klass=2, etype=2, extra_phdrs=()) -> bytes:
    """A minimal PVH ELF64: one PT_LOAD and (optionally) one PT_NOTE."""
    desc = note_desc if note_desc is not None else struct.pack("<I", entry)
    notes = NHDR.pack(4, len(desc), 18) + b"Xen\0" + desc + b"\0" * (-len(desc) % 4)
    phdrs = [(PT_LOAD, payload, paddr, memsz if memsz is not None else len(payload))]
    if note:
        phdrs.append((PT_NOTE, notes, 0, len(notes)))
    phdrs.extend(extra_phdrs)
    phoff = EHDR.size
    data_off = phoff + PHDR.size * len(phdrs)
    table, blobs = b"", b""
    for ptype, blob, addr, msz in phdrs:
        table += PHDR.pack(ptype, 5, data_off + len(blobs), addr, addr, len(blob), msz, 16)
        blobs += blob
    ident = b"\x7fELF" + bytes([klass, 1, 1]) + b"\0" * 9
    header = EHDR.pack(ident, etype, machine, 1, entry, phoff, 0, 0, EHDR.size, PHDR.size, len(phdrs), 0, 0, 0)
    return header + table + blobs


def test_minimal_image_parses():
    image = parse_elf(make_elf())
    assert image.entry32 == 0x100000
    assert image.segments[0].paddr == 0x100000


def test_eight_byte_entry_note_like_linux():
    image = parse_elf(make_elf(note_desc=struct.pack("<Q", 0x1000F0)))
    assert image.entry32 == 0x1000F0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"note": False}, "no PVH entry note"),
    ({"machine": 3}, "not x86-64"),
    ({"klass": 1}, "not a 64-bit ELF"),
    ({"etype": 3}, "not an executable"),
    ({"note_desc": b"\x01\x02"}, "descriptor"),
    ({"note_desc": struct.pack("<Q", 1 << 33)}, "above 4 GiB"),
    ({"memsz": 4}, "exceeds memory size"),
])
def test_malformed_images_get_one_line_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_elf(make_elf(**kwargs))
    assert "\n" not in str(info.value)


def test_not_elf_and_truncated():
    with pytest.raises(ConfigError, match="not an ELF"):
        parse_elf(b"#!/bin/sh\necho hi\n")
    with pytest.raises(ConfigError, match="not an ELF"):
        parse_elf(b"")
    good = make_elf()
    with pytest.raises(ConfigError, match="truncated"):
        parse_elf(good[:40])
    with pytest.raises(ConfigError, match="truncated"):
        parse_elf(good[:-3])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_corruption_is_config_error_or_valid(data):
    good = make_elf()
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


def test_segments_outside_ram_are_refused():
    with GuestMemory("4M") as mem:
        with pytest.raises(ConfigError, match="outside guest RAM"):
            load_image(parse_elf(make_elf(paddr=0x3FFFF8, entry=0x3FFFF8)), mem)
        with pytest.raises(ConfigError, match="outside guest RAM"):
            load_image(parse_elf(make_elf(paddr=0xFEE00000, entry=0x100000)), mem)
        with pytest.raises(ConfigError, match="boot info"):
            load_image(parse_elf(make_elf(paddr=0x6000, entry=0x6000)), mem)


def test_load_copies_and_zero_fills():
    with GuestMemory("4M") as mem:
        mem.write(0x100000, b"\xaa" * 64)
        load_image(parse_elf(make_elf(payload=b"\x90\x90", memsz=32)), mem)
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
