"""The seams a new device plugs into: a virtio device is its class and one
``add_virtio`` line; its counters reach ``stats()``, and the machine closes it."""

from __future__ import annotations

import pytest

from aiokvm import Machine
from aiokvm.devices.virtio import mmio
from aiokvm.devices.virtio.device import F_EVENT_IDX, InterruptKind, VirtioDevice
from aiokvm.testing import VirtqueueDriver

pytestmark = pytest.mark.kvm


class EntropyDevice:
    """A virtio-rng (device ID 4) written against ``VirtioDevice`` only: it fills
    every writable buffer the driver posts with a fixed byte pattern."""

    device_id = 4
    kind = "virtio-rng"
    features = F_EVENT_IDX
    queue_max_sizes = (16,)

    def __init__(self) -> None:
        self.queue = None
        self.memory = None
        self.interrupt = None
        self.bytes_given = 0
        self.closed = False

    def read_config(self, offset, size):
        return 0

    def write_config(self, offset, size, value):
        pass

    def activate(self, memory, queues, features, interrupt):
        self.memory, self.queue, self.interrupt = memory, queues[0], interrupt

    def notify(self, queue):
        while (chain := self.queue.pop()) is not None:
            written = 0
            for addr, length in chain.writable:
                self.memory.write(addr, bytes([0x5A]) * length)
                written += length
            self.queue.push(chain.head, written)
            self.bytes_given += written
        if self.queue.needs_notification():
            self.interrupt.trigger(InterruptKind.USED_BUFFER)

    def reset(self):
        self.queue = None
        return None

    def metrics(self):
        return {"kind": self.kind, "counters": {"bytes_given": self.bytes_given}}

    async def aclose(self):
        self.closed = True


async def test_a_new_virtio_device_is_its_class_and_one_line():
    device = EntropyDevice()
    assert isinstance(device, VirtioDevice)
    async with Machine() as vm:
        transport = vm.add_virtio(device)  # the one line
        vm.load("hello")
        assert "virtio_mmio.device=512@0xfeb00e00:12" in vm.cmdline  # announced as QEMU would

        # Drive it as a driver would, through its registers, with a driver-side queue.
        def w(offset, value):
            assert transport.write(offset, 4, value) is None

        assert transport.read(mmio.DEVICE_ID, 4) == 4
        for status in (mmio.ACKNOWLEDGE, mmio.ACKNOWLEDGE | mmio.DRIVER):
            w(mmio.STATUS, status)
        for sel, bits in ((0, F_EVENT_IDX), (1, mmio.F_VERSION_1 >> 32)):
            w(mmio.DRIVER_FEATURES_SEL, sel)
            w(mmio.DRIVER_FEATURES, bits)
        w(mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK)
        q = VirtqueueDriver(vm.memory, 16, 0x200000, event_idx=True)
        w(mmio.QUEUE_SEL, 0)
        w(mmio.QUEUE_NUM, 16)
        for reg, addr in ((mmio.QUEUE_DESC_LOW, q.desc_addr), (mmio.QUEUE_DRIVER_LOW, q.avail_addr),
                          (mmio.QUEUE_DEVICE_LOW, q.used_addr)):
            w(reg, addr & 0xFFFFFFFF)
            w(reg + 4, addr >> 32)
        w(mmio.QUEUE_READY, 1)
        w(mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK | mmio.DRIVER_OK)
        head = q.add([], [7, 9])
        transport.ioevent(mmio.QUEUE_NOTIFY, 0, 1)  # what the QueueNotify ioeventfd delivers
        assert q.used() == [(head, 16)]
        assert q.read_writable(head) == [b"\x5a" * 7, b"\x5a" * 9]

        entry = vm.stats()["devices"]["virtio7"]
        assert entry["kind"] == "virtio-rng"
        assert entry["counters"] == {"bytes_given": 16}
        assert entry["transport"]["notifies"] == 1
        assert entry["transport"]["interrupts"] == 1  # the device's trigger, counted by the transport
    assert device.closed  # the machine closed it with itself


async def test_plain_devices_report_and_close_through_the_same_seam():
    class Counter:
        kind = "counter"

        def __init__(self):
            self.writes = 0
            self.closed = False

        def read(self, offset, size):
            return 0

        def write(self, offset, size, value):
            self.writes += 1

        def metrics(self):
            return {"kind": self.kind, "counters": {"writes": self.writes}}

        async def aclose(self):
            self.closed = True

    counter = Counter()
    async with Machine() as vm:
        vm.add_device(counter, pio=(0x80, 1), name="port80")
        vm.load("exitloop", cmdline="n=123 port=0x80")
        assert (await vm.run(timeout=60)).code == 0
        assert vm.stats()["devices"]["port80"] == {"kind": "counter", "counters": {"writes": 123}}
    assert counter.closed
