"""What every block backend offers, and the checks they all share.

A backend is a flat array of ``size`` bytes.  Devices (virtio-blk, ATA) hand
it lists of writable memoryviews (usually slices of guest RAM) and await the
transfer.  Offsets and lengths are bytes; the device converts from sectors.

Rules every backend keeps:

- A request outside ``[0, size)`` raises ``BackendIOError`` before any byte
  moves.  Devices check too, but the backend never trusts them.
- On a read-only backend, ``writev``, ``discard`` and ``write_zeroes`` raise
  ``BackendIOError`` and change nothing.
- ``flush`` returns once everything written before it is durable.
- A request on a closed backend raises ``BackendIOError``; ``close`` may be
  called more than once.
- While a request is in flight the caller must leave its buffers alone.  If
  the awaiting task is cancelled, the transfer may still complete into (or
  out of) the buffers; a backend never touches them after ``close`` returns.
"""

from __future__ import annotations

import errno as errno_mod
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from aiokvm.errors import AiokvmError

SECTOR_SIZE = 512
SERIAL_MAX = 20


class BackendIOError(AiokvmError):
    """A block request failed at run time (host I/O error, server error, lost connection).

    ``errno`` is the error number when there is one (from the host or the NBD
    server), else ``None``.  Devices report it to the guest as an I/O error.
    """

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


#: after the first, every LOG_EVERY-th backend error of a kind is logged again (with its count)
LOG_EVERY = 10000


def count_backend_error(counts: dict[str, int], exc: BackendIOError) -> bool:
    """Count ``exc`` in ``counts`` under its errno name; True if the device should log it.

    A failed backend (a dead NBD server, a full file system) fails every
    request after the first, and the guest may retry forever: devices log the
    first error of each kind and then only every ``LOG_EVERY``-th, so the log
    says what happened once and stays bounded, while the counts say how often.
    """
    key = errno_mod.errorcode.get(exc.errno or 0, "EIO")
    count = counts.get(key, 0) + 1
    counts[key] = count
    return count == 1 or count % LOG_EVERY == 0


@runtime_checkable
class BlockBackend(Protocol):
    size: int              # bytes; a multiple of 512
    read_only: bool
    serial: str            # <= 20 ASCII chars, for virtio-blk GET_ID / ATA IDENTIFY
    supports_discard: bool
    supports_write_zeroes: bool

    async def readv(self, offset: int, buffers: list[memoryview]) -> None:
        """Fill ``buffers`` with the bytes at ``[offset, offset + total length)``."""

    async def writev(self, offset: int, buffers: list[memoryview]) -> None:
        """Store the bytes of ``buffers`` at ``[offset, offset + total length)``."""

    async def flush(self) -> None:
        """Return once data written before the call is durable."""

    async def discard(self, offset: int, length: int) -> None:
        """The range is no longer needed."""

    async def write_zeroes(self, offset: int, length: int) -> None:
        """The range reads back as zeroes afterwards."""

    async def close(self) -> None:
        """Release the backend; later requests raise ``BackendIOError``."""


# ----------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------


def byte_views(buffers: Iterable[memoryview], *, writable: bool) -> list[memoryview]:
    """Flat, unsigned-byte views of ``buffers`` (no copies).

    Raises ``BackendIOError`` for a buffer that is not contiguous, or not
    writable when ``writable`` is asked for (a read must land somewhere).
    """
    views: list[memoryview] = []
    for buf in buffers:
        view = buf if isinstance(buf, memoryview) else memoryview(buf)
        if writable and view.readonly:
            raise BackendIOError("read into a read-only buffer: pass writable memoryviews")
        if not view.contiguous:
            raise BackendIOError("block I/O needs contiguous buffers")
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if view.nbytes:
            views.append(view)
    return views


def total_length(views: Iterable[memoryview]) -> int:
    return sum(v.nbytes for v in views)


def checked_views(size: int, offset: int, buffers: Iterable[memoryview], *, writable: bool,
                  what: str) -> tuple[list[memoryview], int]:
    """Every backend's request preamble: flat byte views of ``buffers``, their
    total length, and ``[offset, offset + length)`` checked against the disk."""
    views = byte_views(buffers, writable=writable)
    length = total_length(views)
    check_range(size, offset, length, what)
    return views, length


def check_range(size: int, offset: int, length: int, what: str) -> None:
    """Raise ``BackendIOError`` unless ``[offset, offset + length)`` lies inside the disk."""
    if offset < 0 or length < 0 or offset + length > size:
        raise BackendIOError(
            f"{what} of {length} bytes at offset {offset} is outside the {size}-byte disk"
        )


def check_writable(read_only: bool, what: str) -> None:
    if read_only:
        raise BackendIOError(f"{what} refused: the disk is read-only")


def make_serial(name: str) -> str:
    """At most 20 printable ASCII characters from ``name`` (others become ``_``)."""
    text = "".join(ch if " " <= ch <= "~" else "_" for ch in name).strip()
    return text[:SERIAL_MAX]


def split_views(views: list[memoryview], chunk: int) -> list[tuple[int, list[memoryview]]]:
    """Cut a buffer list into pieces of at most ``chunk`` bytes.

    Returns ``(relative offset, views)`` pairs; the views are slices of the
    originals, so nothing is copied.
    """
    pieces: list[tuple[int, list[memoryview]]] = []
    current: list[memoryview] = []
    current_len = 0
    start = 0
    position = 0
    for view in views:
        while view.nbytes:
            take = min(view.nbytes, chunk - current_len)
            current.append(view[:take])
            current_len += take
            position += take
            view = view[take:]
            if current_len == chunk:
                pieces.append((start, current))
                current, current_len, start = [], 0, position
    if current:
        pieces.append((start, current))
    return pieces
