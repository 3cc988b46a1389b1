"""How an exit reaches its device handler.

``Dispatcher.dispatch_io`` / ``dispatch_mmio`` run in the vCPU thread.  They
find the region on the bus, then either call the device there (inline) or
hand the access to the asyncio loop and wait for it (loop-hosted).  String
I/O (``count > 1``) is dispatched element by element within the one exit,
and a loop-hosted string access costs one handoff, not one per element.

The handoff is a pluggable ``Handoff``: the vCPU thread calls
``handoff.call(fn, arg)`` and gets ``fn(arg)``'s result after it ran on the
loop.  ``EventHandoff`` is the simple, correct baseline
(``call_soon_threadsafe`` plus a per-vCPU ``threading.Event``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from .bus import Bus, HandlerMode, Region, Space
from .cpu.exits import Direction, IoExit, MmioExit
from .errors import DeviceError
from .metrics import VcpuMetrics

log = structlog.get_logger("aiokvm.dispatch")

_DIR_NAME = {Direction.IN: "in", Direction.OUT: "out"}


class HandoffCancelled(Exception):
    """The machine is stopping; a pending loop-hosted access was abandoned."""


class Handoff(Protocol):
    """Runs ``fn(arg)`` on the loop on behalf of a vCPU thread, and waits."""

    name: str

    def call(self, vcpu: int, fn: Callable[[Any], Any], arg: Any) -> Any: ...

    def cancel_all(self) -> None: ...


class _Slot:
    __slots__ = ("event", "result", "error", "cancelled")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.cancelled = False


class EventHandoff:
    """``call_soon_threadsafe`` + ``threading.Event``: correct, two wakeups per exit."""

    name = "event"

    def __init__(self, loop: asyncio.AbstractEventLoop, vcpus: int) -> None:
        self._loop = loop
        self._slots = [_Slot() for _ in range(vcpus)]
        self._stopping = False

    def call(self, vcpu: int, fn: Callable[[Any], Any], arg: Any) -> Any:
        slot = self._slots[vcpu]
        if self._stopping:
            raise HandoffCancelled
        slot.event.clear()
        slot.error = None
        try:
            self._loop.call_soon_threadsafe(self._run, slot, fn, arg)
        except RuntimeError:  # loop closed under us
            raise HandoffCancelled from None
        slot.event.wait()
        if self._stopping and not slot.event.is_set():  # pragma: no cover - defensive
            raise HandoffCancelled
        if slot.cancelled:
            raise HandoffCancelled
        if slot.error is not None:
            raise slot.error
        return slot.result

    @staticmethod
    def _run(slot: _Slot, fn: Callable[[Any], Any], arg: Any) -> None:
        try:
            slot.result = fn(arg)
        except BaseException as exc:  # carried back to the vCPU thread
            slot.error = exc
        slot.event.set()

    def cancel_all(self) -> None:
        self._stopping = True
        for slot in self._slots:
            slot.cancelled = True
            slot.event.set()


HANDOFFS: dict[str, type] = {"event": EventHandoff}
DEFAULT_HANDOFF = "event"


def _mask(size: int) -> int:
    return (1 << (8 * size)) - 1


class Dispatcher:
    """Routes I/O exits to devices on one machine's bus."""

    def __init__(self, bus: Bus, handoff: Handoff) -> None:
        self.bus = bus
        self.handoff = handoff

    # -- port I/O -----------------------------------------------------------------
    def dispatch_io(self, vcpu: int, metrics: VcpuMetrics, exit: IoExit) -> bytes:
        """Perform a port access; returns the bytes read (IN) or b"" (OUT)."""
        key = (exit.port, _DIR_NAME[exit.direction])
        metrics.pio[key] += 1
        metrics.pio_elements[key] += exit.count
        region = self.bus.find_pio(exit.port, exit.size)
        if region is None:
            is_write = exit.direction is Direction.OUT
            for _ in range(exit.count):
                self.bus.note_unclaimed(Space.PIO, exit.port, is_write)
            return b"" if is_write else b"\xff" * (exit.size * exit.count)
        metrics.paths[(region.name, region.mode.value)] += 1
        if region.mode is HandlerMode.INLINE:
            return _perform_io((region, exit))
        return self.handoff.call(vcpu, _perform_io, (region, exit))

    # -- MMIO -----------------------------------------------------------------------
    def dispatch_mmio(self, vcpu: int, metrics: VcpuMetrics, exit: MmioExit) -> bytes:
        region = self.bus.find_mmio(exit.addr, exit.size)
        direction = "write" if exit.is_write else "read"
        if region is None:
            metrics.mmio[("unclaimed", direction)] += 1
            self.bus.note_unclaimed(Space.MMIO, exit.addr, exit.is_write)
            return b"" if exit.is_write else b"\xff" * exit.size
        metrics.mmio[(region.name, direction)] += 1
        metrics.paths[(region.name, region.mode.value)] += 1
        if region.mode is HandlerMode.INLINE:
            return _perform_mmio((region, exit))
        return self.handoff.call(vcpu, _perform_mmio, (region, exit))


def _device_failure(region: Region, what: str, exc: Exception) -> DeviceError:
    return DeviceError(f"device {region.name} failed on {what}: {type(exc).__name__}: {exc}")


def _perform_io(job: tuple[Region, IoExit]) -> bytes:
    region, exit = job
    device, size, offset = region.device, exit.size, exit.port - region.base
    try:
        if exit.direction is Direction.OUT:
            data = exit.data
            if exit.count == 1:
                device.write(offset, size, int.from_bytes(data, "little"))
            else:
                for i in range(0, size * exit.count, size):
                    device.write(offset, size, int.from_bytes(data[i:i + size], "little"))
            return b""
        mask = _mask(size)
        if exit.count == 1:
            return (device.read(offset, size) & mask).to_bytes(size, "little")
        return b"".join((device.read(offset, size) & mask).to_bytes(size, "little") for _ in range(exit.count))
    except DeviceError:
        raise
    except Exception as exc:
        what = f"{'out' if exit.direction is Direction.OUT else 'in'} port {exit.port:#x} size {size}"
        raise _device_failure(region, what, exc) from exc


def _perform_mmio(job: tuple[Region, MmioExit]) -> bytes:
    region, exit = job
    offset, size = exit.addr - region.base, exit.size
    try:
        if exit.is_write:
            region.device.write(offset, size, int.from_bytes(exit.data, "little"))
            return b""
        return (region.device.read(offset, size) & _mask(size)).to_bytes(size, "little")
    except DeviceError:
        raise
    except Exception as exc:
        what = f"mmio {'write' if exit.is_write else 'read'} {exit.addr:#x} size {size}"
        raise _device_failure(region, what, exc) from exc
