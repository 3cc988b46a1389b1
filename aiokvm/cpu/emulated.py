"""The software CPU backend: Unicorn (QEMU's TCG as a library), for hosts
without a usable ``/dev/kvm``.

It runs the same PVH ELFs from the same 32-bit entry: Unicorn starts in
32-bit protected mode (``UC_MODE_32``) with the ``qemu64`` CPU model, so the
guest's own switch to long mode works as under KVM.  Guest RAM is the
machine's own mmap (``mem_map_ptr``), so devices see the guest's writes as
they do under KVM.

Every port access (an ``in``/``out`` hook; ``rep ins/outs`` call it per
element) and every access to the MMIO hole (``mmio_map`` over 3-4 GiB, less
RAM) goes to the machine's bus: inline devices are called in the emulation
thread, loop-hosted ones on the event loop (the thread waits, as a KVM vCPU
waits in a Python-level handoff).  Unclaimed reads float high, as under KVM.

The thread runs the guest in slices of ``SLICE`` instructions and looks at
stop and pause requests between them, so ``stop()``, ``pause()`` and
timeouts work; a device can also stop a slice (``emu_stop``).  Exits map to
the KVM backend's: HLT is ``Halt``; an instruction Unicorn cannot run (it
raises ``UC_ERR_INSN_INVALID``, including ``ud2``) and a CPU exception
(``UC_ERR_EXCEPTION``: Unicorn does not deliver exceptions through the
guest's IDT) end the run with a ``GuestError`` naming the address, where
KVM would deliver them to the guest (and report a triple fault when the
guest has no handler).

Where KVM would signal an ioeventfd (virtio's QueueNotify), the thread
posts the device's notify to the loop and runs on: no wait, as with KVM.
Where KVM would raise an irqfd, there is no interrupt controller to go to:
the interrupt is counted (``interrupts_without_controller``) and the guest
kit's polled drivers do not need it.  A guest that halts to wait for an
interrupt ends with ``Halt``; reads of the local APIC's ID and version are
answered so one-CPU guests find themselves.  One vCPU only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable

import structlog

from ..bus import HandlerMode, Space
from ..errors import ConfigError, DeviceError, GuestError
from ..kvm import ffi, lib
from ..memory import GuestMemory
from .control import ThreadControl
from .exits import Halt

log = structlog.get_logger("aiokvm.cpu")

SLICE = 200_000  # instructions per emu_start: the longest a stop or pause waits
MMIO_HOLE = (0xC000_0000, 0x1_0000_0000)
LAPIC_BASE = 0xFEE0_0000
HANDLER_HIST = 1  # metrics.LATENCIES: exit_to_handler, handler, handler_to_entry (the last two have no
                  # meaning without a mode switch: only "handler" is recorded)
MASKS = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}


def unicorn_available() -> str | None:
    """None if Unicorn can be used here, else why not (one line)."""
    try:
        import unicorn  # noqa: F401
    except ImportError:
        return "the unicorn package is not installed (pip install 'unicorn>=2.0')"
    return None


class EmulatedVcpu:
    """What the board gives a vCPU under Unicorn: its index and its entry state."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.entry: int | None = None
        self.start_info = 0
        self.eax = 0

    def set_pvh_entry(self, entry32: int, start_info: int, eax: int = 0) -> None:
        self.entry, self.start_info, self.eax = entry32, start_info, eax

    def close(self) -> None:
        pass


class EmulatedBoard:
    """The microvm board without KVM: RAM, one vCPU, the virtio slot table (empty: refused)."""

    accel = "unicorn"

    def __init__(self, memory_size: int, vcpus: int) -> None:
        from ..board import VirtioSlots

        why = unicorn_available()
        if why is not None:
            raise ConfigError(f"accel=unicorn: {why}")
        if vcpus != 1:
            raise ConfigError(f"accel=unicorn runs one vCPU (asked for {vcpus}): the emulated CPU has no "
                              "local APIC to start others; use KVM for SMP guests")
        self.vm = None
        self.memory = GuestMemory(memory_size)
        self.vcpus = [EmulatedVcpu(0)]
        self.virtio_slots = VirtioSlots()

    def boot_entry(self, entry32: int, start_info: int, eax: int = 0) -> None:
        self.vcpus[0].set_pvh_entry(entry32, start_info, eax)

    def irq_line(self, irq: int, level: bool) -> None:
        pass  # no interrupt controller: device interrupts have nowhere to go

    def kvm_counters(self, index: int) -> dict:
        return {}

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()


