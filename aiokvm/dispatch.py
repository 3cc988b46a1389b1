"""How an access reaches its device handler.

The C vCPU loop (``aiokvm/kvm/_vcpu_loop.h``) finishes unclaimed accesses
itself and packs every other one into a word (op, size, region id, offset;
``ctx.packed``, and the return value of ``aiokvm_vcpu_run``).  The
``Dispatcher`` keeps one closure per region that turns it into a device
call:

- ``vcpu_handlers[id](packed, ctx)`` in the vCPU thread, for inline regions
  (and loop-hosted ones under a Python-level handoff, which it hands off);
- ``loop_handlers[id](packed, ctx)`` on the asyncio loop, for loop-hosted
  accesses posted by the C loop (``SlotServer`` in handoff.py).

The vCPU thread's hottest cases, a one-element write or read, skip even
that closure: ``vcpu_tables(ctx)`` gives it per-region ``write(offset,
size, value)`` and ``read(offset, size)`` callables, which for an inline
region are the device's own bound methods (one Python call per exit), and
``failure()`` names the device when one raises.

A one-element access (at most 8 bytes) travels as integers.  String I/O
(``rep ins/outs``, ``count > 1``) is decoded from ``kvm_run`` and dispatched
element by element within the one exit (``perform_io``).
"""

from __future__ import annotations

import asyncio
from time import perf_counter_ns

import structlog

from .access import MASKS, OP_READ, OP_WRITE, unpack
from .bus import Bus, HandlerMode, Region
from .cpu.exits import Direction, IoExit
from .cpu.vcpu_thread import decode_exit
from .errors import DeviceError
from .kvm import ffi, lib

log = structlog.get_logger("aiokvm.dispatch")


class Dispatcher:
    """Routes accesses to devices on one machine's bus.

    For speed, each region gets a small closure (``handlers[region.id]``)
    that calls its device directly, and the one-element cases get the
    device's bound ``write``/``read`` themselves (``vcpu_tables``,
    ``loop_writes``/``loop_reads``).  Every list is rebuilt in place whenever
    the bus changes, so the vCPU threads and the loop can keep a reference.
    """

    def __init__(self, bus: Bus, handoff=None) -> None:
        self.bus = bus
        #: a Python-level handoff (``EventHandoff``/``LockHandoff``) or None
        self.handoff = handoff
        #: called on the loop before each loop-hosted access (drains the coalesced ring)
        self.pre_serve = None
        #: per region id: what the vCPU thread calls after the C loop returned
        self.vcpu_handlers: list = []
        #: per region id: what the loop calls for a posted access
        self.loop_handlers: list = []
        #: per region id: the device's write(offset, size, value) / read(offset, size), for the loop
        self.loop_writes: list = []
        self.loop_reads: list = []
        #: (ctx, writes, reads) of every vCPU thread, refilled on bus changes
        self._vcpu_tables: list[tuple] = []
        bus.on_change(self._rebuild)
        self._rebuild()

    def vcpu_tables(self, ctx) -> tuple[list, list]:
        """Per region id, ``write(offset, size, value)`` and ``read(offset, size)`` for vCPU ``ctx``.

        The lists are updated in place when the bus changes.
        """
        writes: list = []
        reads: list = []
        self._vcpu_tables.append((ctx, writes, reads))
        self._fill_vcpu_tables(ctx, writes, reads)
        return writes, reads

    def _fill_vcpu_tables(self, ctx, writes: list, reads: list) -> None:
        w, r = [], []
        for region, handler in zip(self.bus.regions_by_id, self.vcpu_handlers, strict=True):
            if region is None:
                w.append(_ignore_write)
                r.append(_float_high)
            elif handler is self._direct[region.id]:
                w.append(region.device.write)
                r.append(region.device.read)
            else:  # handed off to the loop: the packed access is in ctx
                w.append(_packed_write(handler, ctx))
                r.append(_packed_read(handler, ctx))
        writes[:] = w
        reads[:] = r

    def failure(self, packed: int, ctx, exc: Exception) -> DeviceError:
        """The error for a device that raised ``exc`` on the access ``packed`` of vCPU ``ctx``
        (``exc`` is its ``__cause__``)."""
        region_id = unpack(packed).region
        regions = self.bus.regions_by_id
        region = regions[region_id] if region_id < len(regions) else None
        what = _describe(ctx.kind, ctx.addr, ctx.size)
        if region is None:  # cannot happen while the bus refuses changes under running vCPUs
            error = DeviceError(f"a removed device failed on {what}: {type(exc).__name__}: {exc}")
        else:
            error = _device_failure(region, what, exc)
        error.__cause__ = exc
        return error

    def _rebuild(self) -> None:
        direct = [_direct_handler(r) if r is not None else _gone for r in self.bus.regions_by_id]
        vcpu = []
        for region, handler in zip(self.bus.regions_by_id, direct, strict=True):
            if region is not None and region.mode is HandlerMode.LOOP and self.handoff is not None:
                handler = self._handed_off(handler)
            vcpu.append(handler)
        self._direct = direct
        self.loop_handlers[:] = direct
        regions = self.bus.regions_by_id
        self.loop_writes[:] = [r.device.write if r is not None else _ignore_write for r in regions]
        self.loop_reads[:] = [r.device.read if r is not None else _float_high for r in regions]
        self.vcpu_handlers[:] = vcpu
        for ctx, writes, reads in self._vcpu_tables:
            self._fill_vcpu_tables(ctx, writes, reads)

    def _handed_off(self, handler):
        handoff = self.handoff

        def on_loop(ctx) -> int:
            if self.pre_serve is not None:
                self.pre_serve()
            return handler(ctx.packed, ctx)

        def call(packed: int, ctx) -> int:
            # The C loop cannot time a Python-level wait, so it is timed here.
            start = perf_counter_ns()
            try:
                return handoff.call(ctx.index, on_loop, ctx)
            finally:
                waited = perf_counter_ns() - start
                ctx.wait_ns += waited
                ctx.sleep_wait_ns += waited

        return call


