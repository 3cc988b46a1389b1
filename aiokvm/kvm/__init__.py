"""The ``/dev/kvm`` binding: the only package that knows ioctl numbers.

``Kvm`` (system fd), ``VmFd`` (one VM), ``VcpuFd`` (one vCPU), and the
binary-stats reader.  Built on a cffi API-mode extension compiled from
``<linux/kvm.h>``.
"""

from ._ffi import ffi, lib
from .system import CAPABILITIES, DEV_KVM, Kvm
from .vcpu import VcpuFd
from .vm import VmFd

__all__ = ["CAPABILITIES", "DEV_KVM", "Kvm", "VcpuFd", "VmFd", "ffi", "lib"]
