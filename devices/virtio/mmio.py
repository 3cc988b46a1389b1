"""virtio-mmio transport, modern only (version 2).

A bus device (``read``/``write`` on the 512-byte register window) that drives
one ``VirtioDevice``.  It owns feature negotiation, queue setup, the status
state machine (including reset and NEEDS_RESET), InterruptStatus/ACK and
ConfigGeneration; the device owns its config space and its queues' work.

Threat model: every register write comes from the guest.  Register accesses
must be 32-bit (others are ignored and counted); queue sizes, addresses and
selectors are range-checked; a driver that refuses VERSION_1 never gets
FEATURES_OK; queue addresses are validated when the queues are built
(``SplitQueue``), and a hostile ring puts the device in NEEDS_RESET instead of
raising out of the loop.

QEMU microvm layout (matched by ``Machine.add_virtio``): transport ``i`` at
``0xfeb00000 + 512*i``, IRQ ``5 + i``, filled from slot 7 down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from .queue import SplitQueue, VirtqueueError

log = structlog.get_logger("aiokvm.devices.virtio")

MMIO_BASE = 0xFEB0_0000
MMIO_SIZE = 0x200
MMIO_SLOTS = 8
MMIO_FIRST_IRQ = 5

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

# Feature bits common to all devices.
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32

INT_USED_BUFFER = 1
INT_CONFIG_CHANGE = 2


class VirtioDevice(Protocol):
    """What the transport drives (cf. Firecracker's VirtioDevice)."""

    device_id: int
    features: int            # offered feature bits (VERSION_1 is added by the transport)
    queue_max_sizes: tuple[int, ...]

    def read_config(self, offset: int, size: int) -> int: ...

    def write_config(self, offset: int, size: int, value: int) -> None: ...

    def activate(self, memory, queues: list[SplitQueue], features: int, interrupt: VirtioInterrupt) -> None: ...

    def notify(self, queue: int) -> None: ...

    def reset(self) -> None: ...


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
class TransportMetrics:
    """Counters of one transport (guest-visible misbehaviour included)."""

    reads: int = 0
    writes: int = 0
    notifies: int = 0
    interrupts: int = 0
    resets: int = 0
    bad_accesses: int = 0        # non-32-bit register access, unknown offsets
    features_refused: int = 0    # FEATURES_OK refused (no VERSION_1 or unknown bits)
    needs_reset: int = 0         # device errors that set NEEDS_RESET
    ignored_writes: list[str] = field(default_factory=list)


class VirtioInterrupt:
    """The transport's interrupt: sets InterruptStatus bits and raises the line.

    ``raise_irq`` is the machine's line (an irqfd trigger, an edge); it is
    called on every ``signal()``: the device decides how often to signal
    (EVENT_IDX, batching), not the transport.
    """

    def __init__(self, raise_irq: Callable[[], None]) -> None:
        self._raise = raise_irq
        self.status = 0
        self.count = 0

    def signal(self, bits: int = INT_USED_BUFFER) -> None:
        self.status |= bits
        self.count += 1
        self._raise()

    def ack(self, bits: int) -> None:
        self.status &= ~bits


class MmioTransport:
    """virtio-mmio v2 registers for one device (a loop-hosted bus device)."""

    def __init__(self, device: VirtioDevice, memory, raise_irq: Callable[[], None]) -> None:
        self.device = device
        self.memory = memory
        self.interrupt = VirtioInterrupt(raise_irq)
        self.metrics = TransportMetrics()
        self.offered = device.features | F_VERSION_1
        self.queues = [QueueConfig(size) for size in device.queue_max_sizes]
        self._reset_state()

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

    # -- bus device ------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        self.metrics.reads += 1
        if offset >= CONFIG:
            return self.device.read_config(offset - CONFIG, size)
        if size != 4 or offset % 4:
            self.metrics.bad_accesses += 1
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
            return self.status
        if offset == CONFIG_GENERATION:
            return self.config_generation
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFF_FFFF  # no shared memory regions
        return 0  # QueueReset, write-only and reserved registers read as zero

    def write(self, offset: int, size: int, value: int) -> None:
        self.metrics.writes += 1
        if offset >= CONFIG:
            self.device.write_config(offset - CONFIG, size, value)
            return
        if size != 4 or offset % 4:
            self.metrics.bad_accesses += 1
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
            self._write_status(value)
        elif offset == QUEUE_RESET:
            self._ignored("QueueReset (VIRTIO_F_RING_RESET not offered)")
        else:
            self.metrics.bad_accesses += 1

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
        self.metrics.notifies += 1
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
    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        value &= 0xFF
        if value & FEATURES_OK and not self.status & FEATURES_OK and not self._features_acceptable():
            self.metrics.features_refused += 1
            value &= ~FEATURES_OK  # the driver reads it back and gives up
        if value & DRIVER_OK and not self.status & DRIVER_OK:
            if not (value & FEATURES_OK or self.status & FEATURES_OK):
                self._ignored("DRIVER_OK without FEATURES_OK")
                value &= ~DRIVER_OK
            else:
                self.status = value | (self.status & NEEDS_RESET)
                self._activate()
                return
        self.status = value | (self.status & NEEDS_RESET)

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
        self.device.activate(self.memory, queues, self.driver_features, self.interrupt)

    def reset(self) -> None:
        """Status 0: forget everything the driver set up."""
        self.metrics.resets += 1
        if self.active:
            self.device.reset()
        self._reset_state()

    def device_error(self, why: str) -> None:
        """The driver broke the rules: NEEDS_RESET and a config-change interrupt."""
        self.metrics.needs_reset += 1
        log.warning("virtio device needs reset", device=type(self.device).__name__, reason=why)
        self.status |= NEEDS_RESET
        if self.active:
            self.device.reset()
            self.active = False
        self.config_changed()

    def config_changed(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFFFF_FFFF
        self.interrupt.signal(INT_CONFIG_CHANGE)

    def _ignored(self, what: str) -> None:
        if len(self.metrics.ignored_writes) < 16:
            self.metrics.ignored_writes.append(what)
