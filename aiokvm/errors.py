"""Typed errors.  Every message says what happened and, where it can, what to do.

- ``ConfigError``: the caller asked for something impossible (bad size, missing
  or malformed guest image, overlapping devices).
- ``GuestError``: the guest did something the VMM cannot continue from
  (triple fault, unhandled exit, emulation failure).  It stops that machine
  only, never the process or other machines on the loop.
- ``KvmError``: the host's KVM refused an operation.
"""

from __future__ import annotations


class AiokvmError(Exception):
    """Base of every error aiokvm raises on purpose."""


class ConfigError(AiokvmError, ValueError):
    """The caller's configuration (sizes, paths, files, devices) is invalid."""


class GuestMemoryError(AiokvmError):
    """An access to guest-physical memory fell outside guest RAM."""

    def __init__(self, addr: int, length: int, message: str | None = None) -> None:
        self.addr = addr
        self.length = length
        super().__init__(
            message or f"guest memory access [{addr:#x}, +{length:#x}) is outside guest RAM"
        )


class KvmError(AiokvmError, OSError):
    """A KVM ioctl failed.  ``errno`` holds the kernel's error number."""

    def __init__(self, errno_: int, what: str, hint: str = "") -> None:
        import os

        text = f"{what} failed: {os.strerror(errno_)}"
        if hint:
            text += f" ({hint})"
        OSError.__init__(self, errno_, text)
        self.what = what

    def __str__(self) -> str:
        return self.strerror or ""


class KvmUnavailableError(KvmError):
    """``/dev/kvm`` is missing or cannot be opened."""


class GuestError(AiokvmError):
    """The guest stopped in a way the VMM cannot continue from.

    ``exit`` is the normalized exit value (e.g. ``Shutdown``) when there is one,
    ``vcpu`` the vCPU index, and ``rip`` the guest instruction pointer.
    """

    def __init__(self, message: str, *, exit=None, vcpu: int | None = None, rip: int | None = None):
        super().__init__(message)
        self.exit = exit
        self.vcpu = vcpu
        self.rip = rip


class DeviceError(GuestError):
    """A device model failed while handling a guest access.

    The machine stops; the message names the device and the access.
    """


class MachineTimeout(AiokvmError, TimeoutError):
    """``Machine.run(timeout=...)`` elapsed before the guest finished."""


class HandoffCancelled(Exception):
    """Internal: the machine is stopping; a pending loop-hosted access was abandoned."""
