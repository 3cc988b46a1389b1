"""``VcpuFd``: one vCPU (registers, CPUID, MP state and its ``kvm_run`` page)."""

from __future__ import annotations

import mmap
import os

from ._fd import FdOwner
from ._ffi import check, ffi, ioctl, lib

SEGMENT_FIELDS = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable")


class VcpuFd(FdOwner):
    """A vCPU fd plus its mmap'd ``struct kvm_run``.

    KVM_RUN itself is issued by the C vCPU loop (``_vcpu_loop.h``), which
    gets ``fd`` and ``run_struct``; this class sets the vCPU up and owns both.
    """

    def __init__(self, vm, index: int, fd: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        size = vm.kvm.vcpu_mmap_size()
        try:
            self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        self.mmap_size = size
        # cffi view of the shared kvm_run page (zero-copy).
        self.run_struct = ffi.from_buffer("struct kvm_run *", self._mmap)
        self.run_base = ffi.cast("uint8_t *", self.run_struct)
        self.run_buffer = memoryview(self._mmap)

    # -- registers ------------------------------------------------------------
    def get_regs(self):
        regs = ffi.new("struct kvm_regs *")
        ioctl(self.fd, lib.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs) -> None:
        ioctl(self.fd, lib.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self):
        sregs = ffi.new("struct kvm_sregs *")
        ioctl(self.fd, lib.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs) -> None:
        ioctl(self.fd, lib.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def set_cpuid2(self, cpuid) -> None:
        ioctl(self.fd, lib.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def get_mp_state(self) -> int:
        state = ffi.new("struct kvm_mp_state *")
        ioctl(self.fd, lib.KVM_GET_MP_STATE, state, "KVM_GET_MP_STATE")
        return state.mp_state

    def set_mp_state(self, value: int) -> None:
        state = ffi.new("struct kvm_mp_state *")
        state.mp_state = value
        ioctl(self.fd, lib.KVM_SET_MP_STATE, state, "KVM_SET_MP_STATE")

    def rip(self) -> int | None:
        """Best-effort RIP for error messages (None if the vCPU is gone)."""
        try:
            return int(self.get_regs().rip)
        except Exception:
            return None

    def stats_fd(self) -> int:
        return check(lib.aiokvm_ioctl_int(self.fd, lib.KVM_GET_STATS_FD, 0), "KVM_GET_STATS_FD (vcpu)")

    # -- the kvm_run page ------------------------------------------------------------
    @property
    def immediate_exit(self) -> bool:
        return bool(self.run_struct.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.run_struct.immediate_exit = 1 if value else 0

    def _release(self) -> None:
        # Drop every view of the mmap before closing it.
        self.run_buffer.release()
        self.run_struct = None
        self.run_base = None
        try:
            self._mmap.close()
        except BufferError:
            pass  # a cffi view still alive; the mmap goes with the object
