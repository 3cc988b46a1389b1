"""ELF32 i386 PVH images as binutils links them (``as --32`` + ``ld -m elf_i386``)."""

from __future__ import annotations

import pytest

from aiokvm.boot import load_image, parse_elf, read_elf
from aiokvm.errors import ConfigError
from aiokvm.memory import GuestMemory
from tests.pvh32 import LOAD_ADDR, MESSAGE, build_pvh32


@pytest.mark.parametrize("desc_size", [4, 8])
def test_linked_elf32_parses_and_loads(tmp_path, desc_size):
    image = read_elf(build_pvh32(tmp_path, desc_size=desc_size))
    assert image.bits == 32
    assert image.entry32 == LOAD_ADDR
    assert len(image.segments) == 1
    assert image.span[0] == LOAD_ADDR
    with GuestMemory("4M") as mem:
        load_image(image, mem)
        code = mem.read(LOAD_ADDR, image.segments[0].memsz)
    assert code[:1] == b"\xfc"  # cld, the first instruction at the entry
    assert MESSAGE in code


NOTE_PHDR = 52 + 32  # the second Elf32_Phdr (after the 52-byte Elf32_Ehdr) is the PT_NOTE


def _patch_u32(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + value.to_bytes(4, "little") + data[offset + 4:]


def test_linked_elf32_with_an_overlong_note_segment_is_refused(tmp_path):
    data = build_pvh32(tmp_path).read_bytes()
    p_filesz = NOTE_PHDR + 16  # Elf32_Phdr: type, offset, vaddr, paddr, filesz
    with pytest.raises(ConfigError, match="truncated: note segment 1 runs past the end of the file"):
        parse_elf(_patch_u32(data, p_filesz, len(data)))


def test_linked_elf32_with_a_corrupt_note_name_size_is_refused(tmp_path):
    data = build_pvh32(tmp_path).read_bytes()
    note_offset = int.from_bytes(data[NOTE_PHDR + 4:NOTE_PHDR + 8], "little")
    with pytest.raises(ConfigError, match="truncated ELF note"):
        parse_elf(_patch_u32(data, note_offset, 0xFFFFFFFF))  # n_namesz
