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
from .cpu.kvm import VcpuThread, guest_error
from .devices.console import COM1_IRQ, COM1_PORT, SerialConsole
from .devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit
from .dispatch import DEFAULT_HANDOFF, HANDOFFS, Dispatcher, HandoffCancelled
from .errors import AiokvmError, ConfigError, GuestError, MachineTimeout
from .kvm import Kvm
from .memory import GuestMemory
from .metrics import merge_counts

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
        serial_output: Any = None,
        serial_input: Any = None,
        name: str | None = None,
    ) -> None:
        if isinstance(vcpus, bool) or not isinstance(vcpus, int) or vcpus < 1:
            raise ConfigError(f"vcpus must be a positive integer, got {vcpus!r}")
        if handoff not in HANDOFFS:
            raise ConfigError(f"unknown handoff {handoff!r}; choose one of {', '.join(sorted(HANDOFFS))}")
        from .memory import parse_size, validate_memory_size

        self.memory_size = validate_memory_size(parse_size(memory))
        self.vcpu_count = vcpus
        self.handoff_name = handoff
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
        for index in range(self.vcpu_count):
            vcpu = self.vm.create_vcpu(index)
            self.vcpus.append(vcpu)
            vcpu.set_cpuid2(_cpuid_for(supported, index, self.vcpu_count))
        self.bus = Bus()
        self.handoff = HANDOFFS[self.handoff_name](self._loop, self.vcpu_count)
        self.dispatcher = Dispatcher(self.bus, self.handoff)
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
        self._release()

    def _release(self) -> None:
        self._closed = True
        console = getattr(self, "console", None)
        if console is not None:
            console.close()
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
    ) -> Region:
        """Claim a PIO or MMIO range ``(base, length)`` for ``device``."""
        self._require_open()
        if (pio is None) == (mmio is None):
            raise ConfigError("give exactly one of pio=(base, length) or mmio=(base, length)")
        space, (base, length) = (Space.PIO, pio) if pio is not None else (Space.MMIO, mmio)
        return self.bus.register(space, base, length, device, mode=HandlerMode(mode), name=name)

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
        self._running = True
        self._outcome = self._loop.create_future()
        self._stopping = False
        context = {"vm": self.name}
        self._threads = [
            VcpuThread(vcpu, self.dispatcher, on_exit=self._on_exit, on_stop=self._on_vcpu_stop, context=context)
            for vcpu in self.vcpus
        ]
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
        for thread in self._threads:
            thread.request_stop()
        self.handoff.cancel_all()
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
        for thread in self._threads:
            thread.request_stop()
        self.handoff.cancel_all()

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
        """Counters as plain data (JSON-ready)."""
        vcpus = [t.metrics.as_dict() for t in self._threads]
        unclaimed = {
            space.value: {"reads": c.reads, "writes": c.writes}
            for space, c in self.bus.unclaimed.items()
        } if self._opened and not self._closed or hasattr(self, "bus") else {}
        return {
            "schema": "aiokvm.stats/1",
            "vm": self.name,
            "handoff": self.handoff_name,
            "vcpus": vcpus,
            "exits": merge_counts(vcpus, "exits"),
            "pio": merge_counts(vcpus, "pio"),
            "mmio": merge_counts(vcpus, "mmio"),
            "paths": merge_counts(vcpus, "paths"),
            "unclaimed": unclaimed,
        }


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
