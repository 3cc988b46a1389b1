"""``Machine``: one VM, conducted.

    async with Machine(memory="64M", vcpus=1) as vm:
        vm.load("hello")
        status = await vm.run(timeout=10)

A machine holds a board (``board.py``: the KVM VM, RAM, vCPUs, irqchip,
virtio slots), a bus and its dispatcher, a device manager
(``device_manager.py``: attach, kernel paths, metrics, close), the vCPU
threads and the handoff that brings their exits to the loop.  It loads the
guest, runs it, pauses, resumes and stops it, and assembles ``stats()``
(``metrics.py``).  Many machines can share one event loop: each owns its
KVM fds and vCPU threads, and a guest error stops only its own machine.

Lifecycle events go to the ``aiokvm.machine`` logger with ``vm`` bound:
created, started, paused, resumed, stopped (with how), and errors.  Nothing
is logged per exit.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from . import boot, guests, loader
from .accel import ACCELERATORS, resolve_accel
from .board import MicrovmBoard
from .bus import Bus, HandlerMode, Region
from .cpu.exits import FailEntry, Halt, InternalError, Shutdown, SystemEvent, SystemEventType
from .cpu.vcpu_thread import VcpuThread, ensure_kick_handler, guest_error
from .device_manager import DeviceManager
from .devices.console import COM1_IRQ, COM1_PORT, SerialConsole
from .devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit
from .devices.fw_cfg import FW_CFG_PORT, FW_CFG_PORT_SIZE, FwCfg
from .dispatch import Dispatcher
from .errors import AiokvmError, ConfigError, GuestError, HandoffCancelled, MachineTimeout
from .handoff import C_MECHANISMS, DEFAULT_HANDOFF, HANDOFFS, EventHandoff, LockHandoff, SlotServer
from .kernel_paths import IoEvent, IrqFd
from .memory import parse_size, validate_memory_size
from .metrics import machine_stats

log = structlog.get_logger("aiokvm.machine")

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
    """One virtual machine on KVM.  An async context manager.

    Configuration (memory, vCPUs, handoff) is checked here, before anything
    is opened; ``open()`` (or ``async with``) creates the board and the
    default devices: COM1 (``serial0``, inline) and isa-debug-exit at 0xf4;
    ``load()`` adds fw_cfg at 0x510 (as QEMU microvm has it) unless a device
    of the application's already claims those ports.  ``cpu``: a CPU model as
    QEMU's ``-cpu`` (``cpu/models.py``; default: all that KVM supports, as it
    reports it).  ``pit=False``: no in-kernel PIT (QEMU's ``pit=off``).
    """

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
        accel: str = "kvm",
        cpu: str | None = None,
        pit: bool = True,
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
        if handoff in C_MECHANISMS and vcpus > SlotServer.MAX_VCPUS:
            raise ConfigError(f"the {handoff} handoff serves at most {SlotServer.MAX_VCPUS} vCPUs; "
                              "use fewer vCPUs or --handoff event")
        if accel not in ACCELERATORS:
            raise ConfigError(f"unknown accelerator {accel!r}; choose one of {', '.join(ACCELERATORS)}")
        self.accel = resolve_accel(accel)
        if cpu is not None:
            from .cpu.models import parse_cpu

            if self.accel == "unicorn":  # as resolved: accel="auto" may have chosen it
                raise ConfigError("accel=unicorn has its own CPU model; --cpu is for KVM")
            self.cpu = parse_cpu(cpu)
        else:
            self.cpu = None
        self.pit = pit
        self.memory_size = validate_memory_size(parse_size(memory))
        self.vcpu_count = vcpus
        self.handoff_name = handoff
        self.name = name or f"vm{next(_machine_ids)}"
        self._spin_us = spin_us
        self._poll_window_us = poll_window_us
        self._sample_every = sample_every
        self._serial_output = serial_output
        self._serial_input = serial_input
        self._log = log.bind(vm=self.name)
        # Everything the machine will own, so that teardown never guesses.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self.board: MicrovmBoard | None = None
        self.bus: Bus | None = None
        self.dispatcher: Dispatcher | None = None
        self.devices: DeviceManager | None = None
        self.python_handoff: EventHandoff | None = None
        self.console: SerialConsole | None = None
        self.debug_exit: DebugExit | None = None
        self.fw_cfg: FwCfg | None = None
        self.cmdline = ""
        self.boot_protocol: str | None = None  # "pvh" or "multiboot" once loaded
        self._opened = False
        self._closed = False
        self._closing = False
        self._closed_event = asyncio.Event()
        self._run_done = asyncio.Event()  # run() has finished its teardown (set while not running)
        self._run_done.set()
        self._loaded: Path | None = None
        self._running = False
        self._stopping = True  # nothing runs, so nothing to stop; run() clears it
        self._outcome: asyncio.Future | None = None
        self._threads: list[VcpuThread] = []
        self._slot_server: SlotServer | None = None
        self._stop_lock = threading.Lock()
        self._paused = False
        self._park_waiters: list[asyncio.Future] = []  # pause() calls waiting for vCPUs to park

    # -- lifecycle ----------------------------------------------------------------
    async def __aenter__(self) -> Machine:
        self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def open(self) -> None:
        """Create the board (KVM VM, RAM, vCPUs) and the default devices."""
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
        self._log.info("machine created", memory=self.memory_size, vcpus=self.vcpu_count, handoff=self.handoff_name,
                       accel=self.accel)

    def _open(self) -> None:
        if self.accel == "unicorn":
            from .cpu.emulated import EmulatedBoard

            self.board = EmulatedBoard(self.memory_size, self.vcpu_count)
        else:
            self.board = MicrovmBoard(self.memory_size, self.vcpu_count, self.cpu, pit=self.pit)
            if self.board.dropped_features:
                self._log.warning("host does not support requested CPU features; dropped",
                                  features=self.board.dropped_features)
        self.bus = Bus()
        self.bus.set_guard(self._check_bus_may_change)
        python_handoff = {"event": EventHandoff, "lock": LockHandoff}.get(self.handoff_name)
        self.python_handoff = python_handoff(self._loop, self.vcpu_count) if python_handoff else None
        self.dispatcher = Dispatcher(self.bus, self.python_handoff)
        self.bus.on_change(self._refresh_tables)
        self.devices = DeviceManager(self.board, self.bus, self.dispatcher, self._loop,
                                     on_error=self._on_loop_error, logger=log.bind(vm=self.name))
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
        """Stop the guest if it runs, close every device (each waits for its
        own work in flight and closes its backend), then free every fd,
        thread and mapping."""
        if self._closing:
            await self._closed_event.wait()  # another aclose() is at work: wait for it
            return
        self._closing = True
        try:
            if self._running:
                self.stop()  # run() returns ExitStatus(reason="stopped") and tears down
                try:
                    await asyncio.wait_for(self._run_done.wait(), 10)
                except TimeoutError:
                    pass  # run() was abandoned mid-teardown: finish it here
            if self._threads:
                self._request_stop()
                await self._join_vcpus()
            self._stop_serving()
            if self.devices is not None:
                await self.devices.aclose()
        finally:
            self._release()
            self._closed_event.set()
            self._log.info("machine closed")

    def _stop_serving(self) -> None:
        """After the vCPUs ended: close the loop side of the handoff and the
        kernel paths' timers, and deliver what they still hold (once per run)."""
        if self._run_done.is_set():
            return
        if self._slot_server is not None:
            self._slot_server.close()
        if self.devices is not None:
            self.devices.stop()
        self._running = False
        self._run_done.set()

    def _release(self) -> None:
        self._stop_serving()  # a run() abandoned mid-teardown leaves nothing ticking over freed memory
        self._closed = True
        if self.console is not None:
            self.console.close()
        if self.devices is not None:
            self.devices.close_kernel_paths()
        if self.board is not None:
            self.board.close()

    def _require_open(self) -> None:
        if self._closed:
            raise ConfigError(f"machine {self.name} is closed")
        if not self._opened:
            raise ConfigError("open the machine first: `async with Machine(...) as vm:`")

    def _check_bus_may_change(self, what: str) -> None:
        # The bus guard: the C tables change only while no vCPU can read them:
        # every live vCPU parked, and the machine still paused (after resume()
        # a vCPU's parked flag stays set until it wakes, so it is not enough).
        alive = [t for t in self._threads if t.thread.is_alive()]
        if alive and not (self._paused and all(t.parked.is_set() for t in alive)):
            raise ConfigError(f"cannot {what} while vCPUs of {self.name} run: pause() the machine first, "
                              "or attach devices before run()")

    @property
    def memory(self):
        """Guest RAM (``GuestMemory``)."""
        return self.board.memory if self.board is not None else None

    @property
    def vm(self):
        """The KVM VM fd (``VmFd``)."""
        return self.board.vm if self.board is not None else None

    @property
    def vcpus(self) -> list:
        return self.board.vcpus if self.board is not None else []

    # -- devices ------------------------------------------------------------------------
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
        exit, after the queued writes are delivered.  A device with
        ``metrics()`` shows up in ``stats()["devices"]``; one with
        ``aclose()`` is closed with the machine.
        """
        self._require_open()
        return self.devices.attach(device, pio=pio, mmio=mmio, mode=mode, name=name, ioeventfds=ioeventfds,
                                   coalesced=coalesced)

    def add_virtio(self, device, *, ioeventfd: bool = True, name: str | None = None):
        """Attach a ``VirtioDevice`` on the next virtio-mmio slot, as QEMU microvm does.

        Slots fill from the top (7 down to 0): transport ``i`` at
        ``0xfeb00000 + 512*i`` with IRQ ``5 + i``; ``load()`` then appends
        ``virtio_mmio.device=512@0x...:IRQ`` to the command line.  QueueNotify
        goes through an ioeventfd unless ``ioeventfd=False`` (a plain exit,
        for measurement); interrupts go through an irqfd.  Returns the transport.
        """
        self._require_open()
        return self.devices.attach_virtio(device, ioeventfd=ioeventfd, name=name)

    def _require_kvm(self, what: str) -> None:
        if self.accel != "kvm":
            raise ConfigError(f"accel={self.accel} has no {what}: use accel=kvm")

    async def add_disk(self, disk, *, interface: str | None = None, read_only: bool | None = None,
                       ioeventfd: bool = True):
        """Attach a disk: a ``BlockBackend``, or a CLI-style spec
        ``PATH[,ro][,format=raw|nbd][,if=virtio|ata]`` (NBD: a URL).

        Returns the device (``VirtioBlk`` or ``AtaDisk``), which owns the
        backend: the machine closes it when it closes.
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
            return self._attach_disk(backend, interface, ioeventfd)
        except BaseException:
            await backend.close()
            raise

    def _attach_disk(self, backend, interface: str, ioeventfd: bool):
        if interface == "virtio":
            from .devices.virtio.blk import VirtioBlk

            device = VirtioBlk(backend)
            self.add_virtio(device, ioeventfd=ioeventfd)
            return device
        if interface == "ata":
            from .devices.ata import ATA_BASE, ATA_CTRL, ATA_IRQ, AtaDisk

            if self.devices.get("ata0") is not None:
                raise ConfigError("only one ATA disk (the primary master) is supported; make the others if=virtio")
            device = AtaDisk(backend, irq=lambda level: self.irq_line(ATA_IRQ, level))
            region = self.add_device(device, pio=(ATA_BASE, 8), name="ata0")
            try:
                self.devices.attach(device.control_port(), pio=(ATA_CTRL, 1), name="ata0-ctrl", owner=device)
            except BaseException:
                self.devices.detach(region)  # add_disk closes the backend: the machine must not again
                raise
            return device
        raise ConfigError(f"unknown disk interface {interface!r}: use virtio or ata")

    def add_nic(self, switch, mac: str, *, port: str | None = None, vlan: int | None = None,
                ioeventfd: bool = True, **options):
        """Attach a virtio-net NIC (``mac``) as port ``port`` (default: the
        machine's name) of ``switch``; ``vlan=V``: an untagged member of VLAN V.
        ``options`` go to ``VirtioNet`` (mtu, mac_filter, rx hold bounds).
        Returns the device; its port goes away when the machine closes."""
        from .devices.virtio.net import VirtioNet

        switch.check_port_name(port or self.name)
        device = VirtioNet(mac, **options)
        self.add_virtio(device, ioeventfd=ioeventfd, name=f"net-{port or self.name}")
        switch.add_nic(device, port=port or self.name, vlan=vlan)
        return device

    def _attach_fw_cfg(self) -> None:
        """QEMU microvm always has fw_cfg (kvm-unit-tests read the vCPU count
        there), so every loaded machine gets it -- unless the application put
        a device of its own on those ports first: its device wins."""
        if self.fw_cfg is not None or any(self.bus.find_pio(port, 1) for port in (FW_CFG_PORT, FW_CFG_PORT + 1)):
            return
        self.fw_cfg = FwCfg(cpus=self.vcpu_count, ram_size=self.memory_size)
        self.add_device(self.fw_cfg, pio=(FW_CFG_PORT, FW_CFG_PORT_SIZE), mode=HandlerMode.INLINE, name="fw_cfg")

    def add_pc_testdev(self):
        """Attach QEMU's pc-testdev (``devices/pc_testdev.py``), as kvm-unit-tests'
        runner does: scratch ports at 0xe0, the page-flush port 0xe4, IRQ
        lines at 0x2000+n and 64 KiB of MMIO scratch at 0xff000000.  Inline:
        every access is a short register operation.  Returns the device."""
        from .devices.pc_testdev import (
            IOMEM_BASE,
            IOMEM_SIZE,
            IRQ_LINES,
            IRQ_PORT,
            PORTS_SIZE,
            SCRATCH_PORT,
            PcTestdev,
        )

        self._require_open()
        if self.devices.get("pc-testdev") is not None:
            raise ConfigError("this machine already has a pc-testdev")
        device = PcTestdev(irq_line=self.irq_line, flush_page=self.memory.invalidate_page)
        region = self.add_device(device, pio=(SCRATCH_PORT, PORTS_SIZE), mode=HandlerMode.INLINE, name="pc-testdev")
        attached = [region]
        try:
            for window, name, where in ((device.irq_port(), "pc-testdev-irq", {"pio": (IRQ_PORT, IRQ_LINES)}),
                                        (device.iomem(), "pc-testdev-iomem", {"mmio": (IOMEM_BASE, IOMEM_SIZE)})):
                attached.append(self.devices.attach(window, mode=HandlerMode.INLINE, name=name, owner=device,
                                                    **where))
        except BaseException:
            for done in reversed(attached):
                self.devices.detach(done)
            raise
        return device

    def irqfd(self, gsi: int, *, resample: bool = False, on_resample=None) -> IrqFd:
        """An interrupt line the loop raises by writing an eventfd (no vCPU kick).

        ``resample=True`` makes it level-triggered: ``on_resample()`` runs on
        the loop after the guest acknowledged it.
        """
        self._require_open()
        self._require_kvm("irqfd interrupt lines (there is no interrupt controller)")
        return self.devices.irqfd(gsi, resample=resample, on_resample=on_resample)

    def irq_line(self, irq: int, level: bool) -> None:
        """Drive an in-kernel irqchip input (thread-safe)."""
        if not self._closed and self.board is not None:
            self.board.irq_line(irq, level)

    def load(self, guest: str | Path, cmdline: str = "", *, modules=()) -> None:
        """Load a guest (a path or a bundled guest name) and set up vCPU 0.

        The file's header picks the protocol (``loader.py``): Multiboot v1
        (kvm-unit-tests' ``.flat`` files) or a PVH ELF.  ``modules``: files
        handed to the guest beside it, each ``FILE`` or ``FILE ARGS`` (QEMU's
        ``-initrd``); Multiboot modules, or PVH's module list.
        """
        self._require_open()
        if self._running:
            raise ConfigError("cannot load a guest into a running machine")
        if isinstance(modules, str | Path):
            modules = [modules]
        path = guests.resolve(guest)
        image = loader.read_guest(path)
        boot_modules = [boot.read_module(m) for m in modules]
        if loader.protocol_of(image) == "pvh":
            if self.vcpu_count > 1 and "cpus=" not in cmdline.split("#")[0]:
                # Boot convention of the guest kit: the vCPU count on the cmdline.
                cmdline = f"{cmdline} cpus={self.vcpu_count}".strip()
            # What QEMU's auto-kernel-cmdline adds for each virtio-mmio device.
            cmdline = " ".join([cmdline, *self.board.virtio_slots.cmdline_entries()]).strip()
        self._attach_fw_cfg()
        entry = loader.load_guest(image, self.memory, cmdline, boot_modules)
        self.board.boot_entry(entry.entry32, entry.ebx, entry.eax)  # the board knows how its vCPU starts
        self.devices.freeze_virtio("load()")
        self.cmdline = entry.cmdline
        self.boot_protocol = entry.protocol
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
        if self._closing:
            raise ConfigError(f"machine {self.name} is closing")
        if self.accel == "kvm":
            ensure_kick_handler()  # before anything starts: refuses if the application owns the signal
        self._running = True
        self._run_done.clear()
        self._outcome = self._loop.create_future()
        self._stopping = False
        context = {"vm": self.name}
        if self.accel == "unicorn":
            from .cpu.emulated import EmulatedVcpuThread

            self._threads = [EmulatedVcpuThread(vcpu, bus=self.bus, memory=self.memory, loop=self._loop,
                                                devices=self.devices, on_exit=self._on_exit,
                                                on_stop=self._on_vcpu_stop, on_park=self._vcpu_parked)
                             for vcpu in self.vcpus]
        else:
            self._threads = [
                VcpuThread(vcpu, self.dispatcher, on_exit=self._on_exit, on_stop=self._on_vcpu_stop,
                           context=context, sample_every=self._sample_every, spin_us=self._spin_us,
                           on_park=self._vcpu_parked)
                for vcpu in self.vcpus
            ]
        try:
            if self.handoff_name in C_MECHANISMS and self.accel == "kvm":
                self._slot_server = SlotServer(
                    self._loop, self.handoff_name, [t.ctx for t in self._threads], self.dispatcher,
                    on_error=self._on_loop_error, poll_window_us=self._poll_window_us,
                )
                self._slot_server.start()
            self.devices.start()
            self._log.info("machine started", guest=self._loaded.name)
            for thread in self._threads:
                thread.start()
            try:
                outcome = await asyncio.wait_for(asyncio.shield(self._outcome), timeout)
            except TimeoutError:
                self._log.info("machine timed out", timeout=timeout)
                raise MachineTimeout(
                    f"guest {self._loaded.name} did not finish within {timeout:g}s"
                ) from None
        finally:
            self._request_stop()
            try:
                await self._join_vcpus()
            finally:
                self._stop_serving()
        if isinstance(outcome, BaseException):
            self._log.info("machine stopped on an error", error=str(outcome), error_type=type(outcome).__name__)
            raise outcome
        self._log.info("machine stopped", reason=outcome.reason, code=outcome.code)
        return outcome

    def stop(self) -> None:
        """Stop a running machine; ``run()`` then returns ``ExitStatus(reason="stopped")``.

        Safe to call from any thread.
        """
        self._finish(ExitStatus(None, "stopped"))

    def _finish(self, outcome: ExitStatus | BaseException) -> None:
        """Record how the run ended (first one wins) and stop the vCPUs.  Any thread."""
        with self._stop_lock:
            if self._stopping:
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
            waiter = self._loop.create_future()
            self._park_waiters.append(waiter)
            try:
                if all(t.parked.is_set() or not t.thread.is_alive() for t in self._threads):
                    break
                remaining = deadline - self._loop.time()
                if remaining <= 0:
                    # Do not leave a half-paused machine behind the error.
                    self.resume()
                    raise MachineTimeout(f"vCPUs of {self.name} did not park within {timeout:g}s "
                                         "(a vCPU held by a device write parks only once it completes); "
                                         "the machine runs on")
                await asyncio.wait([waiter], timeout=remaining)
            finally:
                self._park_waiters.remove(waiter)
        self._log.info("machine paused")

    def _vcpu_parked(self, index: int) -> None:
        """A vCPU parked or ended (its thread): wake a waiting ``pause()``."""
        try:
            self._loop.call_soon_threadsafe(self._wake_pauser)
        except RuntimeError:  # pragma: no cover - loop already closed
            pass

    def _wake_pauser(self) -> None:
        for waiter in self._park_waiters:
            if not waiter.done():
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

    def stats(self) -> dict:
        """Counters, latency percentiles, mode split, device counters and KVM's own counters, as plain data.

        The schema is documented in docs/stats-schema.md (``metrics.STATS_SCHEMA``).
        """
        return machine_stats(
            name=self.name, handoff=self.handoff_name, threads=self._threads, bus=self.bus,
            devices=self.devices, slot_server=self._slot_server,
            kvm=(lambda i: {}) if self._closed or self.board is None else self.board.kvm_counters,
            accel=self.accel,
        )
