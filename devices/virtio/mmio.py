"""virtio-mmio transport, modern only (version 2).

A bus device (``read``/``write`` on the 512-byte register window) that drives
one ``VirtioDevice`` (``device.py``).  It owns feature negotiation, queue
setup, the status state machine (including reset and NEEDS_RESET),
InterruptStatus/ACK and ConfigGeneration; the device owns its config space
and its queues' work, and interrupts through ``MmioInterrupt.trigger``.

Threat model: every register write comes from the guest.  Register accesses
must be 32-bit (others are ignored and counted); queue sizes, addresses and
selectors are range-checked; a driver that refuses VERSION_1 or accepts a
bit that was not offered never gets FEATURES_OK; queue addresses are
validated when the queues are built (``SplitQueue``), and a hostile ring
puts the device in NEEDS_RESET instead of raising out of the loop.

Reset: writing 0 to Status resets the device.  When the device still has
work in flight that may touch guest memory (``reset()`` returns a future),
the Status write is *held*: the writing vCPU stays in its exit until the
work is fenced, as under QEMU, where the vCPU's register write drains the
block layer.  Meanwhile Status reads non-zero to every vCPU (a driver must
wait for 0 after a reset), a second reset, or one after NEEDS_RESET
stopped the device, is held on the same fence, and a DRIVER_OK is held too:
the device is activated, and its queues looked at, once the old generation
is gone.

Where transports live in guest-physical space is the board's business
(``aiokvm/board.py``: QEMU microvm's slots).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field

import structlog

from .device import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, InterruptKind, VirtioDevice
from .queue import SplitQueue, VirtqueueError

log = structlog.get_logger("aiokvm.devices.virtio")

MAGIC = 0x74726976
VERSION = 2
VENDOR_ID = 0x4B56_4941  # "AIVK"

# Register offsets.
MAGIC_VALUE, VERSION_REG, DEVICE_ID, VENDOR_ID_REG = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY = 0x030, 0x034, 0x038, 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS, INTERRUPT_ACK = 0x060, 0x064
STATUS = 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH = 0x090, 0x094
QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
SHM_SEL, SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH = 0x0AC, 0x0B0, 0x0B4, 0x0B8, 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

# Status bits.
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 0x40, 0x80

# InterruptStatus bits (virtio-mmio's names for InterruptKind).
INT_USED_BUFFER = int(InterruptKind.USED_BUFFER)
INT_CONFIG_CHANGE = int(InterruptKind.CONFIG_CHANGE)


@dataclass
class QueueConfig:
    max_size: int
    size: int = 0
    ready: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0

    def clear(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc = self.driver = self.device = 0


@dataclass
class TransportCounters:
    """Counters of one transport (guest-visible misbehaviour included)."""

    reads: int = 0
    writes: int = 0
    notifies: int = 0
    interrupts: int = 0
    resets: int = 0
    held_resets: int = 0         # resets that waited for the device's work in flight
    bad_accesses: int = 0        # non-32-bit register access, unknown offsets
    features_refused: int = 0    # FEATURES_OK refused (no VERSION_1 or bits not offered)
    needs_reset: int = 0         # device errors that set NEEDS_RESET
    ignored_writes: list[str] = field(default_factory=list)


class MmioInterrupt:
    """The transport's ``VirtioInterrupt``: sets InterruptStatus bits and raises the line.

    ``raise_irq`` is the machine's line (an irqfd trigger, an edge); it is
    called on every ``trigger()``: the device decides how often to interrupt
    (EVENT_IDX, batching), not the transport.  A config change also bumps
    ConfigGeneration, so a driver reading the config space sees it moved.
    """

    def __init__(self, raise_irq, on_config_change, on_needs_reset) -> None:
        self._raise = raise_irq
        self._on_config_change = on_config_change
        self._on_needs_reset = on_needs_reset
        self.status = 0
        self.count = 0

    def trigger(self, kind: InterruptKind = InterruptKind.USED_BUFFER) -> None:
        if kind == InterruptKind.CONFIG_CHANGE:
            self._on_config_change()
        self.status |= int(kind)
        self.count += 1
        self._raise()

    def needs_reset(self, why: str) -> None:
        self._on_needs_reset(why)

    def ack(self, bits: int) -> None:
        self.status &= ~bits


class MmioTransport:
    """virtio-mmio v2 registers for one device (a loop-hosted bus device)."""

    def __init__(self, device: VirtioDevice, memory, raise_irq) -> None:
        self.device = device
        self.memory = memory
        self.interrupt = MmioInterrupt(raise_irq, self._bump_generation, self.device_error)
        self.counters = TransportCounters()
        self.offered = device.features | F_VERSION_1
        self.queues = [QueueConfig(size) for size in device.queue_max_sizes]
        self.log = log  # the device manager binds vm= and device=
        self._fence: asyncio.Future | None = None  # the old generation draining after a reset
        self._status_draining = 0  # what Status read before that reset (reads stay non-zero until it drains)
        self._closed = False
        self._reset_state()

    @property
    def kind(self) -> str:
        return getattr(self.device, "kind", type(self.device).__name__)

    def metrics(self) -> dict:
        """The device's counters, with this transport's under ``transport``."""
        inner = self.device.metrics()
        self.counters.interrupts = self.interrupt.count
        return {**inner, "kind": self.kind, "transport": asdict(self.counters)}

    async def aclose(self) -> None:
        self._closed = True
        await self.device.aclose()

    def _reset_state(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.config_generation = 0
        self.active = False
        self.interrupt.status = 0
        for q in self.queues:
            q.clear()

    _generation = 0  # bumps on every reset: a held activation of an older one is dropped

    # -- bus device ------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        self.counters.reads += 1
        if offset >= CONFIG:
            return self.device.read_config(offset - CONFIG, size)
        if size != 4 or offset % 4:
            self.counters.bad_accesses += 1
            return 0
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR_ID_REG:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            if self.device_features_sel > 1:
                return 0
            return (self.offered >> (32 * self.device_features_sel)) & 0xFFFF_FFFF
        if offset == QUEUE_NUM_MAX:
            q = self._selected()
            return q.max_size if q is not None else 0
        if offset == QUEUE_READY:
            q = self._selected()
            return int(q.ready) if q is not None else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt.status
        if offset == STATUS:
            # A driver MUST wait for Status to read 0 after a reset (virtio
            # 1.2, 2.4.2): while the old generation drains, it does not.
            return self.status | self._status_draining if self._draining() else self.status
        if offset == CONFIG_GENERATION:
            return self.config_generation
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFF_FFFF  # no shared memory regions
        return 0  # QueueReset, write-only and reserved registers read as zero

    def write(self, offset: int, size: int, value: int) -> asyncio.Future | None:
        """A register write.  Returns a future only for a held Status write (see the module docstring)."""
        self.counters.writes += 1
        if offset >= CONFIG:
            self.device.write_config(offset - CONFIG, size, value)
            return
        if size != 4 or offset % 4:
            self.counters.bad_accesses += 1
            return
        value &= 0xFFFF_FFFF
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if self.status & FEATURES_OK or not self.status & DRIVER:
                self._ignored("DriverFeatures outside feature negotiation")
            elif self.driver_features_sel <= 1:
                shift = 32 * self.driver_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset in (QUEUE_NUM, QUEUE_DESC_LOW, QUEUE_DESC_HIGH, QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH,
                        QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, QUEUE_READY):
            self._write_queue(offset, value)
        elif offset == QUEUE_NOTIFY:
            self.notify(value)
        elif offset == INTERRUPT_ACK:
            self.interrupt.ack(value)
        elif offset == STATUS:
            return self._write_status(value)
        elif offset == QUEUE_RESET:
            self._ignored("QueueReset (VIRTIO_F_RING_RESET not offered)")
        else:
            self.counters.bad_accesses += 1

    # -- queues ---------------------------------------------------------------------
    def _selected(self) -> QueueConfig | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _write_queue(self, offset: int, value: int) -> None:
        q = self._selected()
        if q is None:
            self._ignored(f"queue register for missing queue {self.queue_sel}")
            return
        if offset == QUEUE_READY:
            if self.status & DRIVER_OK and not value:
                self._ignored("QueueReady=0 after DRIVER_OK")
                return
            q.ready = bool(value & 1)
            return
        if q.ready or self.status & DRIVER_OK:
            self._ignored("queue configuration while the queue is ready")
            return
        if offset == QUEUE_NUM:
            q.size = value
        elif offset == QUEUE_DESC_LOW:
            q.desc = (q.desc & ~0xFFFF_FFFF) | value
        elif offset == QUEUE_DESC_HIGH:
            q.desc = (q.desc & 0xFFFF_FFFF) | value << 32
        elif offset == QUEUE_DRIVER_LOW:
            q.driver = (q.driver & ~0xFFFF_FFFF) | value
        elif offset == QUEUE_DRIVER_HIGH:
            q.driver = (q.driver & 0xFFFF_FFFF) | value << 32
        elif offset == QUEUE_DEVICE_LOW:
            q.device = (q.device & ~0xFFFF_FFFF) | value
        elif offset == QUEUE_DEVICE_HIGH:
            q.device = (q.device & 0xFFFF_FFFF) | value << 32

    def ioevent(self, offset: int, datamatch: int | None, count: int) -> None:
        """QueueNotify through an ioeventfd (datamatch = the queue index)."""
        self.notify(datamatch or 0)

    def notify(self, queue: int) -> None:
        """A QueueNotify write (from an exit or from the ioeventfd)."""
        self.counters.notifies += 1
        if not self.active or self.status & NEEDS_RESET:
            return
        if queue >= len(self.queues):
            self._ignored(f"notify of missing queue {queue}")
            return
        try:
            self.device.notify(queue)
        except VirtqueueError as exc:
            self.device_error(str(exc))

    # -- status ------------------------------------------------------------------------
    def _write_status(self, value: int) -> asyncio.Future | None:
        if value == 0:
            return self.reset()
        value &= 0xFF
        if value & FEATURES_OK and not self.status & FEATURES_OK and not self._features_acceptable():
            self.counters.features_refused += 1
            value &= ~FEATURES_OK  # the driver reads it back and gives up
        if value & DRIVER_OK and not self.status & DRIVER_OK:
            if not (value & FEATURES_OK or self.status & FEATURES_OK):
                self._ignored("DRIVER_OK without FEATURES_OK")
                value &= ~DRIVER_OK
            else:
                self.status = value | (self.status & NEEDS_RESET)
                fence = self._fence
                if fence is not None and not fence.done():
                    # The old generation is still draining: activate after it.
                    generation = self._generation
                    fence.add_done_callback(lambda _: self._activate_if_current(generation))
                    return fence
                self._activate()
                return None
        self.status = value | (self.status & NEEDS_RESET)
        return None

    def _activate_if_current(self, generation: int) -> None:
        """A DRIVER_OK held behind a reset's fence: activate now, unless another
        reset came meanwhile or the machine is closing, and look at every
        queue once (a kick from another vCPU in between found us inactive)."""
        if generation != self._generation or not self.status & DRIVER_OK or self.active or self._closed:
            return
        try:
            self._activate()
            for index, q in enumerate(self.queues):
                if self.active and q.ready:
                    self.device.notify(index)
        except VirtqueueError as exc:
            self.device_error(str(exc))
        except Exception as exc:  # a device bug: keep the loop, fail the device
            self.log.exception("virtio device failed to activate", kind=self.kind)
            self.device_error(f"{type(exc).__name__}: {exc}")

    def _draining(self) -> bool:
        return self._fence is not None and not self._fence.done()

    def _features_acceptable(self) -> bool:
        wanted = self.driver_features
        return bool(wanted & F_VERSION_1) and not wanted & ~self.offered

    def _activate(self) -> None:
        queues = []
        try:
            for index, q in enumerate(self.queues):
                if not q.ready:
                    queues.append(None)
                    continue
                if q.size > q.max_size:  # SplitQueue checks the rest (a power of two, >= 1)
                    raise VirtqueueError(f"queue {index}: size {q.size} is above QueueNumMax {q.max_size}")
                queues.append(SplitQueue(
                    self.memory, q.size, q.desc, q.driver, q.device,
                    event_idx=bool(self.driver_features & F_EVENT_IDX),
                    indirect=bool(self.driver_features & F_INDIRECT_DESC),
                ))
        except VirtqueueError as exc:
            self.device_error(str(exc))
            return
        self.active = True
        try:
            self.device.activate(self.memory, queues, self.driver_features, self.interrupt)
        except VirtqueueError as exc:
            self.device_error(str(exc))

    def reset(self) -> asyncio.Future | None:
        """Status 0: forget everything the driver set up.

        Returns the device's fence (a future) while its old work may still
        touch guest memory; the Status write is held until it resolves.
        """
        self.counters.resets += 1
        self._generation += 1
        before = self.status
        fence = self.device.reset() if self.active else None
        self._reset_state()
        if fence is not None and not fence.done():
            self._fence = fence
        # Also when the device was already stopped by NEEDS_RESET, or a
        # second reset comes while the first drains: the old work is the
        # same, and so is the fence.
        if not self._draining():
            return None
        if before:
            self._status_draining = before
        self.counters.held_resets += 1
        return self._fence

    def device_error(self, why: str) -> None:
        """The driver broke the rules: NEEDS_RESET and a config-change interrupt."""
        self.counters.needs_reset += 1
        if self.counters.needs_reset <= 16:  # a guest can repeat it: bounded
            self.log.warning("virtio device needs reset", kind=self.kind, reason=why)
        self.status |= NEEDS_RESET
        if self.active:
            self.active = False
            fence = self.device.reset()
            if fence is not None and not fence.done():
                self._fence = fence
        self.interrupt.trigger(InterruptKind.CONFIG_CHANGE)

    def _bump_generation(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFFFF_FFFF

    def _ignored(self, what: str) -> None:
        if len(self.counters.ignored_writes) < 16:
            self.counters.ignored_writes.append(what)
