"""Kernel-side I/O paths: the ways to avoid an exit to user mode.

- ``IoEvent`` / ``IoEventFd`` (KVM_IOEVENTFD): guest writes to an address
  (optionally only of a given value) signal an eventfd.  KVM resumes the guest
  at once; the loop reads the eventfd and tells the device how many writes
  happened.  The written value is lost unless ``datamatch`` names it.
- ``IrqFd`` (KVM_IRQFD): the loop raises a GSI by writing an eventfd; no vCPU
  is kicked.  With ``resample=True`` the line is level-triggered: KVM keeps it
  asserted until the guest acknowledges it, then lowers it and signals the
  resample eventfd, and the device re-raises it if it is still pending.
- ``CoalescedRing`` (KVM_REGISTER_COALESCED_MMIO / _PIO): writes to a zone
  are queued in a ring shared with KVM instead of exiting; the loop drains
  the ring before it serves any loop-hosted exit (so ordering with later
  accesses holds) and on a timer.

All three are asyncio adapters on the machine's loop; the counts they keep
are reported by ``Machine.stats()`` as the ``ioeventfd`` and ``coalesced``
paths.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from .errors import ConfigError
from .kvm import ffi, lib

log = structlog.get_logger("aiokvm.kernel_paths")


@dataclass(frozen=True)
class IoEvent:
    """Ask for an ioeventfd at ``offset`` within a device's region.

    ``size`` is the access width that triggers it (1, 2, 4 or 8; 0 for any
    width on MMIO).  With ``datamatch`` only writes of that value trigger it.
    """

    offset: int
    size: int
    datamatch: int | None = None


class IoEventFd:
    """One registered ioeventfd and its reader on the loop.

    ``callback(count)`` runs on the loop with the number of guest writes since
    the last call (the eventfd counter).
    """

    def __init__(self, vm, loop: asyncio.AbstractEventLoop, *, addr: int, size: int, pio: bool,
                 datamatch: int | None, callback: Callable[[int], None], name: str) -> None:
        if size not in (0, 1, 2, 4, 8) or (pio and size == 0):
            raise ConfigError(f"{name}: ioeventfd size must be 1, 2, 4 or 8 (0 = any, MMIO only), got {size}")
        self.name = name
        self.addr, self.size, self.pio, self.datamatch = addr, size, pio, datamatch
        self._vm, self._loop, self._callback = vm, loop, callback
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            vm.ioeventfd(addr, size, self.fd, pio=pio, datamatch=datamatch)
        except OSError as exc:
            os.close(self.fd)
            raise ConfigError(f"{name}: KVM refused an ioeventfd at {addr:#x}: {exc}") from None
        self.count = 0
        self.wakeups = 0
        loop.add_reader(self.fd, self._on_ready)

    def _on_ready(self) -> None:
        try:
            count = os.eventfd_read(self.fd)
        except BlockingIOError:
            return
        self.count += count
        self.wakeups += 1
        self._callback(count)

    def drain(self) -> None:
        """Deliver signals that arrived but were not yet read (e.g. at stop)."""
        if self.fd >= 0:
            self._on_ready()

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            self._loop.remove_reader(self.fd)
        except Exception:  # loop closed
            pass
        try:
            self._vm.ioeventfd(self.addr, self.size, self.fd, pio=self.pio, datamatch=self.datamatch, deassign=True)
        except OSError:
            pass  # the VM is going away
        os.close(self.fd)
        self.fd = -1


class IrqFd:
    """An interrupt line the loop raises without kicking a vCPU.

    ``trigger()`` injects an edge (or asserts a level line, with
    ``resample=True``).  ``on_resample()`` runs on the loop when the guest
    acknowledged a level interrupt; re-``trigger()`` there if it is still
    pending.
    """

    def __init__(self, vm, loop: asyncio.AbstractEventLoop, gsi: int, *, resample: bool = False,
                 on_resample: Callable[[], None] | None = None) -> None:
        self.gsi = gsi
        self._vm, self._loop = vm, loop
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.resample_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if resample else -1
        self._on_resample = on_resample
        try:
            vm.irqfd(self.fd, gsi, resample_fd=self.resample_fd if resample else None)
        except OSError as exc:
            self._close_fds()
            raise ConfigError(f"KVM refused an irqfd on GSI {gsi}: {exc} (is the in-kernel irqchip there?)") from None
        self.triggers = 0
        self.resamples = 0
        if resample:
            loop.add_reader(self.resample_fd, self._on_resample_ready)

    def trigger(self) -> None:
        """Raise the interrupt (thread-safe: one eventfd write; nothing once closed)."""
        fd = self.fd
        if fd < 0:
            return  # the machine closed under a late completion: there is no guest to interrupt
        os.eventfd_write(fd, 1)
        self.triggers += 1

    def _on_resample_ready(self) -> None:
        try:
            count = os.eventfd_read(self.resample_fd)
        except BlockingIOError:
            return
        self.resamples += count
        if self._on_resample is not None:
            self._on_resample()

    def _close_fds(self) -> None:
        for fd in (self.fd, self.resample_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.resample_fd = -1

    def close(self) -> None:
        if self.fd < 0:
            return
        if self.resample_fd >= 0:
            try:
                self._loop.remove_reader(self.resample_fd)
            except Exception:
                pass
        try:
            self._vm.irqfd(self.fd, self.gsi, deassign=True)
        except OSError:
            pass
        self._close_fds()


class CoalescedRing:
    """Drains KVM's coalesced MMIO/PIO ring and delivers the writes to devices.

    The ring is one page shared by the VM, mapped through any vCPU fd at page
    ``KVM_COALESCED_MMIO_PAGE_OFFSET``.  Only the loop drains it.
    """

    BATCH = 256

    def __init__(self, vcpu, deliver: Callable[[bool, int, int, bytes], None]) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        offset = lib.KVM_COALESCED_MMIO_PAGE_OFFSET * page
        if vcpu.mmap_size < offset + page:
            raise ConfigError("this KVM maps no coalesced MMIO ring")
        self._vcpu = vcpu  # the ring lives in its mapping: drain only while it is open
        self._ring = ffi.cast("struct kvm_coalesced_mmio_ring *", vcpu.run_base + offset)
        self._capacity = (page - ffi.sizeof("struct kvm_coalesced_mmio_ring")) // ffi.sizeof(
            "struct kvm_coalesced_mmio")
        self._out = ffi.new("struct kvm_coalesced_mmio[]", self.BATCH)
        self._deliver = deliver
        self.entries = 0

    def drain(self) -> int:
        """Deliver every queued write, oldest first; returns how many."""
        total = 0
        if self._vcpu.closed:
            return 0  # the mapping is gone (the machine closed): nothing left to read
        out, deliver = self._out, self._deliver
        while True:
            n = lib.aiokvm_coalesced_drain(self._ring, self._capacity, out, self.BATCH)
            for i in range(n):
                entry = out[i]
                size = min(entry.len, 8)
                deliver(bool(entry.pio), entry.phys_addr, size, bytes(entry.data[0:size]))
            total += n
            if n < self.BATCH:
                break
        self.entries += total
        return total
