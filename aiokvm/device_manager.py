"""Device lifetime and wiring for one machine.

``DeviceManager.attach`` puts a device on the bus (PIO or MMIO, inline or
loop-hosted) with its kernel paths: ioeventfds that turn guest writes into
loop callbacks without an exit, and a coalesced-MMIO zone.
``attach_virtio`` does the same for a ``VirtioDevice`` behind a virtio-mmio
transport on the board's next slot, with an ioeventfd per queue on
QueueNotify and an irqfd on the slot's line.  ``irqfd`` gives a device an
interrupt line the loop raises without kicking a vCPU.

Every attached device is recorded under its name.  The manager asks any
device that has them for ``metrics()`` (its counters, for
``Machine.stats()["devices"]``) and ``aclose()`` (wait for its work and
release its backend, in reverse attach order), and binds ``vm`` and
``device`` into a device's ``log`` attribute when it has one.  Nothing here
knows a device type.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from .bus import Bus, HandlerMode, Region, Space
from .dispatch import unheld
from .errors import ConfigError
from .kernel_paths import CoalescedRing, IoEvent, IoEventFd, IrqFd

log = structlog.get_logger("aiokvm.devices")


@dataclass(frozen=True)
class Attached:
    """A device the manager owns: its name and the object to ask for metrics and to close."""

    name: str
    device: object


class DeviceManager:
    """Owns every device of one machine (``board`` provides the VM, vCPUs and virtio slots)."""

    #: how often the coalesced ring is drained while nothing else drains it
    COALESCED_DRAIN_S = 0.001

    def __init__(self, board, bus: Bus, dispatcher, loop: asyncio.AbstractEventLoop, *,
                 on_error: Callable[[BaseException], None], logger=log) -> None:
        self._board = board
        self.bus = bus
        self._dispatcher = dispatcher
        self._loop = loop
        self._on_error = on_error
        self._log = logger
        self.attached: list[Attached] = []
        self.ioeventfds: list[tuple[Region, IoEventFd]] = []
        self.irqfds: list[IrqFd] = []
        self.coalesced: CoalescedRing | None = None
        self.coalesced_counts: dict[str, int] = {}
        self._coalesced_handle: asyncio.TimerHandle | None = None
        self.virtio: list = []  # (VirtioSlot, MmioTransport)
        #: accel=unicorn has no kernel paths: per region, the notifies the emulated
        #: CPU posts to the loop itself (what an ioeventfd would have signalled)
        self.emulated = getattr(board, "accel", "kvm") == "unicorn"
        self.emulated_ioevents: dict[int, list] = {}  # region id -> [(IoEvent, callback)]
        self.emulated_counts: dict[str, int] = {}
        self.interrupts_without_controller = 0
        self._virtio_frozen: str | None = None  # why no more virtio devices may come

    # -- attaching ---------------------------------------------------------------------
    def attach(
        self, device, *, pio: tuple[int, int] | None = None, mmio: tuple[int, int] | None = None,
        mode: HandlerMode | str = HandlerMode.LOOP, name: str | None = None,
        ioeventfds: list[IoEvent] | tuple[IoEvent, ...] = (), coalesced: bool = False, owner=None,
    ) -> Region:
        """Claim a PIO or MMIO range ``(base, length)`` for ``device`` (see ``Machine.add_device``).

        ``owner``: the device this region belongs to when it is one of
        several regions of one device (ATA's control port); metrics and
        close go to the owner, once.
        """
        if (pio is None) == (mmio is None):
            raise ConfigError("give exactly one of pio=(base, length) or mmio=(base, length)")
        space, (base, length) = (Space.PIO, pio) if pio is not None else (Space.MMIO, mmio)
        mode = HandlerMode(mode)
        name = name or type(device).__name__
        if any(a.name == name for a in self.attached):
            raise ConfigError(f"a device named {name!r} is already attached; give another name=")
        if coalesced and self.emulated:
            raise ConfigError(f"{name}: accel=unicorn has no coalesced MMIO ring (a KVM kernel path); attach "
                              "without coalesced=True")
        if coalesced and mode is not HandlerMode.LOOP:
            raise ConfigError(f"{name}: coalesced writes are delivered on the loop; use mode='loop'")
        for spec in ioeventfds:
            if not 0 <= spec.offset < length:
                raise ConfigError(f"ioeventfd offset {spec.offset:#x} is outside the device's {length:#x} bytes")
        region = self.bus.register(space, base, length, device, mode=mode, name=name)
        try:
            for spec in ioeventfds if self.emulated else ():
                self.emulated_ioevents.setdefault(region.id, []).append((spec, self._ioevent_callback(region, spec)))
            for spec in () if self.emulated else ioeventfds:
                self.ioeventfds.append((region, IoEventFd(
                    self._board.vm, self._loop, addr=base + spec.offset, size=spec.size, pio=space is Space.PIO,
                    datamatch=spec.datamatch, callback=self._ioevent_callback(region, spec),
                    name=f"{region.name}+{spec.offset:#x}",
                )))
            if coalesced:
                self._board.vm.coalesced_zone(base, length, pio=space is Space.PIO)
                if self.coalesced is None:
                    self.coalesced = CoalescedRing(self._board.vcpus[0], self._deliver_coalesced)
                    self._dispatcher.pre_serve = self.coalesced.drain
        except BaseException:
            for entry in [e for e in self.ioeventfds if e[0] is region]:
                entry[1].close()
                self.ioeventfds.remove(entry)
            self.bus.unregister(region)
            raise
        owned = owner if owner is not None else device
        if not any(a.device is owned for a in self.attached):
            self.attached.append(Attached(name, owned))
            self._bind_log(owned, name)
        return region

    def attach_virtio(self, device, *, ioeventfd: bool = True, name: str | None = None):
        """Attach a ``VirtioDevice`` on the board's next virtio-mmio slot; returns its transport.

        QueueNotify goes through an ioeventfd per queue unless
        ``ioeventfd=False`` (a plain exit, for measurement); interrupts go
        through an irqfd on the slot's line.
        """
        from .devices.virtio.mmio import QUEUE_NOTIFY, MmioTransport

        if self._virtio_frozen:
            raise ConfigError(f"add virtio devices before {self._virtio_frozen}: the command line announces them")
        slot = self._board.virtio_slots.allocate()
        line = None
        try:
            if self.emulated:
                trigger = self._no_interrupt_controller  # the guest kit's drivers poll
            else:
                line = self.irqfd(slot.irq)
                trigger = line.trigger
            transport = MmioTransport(device, self._board.memory, trigger)
            queues = range(len(device.queue_max_sizes))
            notify = [IoEvent(QUEUE_NOTIFY, 4, datamatch=q) for q in queues] if ioeventfd else []
            self.attach(transport, mmio=(slot.base, slot.size), name=name or f"virtio{slot.index}", ioeventfds=notify)
        except BaseException:
            if line is not None:
                line.close()
                self.irqfds.remove(line)
            self._board.virtio_slots.release(slot)
            raise
        self._bind_log(device, name or f"virtio{slot.index}")
        self.virtio.append((slot, transport))
        return transport

    def _no_interrupt_controller(self) -> None:
        """accel=unicorn: an interrupt a device raises has no controller to go to; counted."""
        self.interrupts_without_controller += 1

    def detach(self, region: Region) -> None:
        """Undo ``attach`` of one region (its ioeventfds, and its device's record
        when no other region of that device remains)."""
        for entry in [e for e in self.ioeventfds if e[0] is region]:
            entry[1].close()
            self.ioeventfds.remove(entry)
        self.bus.unregister(region)
        still_used = {id(r.device) for r in self.bus.regions()}
        self.attached = [a for a in self.attached if a.name != region.name or id(a.device) in still_used]

    def get(self, name: str):
        """The attached device named ``name``, or None."""
        return next((a.device for a in self.attached if a.name == name), None)

    def freeze_virtio(self, why: str) -> None:
        """No more virtio devices: the guest's command line (announcing them) is written."""
        self._virtio_frozen = why

    def irqfd(self, gsi: int, *, resample: bool = False, on_resample=None) -> IrqFd:
        """An interrupt line the loop raises by writing an eventfd (no vCPU kick)."""
        irq = IrqFd(self._board.vm, self._loop, gsi, resample=resample, on_resample=on_resample)
        self.irqfds.append(irq)
        return irq

    def _bind_log(self, device, name: str) -> None:
        if hasattr(device, "log"):
            device.log = self._log.bind(device=name)

    # -- kernel paths ------------------------------------------------------------------
    def _ioevent_callback(self, region: Region, spec: IoEvent):
        device = region.device
        notify = getattr(device, "ioevent", None)

        def callback(count: int) -> None:
            try:
                if notify is not None:
                    notify(spec.offset, spec.datamatch, count)
                else:
                    unheld(device.write(spec.offset, spec.size, spec.datamatch or 0), "ioeventfd")
            except Exception as exc:
                self._on_error(exc)

        return callback

    def _deliver_coalesced(self, pio: bool, addr: int, size: int, data: bytes) -> None:
        region = self.bus.find(Space.PIO if pio else Space.MMIO, addr, size)
        if region is None:
            return  # the zone was unregistered meanwhile
        self.coalesced_counts[region.name] = self.coalesced_counts.get(region.name, 0) + 1
        try:
            unheld(region.device.write(addr - region.base, size, int.from_bytes(data, "little")), "coalesced")
        except Exception as exc:
            self._on_error(exc)

    def start(self) -> None:
        """The vCPUs start: drain the coalesced ring on a timer."""
        if self.coalesced is not None:
            self._drain_coalesced_periodically()

    def _drain_coalesced_periodically(self) -> None:
        self.coalesced.drain()
        self._coalesced_handle = self._loop.call_later(self.COALESCED_DRAIN_S, self._drain_coalesced_periodically)

    def stop(self) -> None:
        """The vCPUs stopped: deliver what the guest wrote through kernel paths before it did."""
        if self._coalesced_handle is not None:
            self._coalesced_handle.cancel()
            self._coalesced_handle = None
        if self.coalesced is not None:
            self.coalesced.drain()
        for _, efd in self.ioeventfds:
            efd.drain()
        for attached in self.attached:
            flush = getattr(attached.device, "drain", None)
            if flush is not None and not asyncio.iscoroutinefunction(flush):
                flush()  # synchronous output flushes (the console)

    # -- reporting ---------------------------------------------------------------------
    def metrics(self) -> dict[str, dict]:
        """Every device's own counters, by name (devices without ``metrics()`` are left out)."""
        out = {}
        for attached in self.attached:
            metrics = getattr(attached.device, "metrics", None)
            if metrics is not None:
                out[attached.name] = metrics()
        return out

    def kernel_paths(self) -> dict:
        return {
            "ioeventfd": {efd.name: {"signals": efd.count, "loop_wakeups": efd.wakeups}
                          for _, efd in self.ioeventfds},
            "irqfd": {str(irq.gsi): {"triggers": irq.triggers, "resamples": irq.resamples} for irq in self.irqfds},
            "coalesced": {"entries": self.coalesced.entries if self.coalesced else 0,
                          "by_region": dict(self.coalesced_counts)},
        }

    def kernel_path_counts(self) -> dict[str, int]:
        """Accesses by ``device/path`` that never exited to user mode (ioeventfd, coalesced)."""
        paths: dict[str, int] = {}
        for region, efd in self.ioeventfds:
            key = f"{region.name}/ioeventfd"
            paths[key] = paths.get(key, 0) + efd.count
        for name, count in self.coalesced_counts.items():
            paths[f"{name}/coalesced"] = count
        for name, count in self.emulated_counts.items():
            paths[f"{name}/notify"] = count  # accel=unicorn: posted to the loop without an exit
        return paths

    # -- closing -----------------------------------------------------------------------
    async def aclose(self) -> None:
        """Close every device (newest first; each waits for its own work), then the kernel paths."""
        errors = []
        for attached in reversed(self.attached):
            aclose = getattr(attached.device, "aclose", None)
            if aclose is None:
                continue
            try:
                await aclose()
            except Exception as exc:  # one device failing to close must not leak the others
                errors.append(exc)
                self._log.warning("device failed to close", device=attached.name, error=str(exc))
        self.close_kernel_paths()
        if errors:
            raise errors[0]

    def close_kernel_paths(self) -> None:
        """Close every ioeventfd and irqfd (idempotent); their counts stay for ``stats()``."""
        for _, efd in self.ioeventfds:
            efd.close()
        for irq in self.irqfds:
            irq.close()
