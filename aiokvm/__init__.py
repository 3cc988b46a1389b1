"""aiokvm: a Python VMM on Linux KVM whose vCPU exits are handed to asyncio.

Public API::

    import aiokvm
    async with aiokvm.Machine(memory="64M", vcpus=1) as vm:
        vm.load("hello")
        status = await vm.run(timeout=10)
"""

from .bus import Bus, Device, HandlerMode, Region, Space
from .errors import (
    AiokvmError,
    ConfigError,
    DeviceError,
    GuestError,
    GuestMemoryError,
    KvmError,
    KvmUnavailableError,
    MachineTimeout,
)
from .kernel_paths import IoEvent, IrqFd
from .machine import ExitStatus, Machine
from .memory import GuestMemory

__all__ = [
    "AiokvmError", "Bus", "ConfigError", "Device", "DeviceError", "ExitStatus", "GuestError",
    "GuestMemory", "GuestMemoryError", "HandlerMode", "IoEvent", "IrqFd", "KvmError", "KvmUnavailableError",
    "Machine", "MachineTimeout", "Region", "Space",
]
