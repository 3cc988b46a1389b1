"""``VmFd``: one KVM virtual machine (memory slots, irqchip, PIT, IRQ lines,
ioeventfd, irqfd, coalesced MMIO)."""

from __future__ import annotations

from ._fd import FdOwner
from ._ffi import ffi, ioctl, ioctl_int, lib


class VmFd(FdOwner):
    """A KVM VM fd.  Created by ``Kvm.create_vm()``."""

    def __init__(self, kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    # -- memory -------------------------------------------------------------
    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, size: int, host_addr: int, *, readonly: bool = False
    ) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = slot
        region.flags = lib.KVM_MEM_READONLY if readonly else 0
        region.guest_phys_addr = guest_phys_addr
        region.memory_size = size
        region.userspace_addr = host_addr
        ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region,
              f"KVM_SET_USER_MEMORY_REGION slot {slot} at {guest_phys_addr:#x}")

    # -- platform -----------------------------------------------------------
    def set_tss_addr(self, addr: int) -> None:
        ioctl_int(self.fd, lib.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        value = ffi.new("uint64_t *", addr)
        ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, value, "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        ioctl_int(self.fd, lib.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        config = ffi.new("struct kvm_pit_config *")
        config.flags = lib.KVM_PIT_SPEAKER_DUMMY
        ioctl(self.fd, lib.KVM_CREATE_PIT2, config, "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: bool) -> None:
        """Set the level of an in-kernel irqchip input (PIC/IOAPIC GSI).

        Thread-safe: the kernel serializes it.  A fresh struct per call keeps
        concurrent callers (vCPU threads, the loop) from sharing one buffer.
        """
        req = ffi.new("struct kvm_irq_level *")
        req.irq = irq
        req.level = 1 if level else 0
        ioctl(self.fd, lib.KVM_IRQ_LINE, req, f"KVM_IRQ_LINE {irq}")

    # -- kernel-side I/O paths ---------------------------------------------------
    def ioeventfd(
        self, addr: int, length: int, efd: int, *, pio: bool = False,
        datamatch: int | None = None, deassign: bool = False,
    ) -> None:
        req = ffi.new("struct kvm_ioeventfd *")
        req.addr = addr
        req.len = length
        req.fd = efd
        flags = 0
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
            req.datamatch = datamatch
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        req.flags = flags
        ioctl(self.fd, lib.KVM_IOEVENTFD, req, f"KVM_IOEVENTFD {addr:#x}")

    def irqfd(self, efd: int, gsi: int, *, resample_fd: int | None = None, deassign: bool = False) -> None:
        req = ffi.new("struct kvm_irqfd *")
        req.fd = efd
        req.gsi = gsi
        flags = 0
        if resample_fd is not None:
            flags |= lib.KVM_IRQFD_FLAG_RESAMPLE
            req.resamplefd = resample_fd
        if deassign:
            flags |= lib.KVM_IRQFD_FLAG_DEASSIGN
        req.flags = flags
        ioctl(self.fd, lib.KVM_IRQFD, req, f"KVM_IRQFD gsi {gsi}")

    def coalesced_zone(self, addr: int, size: int, *, pio: bool = False, register: bool = True) -> None:
        zone = ffi.new("struct kvm_coalesced_mmio_zone *")
        zone.addr = addr
        zone.size = size
        zone.pio = 1 if pio else 0
        req = lib.KVM_REGISTER_COALESCED_MMIO if register else lib.KVM_UNREGISTER_COALESCED_MMIO
        ioctl(self.fd, req, zone, f"KVM_(UN)REGISTER_COALESCED_MMIO {addr:#x}")

    def stats_fd(self) -> int:
        return ioctl_int(self.fd, lib.KVM_GET_STATS_FD, 0, "KVM_GET_STATS_FD")

    # -- vCPUs --------------------------------------------------------------------
    def create_vcpu(self, index: int):
        from .vcpu import VcpuFd

        fd = ioctl_int(self.fd, lib.KVM_CREATE_VCPU, index, f"KVM_CREATE_VCPU {index}")
        return VcpuFd(self, index, fd)
