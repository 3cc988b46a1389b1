"""Multiboot v1: header search, ELF and a.out-kludge images, the information
structure, modules, and hostile images (one-line errors, never a crash)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiokvm import boot, loader, multiboot
from aiokvm.errors import ConfigError
from aiokvm.memory import GuestMemory, MiB
from tests.unit.test_boot import make_elf


def mb_header(flags: int = 0, *, checksum: int | None = None, addresses: tuple[int, ...] = ()) -> bytes:
    checksum = (-(multiboot.HEADER_MAGIC + flags)) & 0xFFFFFFFF if checksum is None else checksum
    return struct.pack("<III", multiboot.HEADER_MAGIC, flags, checksum) + struct.pack(f"<{len(addresses)}I", *addresses)


def mb_elf(*, entry=0x400000, paddr=0x400000, payload=b"\xf4" * 64, memsz=None, flags=0, bits=32) -> bytes:
    """An ELF32 with no PVH note and a Multiboot header in its first segment (as kvm-unit-tests' .flat)."""
    return make_elf(bits=bits, entry=entry, paddr=paddr, payload=mb_header(flags) + payload, memsz=memsz, note=False)


def test_header_found_only_aligned_with_a_valid_checksum_in_the_first_8k():
    assert multiboot.find_header(b"\0" * 8 + mb_header()) == 8
    assert multiboot.find_header(b"\0" * 6 + mb_header()) is None  # not 4-byte aligned
    assert multiboot.find_header(mb_header(checksum=1)) is None
    assert multiboot.find_header(b"\0" * 8192 + mb_header()) is None  # past the first 8 KiB
    assert multiboot.find_header(b"\0" * (8192 - 52) + mb_header()) == 8192 - 52  # QEMU's last offset
    assert multiboot.find_header(b"\0" * (8192 - 48) + mb_header()) is None


def test_elf_image_loads_by_program_headers_and_boots_with_the_magic():
    data = mb_elf(memsz=0x2000)
    image = loader.parse_guest(data, "t.flat")
    assert isinstance(image, multiboot.MultibootImage) and image.entry32 == 0x400000
    with GuestMemory(64 * MiB) as mem:
        entry = loader.load_guest(image, mem, "arg1 arg2")
        assert (entry.protocol, entry.eax, entry.ebx) == ("multiboot", 0x2BADB002, multiboot.INFO_ADDR)
        assert mem.read(0x400000, 12) == mb_header()
        info = multiboot.parse_multiboot_info(mem)
    # argv[0] is the image path, as QEMU writes it.
    assert info["cmdline"] == "t.flat arg1 arg2"
    assert info["flags"] == 0b1001001111  # memory, boot device, cmdline, mods, mmap, loader name (QEMU: the same
    #                                        but the loader name)
    assert info["mem_lower"] == 639 and info["mem_upper"] == (64 * MiB - MiB) // 1024
    assert (0, 0x9FC00, 1) in info["mmap"] and (0x100000, 63 * MiB, 1) in info["mmap"]
    assert info["modules"] == [] and info["loader"] == "aiokvm"


def test_modules_go_page_aligned_after_the_image_with_their_strings(tmp_path):
    env = tmp_path / "env"
    env.write_bytes(b"NR_CPUS=2\nMEMSIZE=64\n")
    blob = tmp_path / "blob"
    blob.write_bytes(bytes(range(256)) * 20)
    image = loader.parse_guest(mb_elf(memsz=0x10001), "k")
    modules = [boot.read_module(str(env)), boot.read_module(f"{blob} some args")]
    with GuestMemory(64 * MiB) as mem:
        loader.load_guest(image, mem, "", modules)
        info = multiboot.parse_multiboot_info(mem)
        first, second = info["modules"]
        assert first["start"] == 0x411000 and first["end"] - first["start"] == env.stat().st_size
        assert second["start"] % 4096 == 0 and second["start"] >= first["end"]
        assert mem.read(first["start"], first["end"] - first["start"]) == env.read_bytes()
        assert mem.read(second["start"], 5120) == blob.read_bytes()
    assert first["string"] == str(env) and second["string"] == f"{blob} some args"


def test_modules_skip_the_boot_info_and_the_low_memory_holes(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"x" * 0x100000)
    image = loader.parse_guest(mb_elf(entry=0x8000, paddr=0x8000), "realmode")
    with GuestMemory(64 * MiB) as mem:
        loader.load_guest(image, mem, "", [boot.read_module(str(big))])
        (mod,) = multiboot.parse_multiboot_info(mem)["modules"]
    assert mod["start"] >= 0x100000  # not across the cmdline area, the EBDA or the BIOS hole


def test_a_module_that_does_not_fit_is_a_config_error(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"x" * (3 * MiB))
    image = loader.parse_guest(mb_elf(), "k")
    with GuestMemory(4 * MiB + 0x10000) as mem, pytest.raises(ConfigError, match="does not fit"):
        loader.load_guest(image, mem, "", [boot.read_module(str(big))])
    with pytest.raises(ConfigError, match="no such boot module"):
        boot.read_module(str(tmp_path / "missing"))


def test_aout_kludge_loads_from_the_header_addresses():
    # header at file offset 0 loads at 0x200000; 0x100 bytes of file, bss to 0x201000.
    head = mb_header(multiboot.FLAG_ADDRESSES, addresses=(0x200000, 0x200000, 0x200100, 0x201000, 0x200020))
    data = head + b"\x90" * (0x100 - len(head)) + b"trailing, not loaded"
    image = loader.parse_guest(data, "raw")
    assert image.entry32 == 0x200020 and image.segments == (boot.Segment(0x200000, 0, 0x100, 0x1000),)
    with GuestMemory(16 * MiB) as mem:
        mem.write(0x200100, b"\xff" * 16)
        loader.load_guest(image, mem, "")
        assert mem.read(0x200000, 0x100) == data[:0x100] and mem.read(0x200100, 16) == bytes(16)


@pytest.mark.parametrize(("data", "message"), [
    (mb_header(1 << 3) + b"\0" * 64, "requires features 0x8"),
    (mb_header() + b"\0" * 64, "not an ELF file"),
    (mb_header(multiboot.FLAG_ADDRESSES, addresses=(0x1000,)), "truncated Multiboot header"),
    (mb_header(multiboot.FLAG_ADDRESSES, addresses=(0x1000, 0x2000, 0, 0, 0x2000)), "before the file's start"),
    (mb_header(multiboot.FLAG_ADDRESSES, addresses=(0x100000, 0x100000, 0x200000, 0, 0x100000)), "past the end"),
    (mb_header(multiboot.FLAG_ADDRESSES, addresses=(0x100000, 0x100000, 0x100020, 0x100010, 0x100000)),
     "before load_end_addr"),
    (mb_elf(bits=64), "must be ELF32"),
])
def test_malformed_multiboot_images_get_one_line_errors(data, message):
    with pytest.raises(ConfigError, match=message) as info:
        loader.parse_guest(data, "bad")
    assert "\n" not in str(info.value) and str(info.value).startswith("bad: ")


def test_boot_data_is_clear_of_the_image_and_entry_in_ram():
    with GuestMemory(64 * MiB) as mem:
        with pytest.raises(ConfigError, match="overlaps the Multiboot boot info"):
            loader.load_guest(loader.parse_guest(mb_elf(entry=0x6000, paddr=0x6000), "k"), mem, "")
        with pytest.raises(ConfigError, match="Multiboot entry 0x8000000 is outside guest RAM"):
            loader.load_guest(loader.parse_guest(mb_elf(entry=0x8000000), "k"), mem, "")


def test_pvh_images_are_still_pvh_and_get_modules_too(tmp_path):
    mod = tmp_path / "m"
    mod.write_bytes(b"module!")
    image = loader.parse_guest(make_elf(), "pvh")
    assert loader.protocol_of(image) == "pvh"
    with GuestMemory(64 * MiB) as mem:
        entry = loader.load_guest(image, mem, "x=1", [boot.read_module(f"{mod} a")])
        info = boot.parse_start_info(mem, entry.ebx)
    assert entry.eax == 0 and info["cmdline"] == "x=1"
    (m,) = info["modules"]
    assert m["size"] == 7 and m["string"] == f"{mod} a" and m["start"] % 4096 == 0


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=512), st.integers(0, 0x3FFFF), st.lists(st.integers(0, 2**32 - 1), max_size=5))
def test_hostile_headers_never_crash_the_loader(tail, flags, addresses):
    data = mb_header(flags, addresses=tuple(addresses)) + tail
    try:
        image = loader.parse_guest(data, "fuzz")
    except ConfigError:
        return
    with GuestMemory(8 * MiB) as mem:
        try:
            loader.load_guest(image, mem, "")
        except ConfigError:
            pass
