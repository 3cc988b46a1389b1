"""How an access reaches its device handler.

The C vCPU loop (``aiokvm/kvm/_vcpu_loop.h``) finishes unclaimed accesses
itself and describes every other one in its ``struct aiokvm_vcpu``
(kind, region id, address, size, count, value).  The ``Dispatcher`` turns
that into a device call:

- ``inline_access(ctx)`` in the vCPU thread, for inline regions (and for
  loop-hosted ones under a Python-level handoff, which it hands off);
- ``serve_slot(ctx)`` on the asyncio loop, for loop-hosted accesses posted
  by the C loop (``spin`` / ``wake`` / ``futex`` handoffs).

A *simple* access (one element of at most 8 bytes) travels as an integer.
String I/O (``rep ins/outs``, ``count > 1``) is decoded from ``kvm_run`` and
dispatched element by element within the one exit (``dispatch_io``).
"""

from __future__ import annotations

from time import perf_counter_ns

import structlog

from .bus import Bus, HandlerMode, Region
from .cpu.exits import Direction, IoExit
from .errors import DeviceError
from .handoff import MASKS
from .kvm import ffi, lib

log = structlog.get_logger("aiokvm.dispatch")


def _mask(size: int) -> int:
    return (1 << (8 * size)) - 1


class Dispatcher:
    """Routes accesses to devices on one machine's bus."""

    def __init__(self, bus: Bus, handoff=None) -> None:
        self.bus = bus
        #: a Python-level handoff (``EventHandoff``/``LockHandoff``) or None
        self.handoff = handoff
        self._regions = bus.regions_by_id
        #: called on the loop before each loop-hosted access (drains the coalesced ring)
        self.pre_serve = None

    # -- the C loop's accesses ----------------------------------------------------------
    def inline_access(self, vcpu: int, ctx) -> int:
        """Handle the access the C loop returned with; returns the read value."""
        region = self._regions[ctx.region]
        if region.mode is HandlerMode.LOOP and self.handoff is not None:
            # Python-level handoff: the C loop cannot time this wait, so do it here.
            start = perf_counter_ns()
            try:
                return self.handoff.call(vcpu, self._perform_on_loop, ctx)
            finally:
                waited = perf_counter_ns() - start
                ctx.wait_ns += waited
                ctx.sleep_wait_ns += waited
        return self.perform(ctx)

    def _perform_on_loop(self, ctx) -> int:
        if self.pre_serve is not None:
            self.pre_serve()
        return self.perform(ctx)

    def serve_slot(self, ctx) -> None:
        """Loop side of the C handoffs: run a claimed access and complete the slot."""
        if self.pre_serve is not None:
            self.pre_serve()
        try:
            value = self.perform(ctx)
        except BaseException:
            lib.aiokvm_cancel(ctx)  # the vCPU gives up; the error stops the machine
            raise
        lib.aiokvm_complete(ctx, value)

    def perform(self, ctx) -> int:
        """Call the device for the access described by ``ctx``."""
        region = self._regions[ctx.region]
        kind = ctx.kind
        if ctx.simple:
            size = ctx.size
            offset = ctx.addr - region.base
            try:
                if kind & 1:  # IO_OUT / MMIO_WRITE
                    region.device.write(offset, size, ctx.value)
                    return 0
                return region.device.read(offset, size) & MASKS[size]
            except DeviceError:
                raise
            except Exception as exc:
                raise _device_failure(region, _describe(kind, ctx.addr, size), exc) from exc
        # String I/O: decode from kvm_run, dispatch per element, write back.
        run = ctx.run
        base = ffi.cast("uint8_t *", run)
        io = run.io
        direction = Direction(io.direction)
        data = b""
        if direction is Direction.OUT:
            data = bytes(ffi.buffer(base + io.data_offset, io.size * io.count))
        result = perform_io(region, IoExit(io.port, io.size, direction, io.count, data))
        if result:
            ffi.memmove(base + io.data_offset, result, len(result))
        return 0


def _describe(kind: int, addr: int, size: int) -> str:
    names = {lib.AIOKVM_IO_IN: "in port", lib.AIOKVM_IO_OUT: "out port",
             lib.AIOKVM_MMIO_READ: "mmio read", lib.AIOKVM_MMIO_WRITE: "mmio write"}
    return f"{names.get(kind, 'access')} {addr:#x} size {size}"


def _device_failure(region: Region, what: str, exc: Exception) -> DeviceError:
    return DeviceError(f"device {region.name} failed on {what}: {type(exc).__name__}: {exc}")


def perform_io(region: Region, exit: IoExit) -> bytes:
    """Perform a port access element by element; returns the bytes read (IN) or b"" (OUT)."""
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
