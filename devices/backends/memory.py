"""A disk held in a bytearray, for tests and throwaway machines.

Nothing is durable, so ``flush`` only checks the backend is open.  ``discard``
zeroes the range (the guest may not rely on discarded data, so zeroes are a
valid answer and keep the behaviour easy to test).
"""

from __future__ import annotations

from aiokvm.errors import ConfigError

from .base import (
    SECTOR_SIZE,
    BackendIOError,
    check_range,
    check_writable,
    checked_views,
)


class MemoryBackend:
    """``size`` bytes of RAM; ``data`` (at most ``size`` bytes) fills the start."""

    def __init__(self, size: int, *, read_only: bool = False, data: bytes | None = None,
                 serial: str = "aiokvm-memory") -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % SECTOR_SIZE:
            raise ConfigError(f"memory disk size {size!r} is invalid: give a positive multiple of 512 bytes")
        if data is not None and len(data) > size:
            raise ConfigError(f"memory disk data ({len(data)} bytes) is larger than the disk ({size} bytes)")
        self.size = size
        self.read_only = read_only
        self.serial = serial[:20]
        self.supports_discard = not read_only
        self.supports_write_zeroes = not read_only
        self._data = bytearray(size)
        if data:
            self._data[: len(data)] = data
        self._closed = False

    def __repr__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        return f"<MemoryBackend {self.size} bytes {mode}{' closed' if self._closed else ''}>"

    @property
    def contents(self) -> bytes:
        """A copy of the whole disk (for tests)."""
        return bytes(self._data)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise BackendIOError(f"{what} on a closed memory disk")

    async def readv(self, offset: int, buffers: list[memoryview]) -> None:
        self._check_open("read")
        self.readv_nowait(offset, buffers)

    def readv_nowait(self, offset: int, buffers: list[memoryview]) -> bool:
        """Memory never blocks: read at once (see RawFileBackend.readv_nowait)."""
        if self._closed:
            return False
        views, _length = checked_views(self.size, offset, buffers, writable=True, what="read")
        data = memoryview(self._data)
        for view in views:
            n = view.nbytes
            view[:] = data[offset : offset + n]
            offset += n
        return True

    async def writev(self, offset: int, buffers: list[memoryview]) -> None:
        self._check_open("write")
        check_writable(self.read_only, "write")
        views, _length = checked_views(self.size, offset, buffers, writable=False, what="write")
        for view in views:
            n = view.nbytes
            self._data[offset : offset + n] = view
            offset += n

    async def flush(self) -> None:
        self._check_open("flush")

    async def discard(self, offset: int, length: int) -> None:
        await self.write_zeroes(offset, length, what="discard")

    async def write_zeroes(self, offset: int, length: int, *, what: str = "write zeroes") -> None:
        self._check_open(what)
        check_writable(self.read_only, what)
        check_range(self.size, offset, length, what)
        self._data[offset : offset + length] = bytes(length)

    async def close(self) -> None:
        self._closed = True