def _ignore_write(offset: int, size: int, value: int) -> None:
    pass  # a free region id


def _float_high(offset: int, size: int) -> int:
    return MASKS[size]


def _packed_write(handler, ctx):
    def write(offset: int, size: int, value: int) -> None:
        handler(ctx.packed, ctx)

    return write


def _packed_read(handler, ctx):
    def read(offset: int, size: int) -> int:
        return handler(ctx.packed, ctx)

    return read


def _gone(packed: int, ctx) -> int:
    # A free region id (the bus refuses changes while vCPUs run, so no access reaches one).
    access = unpack(packed)
    return MASKS[access.size] if access.op == OP_READ else 0


def _direct_handler(region: Region):
    """A closure calling ``region``'s device for an access from the C loop.

    ``packed`` is the access word (aiokvm/access.py); a write's value is
    ``ctx.value``.  A write returns what the device's ``write`` returned when
    that is a held write (a Future, see ``SlotServer``), else 0.
    """
    read, write = region.device.read, region.device.write

    def access(packed: int, ctx) -> int:
        op, size, _region, offset = unpack(packed)
        try:
            if op == OP_WRITE:  # one element
                held = write(offset, size, ctx.value)
                if held is None:
                    return 0
                if not isinstance(held, asyncio.Future):
                    raise TypeError(f"write returned {held!r}; return None, or an asyncio.Future to hold the vCPU")
                return held
            if op == OP_READ:  # one element
                return read(offset, size) & MASKS[size]
        except DeviceError:
            raise
        except Exception as exc:
            raise _device_failure(region, _describe(ctx.kind, ctx.addr, ctx.size), exc) from exc
        return _string_io(region, ctx)

    return access


def _string_io(region: Region, ctx) -> int:
    """String I/O: decode from kvm_run, dispatch per element, write the reads back."""
    run = ctx.run
    result = perform_io(region, decode_exit(run))
    if result:
        ffi.memmove(ffi.cast("uint8_t *", run) + run.io.data_offset, result, len(result))
    return 0


def _describe(kind: int, addr: int, size: int) -> str:
    names = {lib.AIOKVM_IO_IN: "in port", lib.AIOKVM_IO_OUT: "out port",
             lib.AIOKVM_MMIO_READ: "mmio read", lib.AIOKVM_MMIO_WRITE: "mmio write"}
    return f"{names.get(kind, 'access')} {addr:#x} size {size}"


def _device_failure(region: Region, what: str, exc: Exception) -> DeviceError:
    return DeviceError(f"device {region.name} failed on {what}: {type(exc).__name__}: {exc}")


def unheld(result, where: str) -> None:
    """A write on a path that cannot hold its vCPU (string I/O, ioeventfd,
    coalesced) must return None; anything else is the device's mistake."""
    if result is not None:
        raise TypeError(f"write returned {result!r} on the {where} path, which cannot hold the vCPU; return None")


def perform_io(region: Region, exit: IoExit) -> bytes:
    """Perform a port access element by element; returns the bytes read (IN) or b"" (OUT).

    A device may take a whole string at once by defining
    ``read_string(offset, size, count) -> bytes`` / ``write_string(offset,
    size, data)`` (e.g. an ATA data port under ``rep insw``).
    """
    device, size, offset = region.device, exit.size, exit.port - region.base
    try:
        if exit.count > 1:
            bulk = getattr(device, "write_string" if exit.direction is Direction.OUT else "read_string", None)
            if bulk is not None:
                if exit.direction is Direction.OUT:
                    bulk(offset, size, exit.data)
                    return b""
                data = bytes(bulk(offset, size, exit.count))
                want = size * exit.count
                return data[:want].ljust(want, b"\xff")
        if exit.direction is Direction.OUT:
            data = exit.data
            for i in range(0, size * exit.count, size):
                unheld(device.write(offset, size, int.from_bytes(data[i:i + size], "little")), "string I/O")
            return b""
        mask = MASKS[size]
        if exit.count == 1:
            return (device.read(offset, size) & mask).to_bytes(size, "little")
        return b"".join((device.read(offset, size) & mask).to_bytes(size, "little") for _ in range(exit.count))
    except DeviceError:
        raise
    except Exception as exc:
        what = f"{'out' if exit.direction is Direction.OUT else 'in'} port {exit.port:#x} size {size}"
        raise _device_failure(region, what, exc) from exc
