"""Which CPU backend runs a machine: KVM, or the Unicorn software CPU.

``auto`` takes KVM when ``/dev/kvm`` can be opened for reading and writing,
else Unicorn, and says so in one line on stderr.  ``AIOKVM_KVM_DEVICE``
names another path to try as the KVM device (a test points it at nothing
to see the fallback).
"""

from __future__ import annotations

import os
import sys

ACCELERATORS = ("kvm", "unicorn", "auto")
KVM_DEVICE_ENV = "AIOKVM_KVM_DEVICE"


def kvm_device() -> str:
    return os.environ.get(KVM_DEVICE_ENV, "/dev/kvm")


def kvm_usable() -> str | None:
    """None if the KVM device can be used, else why not."""
    path = kvm_device()
    if not os.path.exists(path):
        return f"{path} does not exist"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not readable and writable by this user"
    return None


def resolve_accel(accel: str) -> str:
    if accel != "auto":
        return accel
    why = kvm_usable()
    if why is None:
        return "kvm"
    print(f"aiokvm: {why}: running on the unicorn software CPU (accel=auto)", file=sys.stderr)
    return "unicorn"


def accelerators() -> dict[str, str | None]:
    """Each accelerator: None if usable here, else why not."""
    from .cpu.emulated import unicorn_available

    return {"kvm": kvm_usable(), "unicorn": unicorn_available()}
