"""``Kvm``: the ``/dev/kvm`` system fd (API version, capabilities, CPUID)."""

from __future__ import annotations

import errno
import os

from ..errors import KvmError, KvmUnavailableError
from ._fd import FdOwner
from ._ffi import ffi, ioctl_int, lib

DEV_KVM = "/dev/kvm"

# Capabilities the project uses, by name, for `aiokvm info` and feature checks.
CAPABILITIES: dict[str, int] = {
    name[len("KVM_CAP_"):]: getattr(lib, name)
    for name in dir(lib)
    if name.startswith("KVM_CAP_")
}


class Kvm(FdOwner):
    """The KVM system fd.  Use as a context manager or call ``close()``."""

    def __init__(self, path: str = DEV_KVM) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                errno.ENOENT, f"opening {path}",
                "load the module: `modprobe kvm_intel` or `modprobe kvm_amd`",
            ) from None
        except PermissionError:
            raise KvmUnavailableError(
                errno.EACCES, f"opening {path}",
                "add yourself to the kvm group: `sudo usermod -aG kvm $USER`, then log in again",
            ) from None
        except OSError as exc:
            raise KvmUnavailableError(exc.errno or errno.EIO, f"opening {path}") from None
        try:
            version = ioctl_int(self.fd, lib.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
            if version != lib.KVM_API_VERSION:
                raise KvmError(
                    errno.EINVAL, "KVM API version check",
                    f"kernel reports {version}, aiokvm needs {lib.KVM_API_VERSION}",
                )
            self.api_version = version
        except BaseException:
            os.close(self.fd)
            raise

    def check_extension(self, cap: int | str) -> int:
        """KVM_CHECK_EXTENSION: 0 if absent, else a capability-specific value."""
        if isinstance(cap, str):
            cap = CAPABILITIES[cap]
        rc = lib.aiokvm_ioctl_int(self.fd, lib.KVM_CHECK_EXTENSION, cap)
        return max(rc, 0)

    def capabilities(self) -> dict[str, int]:
        return {name: self.check_extension(num) for name, num in sorted(CAPABILITIES.items())}

    def vcpu_mmap_size(self) -> int:
        return ioctl_int(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self, max_entries: int = 256):
        """KVM_GET_SUPPORTED_CPUID as a cffi ``struct kvm_cpuid2 *`` (owned)."""
        while True:
            cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
            cpuid.nent = max_entries
            rc = lib.aiokvm_ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, cpuid)
            if rc == -errno.E2BIG and max_entries < 4096:
                max_entries *= 2
                continue
            if rc < 0:
                raise KvmError(-rc, "KVM_GET_SUPPORTED_CPUID")
            return cpuid

    def create_vm(self):
        from .vm import VmFd

        fd = ioctl_int(self.fd, lib.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        return VmFd(self, fd)
