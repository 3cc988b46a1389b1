"""``Machine``: memory, vCPUs, bus, devices and loader wired together.

    async with Machine(memory="64M", vcpus=1) as vm:
        vm.load("hello")
        status = await vm.run(timeout=10)

Many machines can share one event loop: each owns its KVM fds and vCPU
threads, and a guest error stops only its own machine.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from . import boot, guests
from .bus import Bus, HandlerMode, Region, Space
from .cpu.exits import FailEntry, Halt, InternalError, Shutdown, SystemEvent, SystemEventType
from .cpu.vcpu_thread import VcpuThread, ensure_kick_handler, guest_error
from .devices.console import COM1_IRQ, COM1_PORT, SerialConsole
from .devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit
from .dispatch import Dispatcher
from .errors import AiokvmError, ConfigError, GuestError, HandoffCancelled, MachineTimeout
from .handoff import C_MECHANISMS, DEFAULT_HANDOFF, HANDOFFS, EventHandoff, LockHandoff, SlotServer
from .kernel_paths import CoalescedRing, IoEvent, IoEventFd, IrqFd
from .kvm import Kvm
from .kvm.stats import KvmStats
from .memory import GuestMemory
from .metrics import STATS_SCHEMA, merge_counts, mode_split, vcpu_stats
from .procstat import diff, read_thread_times_precise

log = structlog.get_logger("aiokvm.machine")

# Addresses KVM needs on Intel hosts (unused on others); QEMU's choices, and
# reserved in the e820 map (boot.KVM_PRIVATE_START).
IDENTITY_MAP_ADDR = 0xFEFF_C000
TSS_ADDR = 0xFEFF_D000

_machine_ids = itertools.count(1)


@dataclass(frozen=True)
class ExitStatus:
    """How a guest run ended without error.

    ``reason`` is ``"debug-exit"`` (``code`` is the value written),
    ``"stopped"`` (``Machine.stop()``), ``"system-event:shutdown"`` or
    ``"system-event:reset"``, or ``"halt"`` (all vCPUs halted, no irqchip).
    """

    code: int | None
    reason: str
    vcpu: int | None = None


class Machine:
    """One virtual machine on KVM.  An async context manager."""

    def __init__(
        self,
        memory: int | str = "64M",
        vcpus: int = 1,
        *,
        handoff: str = DEFAULT_HANDOFF,
        spin_us: float = 200.0,
        poll_window_us: float = 500.0,
        sample_every: int = 1,
        serial_output: Any = None,
        serial_input: Any = None,
        name: str | None = None,
    ) -> None:
        if isinstance(vcpus, bool) or not isinstance(vcpus, int) or vcpus < 1:
            raise ConfigError(f"vcpus must be a positive integer, got {vcpus!r}")
        for label, value in (("spin_us", spin_us), ("poll_window_us", poll_window_us)):
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1e6:
                raise ConfigError(f"{label} must be a number of microseconds in [0, 1e6], got {value!r}")
        if isinstance(sample_every, bool) or not isinstance(sample_every, int) or not 1 <= sample_every <= 1 << 20:
            raise ConfigError(f"sample_every must be an integer in [1, 2**20], got {sample_every!r}")
        if handoff not in HANDOFFS:
            raise ConfigError(f"unknown handoff {handoff!r}; choose one of {', '.join(sorted(HANDOFFS))}")
        from .memory import parse_size, validate_memory_size

        self.memory_size = validate_memory_size(parse_size(memory))
        self.vcpu_count = vcpus
        self.handoff_name = handoff
        self._spin_us = spin_us
        self._poll_window_us = poll_window_us
        self._sample_every = sample_every
        self._slot_server: SlotServer | None = None
        self._paused = False
        self._park_waiter: asyncio.Future | None = None
        self.name = name or f"vm{next(_machine_ids)}"
        self._serial_output = serial_output
        self._serial_input = serial_input
        self._opened = False
        self._closed = False
        self._loaded: Path | None = None
        self._running = False
        self._outcome: asyncio.Future | None = None
        self._threads: list[VcpuThread] = []
        self._stop_lock = threading.Lock()
        self._log = log.bind(vm=self.name)

    # -- lifecycle ----------------------------------------------------------------
    async def __aenter__(self) -> Machine:
        self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def open(self) -> None:
        """Create the KVM VM, guest RAM, vCPUs and the default devices."""
        if self._opened:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._opened = True
        try:
            self._open()
        except BaseException:
            self._release()
            raise

    def _open(self) -> None:
        self.kvm = Kvm()
        max_vcpus = self.kvm.check_extension("MAX_VCPUS") or self.kvm.check_extension("NR_VCPUS") or 1
        if self.vcpu_count > max_vcpus:
            raise ConfigError(f"{self.vcpu_count} vCPUs asked for; this KVM allows at most {max_vcpus}")
        self.vm = self.kvm.create_vm()
        for setter, addr in ((self.vm.set_tss_addr, TSS_ADDR), (self.vm.set_identity_map_addr, IDENTITY_MAP_ADDR)):
            try:
                setter(addr)
            except OSError:
                pass  # only needed by VMX hosts; others may refuse it
        self.vm.create_irqchip()
        self.vm.create_pit2()
        self.memory = GuestMemory(self.memory_size)
        for slot, region in enumerate(self.memory.regions):
            self.vm.set_user_memory_region(slot, region.start, region.size, self.memory.host_address(region))
        supported = self.kvm.supported_cpuid()
        self.vcpus = []
        self._kvm_stats: list[KvmStats] = []
        for index in range(self.vcpu_count):
            vcpu = self.vm.create_vcpu(index)
            self.vcpus.append(vcpu)
            vcpu.set_cpuid2(_cpuid_for(supported, index, self.vcpu_count))
        if self.kvm.check_extension("BINARY_STATS_FD"):
            self._kvm_stats = [KvmStats.for_vcpu(vcpu) for vcpu in self.vcpus]
        self._ioeventfds: list[tuple[Region, IoEventFd]] = []
        self._irqfds: list[IrqFd] = []
        self._coalesced: CoalescedRing | None = None
        self._coalesced_regions: list[Region] = []
        self._coalesced_counts: dict[str, int] = {}
        self._coalesced_handle: asyncio.TimerHandle | None = None
        self._virtio: list = []       # (slot, MmioTransport)
        self._disks: list = []        # (device, backend)
        self.bus = Bus()
        python_handoff = {"event": EventHandoff, "lock": LockHandoff}.get(self.handoff_name)
        self.python_handoff = python_handoff(self._loop, self.vcpu_count) if python_handoff else None
        self.dispatcher = Dispatcher(self.bus, self.python_handoff)
        self.bus.on_change(self._refresh_tables)
        self.console = SerialConsole(
            self._loop, irq=lambda level: self.irq_line(COM1_IRQ, level), sink=self._serial_output,
        )
        self.add_device(self.console, pio=(COM1_PORT, 8), mode=HandlerMode.INLINE, name="serial0")
        self.debug_exit = DebugExit(self._on_debug_exit)
        self.add_device(self.debug_exit, pio=(DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE), mode=HandlerMode.INLINE,
                        name="debug-exit")
        if self._serial_input is not None:
            self.console.attach_source(self._serial_input)

    async def aclose(self) -> None:
        """Stop the guest if it runs, then free every fd, thread and mapping."""
        if self._closed:
            return
        if self._threads:
            self._request_stop()
            await self._join_vcpus()
        for device, backend in getattr(self, "_disks", []):
            drain = getattr(device, "drain", None)
            if drain is not None:
                await drain()  # requests in flight finish before the backend goes
            await backend.close()
        self._disks = []
        self._release()

    def _release(self) -> None:
        self._closed = True
        console = getattr(self, "console", None)
        if console is not None:
            console.close()
        for _, efd in getattr(self, "_ioeventfds", []):
            efd.close()
        self._ioeventfds = []
        for irq in getattr(self, "_irqfds", []):
            irq.close()
        self._irqfds = []
        for stats in getattr(self, "_kvm_stats", []):
            stats.close()
        self._kvm_stats = []
        for vcpu in getattr(self, "vcpus", []):
            vcpu.close()
        self.vcpus = []
        for name in ("vm", "kvm"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()
        memory = getattr(self, "memory", None)
        if memory is not None:
            memory.close()

    def _require_open(self) -> None:
        if self._closed:
            raise ConfigError(f"machine {self.name} is closed")
        if not self._opened:
            raise ConfigError("open the machine first: `async with Machine(...) as vm:`")

    # -- configuration ----------------------------------------------------------------
    def add_device(
        self, device, *, pio: tuple[int, int] | None = None, mmio: tuple[int, int] | None = None,
        mode: HandlerMode | str = HandlerMode.LOOP, name: str | None = None,
        ioeventfds: list[IoEvent] | tuple[IoEvent, ...] = (), coalesced: bool = False,
    ) -> Region:
        """Claim a PIO or MMIO range ``(base, length)`` for ``device``.

        ``mode``: where ``read``/``write`` run ("loop", the default, or
        "inline" in the vCPU thread).  ``ioeventfds``: offsets whose guest
        writes only signal the device (``device.ioevent(offset, datamatch,
        count)`` on the loop, else one ``write(offset, size, datamatch or 0)``)
        without an exit to user mode.  ``coalesced``: queue the region's
        writes in KVM's coalesced ring (loop-hosted devices only); reads still
        exit, after the queued writes are delivered.
        """
        self._require_open()
        if (pio is None) == (mmio is None):
            raise ConfigError("give exactly one of pio=(base, length) or mmio=(base, length)")
        space, (base, length) = (Space.PIO, pio) if pio is not None else (Space.MMIO, mmio)
        mode = HandlerMode(mode)
        if coalesced and mode is not HandlerMode.LOOP:
            raise ConfigError(f"{name or type(device).__name__}: coalesced writes are delivered on the loop; "
                              "use mode='loop'")
        for spec in ioeventfds:
            if not 0 <= spec.offset < length:
                raise ConfigError(f"ioeventfd offset {spec.offset:#x} is outside the device's {length:#x} bytes")
        region = self.bus.register(space, base, length, device, mode=mode, name=name)
        try:
            for spec in ioeventfds:
                self._ioeventfds.append((region, IoEventFd(
                    self.vm, self._loop, addr=base + spec.offset, size=spec.size, pio=space is Space.PIO,
                    datamatch=spec.datamatch, callback=self._ioevent_callback(region, spec),
                    name=f"{region.name}+{spec.offset:#x}",
                )))
            if coalesced:
                self.vm.coalesced_zone(base, length, pio=space is Space.PIO)
                self._coalesced_regions.append(region)
                if self._coalesced is None:
                    self._coalesced = CoalescedRing(self.vcpus[0], self._deliver_coalesced)
                    self.dispatcher.pre_serve = self._coalesced.drain
        except BaseException:
            for entry in [e for e in self._ioeventfds if e[0] is region]:
                entry[1].close()
                self._ioeventfds.remove(entry)
            self.bus.unregister(region)
            raise
        return region

    def _ioevent_callback(self, region: Region, spec: IoEvent):
        device = region.device
        notify = getattr(device, "ioevent", None)

        def callback(count: int) -> None:
            try:
                if notify is not None:
                    notify(spec.offset, spec.datamatch, count)
                else:
                    device.write(spec.offset, spec.size, spec.datamatch or 0)
            except Exception as exc:
                self._on_loop_error(exc)

        return callback

    def _deliver_coalesced(self, pio: bool, addr: int, size: int, data: bytes) -> None:
        region = self.bus.find(Space.PIO if pio else Space.MMIO, addr, size)
        if region is None:
            return  # the zone was unregistered meanwhile
        self._coalesced_counts[region.name] = self._coalesced_counts.get(region.name, 0) + 1
        try:
            region.device.write(addr - region.base, size, int.from_bytes(data, "little"))
        except Exception as exc:
            self._on_loop_error(exc)

    # -- virtio and disks -------------------------------------------------------------------
    def add_virtio(self, device, *, ioeventfd: bool = True, name: str | None = None):
        """Attach a virtio device on the next virtio-mmio slot, as QEMU microvm does.

        Slots fill from the top (7 down to 0): transport ``i`` at
        ``0xfeb00000 + 512*i`` with IRQ ``5 + i``; ``load()`` then appends
        ``virtio_mmio.device=512@0x...:IRQ`` to the command line.  QueueNotify
        goes through an ioeventfd unless ``ioeventfd=False`` (a plain exit,
        for measurement); interrupts go through an irqfd.
        """
        from .devices.virtio.mmio import MMIO_BASE, MMIO_FIRST_IRQ, MMIO_SIZE, MMIO_SLOTS, QUEUE_NOTIFY, MmioTransport

        self._require_open()
        if self._loaded is not None:
            raise ConfigError("add virtio devices before load(): the command line announces them")
        used = {slot for slot, _ in self._virtio}
        free = [slot for slot in range(MMIO_SLOTS - 1, -1, -1) if slot not in used]
        if not free:
            raise ConfigError(f"all {MMIO_SLOTS} virtio-mmio slots are taken")
        slot = free[0]
        base, irq = MMIO_BASE + MMIO_SIZE * slot, MMIO_FIRST_IRQ + slot
        line = self.irqfd(irq)
        transport = MmioTransport(device, self.memory, line.trigger)
        queues = range(len(device.queue_max_sizes))
        notify = [IoEvent(QUEUE_NOTIFY, 4, datamatch=q) for q in queues] if ioeventfd else []
        self.add_device(transport, mmio=(base, MMIO_SIZE), name=name or f"virtio{slot}", ioeventfds=notify)
        self._virtio.append((slot, transport))
        return transport

    async def add_disk(self, disk, *, interface: str | None = None, read_only: bool | None = None,
                       ioeventfd: bool = True):
        """Attach a disk: a ``BlockBackend``, or a CLI-style spec
        ``PATH[,ro][,format=raw|nbd][,if=virtio|ata]`` (NBD: a URL).

        Returns the device (``VirtioBlk`` or ``AtaDisk``).  The machine closes
        the backend when it closes.
        """
        from .devices.backends.spec import open_backend, parse_disk_spec

        self._require_open()
        if isinstance(disk, str):
            spec = parse_disk_spec(disk)
            if read_only is not None and read_only != spec.read_only:
                spec = type(spec)(**{**spec.__dict__, "read_only": read_only})
            backend = await open_backend(spec)
            interface = interface or spec.interface
        else:
            backend = disk
            interface = interface or "virtio"
        try:
            device = self._attach_disk(backend, interface, ioeventfd)
        except BaseException:
            await backend.close()
            raise
        self._disks.append((device, backend))
        return device

    def _attach_disk(self, backend, interface: str, ioeventfd: bool):
        if interface == "virtio":
            from .devices.virtio.blk import VirtioBlk

            device = VirtioBlk(backend)
            self.add_virtio(device, ioeventfd=ioeventfd)
            return device
        if interface == "ata":
            from .devices.ata import ATA_BASE, ATA_CTRL, ATA_IRQ, AtaDisk

            if any(type(d).__name__ == "AtaDisk" for d, _ in self._disks):
                raise ConfigError("only one ATA disk (the primary master) is supported")
            device = AtaDisk(backend, irq=lambda level: self.irq_line(ATA_IRQ, level))
            region = self.add_device(device, pio=(ATA_BASE, 8), name="ata0")
            try:
                self.add_device(device.control_port(), pio=(ATA_CTRL, 1), name="ata0-ctrl")
            except BaseException:
                self.bus.unregister(region)
                raise
            return device
        raise ConfigError(f"unknown disk interface {interface!r}: use virtio or ata")

    def irqfd(self, gsi: int, *, resample: bool = False, on_resample=None) -> IrqFd:
        """An interrupt line the loop raises by writing an eventfd (no vCPU kick).

        ``resample=True`` makes it level-triggered: ``on_resample()`` runs on
        the loop after the guest acknowledged it.
        """
        self._require_open()
        irq = IrqFd(self.vm, self._loop, gsi, resample=resample, on_resample=on_resample)
        self._irqfds.append(irq)
        return irq

    def irq_line(self, irq: int, level: bool) -> None:
        """Drive an in-kernel irqchip input (thread-safe)."""
        if not self._closed:
            self.vm.irq_line(irq, level)

    def load(self, guest: str | Path, cmdline: str = "") -> None:
        """Load a PVH ELF guest (a path or a bundled guest name) and set up vCPU 0."""
        self._require_open()
        if self._running:
            raise ConfigError("cannot load a guest into a running machine")
        path = guests.resolve(guest)
        image = boot.read_elf(path)
        boot.load_image(image, self.memory)
        if self.vcpu_count > 1 and "cpus=" not in cmdline.split("#")[0]:
            # Boot convention of the guest kit: the vCPU count on the cmdline.
            cmdline = f"{cmdline} cpus={self.vcpu_count}".strip()
        from .devices.virtio.mmio import MMIO_BASE, MMIO_FIRST_IRQ, MMIO_SIZE

        for slot, _ in sorted(self._virtio, reverse=True):
            # What QEMU's auto-kernel-cmdline adds for each virtio-mmio device.
            cmdline += f" virtio_mmio.device={MMIO_SIZE}@{MMIO_BASE + MMIO_SIZE * slot:#x}:{MMIO_FIRST_IRQ + slot}"
        cmdline = cmdline.strip()
        start_info = boot.write_start_info(self.memory, cmdline)
        boot.pvh_initial_state(self.vcpus[0], image.entry32, start_info)
        self.cmdline = cmdline
        self._loaded = path

    # -- running ---------------------------------------------------------------------
    async def run(self, timeout: float | None = None) -> ExitStatus:
        """Run the guest until it exits; returns its ``ExitStatus``.

        Raises ``GuestError`` if the guest stops in a way the VMM cannot
        continue from (triple fault, emulation failure, unhandled exit), and
        ``MachineTimeout`` after ``timeout`` seconds.  Cancelling the task
        stops the vCPUs and frees their threads.
        """
        self._require_open()
        if self._loaded is None:
            raise ConfigError("load a guest before run(): vm.load('hello')")
        if self._running or self._threads:
            raise ConfigError(f"machine {self.name} is already running or has run; create a new Machine")
        ensure_kick_handler()  # before anything starts: refuses if the application owns the signal
        self._running = True
        self._outcome = self._loop.create_future()
        self._stopping = False
        context = {"vm": self.name}
        self._threads = [
            VcpuThread(vcpu, self.dispatcher, on_exit=self._on_exit, on_stop=self._on_vcpu_stop, context=context,
                       sample_every=self._sample_every, spin_us=self._spin_us, on_park=self._vcpu_parked)
            for vcpu in self.vcpus
        ]
        if self.handoff_name in C_MECHANISMS:
            self._slot_server = SlotServer(
                self._loop, self.handoff_name, [t.ctx for t in self._threads], self.dispatcher,
                on_error=self._on_loop_error, poll_window_us=self._poll_window_us,
            )
            self._slot_server.start()
        if self._coalesced is not None:
            self._schedule_coalesced()
        try:
            for thread in self._threads:
                thread.start()
            try:
                outcome = await asyncio.wait_for(asyncio.shield(self._outcome), timeout)
            except TimeoutError:
                raise MachineTimeout(
                    f"guest {self._loaded.name} did not finish within {timeout:g}s"
                ) from None
        finally:
            self._request_stop()
            await self._join_vcpus()
            if self._slot_server is not None:
                self._slot_server.close()
            if self._coalesced_handle is not None:
                self._coalesced_handle.cancel()
                self._coalesced_handle = None
            self._drain_kernel_paths()
            self.console.drain()
            self._running = False
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def stop(self) -> None:
        """Stop a running machine; ``run()`` then returns ``ExitStatus(reason="stopped")``.

        Safe to call from any thread.
        """
        self._finish(ExitStatus(None, "stopped"))

    def _finish(self, outcome: ExitStatus | BaseException) -> None:
        """Record how the run ended (first one wins) and stop the vCPUs.  Any thread."""
        with self._stop_lock:
            if getattr(self, "_stopping", True):
                return
            self._stopping = True
        self._cancel_handoffs()
        if threading.get_ident() == self._loop_thread:
            self._set_outcome(outcome)
        else:
            try:
                self._loop.call_soon_threadsafe(self._set_outcome, outcome)
            except RuntimeError:  # pragma: no cover - loop already closed
                pass

    def _set_outcome(self, outcome) -> None:
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_result(outcome)

    def _request_stop(self) -> None:
        with self._stop_lock:
            self._stopping = True
        self._cancel_handoffs()

    def _cancel_handoffs(self) -> None:
        for thread in self._threads:
            thread.request_stop()
        if self.python_handoff is not None:
            self.python_handoff.cancel_all()
        if self._slot_server is not None:
            self._slot_server.cancel_all()

    async def pause(self, timeout: float = 5.0) -> None:
        """Hold every vCPU outside KVM_RUN; returns once all are parked.

        A loop-hosted access in flight completes first.  ``resume()``
        continues exactly where each vCPU stopped.  Raises ``MachineTimeout``
        if a vCPU has not parked within ``timeout`` seconds.
        """
        if not self._running:
            raise ConfigError(f"machine {self.name} is not running")
        self._paused = True
        for thread in self._threads:
            thread.pause()
        deadline = self._loop.time() + timeout
        while True:
            # Arm the waiter before looking, so a park in between still wakes us.
            self._park_waiter = self._loop.create_future()
            if all(t.parked.is_set() or not t.thread.is_alive() for t in self._threads):
                break
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise MachineTimeout(f"vCPUs of {self.name} did not park within {timeout:g}s")
            await asyncio.wait([self._park_waiter], timeout=remaining)
        self._park_waiter = None
        self._log.info("machine paused")

    def _vcpu_parked(self, index: int) -> None:
        """A vCPU parked or ended (its thread): wake a waiting ``pause()``."""
        try:
            self._loop.call_soon_threadsafe(self._wake_pauser)
        except RuntimeError:  # pragma: no cover - loop already closed
            pass

    def _wake_pauser(self) -> None:
        waiter = self._park_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def resume(self) -> None:
        """Let paused vCPUs run again."""
        if self._paused:
            self._log.info("machine resumed")
        self._paused = False
        for thread in self._threads:
            thread.resume()

    @property
    def paused(self) -> bool:
        return self._paused

    def _refresh_tables(self) -> None:
        # The port table is shared by pointer; the MMIO list is copied per vCPU.
        for thread in self._threads:
            self.bus.fill_tables(thread.ctx)

    def _on_loop_error(self, error: BaseException) -> None:
        if not isinstance(error, AiokvmError):
            wrapped = GuestError(f"loop-hosted handler failed: {type(error).__name__}: {error}")
            wrapped.__cause__ = error
            error = wrapped
        self._finish(error)

    async def _join_vcpus(self) -> None:
        # Poll instead of join(): the loop must keep running so that nothing a
        # vCPU waits on can deadlock, and no helper thread is needed.
        delay = 0.0005
        waited = 0.0
        while any(t.thread.is_alive() for t in self._threads):
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.05)
            if waited > 0.2:
                for thread in self._threads:  # a kick can race with thread start; repeat it
                    thread.kick()
                waited = 0.0

    # -- callbacks from vCPU threads ---------------------------------------------------
    def _on_debug_exit(self, value: int) -> None:
        self._finish(ExitStatus(value, "debug-exit"))

    def _on_exit(self, index: int, exit) -> None:
        thread = self._threads[index]
        if isinstance(exit, Shutdown):
            raise guest_error(thread, exit, "guest triple-faulted (KVM_EXIT_SHUTDOWN)")
        if isinstance(exit, InternalError):
            raise guest_error(thread, exit, f"KVM internal error, suberror {exit.suberror} "
                                            "(KVM could not emulate a guest instruction)")
        if isinstance(exit, FailEntry):
            raise guest_error(thread, exit, f"VM entry failed, hardware reason {exit.hardware_reason:#x}")
        if isinstance(exit, SystemEvent):
            if exit.type == SystemEventType.SHUTDOWN:
                self._finish(ExitStatus(None, "system-event:shutdown", index))
                return
            if exit.type == SystemEventType.RESET:
                self._finish(ExitStatus(None, "system-event:reset", index))
                return
            raise guest_error(thread, exit, f"guest reported a crash (system event {exit.type})")
        if isinstance(exit, Halt):
            self._finish(ExitStatus(None, "halt", index))
            return
        raise guest_error(thread, exit, f"unhandled KVM exit {exit.reason}")

    def _on_vcpu_stop(self, index: int, error: BaseException | None) -> None:
        self._vcpu_parked(index)  # a pause() waiting for this vCPU stops waiting
        if error is None or isinstance(error, HandoffCancelled):
            return
        if not isinstance(error, AiokvmError):
            wrapped = GuestError(f"vCPU {index} failed: {type(error).__name__}: {error}", vcpu=index)
            wrapped.__cause__ = error
            error = wrapped
        self._finish(error)

    # -- introspection ---------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._running

    #: how often the coalesced ring is drained while nothing else drains it
    COALESCED_DRAIN_S = 0.001

    def _schedule_coalesced(self) -> None:
        self._coalesced.drain()
        self._coalesced_handle = self._loop.call_later(self.COALESCED_DRAIN_S, self._schedule_coalesced)

    def _drain_kernel_paths(self) -> None:
        """Deliver what the guest wrote through kernel paths before it stopped."""
        if self._coalesced is not None:
            self._coalesced.drain()
        for _, efd in self._ioeventfds:
            efd.drain()

    def stats(self) -> dict:
        """Counters, latency percentiles, mode split and KVM's own counters, as plain data.

        The schema (``"aiokvm.stats/1"``) is documented in docs/stats-schema.md.
        """
        vcpus = []
        for i, thread in enumerate(self._threads):
            kvm = self._kvm_stats[i].read() if i < len(self._kvm_stats) and not self._closed else {}
            kvm = {k: v for k, v in kvm.items() if isinstance(v, int)}
            vcpus.append(vcpu_stats(
                thread, self.bus, kvm=kvm, modes=self._modes(thread),
                latency=thread.latency.summary(),
            ))
        unclaimed = {
            "pio": {"reads": sum(v["unclaimed"]["pio_reads"] for v in vcpus),
                    "writes": sum(v["unclaimed"]["pio_writes"] for v in vcpus)},
            "mmio": {"reads": sum(v["unclaimed"]["mmio_reads"] for v in vcpus),
                     "writes": sum(v["unclaimed"]["mmio_writes"] for v in vcpus)},
        }
        server = self._slot_server
        paths = merge_counts(vcpus, "paths")
        for region, efd in self._ioeventfds:
            key = f"{region.name}/ioeventfd"
            paths[key] = paths.get(key, 0) + efd.count
        for name, count in self._coalesced_counts.items():
            paths[f"{name}/coalesced"] = count
        return {
            "schema": STATS_SCHEMA,
            "vm": self.name,
            "handoff": self.handoff_name,
            "vcpus": vcpus,
            "exits": merge_counts(vcpus, "exits"),
            "pio": merge_counts(vcpus, "pio"),
            "mmio": merge_counts(vcpus, "mmio"),
            "paths": dict(sorted(paths.items())),
            "unclaimed": unclaimed,
            "kernel_paths": {
                "ioeventfd": {efd.name: {"signals": efd.count, "loop_wakeups": efd.wakeups}
                              for _, efd in self._ioeventfds},
                "irqfd": {str(irq.gsi): {"triggers": irq.triggers, "resamples": irq.resamples}
                          for irq in self._irqfds},
                "coalesced": {"entries": self._coalesced.entries if self._coalesced else 0,
                              "by_region": dict(self._coalesced_counts)},
            },
            "loop": {"wakeups": server.wakeups, "served": server.served,
                     "idle_sleeps": server.idle_sleeps} if server is not None else {},
        }

    def _modes(self, thread) -> dict:
        start = thread.times_start
        if start is None or thread.started_ns is None:
            return {}
        end = thread.times_end
        end_ns = thread.ended_ns
        if end is None:  # still running: read it live
            if end_ns is not None or thread.native_id is None:
                return {}
            try:
                end = read_thread_times_precise(thread.native_id)
            except OSError:
                return {}
            import time as _time

            end_ns = _time.monotonic_ns()
        ctx = thread.ctx
        return mode_split(diff(start, end), wall_s=(end_ns - thread.started_ns) / 1e9,
                          spin_wait_s=ctx.spin_wait_ns / 1e9, sleep_wait_s=ctx.sleep_wait_ns / 1e9)


def _cpuid_for(supported, index: int, count: int):
    """The host-supported CPUID with this vCPU's APIC ID filled in."""
    from .kvm import ffi

    n = supported.nent
    cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
    cpuid.nent = n
    for i in range(n):
        src, dst = supported.entries[i], cpuid.entries[i]
        for field in ("function", "index", "flags", "eax", "ebx", "ecx", "edx"):
            setattr(dst, field, getattr(src, field))
        if dst.function == 1:
            # EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
            dst.ebx = (dst.ebx & 0x0000FFFF) | (index << 24) | (min(count, 255) << 16)
            if count > 1:
                dst.edx |= 1 << 28  # HTT: the count field above is valid
        elif dst.function in (0xB, 0x1F):
            dst.edx = index  # x2APIC ID
    return cpuid
