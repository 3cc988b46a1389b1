"""PIO and MMIO address maps with one registration primitive.

A device claims ``[base, base + length)`` in one address space and says where
its handlers run: ``HandlerMode.INLINE`` (in the vCPU thread, for cheap
register devices) or ``HandlerMode.LOOP`` (on the asyncio loop, the default).
Overlapping claims are refused with ``ConfigError``.  Accesses nobody claims
are finished by the C vCPU loop, which counts them; reads of them return
all-ones, writes are dropped.

The maps change only while no vCPU can look them up.  The C vCPU loop reads
the port table and its MMIO list without a lock, and the dispatcher's
tables are indexed by region id, so rewriting them under a running vCPU
could send an access to the wrong device.  The owner (``Machine``) installs
a guard, called under the bus lock, that refuses (un)registration with
``ConfigError`` while vCPUs run, unless the machine is paused and every vCPU
has parked.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

from .errors import ConfigError
from .kvm import ffi, lib


class Space(StrEnum):
    PIO = "pio"
    MMIO = "mmio"


class HandlerMode(StrEnum):
    INLINE = "inline"  # runs in the vCPU thread, returns at once
    LOOP = "loop"      # runs on the asyncio loop; the vCPU waits for it


SPACE_LIMIT = {Space.PIO: 0x1_0000, Space.MMIO: 1 << 64}
_C_MODE = {HandlerMode.INLINE: lib.AIOKVM_INLINE, HandlerMode.LOOP: lib.AIOKVM_LOOP}


@runtime_checkable
class Device(Protocol):
    """What the bus calls.  ``offset`` is relative to the region's base.

    ``read`` returns an int of ``size`` bytes (little-endian semantics); the
    bus masks it.  Neither may block: a handler that needs I/O starts it and
    reports progress through device state (e.g. a BSY bit) or an interrupt.
    """

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


@dataclass(frozen=True, eq=False)
class Region:
    space: Space
    base: int
    length: int
    device: Device
    mode: HandlerMode
    name: str
    #: small integer the C vCPU loop reports for this region
    id: int = -1

    @property
    def end(self) -> int:
        return self.base + self.length

    def __repr__(self) -> str:
        return f"<Region {self.name} {self.space.value} [{self.base:#x}, {self.end:#x}) {self.mode.value}>"


class Bus:
    """Both address maps of one machine."""

    def __init__(self) -> None:
        self._regions: dict[Space, list[Region]] = {Space.PIO: [], Space.MMIO: []}
        self._starts: dict[Space, list[int]] = {Space.PIO: [], Space.MMIO: []}
        # PIO is small: a direct port -> region table makes lookup one dict hit.
        self._pio_index: dict[int, Region] = {}
        self._lock = threading.Lock()  # registration from several threads
        self._guard = None  # raises ConfigError when the maps must not change (see the module docstring)
        # The C vCPU loop's view: a port table (id << 2 | mode per port, shared
        # by every vCPU) and a short MMIO region list copied into each vCPU.
        self.regions_by_id: list[Region | None] = []
        self.pio_table = ffi.new("uint16_t[65536]")
        self._listeners: list = []

    # -- registration ---------------------------------------------------------
    def set_guard(self, guard) -> None:
        """``guard(what)`` runs before every (un)registration and raises ``ConfigError`` to refuse it."""
        self._guard = guard

    def register(
        self, space: Space, base: int, length: int, device: Device, *,
        mode: HandlerMode = HandlerMode.LOOP, name: str | None = None,
    ) -> Region:
        space = Space(space)
        mode = HandlerMode(mode)
        name = name or type(device).__name__
        if length <= 0:
            raise ConfigError(f"{name}: region length must be positive, got {length}")
        if base < 0 or base + length > SPACE_LIMIT[space]:
            raise ConfigError(f"{name}: {space.value} range [{base:#x}, {base + length:#x}) is out of bounds")
        if not (callable(getattr(device, "read", None)) and callable(getattr(device, "write", None))):
            raise ConfigError(f"{name}: a device needs read(offset, size) and write(offset, size, value)")
        with self._lock:
            if self._guard is not None:
                self._guard(f"register {name}")
            region_id = self._free_id()
            region = Region(space, base, length, device, mode, name, region_id)
            regions, starts = self._regions[space], self._starts[space]
            i = bisect.bisect_left(starts, base)
            for neighbour in regions[max(i - 1, 0):i + 1]:
                if neighbour.base < region.end and base < neighbour.end:
                    raise ConfigError(
                        f"{name}: {space.value} [{base:#x}, {region.end:#x}) overlaps "
                        f"{neighbour.name} [{neighbour.base:#x}, {neighbour.end:#x})"
                    )
            if space is Space.MMIO and len(regions) >= lib.AIOKVM_MAX_MMIO_REGIONS:
                raise ConfigError(f"{name}: at most {lib.AIOKVM_MAX_MMIO_REGIONS} MMIO regions per machine")
            regions.insert(i, region)
            starts.insert(i, base)
            if region_id == len(self.regions_by_id):
                self.regions_by_id.append(region)
            else:
                self.regions_by_id[region_id] = region
            if space is Space.PIO:
                entry = region_id << 2 | _C_MODE[mode]
                for port in range(base, region.end):
                    self._pio_index[port] = region
                    self.pio_table[port] = entry
        self._changed()
        return region

    def _free_id(self) -> int:
        for i, r in enumerate(self.regions_by_id):
            if r is None:
                return i
        if len(self.regions_by_id) >= lib.AIOKVM_MAX_REGIONS:
            raise ConfigError(f"at most {lib.AIOKVM_MAX_REGIONS} regions per machine")
        return len(self.regions_by_id)

    def on_change(self, callback) -> None:
        """Call ``callback()`` after every (un)registration (the C tables follow)."""
        self._listeners.append(callback)

    def _changed(self) -> None:
        for callback in self._listeners:
            callback()

    def fill_tables(self, vcpu_ctx) -> None:
        """Copy the MMIO map and region bases into a C vCPU context (``struct aiokvm_vcpu``)."""
        for region in self.regions_by_id:
            if region is not None:
                vcpu_ctx.region_base[region.id] = region.base
        regions = self._regions[Space.MMIO]
        for i, region in enumerate(regions):
            slot = vcpu_ctx.mmio[i]
            slot.base = region.base
            slot.end = region.end
            slot.id = region.id
            slot.mode = _C_MODE[region.mode]
        vcpu_ctx.n_mmio = len(regions)

    def register_pio(self, base: int, length: int, device: Device, **kw) -> Region:
        return self.register(Space.PIO, base, length, device, **kw)

    def register_mmio(self, base: int, length: int, device: Device, **kw) -> Region:
        return self.register(Space.MMIO, base, length, device, **kw)

    def unregister(self, region: Region) -> None:
        with self._lock:
            if self._guard is not None:
                self._guard(f"unregister {region.name}")
            regions, starts = self._regions[region.space], self._starts[region.space]
            i = regions.index(region)
            del regions[i]
            del starts[i]
            self.regions_by_id[region.id] = None
            if region.space is Space.PIO:
                for port in range(region.base, region.end):
                    self._pio_index.pop(port, None)
                    self.pio_table[port] = 0
        self._changed()

    def regions(self, space: Space | None = None) -> list[Region]:
        if space is None:
            return self._regions[Space.PIO] + self._regions[Space.MMIO]
        return list(self._regions[Space(space)])

    # -- lookup -----------------------------------------------------------------
    def find_pio(self, port: int, size: int) -> Region | None:
        region = self._pio_index.get(port)
        if region is not None and port + size <= region.end:
            return region
        return None

    def find_mmio(self, addr: int, size: int) -> Region | None:
        starts = self._starts[Space.MMIO]
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0:
            region = self._regions[Space.MMIO][i]
            if addr + size <= region.end:
                return region
        return None

    def find(self, space: Space, addr: int, size: int) -> Region | None:
        return self.find_pio(addr, size) if space is Space.PIO else self.find_mmio(addr, size)
