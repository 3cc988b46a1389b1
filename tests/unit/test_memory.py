"""GuestMemory: sizes, bounds, zero-copy views."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiokvm.errors import ConfigError, GuestMemoryError
from aiokvm.memory import BELOW_4G_LIMIT, HIGH_RAM_START, GuestMemory, MiB, parse_size


@pytest.mark.parametrize(("text", "size"), [("64M", 64 * MiB), ("1G", 1024 * MiB), ("2048K", 2 * MiB),
                                            ("64MiB", 64 * MiB), (8 * MiB, 8 * MiB), ("3m", 3 * MiB)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "abc", "-1M", "1.5G", "12X", "M", True])
def test_parse_size_rejects_garbage(bad):
    with pytest.raises(ConfigError):
        parse_size(bad)


@pytest.mark.parametrize("bad", ["1M", "0", 4097 * 1024 + 1, "100T"])
def test_invalid_or_too_large_memory_is_config_error(bad):
    with pytest.raises(ConfigError):
        GuestMemory(bad)


def test_read_write_roundtrip_and_views_share_storage():
    with GuestMemory("4M") as mem:
        mem.write(0x1000, b"hello")
        assert mem.read(0x1000, 5) == b"hello"
        view = mem.view(0x1000, 5)
        view[0:1] = b"J"
        assert mem.read(0x1000, 5) == b"Jello"
        mem.write_u32(0x2000, 0xDEADBEEF)
        assert mem.read_u32(0x2000) == 0xDEADBEEF
        assert mem.read_u16(0x2000) == 0xBEEF
        mem.write_u64(0x3000, 2**64 - 1)
        assert mem.read_u64(0x3000) == 2**64 - 1
        assert mem.read_u8(0x3000) == 0xFF


@given(addr=st.integers(min_value=-(2**64), max_value=2**65), length=st.integers(min_value=-10, max_value=2**33))
def test_out_of_range_access_is_guest_memory_error(addr, length):
    with GuestMemory("2M") as mem:
        inside = addr >= 0 and length >= 0 and addr + length <= 2 * MiB
        if inside:
            assert len(mem.view(addr, length)) == length
        else:
            with pytest.raises(GuestMemoryError):
                mem.view(addr, length)
            with pytest.raises(GuestMemoryError):
                mem.read(addr, length)
            assert not mem.contains(addr, length)


def test_access_straddling_the_end_is_refused():
    with GuestMemory("2M") as mem:
        with pytest.raises(GuestMemoryError):
            mem.write(2 * MiB - 2, b"abcd")
        with pytest.raises(GuestMemoryError):
            mem.read_u64(2 * MiB - 4)


def test_large_memory_is_split_around_the_mmio_hole():
    size = BELOW_4G_LIMIT + 16 * MiB
    with GuestMemory(size) as mem:  # MAP_NORESERVE: nothing is touched
        assert mem.ram_ranges() == [(0, BELOW_4G_LIMIT), (HIGH_RAM_START, 16 * MiB)]
        mem.write(HIGH_RAM_START, b"x")
        with pytest.raises(GuestMemoryError):
            mem.read(BELOW_4G_LIMIT, 1)  # the hole is not RAM
        with pytest.raises(GuestMemoryError):
            mem.read(BELOW_4G_LIMIT - 1, 2)  # nor is a range spanning into it

