"""Normalized vCPU exits: small immutable values, one type per kind.

A CPU backend turns its raw exit (``struct kvm_run`` for KVM) into one of
these; the rest of the VMM never looks at ``kvm_run`` directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Direction(IntEnum):
    IN = 0   # guest reads: the device supplies data
    OUT = 1  # guest writes: the device consumes data


@dataclass(frozen=True, slots=True)
class IoExit:
    """Port I/O.  ``data`` holds ``size * count`` bytes for OUT, b"" for IN.

    ``count > 1`` is string I/O (``rep outsb`` / ``rep insw``): KVM batches
    several elements into one exit.
    """

    port: int
    size: int
    direction: Direction
    count: int
    data: bytes = b""

    @property
    def reason(self) -> str:
        return "io"


@dataclass(frozen=True, slots=True)
class MmioExit:
    """An MMIO access to an address with no RAM.  ``data`` is set for writes."""

    addr: int
    size: int
    is_write: bool
    data: bytes = b""

    @property
    def reason(self) -> str:
        return "mmio"


@dataclass(frozen=True, slots=True)
class Halt:
    """HLT reached user mode (only without an in-kernel irqchip)."""

    @property
    def reason(self) -> str:
        return "hlt"


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Triple fault: the CPU shut down."""

    @property
    def reason(self) -> str:
        return "shutdown"


@dataclass(frozen=True, slots=True)
class InternalError:
    """KVM could not continue (e.g. emulation failure).  ``suberror`` is KVM's code."""

    suberror: int
    data: tuple[int, ...] = ()

    @property
    def reason(self) -> str:
        return "internal_error"


@dataclass(frozen=True, slots=True)
class FailEntry:
    """VM entry failed; ``hardware_reason`` is the hardware's code."""

    hardware_reason: int
    cpu: int = 0

    @property
    def reason(self) -> str:
        return "fail_entry"


class SystemEventType(IntEnum):
    SHUTDOWN = 1
    RESET = 2
    CRASH = 3


@dataclass(frozen=True, slots=True)
class SystemEvent:
    """A platform event KVM reports (shutdown, reset, crash)."""

    type: int
    data: tuple[int, ...] = ()

    @property
    def reason(self) -> str:
        return "system_event"


@dataclass(frozen=True, slots=True)
class Interrupted:
    """KVM_RUN returned because of a kick (signal or immediate_exit)."""

    @property
    def reason(self) -> str:
        return "intr"


@dataclass(frozen=True, slots=True)
class UnknownExit:
    """Any other KVM exit reason; the VMM stops the machine on it."""

    code: int
    name: str = ""

    @property
    def reason(self) -> str:
        return f"unknown:{self.name or self.code}"


Exit = IoExit | MmioExit | Halt | Shutdown | InternalError | FailEntry | SystemEvent | Interrupted | UnknownExit
