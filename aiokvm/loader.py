"""Which boot protocol a guest file speaks, and loading it by that protocol.

The file's own header decides, in QEMU's ``-kernel`` order: a valid
Multiboot v1 header in the first 8 KiB makes it a Multiboot image
(``multiboot.py``); otherwise it must be an ELF with a PVH entry note
(``boot.py``).  Both start vCPU 0 in 32-bit protected mode with paging off;
they differ in the boot information and in EAX.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import boot, multiboot
from .memory import GuestMemory


@dataclass(frozen=True)
class BootEntry:
    """Where vCPU 0 starts and what it finds in EAX and EBX."""

    protocol: str  # "pvh" or "multiboot"
    entry32: int
    eax: int
    ebx: int
    cmdline: str  # as the guest reads it


def parse_guest(data: bytes, path: str = "<image>"):
    """An ``ElfImage`` (PVH) or a ``MultibootImage``.  Raises ``ConfigError`` only."""
    if multiboot.find_header(data) is not None:
        return multiboot.parse_multiboot(data, path)
    return boot.parse_elf(data, path)


def read_guest(path: str | Path):
    """Read and parse a guest file (``parse_guest``)."""
    return parse_guest(boot.read_image_bytes(path), str(path))


def protocol_of(image) -> str:
    return "multiboot" if isinstance(image, multiboot.MultibootImage) else "pvh"


def load_guest(image, memory: GuestMemory, cmdline: str, modules=()) -> BootEntry:
    """Copy the image and write the boot information its protocol defines.

    ``cmdline`` is the kernel command line; a Multiboot guest reads it after
    its own path, as QEMU writes it.  ``modules`` are ``boot.BootModule``.
    """
    image_end = image.span[1]
    if protocol_of(image) == "multiboot":
        boot.load_image(image, memory, protocol="Multiboot")
        full = f"{image.path} {cmdline}"
        info = multiboot.write_multiboot_info(memory, full, modules, image_end)
        return BootEntry("multiboot", image.entry32, multiboot.BOOT_MAGIC, info, full)
    boot.load_image(image, memory)
    info = boot.write_start_info(memory, cmdline, modules, image_end)
    return BootEntry("pvh", image.entry32, 0, info, cmdline)
