"""Block backends: where a virtual disk's bytes live.

- ``RawFileBackend``: a raw image file or block device, I/O in a thread pool.
- ``NbdBackend``: an export on an NBD server (``nbd://`` or ``nbd+unix://``).
- ``MemoryBackend``: a bytearray, for tests.

All satisfy the ``BlockBackend`` protocol (``base.py``).  ``parse_disk_spec``
reads the CLI's ``PATH[,ro][,format=raw|nbd][,if=virtio|ata]`` and
``open_backend`` turns the result into a backend.
"""

from __future__ import annotations

from .base import SECTOR_SIZE, BackendIOError, BlockBackend
from .memory import MemoryBackend
from .nbd import NbdBackend, parse_nbd_url
from .raw import RawFileBackend
from .spec import DiskSpec, open_backend, parse_disk_spec

__all__ = [
    "SECTOR_SIZE",
    "BackendIOError",
    "BlockBackend",
    "DiskSpec",
    "MemoryBackend",
    "NbdBackend",
    "RawFileBackend",
    "open_backend",
    "parse_disk_spec",
    "parse_nbd_url",
]
