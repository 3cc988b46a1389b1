"""virtio-mmio v2 transport + virtio-blk, driven by a driver-side queue writer (no KVM)."""

from __future__ import annotations

import asyncio
import random
import struct
import threading

import pytest

from aiokvm.devices.backends.memory import MemoryBackend
from aiokvm.devices.virtio import mmio
from aiokvm.devices.virtio.blk import S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, VirtioBlk
from aiokvm.memory import GuestMemory
from aiokvm.testing import VirtqueueDriver

QSIZE = 64


class SlowBackend(MemoryBackend):
    """Completes requests after random delays: out-of-order completion."""

    def __init__(self, *args, seed: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._rng = random.Random(seed)

    async def readv(self, offset, buffers):
        await asyncio.sleep(self._rng.random() * 0.003)
        await super().readv(offset, buffers)

    async def writev(self, offset, buffers):
        await asyncio.sleep(self._rng.random() * 0.003)
        await super().writev(offset, buffers)


class Guest:
    """A virtio-blk driver in miniature: register pokes plus a VirtqueueDriver."""

    def __init__(self, backend, *, features: int | None = None) -> None:
        self.memory = GuestMemory("4M")
        self.irqs = 0
        self.device = VirtioBlk(backend)
        self.t = mmio.MmioTransport(self.device, self.memory, self._irq)
        self.features = features

    def _irq(self) -> None:
        self.irqs += 1

    def r(self, off):
        return self.t.read(off, 4)

    def w(self, off, value):
        self.t.write(off, 4, value)

    def offered(self) -> int:
        self.w(mmio.DEVICE_FEATURES_SEL, 0)
        lo = self.r(mmio.DEVICE_FEATURES)
        self.w(mmio.DEVICE_FEATURES_SEL, 1)
        return lo | self.r(mmio.DEVICE_FEATURES) << 32

    def negotiate(self) -> bool:
        self.w(mmio.STATUS, 0)
        self.w(mmio.STATUS, mmio.ACKNOWLEDGE)
        self.w(mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER)
        wanted = self.offered() if self.features is None else self.features
        for sel in (0, 1):
            self.w(mmio.DRIVER_FEATURES_SEL, sel)
            self.w(mmio.DRIVER_FEATURES, (wanted >> (32 * sel)) & 0xFFFFFFFF)
        self.w(mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK)
        return bool(self.r(mmio.STATUS) & mmio.FEATURES_OK)

    def setup_queue(self) -> VirtqueueDriver:
        self.w(mmio.QUEUE_SEL, 0)
        assert self.r(mmio.QUEUE_NUM_MAX) >= QSIZE
        q = VirtqueueDriver(self.memory, QSIZE, 0x10000, event_idx=bool(self.offered() & mmio.F_EVENT_IDX))
        q.program(self.w, 0)
        self.w(mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK | mmio.DRIVER_OK)
        self.q = q
        return q

    def submit(self, rtype: int, sector: int, data: bytes = b"", read_len: int = 0) -> int:
        header = struct.pack("<IIQ", rtype, 0, sector)
        readable = [header] + ([data] if data else [])
        writable = ([read_len] if read_len else []) + [1]
        return self.q.add(readable, writable)

    def kick(self) -> None:
        self.w(mmio.QUEUE_NOTIFY, 0)

    async def complete(self, count: int) -> dict[int, list[bytes]]:
        done: dict[int, list[bytes]] = {}
        for _ in range(2000):
            for head, _length in self.q.used():
                done[head] = self.q.read_writable(head)
            if self.q.event_idx:
                self.q.set_used_event(self.q.last_used_idx)  # interrupt me for the next one
            if len(done) >= count:
                return done
            await asyncio.sleep(0.001)
        raise AssertionError(f"only {len(done)} of {count} requests completed")


async def ready_guest(backend=None, **kw) -> Guest:
    g = Guest(backend or MemoryBackend(64 * 512), **kw)
    assert g.negotiate()
    g.setup_queue()
    return g


def test_identity_registers_and_config():
    g = Guest(MemoryBackend(64 * 512))
    assert g.r(mmio.MAGIC_VALUE) == 0x74726976
    assert g.r(mmio.VERSION_REG) == 2
    assert g.r(mmio.DEVICE_ID) == 2
    assert g.offered() & mmio.F_VERSION_1
    assert g.t.read(0x100, 8) == 64  # capacity in sectors
    assert g.t.read(0x100 + 20, 4) == 512  # blk_size


def test_a_driver_refusing_version_1_never_gets_features_ok():
    g = Guest(MemoryBackend(64 * 512), features=0)
    assert not g.negotiate()
    assert g.t.counters.features_refused == 1


def test_unknown_feature_bits_are_refused():
    g = Guest(MemoryBackend(64 * 512), features=mmio.F_VERSION_1 | 1 << 40)
    assert not g.negotiate()


def test_non_32_bit_register_access_is_ignored():
    g = Guest(MemoryBackend(64 * 512))
    assert g.t.read(mmio.MAGIC_VALUE, 2) == 0
    g.t.write(mmio.STATUS, 1, 1)
    assert g.r(mmio.STATUS) == 0
    assert g.t.counters.bad_accesses == 2


class CountingBackend(MemoryBackend):
    """Counts flushes: a FLUSH request must reach the backend, not just answer OK."""

    flushes = 0

    async def flush(self) -> None:
        self.flushes += 1
        await super().flush()


async def test_write_read_flush_get_id_round_trip():
    backend = CountingBackend(64 * 512)
    g = await ready_guest(backend)
    payload = bytes(range(256)) * 4
    h1 = g.submit(T_OUT, 3, payload)
    g.kick()
    assert h1 in await g.complete(1)
    h2 = g.submit(T_IN, 3, read_len=1024)
    h3 = g.submit(T_FLUSH, 0)
    h4 = g.submit(T_GET_ID, 0, read_len=20)
    g.kick()
    done = await g.complete(3)
    assert done[h2][0] == payload and done[h2][1] == bytes([S_OK])
    assert done[h3] == [bytes([S_OK])]
    assert done[h4][1] == bytes([S_OK]) and len(done[h4][0]) == 20
    assert backend.flushes == 1
    assert g.irqs >= 2
    assert g.r(mmio.INTERRUPT_STATUS) & 1
    g.w(mmio.INTERRUPT_ACK, 1)
    assert not g.r(mmio.INTERRUPT_STATUS) & 1


async def test_many_requests_in_flight_complete_out_of_order():
    backend = SlowBackend(256 * 512, seed=7)
    g = await ready_guest(backend)
    heads = {}
    for i in range(12):
        heads[g.submit(T_OUT, i * 4, bytes([i]) * 2048)] = i
    g.kick()
    await asyncio.sleep(0)
    assert g.device.counters.in_flight_max > 1
    done = await g.complete(12)
    assert all(v[-1] == bytes([S_OK]) for v in done.values())
    for i in range(12):
        view = bytearray(2048)
        await backend.readv(i * 4 * 512, [memoryview(view)])
        assert view == bytes([i]) * 2048


@pytest.mark.parametrize(("rtype", "sector", "data", "read_len", "status"), [
    (T_IN, 63, b"", 1024, S_IOERR),         # crosses the end
    (T_OUT, 64, b"x" * 512, 0, S_IOERR),    # starts past the end
    (T_IN, 0, b"", 100, S_IOERR),           # not a multiple of 512
    (99, 0, b"", 0, S_UNSUPP),              # unknown type
    (T_DISCARD, 60, struct.pack("<QII", 60, 10, 0), 0, S_IOERR),  # segment past the end
])
async def test_bad_requests_complete_with_an_error_status(rtype, sector, data, read_len, status):
    g = await ready_guest()
    head = g.submit(rtype, sector, data, read_len)
    g.kick()
    done = await g.complete(1)
    assert done[head][-1] == bytes([status])


async def test_read_only_disk_refuses_writes_and_keeps_its_bytes():
    original = bytes(range(256)) * 2 * 64
    g = await ready_guest(MemoryBackend(64 * 512, read_only=True, data=original))
    assert g.offered() & (1 << 5)  # VIRTIO_BLK_F_RO
    head = g.submit(T_OUT, 0, b"\xaa" * 512)
    g.kick()
    done = await g.complete(1)
    assert done[head][-1] == bytes([S_IOERR])
    view = bytearray(len(original))
    await g.device.backend.readv(0, [memoryview(view)])
    assert bytes(view) == original


async def test_hostile_descriptor_sets_needs_reset_without_raising():
    g = await ready_guest()
    g.q.add_raw([(0xFFFF_FFFF_0000, 16, 0, 0)])  # buffer outside guest RAM
    g.kick()
    await asyncio.sleep(0)
    assert g.r(mmio.STATUS) & mmio.NEEDS_RESET
    assert g.r(mmio.INTERRUPT_STATUS) & mmio.INT_CONFIG_CHANGE
    assert g.t.counters.needs_reset == 1
    g.kick()  # further notifies are ignored until reset
    g.w(mmio.STATUS, 0)
    assert g.r(mmio.STATUS) == 0
    assert g.negotiate()


async def test_reset_forgets_the_queues():
    g = await ready_guest()
    resets = g.t.counters.resets
    g.w(mmio.STATUS, 0)
    g.w(mmio.QUEUE_SEL, 0)
    assert g.r(mmio.QUEUE_READY) == 0
    assert g.t.counters.resets == resets + 1


def test_queue_config_is_frozen_once_ready():
    g = Guest(MemoryBackend(64 * 512))
    assert g.negotiate()
    g.setup_queue()
    before = g.t.queues[0].desc
    g.w(mmio.QUEUE_DESC_LOW, 0x1234)
    assert g.t.queues[0].desc == before


async def test_event_idx_driver_that_kicks_only_when_asked_is_never_stranded():
    """A real EVENT_IDX driver kicks only when avail_event says so: the device
    must keep avail_event current or later requests are never seen."""
    g = await ready_guest(SlowBackend(256 * 512, seed=3))
    assert g.q.event_idx
    done = 0
    for round_ in range(6):
        for i in range(5):
            g.submit(T_OUT, (round_ * 5 + i) * 2, bytes([i]) * 1024)
        if g.q.should_kick():
            g.kick()
        done += len(await g.complete(5))
    assert done == 30


@pytest.mark.parametrize(("used_event", "lo", "hi"), [
    (0, 1, 1 + 20 // VirtioBlk.SIGNAL_BATCH),  # "interrupt me at the first completion"
    (5, 1, 1 + 20 // VirtioBlk.SIGNAL_BATCH),  # mid-pass: still seen, at the next decision
    (0x8000, 0, 0),                           # far from every index used here: never
])
async def test_a_pass_of_inline_reads_decides_about_interrupts_in_batches(used_event, lo, hi):
    # 20 page-cached reads kicked at once complete in one notify pass; the
    # interrupt decision is taken once per SIGNAL_BATCH completions and at the
    # end of the pass, and follows used_event (EVENT_IDX) each time.
    g = await ready_guest(MemoryBackend(64 * 512))
    assert g.q.event_idx
    g.q.set_used_event(used_event)
    heads = [g.submit(T_IN, i, read_len=512) for i in range(20)]
    g.kick()
    assert {head for head, _ in g.q.used()} == set(heads)  # all done in the pass
    assert lo <= g.irqs <= hi


NEXT, WRITE, INDIRECT = 1, 2, 4
DATA = 0x200000  # inside the 4 MiB guest


@pytest.mark.parametrize(("name", "descriptors"), [
    ("outside RAM", [(0x7FFF_FFFF_0000, 16, 0, 0)]),
    ("length overflow", [(DATA, 0xFFFF_FFFF, NEXT, 1), (2**64 - 8, 16, WRITE, 0)]),
    ("loop", [(DATA, 16, NEXT, 1), (DATA + 16, 1, WRITE | NEXT, 0)]),
    ("readable after writable", [(DATA, 16, WRITE | NEXT, 1), (DATA + 16, 16, 0, 0)]),
    ("next out of range", [(DATA, 16, NEXT, 500)]),
    ("indirect with next", [(DATA, 16, INDIRECT | NEXT, 1), (DATA, 1, WRITE, 0)]),
])
async def test_every_hostile_chain_means_needs_reset_and_a_counted_error(name, descriptors):
    g = await ready_guest()
    g.q.add_raw(descriptors)
    g.kick()
    await asyncio.sleep(0)
    assert g.r(mmio.STATUS) & mmio.NEEDS_RESET, name
    assert g.t.counters.needs_reset == 1
    assert g.device.counters.requests == 0  # nothing reached the backend


async def test_nested_indirect_table_means_needs_reset():
    g = await ready_guest()
    table = g.q.alloc(32)
    inner = g.q.alloc(16)
    g.q.write_table(table, [(inner, 16, INDIRECT, 0), (DATA, 1, WRITE, 0)])
    g.q.add_raw([(table, 32, INDIRECT, 0)])
    g.kick()
    await asyncio.sleep(0)
    assert g.r(mmio.STATUS) & mmio.NEEDS_RESET


async def test_a_chain_longer_than_the_queue_means_needs_reset():
    g = await ready_guest()
    chain = [(DATA + 16 * i, 16, NEXT, i + 1) for i in range(QSIZE - 1)] + [(DATA, 16, NEXT, 0)]
    g.q.add_raw(chain)  # the last one points back to the head: longer than the queue
    g.kick()
    await asyncio.sleep(0)
    assert g.r(mmio.STATUS) & mmio.NEEDS_RESET


class GatedThreadBackend(MemoryBackend):
    """Reads run in a worker thread that waits at a gate, then fill the guest's
    buffers: like RawFileBackend, a cancelled request's thread keeps going."""

    readv_nowait = None  # never served inline: every read is in flight

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = threading.Event()
        self.started = 0
        self.finished = 0

    async def readv(self, offset, buffers):
        def work():
            self.started += 1
            self.gate.wait(10)
            for view in buffers:
                view[:] = b"\xab" * len(view)
            self.finished += 1

        await asyncio.get_running_loop().run_in_executor(None, work)


async def requests_in_flight(count: int) -> tuple[Guest, GatedThreadBackend]:
    backend = GatedThreadBackend(64 * 512)
    g = await ready_guest(backend)
    for i in range(count):
        g.submit(T_IN, i, read_len=512)
    g.kick()
    for _ in range(500):
        if backend.started == count:
            break
        await asyncio.sleep(0.002)
    assert backend.started == count
    return g, backend


async def test_a_reset_holds_the_vcpu_until_every_request_in_flight_is_done():
    """Worker threads still write into the driver's buffers after status 0:
    the reset must not complete (the writing vCPU is held) until they are done."""
    g, backend = await requests_in_flight(4)
    held = g.t.write(mmio.STATUS, 4, 0)
    assert isinstance(held, asyncio.Future) and not held.done()
    assert g.r(mmio.STATUS) != 0  # to every vCPU: not reset yet (a driver waits for 0)
    await asyncio.sleep(0.02)
    assert not held.done() and backend.finished == 0
    backend.gate.set()
    await asyncio.wait_for(held, 5)
    assert g.r(mmio.STATUS) == 0
    assert backend.finished == 4  # every late write landed before the reset completed
    await asyncio.sleep(0.01)
    assert g.q.used() == []  # and their completions were dropped: a new generation
    assert g.t.counters.resets >= 1 and g.t.counters.held_resets == 1


async def test_a_reset_with_nothing_in_flight_completes_at_once():
    g = await ready_guest()
    g.submit(T_IN, 0, read_len=512)
    g.kick()
    await g.complete(1)
    assert g.t.write(mmio.STATUS, 4, 0) is None
    assert g.t.counters.held_resets == 0


async def test_driver_ok_during_a_held_reset_activates_after_the_old_requests_are_gone():
    g, backend = await requests_in_flight(2)
    held = g.t.write(mmio.STATUS, 4, 0)
    assert not held.done()
    # Another vCPU sets the device up again at once (negotiate() starts with
    # a reset of its own, held on the same requests).
    g.negotiate()
    g.setup_queue()
    assert g.r(mmio.STATUS) & mmio.DRIVER_OK
    assert not g.t.active  # not while the old generation may still write
    backend.gate.set()
    await asyncio.wait_for(held, 5)
    await asyncio.sleep(0.01)
    assert g.t.active
    g.submit(T_IN, 3, read_len=512)  # and the new generation works
    g.kick()
    done = await g.complete(1)
    assert list(done.values())[0][-1] == bytes([S_OK])


async def test_a_reset_after_needs_reset_is_held_on_the_requests_still_in_flight():
    g, backend = await requests_in_flight(2)
    g.t.device_error("a hostile chain")  # NEEDS_RESET stops the device; its requests still run
    assert g.r(mmio.STATUS) & mmio.NEEDS_RESET
    held = g.t.write(mmio.STATUS, 4, 0)
    assert isinstance(held, asyncio.Future) and not held.done()
    again = g.t.write(mmio.STATUS, 4, 0)  # a second reset from another vCPU waits for the same
    assert again is held
    backend.gate.set()
    await asyncio.wait_for(held, 5)
    assert backend.finished == 2 and g.r(mmio.STATUS) == 0
