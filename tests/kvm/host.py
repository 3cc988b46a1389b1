"""Facts about the host the KVM tests run on."""

from __future__ import annotations

import os


def pvm_host() -> bool:
    """KVM provided by PVM (kvm_pvm) rather than VMX or SVM."""
    return os.path.isdir("/sys/module/kvm_pvm") and not any(
        os.path.isdir(f"/sys/module/{m}") for m in ("kvm_intel", "kvm_amd")
    )


def open_fds() -> int:
    """File descriptors this process has open now."""
    return len(os.listdir("/proc/self/fd"))
