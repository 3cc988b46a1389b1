"""Bus registration and dispatch (inline and loop-hosted), without KVM."""

from __future__ import annotations

import asyncio
import threading

import pytest

from aiokvm.bus import Bus, HandlerMode, Space
from aiokvm.cpu.exits import Direction, IoExit, MmioExit
from aiokvm.dispatch import Dispatcher, EventHandoff, HandoffCancelled
from aiokvm.errors import ConfigError, DeviceError
from aiokvm.metrics import VcpuMetrics


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


def _inline_dispatcher() -> tuple[Bus, Dispatcher, VcpuMetrics]:
    bus = Bus()
    return bus, Dispatcher(bus, handoff=None), VcpuMetrics(0)


def test_unclaimed_reads_are_all_ones_and_counted():
    bus, dispatcher, metrics = _inline_dispatcher()
    assert dispatcher.dispatch_io(0, metrics, IoExit(0x2F0, 2, Direction.IN, 1)) == b"\xff\xff"
    assert dispatcher.dispatch_io(0, metrics, IoExit(0x2F0, 1, Direction.IN, 3)) == b"\xff" * 3
    assert dispatcher.dispatch_io(0, metrics, IoExit(0x2F0, 1, Direction.OUT, 2, b"ab")) == b""
    assert dispatcher.dispatch_mmio(0, metrics, MmioExit(0xD0000000, 4, False)) == b"\xff" * 4
    assert dispatcher.dispatch_mmio(0, metrics, MmioExit(0xD0000000, 4, True, b"abcd")) == b""
    assert bus.unclaimed[Space.PIO].reads == 4
    assert bus.unclaimed[Space.PIO].writes == 2
    assert bus.unclaimed[Space.MMIO].reads == 1
    assert bus.unclaimed[Space.MMIO].writes == 1
    assert metrics.pio[(0x2F0, "in")] == 2
    assert metrics.pio_elements[(0x2F0, "in")] == 4


def test_string_io_is_dispatched_per_element_in_one_exit():
    bus, dispatcher, metrics = _inline_dispatcher()
    dev = Recorder(fill=0x100)
    bus.register_pio(0x1F0, 8, dev, mode=HandlerMode.INLINE)
    # rep outsw of 3 words
    dispatcher.dispatch_io(0, metrics, IoExit(0x1F0, 2, Direction.OUT, 3, b"\x01\x00\x02\x00\x03\x00"))
    assert dev.log == [("w", 0, 2, 1), ("w", 0, 2, 2), ("w", 0, 2, 3)]
    # rep insw of 2 words: values 0x104, 0x105 little-endian
    assert dispatcher.dispatch_io(0, metrics, IoExit(0x1F0, 2, Direction.IN, 2)) == b"\x04\x01\x05\x01"
    assert metrics.pio[(0x1F0, "out")] == 1
    assert metrics.pio_elements[(0x1F0, "out")] == 3
    assert metrics.paths[("Recorder", "inline")] == 2


def test_read_results_are_masked_to_the_access_size():
    bus, dispatcher, metrics = _inline_dispatcher()
    bus.register_pio(0x60, 1, Recorder(fill=0x1FF), mode="inline")
    assert dispatcher.dispatch_io(0, metrics, IoExit(0x60, 1, Direction.IN, 1)) == b"\x00"


def test_device_exceptions_become_device_errors_naming_the_device():
    bus, dispatcher, metrics = _inline_dispatcher()
    bus.register_pio(0x70, 2, Broken(), mode="inline", name="rtc")
    with pytest.raises(DeviceError, match="rtc.*in port 0x70"):
        dispatcher.dispatch_io(0, metrics, IoExit(0x70, 1, Direction.IN, 1))
    bus.register_mmio(0x9000, 8, Broken(), mode="inline", name="mm")
    with pytest.raises(DeviceError, match="mm.*mmio write"):
        dispatcher.dispatch_mmio(0, metrics, MmioExit(0x9000, 4, True, b"\0\0\0\0"))


async def test_loop_hosted_handlers_run_on_the_loop_thread():
    loop = asyncio.get_running_loop()
    bus = Bus()
    dev = Recorder(fill=7)
    bus.register_pio(0x500, 4, dev)  # default mode: loop
    dispatcher = Dispatcher(bus, EventHandoff(loop, 2))
    results = {}

    def vcpu(index: int) -> None:
        metrics = VcpuMetrics(index)
        out = []
        for i in range(200):
            dispatcher.dispatch_io(index, metrics, IoExit(0x500 + index, 1, Direction.OUT, 1, bytes([i])))
            out.append(dispatcher.dispatch_io(index, metrics, IoExit(0x500 + index, 1, Direction.IN, 1)))
        results[index] = (out, metrics)

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
        assert results[index][1].paths[("Recorder", "loop")] == 400


async def test_cancel_all_releases_a_waiting_vcpu():
    loop = asyncio.get_running_loop()
    handoff = EventHandoff(loop, 1)
    started = threading.Event()
    outcome = []

    def slow(_):
        started.set()
        return 1

    def vcpu():
        try:
            handoff.call(0, slow, None)
            handoff.cancel_all()  # stop requested while running
            handoff.call(0, slow, None)
        except HandoffCancelled:
            outcome.append("cancelled")

    t = threading.Thread(target=vcpu)
    t.start()
    while t.is_alive():
        await asyncio.sleep(0.001)
    assert outcome == ["cancelled"]