class EmulatedVcpuThread(ThreadControl):
    """Runs one emulated vCPU; the same face as ``VcpuThread`` to ``Machine`` and ``metrics``."""

    accel = "unicorn"

    def __init__(self, vcpu: EmulatedVcpu, *, bus, memory: GuestMemory, loop: asyncio.AbstractEventLoop,
                 devices, on_exit: Callable, on_stop: Callable, on_park: Callable | None = None) -> None:
        from ..metrics import LatencyHistograms, VcpuMetrics

        self.vcpu = vcpu
        self.index = vcpu.index
        self.bus = bus
        self.memory = memory
        self.loop = loop
        self.devices = devices
        self.metrics = VcpuMetrics(vcpu.index)
        self.ctx = ffi.new("struct aiokvm_vcpu *")  # the KVM backend's counters, kept here by hand
        self.pio_counts = ffi.new("uint64_t[]", 0x20000)
        self.latency = LatencyHistograms(self.ctx)
        self._on_exit, self._on_stop = on_exit, on_stop
        self._init_control(on_park)
        self._uc = None
        self._error: BaseException | None = None
        self.native_id = None
        self.started_ns = self.ended_ns = None
        self.times_start = self.times_end = None
        self._stopped_by_device = False  # a device ended the last slice early (not a HLT)
        self.thread = threading.Thread(target=self._main, name=f"aiokvm-emu{self.index}", daemon=True)

    # -- control (any thread) ------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def kick(self) -> None:
        uc = self._uc
        if uc is not None:
            try:
                uc.emu_stop()
            except Exception:  # pragma: no cover - not started or already stopped
                pass

    # -- the thread -----------------------------------------------------------------------------
    def _main(self) -> None:
        self.native_id = threading.get_native_id()
        self.started_ns = time.monotonic_ns()
        error: BaseException | None = None
        try:
            self._run()
        except BaseException as exc:  # reported to the machine, which ends the run
            error = exc
        finally:
            self.ended_ns = time.monotonic_ns()
            self._on_stop(self.index, error)

    def _setup(self):
        from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_32, UC_PROT_ALL, Uc
        from unicorn.x86_const import (
            UC_CPU_X86_QEMU64,
            UC_X86_INS_IN,
            UC_X86_INS_OUT,
            UC_X86_REG_EAX,
            UC_X86_REG_EBX,
        )

        uc = Uc(UC_ARCH_X86, UC_MODE_32)
        uc.ctl_set_cpu_model(UC_CPU_X86_QEMU64)  # long mode, which the guest switches to itself
        ram = []
        for region in self.memory.regions:
            uc.mem_map_ptr(region.start, region.size, UC_PROT_ALL, self.memory.host_address(region))
            ram.append((region.start, region.end))
        lo, hi = MMIO_HOLE
        for start, end in ram:  # the hole, less any RAM in it
            if start < hi and end > lo:
                raise ConfigError("accel=unicorn: RAM reaching into the 3-4 GiB MMIO hole is not supported")
        uc.mmio_map(lo, hi - lo, self._mmio_read, None, self._mmio_write, None)
        uc.hook_add(UC_HOOK_INSN, self._port_in, None, 1, 0, UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._port_out, None, 1, 0, UC_X86_INS_OUT)
        uc.reg_write(UC_X86_REG_EBX, self.vcpu.start_info)
        uc.reg_write(UC_X86_REG_EAX, self.vcpu.eax)
        return uc

    def _run(self) -> None:
        from unicorn import UC_ERR_EXCEPTION, UC_ERR_INSN_INVALID, UcError
        from unicorn.x86_const import UC_X86_REG_EIP

        if self.vcpu.entry is None:
            raise ConfigError("load a guest before run()")
        uc = self._uc = self._setup()
        pc = self.vcpu.entry
        while not self._stop:
            if self._paused:
                self._park()
                continue
            started = time.perf_counter_ns()
            try:
                uc.emu_start(pc, 1 << 62, 0, SLICE)
            except UcError as exc:
                pc = uc.reg_read(UC_X86_REG_EIP)
                if self._error is not None:
                    raise self._error from None
                if exc.errno == UC_ERR_INSN_INVALID:
                    raise GuestError(f"the emulated CPU met an instruction it cannot run at {pc:#x} "
                                     "(accel=unicorn; under KVM the guest would get #UD)", vcpu=self.index) from None
                if exc.errno == UC_ERR_EXCEPTION:
                    raise GuestError(f"the guest raised a CPU exception at {pc:#x}, which accel=unicorn cannot "
                                     "deliver to its IDT (under KVM its handler would run, or the guest would "
                                     "triple-fault without one)", vcpu=self.index) from None
                raise GuestError(f"the emulated CPU stopped at {pc:#x}: {exc}", vcpu=self.index) from None
            finally:
                self.ctx.kvm_run_ns += time.perf_counter_ns() - started  # "guest" time: inside emu_start
            if self._error is not None:
                raise self._error
            pc = uc.reg_read(UC_X86_REG_EIP)
            if self._stop:
                break
            if self.memory.contains(pc - 1) and self.memory.read_u8(pc - 1) == 0xF4 and not self._paused \
                    and not self._stopped_by_device:
                self.ctx.exits += 1
                self.metrics.exits["hlt"] = self.metrics.exits.get("hlt", 0) + 1
                self._on_exit(self.index, Halt())
                return
            self._stopped_by_device = False

    # -- accesses --------------------------------------------------------------------------------
    def _port_in(self, uc, port, size, user_data):
        return self._access(Space.PIO, port, size, None)

    def _port_out(self, uc, port, size, value, user_data):
        self._access(Space.PIO, port, size, value)

    def _mmio_read(self, uc, offset, size, user_data):
        return self._access(Space.MMIO, MMIO_HOLE[0] + offset, size, None)

    def _mmio_write(self, uc, offset, size, value, user_data):
        self._access(Space.MMIO, MMIO_HOLE[0] + offset, size, value)

    def _access(self, space: Space, addr: int, size: int, value: int | None) -> int:
        ctx = self.ctx
        ctx.exits += 1
        if space is Space.PIO:
            ctx.io_exits += 1
            self.pio_counts[(addr << 1) | (value is not None)] += 1
        else:
            ctx.mmio_exits += 1
        region = self.bus.find(space, addr, size)
        if region is None and space is Space.MMIO and LAPIC_BASE <= addr < LAPIC_BASE + 0x1000:
            return self._lapic(addr - LAPIC_BASE, value)
        if region is None:
            if space is Space.PIO:
                if value is None:
                    ctx.unclaimed_pio_reads += 1
                else:
                    ctx.unclaimed_pio_writes += 1
            elif value is None:
                ctx.unclaimed_mmio_reads += 1
            else:
                ctx.unclaimed_mmio_writes += 1
            return MASKS.get(size, 0xFF) if value is None else 0  # unclaimed reads float high
        offset = addr - region.base
        if value is not None and region.id in self.devices.emulated_ioevents:
            for spec, callback in self.devices.emulated_ioevents[region.id]:
                if spec.offset == offset and spec.size == size and spec.datamatch in (None, value):
                    # what an ioeventfd does: signal the loop, and let the guest run on
                    ctx.exits -= 1
                    counts = self.devices.emulated_counts
                    counts[region.name] = counts.get(region.name, 0) + 1
                    self.loop.call_soon_threadsafe(callback, 1)
                    return 0
        ctx.region_hits[region.id] += 1
        started = time.perf_counter_ns()
        try:
            if region.mode is HandlerMode.INLINE:
                result = self._call(region, offset, size, value)
            else:
                ctx.to_loop += 1
                result = self._on_loop(region, offset, size, value)
        except BaseException as exc:
            if self._error is None:
                self._error = exc if isinstance(exc, DeviceError | GuestError) else DeviceError(
                    f"device {region.name} failed on {space.value} {'read' if value is None else 'write'} "
                    f"{addr:#x} size {size}: {type(exc).__name__}: {exc}")
            self._uc.emu_stop()
            return 0
        finally:
            spent = time.perf_counter_ns() - started
            ctx.python_ns += spent
            lib.aiokvm_hist_record(ctx.hist + HANDLER_HIST, spent)  # the "handler" latency histogram
        if self._stop or self._paused:
            self._stopped_by_device = True
            self._uc.emu_stop()  # a device asked the machine to stop (debug-exit): end the slice here
        return result

    def _lapic(self, offset: int, value: int | None) -> int:
        """The few local-APIC registers a one-CPU guest reads (its ID, the version);
        everything else reads 0 and writes are dropped: there is no interrupt
        controller behind them."""
        self.metrics.exits["lapic"] = self.metrics.exits.get("lapic", 0) + 1
        if value is not None:
            return 0
        if offset == 0x20:
            return self.index << 24
        if offset == 0x30:
            return 0x14  # an integrated APIC, as KVM's reports
        return 0

    @staticmethod
    def _call(region, offset: int, size: int, value: int | None):
        device = region.device
        if value is None:
            return device.read(offset, size) & MASKS.get(size, 0xFF)
        held = device.write(offset, size, value)
        if held is not None and not isinstance(held, asyncio.Future):
            raise TypeError(f"write returned {held!r}; return None, or an asyncio.Future to hold the vCPU")
        return held

    def _on_loop(self, region, offset: int, size: int, value: int | None) -> int:
        """A loop-hosted access: run it on the loop and wait (a held write: until it completes)."""
        done: concurrent.futures.Future = concurrent.futures.Future()

        def on_loop() -> None:
            try:
                result = self._call(region, offset, size, value)
            except BaseException as exc:
                done.set_exception(exc)
                return
            if isinstance(result, asyncio.Future):
                def released(held: asyncio.Future) -> None:
                    if held.cancelled():
                        done.set_result(0)
                    elif held.exception() is not None:
                        done.set_exception(held.exception())
                    else:
                        done.set_result(0)
                result.add_done_callback(released)
            else:
                done.set_result(result or 0)

        self.loop.call_soon_threadsafe(on_loop)
        while True:
            try:
                return done.result(timeout=0.05)
            except concurrent.futures.TimeoutError:
                if self._stop:
                    return 0
