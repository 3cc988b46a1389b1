"""Bus registration and dispatch (inline and loop-hosted), without KVM."""

from __future__ import annotations

import asyncio
import threading

import pytest

from aiokvm.bus import Bus, HandlerMode
from aiokvm.cpu.exits import Direction, IoExit
from aiokvm.dispatch import perform_io
from aiokvm.errors import ConfigError, DeviceError, HandoffCancelled
from aiokvm.handoff import EventHandoff


class Recorder:
    """A register file that logs every access (a test double for pure logic)."""

    def __init__(self, fill: int = 0) -> None:
        self.log: list[tuple] = []
        self.fill = fill
        self.threads: set[int] = set()

    def read(self, offset, size):
        self.threads.add(threading.get_ident())
        self.log.append(("r", offset, size))
        return self.fill + len(self.log)

    def write(self, offset, size, value):
        self.threads.add(threading.get_ident())
        self.log.append(("w", offset, size, value))


class Broken:
    def read(self, offset, size):
        raise ZeroDivisionError("boom")

    def write(self, offset, size, value):
        raise KeyError(offset)


def test_overlap_is_config_error_in_both_spaces():
    bus = Bus()
    bus.register_pio(0x3F8, 8, Recorder(), name="uart")
    with pytest.raises(ConfigError, match="overlaps uart"):
        bus.register_pio(0x3FF, 2, Recorder(), name="other")
    with pytest.raises(ConfigError, match="overlaps"):
        bus.register_pio(0x3F0, 9, Recorder())
    bus.register_pio(0x3F0, 8, Recorder())  # adjacent is fine
    bus.register_pio(0x400, 1, Recorder())
    bus.register_mmio(0xFEB00000, 0x200, Recorder(), name="virtio0")
    with pytest.raises(ConfigError, match="overlaps virtio0"):
        bus.register_mmio(0xFEB001FF, 0x10, Recorder())
    bus.register_mmio(0xFEB00200, 0x200, Recorder())


@pytest.mark.parametrize(("base", "length"), [(0, 0), (-1, 4), (0xFFFF, 2), (0x10000, 1)])
def test_bad_pio_ranges_are_refused(base, length):
    with pytest.raises(ConfigError):
        Bus().register_pio(base, length, Recorder())


def test_device_without_handlers_is_refused():
    with pytest.raises(ConfigError, match="read"):
        Bus().register_pio(0x80, 1, object())


def test_unregister_frees_the_range():
    bus = Bus()
    region = bus.register_pio(0x80, 4, Recorder())
    bus.unregister(region)
    assert bus.find_pio(0x81, 1) is None
    bus.register_pio(0x80, 4, Recorder())


def test_lookup_respects_region_end():
    bus = Bus()
    region = bus.register_mmio(0x1000, 0x10, Recorder())
    assert bus.find_mmio(0x100C, 4) is region
    assert bus.find_mmio(0x100E, 4) is None  # straddles the end
    assert bus.find_mmio(0x0FFF, 1) is None
    assert bus.find_mmio(0x1010, 1) is None


def test_string_io_is_dispatched_per_element_in_one_exit():
    bus = Bus()
    dev = Recorder(fill=0x100)
    region = bus.register_pio(0x1F0, 8, dev, mode=HandlerMode.INLINE)
    # rep outsw of 3 words
    assert perform_io(region, IoExit(0x1F0, 2, Direction.OUT, 3, b"\x01\x00\x02\x00\x03\x00")) == b""
    assert dev.log == [("w", 0, 2, 1), ("w", 0, 2, 2), ("w", 0, 2, 3)]
    # rep insw of 2 words: values 0x104, 0x105 little-endian
    assert perform_io(region, IoExit(0x1F0, 2, Direction.IN, 2)) == b"\x04\x01\x05\x01"


def test_read_results_are_masked_to_the_access_size():
    bus = Bus()
    region = bus.register_pio(0x60, 1, Recorder(fill=0x1FF), mode="inline")
    assert perform_io(region, IoExit(0x60, 1, Direction.IN, 1)) == b"\x00"


def test_device_exceptions_become_device_errors_naming_the_device():
    bus = Bus()
    region = bus.register_pio(0x70, 2, Broken(), mode="inline", name="rtc")
    with pytest.raises(DeviceError, match="rtc.*in port 0x70"):
        perform_io(region, IoExit(0x70, 1, Direction.IN, 1))
    with pytest.raises(DeviceError, match="rtc.*out port 0x71"):
        perform_io(region, IoExit(0x71, 1, Direction.OUT, 2, b"ab"))


def test_c_tables_follow_registration():
    bus = Bus()
    region = bus.register_pio(0x1F0, 8, Recorder(), mode="loop")
    assert bus.pio_table[0x1F7] == region.id << 2 | 2
    assert bus.pio_table[0x1F8] == 0
    bus.unregister(region)
    assert bus.pio_table[0x1F0] == 0
    again = bus.register_pio(0x60, 1, Recorder(), mode="inline")
    assert again.id == region.id  # ids are reused
    assert bus.pio_table[0x60] == again.id << 2 | 1


def test_mmio_region_limit_is_a_config_error():
    from aiokvm.kvm import lib

    bus = Bus()
    for i in range(lib.AIOKVM_MAX_MMIO_REGIONS):
        bus.register_mmio(0x10000 * i, 0x100, Recorder())
    with pytest.raises(ConfigError, match="at most"):
        bus.register_mmio(0xF000_0000, 0x100, Recorder())


async def test_event_handoff_runs_on_the_loop_thread_in_order():
    loop = asyncio.get_running_loop()
    bus = Bus()
    dev = Recorder(fill=7)
    region = bus.register_pio(0x500, 4, dev)  # default mode: loop
    handoff = EventHandoff(loop, 2)

    def job(arg):
        return perform_io(region, arg)

    def vcpu(index: int) -> None:
        for i in range(200):
            handoff.call(index, job, IoExit(0x500 + index, 1, Direction.OUT, 1, bytes([i])))
            handoff.call(index, job, IoExit(0x500 + index, 1, Direction.IN, 1))

    threads = [threading.Thread(target=vcpu, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        await asyncio.sleep(0.001)
    assert dev.threads == {threading.get_ident()}
    writes = [entry for entry in dev.log if entry[0] == "w"]
    assert len(writes) == 400
    for index in range(2):
        mine = [entry[3] for entry in writes if entry[1] == index]
        assert mine == list(range(200))  # per-vCPU order kept, nothing lost or doubled


async def test_cancel_all_releases_a_waiting_vcpu():
    loop = asyncio.get_running_loop()
    handoff = EventHandoff(loop, 1)
    outcome = []

    def vcpu():
        try:
            handoff.call(0, lambda _: 1, None)
            handoff.cancel_all()  # stop requested while running
            handoff.call(0, lambda _: 1, None)
        except HandoffCancelled:
            outcome.append("cancelled")

    t = threading.Thread(target=vcpu)
    t.start()
    while t.is_alive():
        await asyncio.sleep(0.001)
    assert outcome == ["cancelled"]
