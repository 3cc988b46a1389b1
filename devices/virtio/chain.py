"""Cursors over a descriptor chain: ``ChainReader`` and ``ChainWriter``.

A chain's device-readable (or device-writable) buffers form one byte stream
whose pieces lie wherever the driver put them.  A cursor walks that stream:
reads and writes cross buffer boundaries, zero-length buffers are skipped,
and every access is checked against what is left *before* anything happens,
so an access that does not fit raises ``ChainBoundsError`` and changes
nothing (no bytes written, position unchanged).

The model is rust-vmm's ``virtio_queue::{Reader, Writer}``: ``remaining``
(their ``available_bytes``), ``consumed`` / ``written`` (``bytes_read`` /
``bytes_written``), ``read_struct`` / ``write_struct`` (``read_obj`` /
``write_obj``) and ``split_at``, where the cursor keeps the first ``offset``
bytes and hands back a new cursor for the rest.  Unlike ``io.Read`` there are
no short reads or writes: it is all of it or an error.

Zero-copy: ``segments(n)`` consumes ``n`` bytes and returns them as guest
``(address, length)`` pairs, ``views(n)`` as memoryviews into guest RAM (for
``readv``/``writev``/``recv_into``-style I/O; a reader's are read-only, so a
device cannot write into buffers the driver gave it to read).
``ChainWriter.write_at`` fills in bytes behind the cursor, e.g. virtio-net's
``num_buffers``, known only once a frame has been spread over several chains.

Sans-I/O: guest memory is touched only through ``GuestMemory.view``, so a
buffer outside RAM (possible only if a cursor is built over unvalidated
pairs; ``SplitQueue.pop`` checks every one) is a ``GuestMemoryError``, raised
before any byte moves.

Why ``ChainBoundsError`` is not a ``VirtqueueError``: running off the end of
a chain means the *request* is malformed (a header missing, a reply buffer
too small).  The device answers that with an error status or drops the
packet; the ring itself is intact, so DEVICE_NEEDS_RESET, which
``VirtqueueError`` triggers, would punish a driver for one bad request.  It
is a ``ValueError`` too: the caller asked for more bytes than there are.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from aiokvm.errors import AiokvmError

__all__ = ["ChainBoundsError", "ChainReader", "ChainWriter"]

Buffers = Sequence[tuple[int, int]]


class ChainBoundsError(AiokvmError, ValueError):
    """A read, write or split reached past the end of a chain's buffers; nothing was done."""

    def __init__(self, message: str, wanted: int, available: int) -> None:
        super().__init__(message)
        self.wanted = wanted
        self.available = available


class _ChainCursor:
    """Position in the byte stream of ``buffers``: buffer index and offset into it.

    ``_remaining`` bounds the cursor (``split_at`` shortens it), so the walk
    never needs to look at the buffer list's length.  A position at the very
    end of a buffer is as good as the start of the next one.  The origin
    (where the cursor started) is kept for ``write_at``.  ``buffers`` is not
    copied: hand over a tuple (``DescriptorChain`` fields are).
    """

    __slots__ = ("_bufs", "_consumed", "_index", "_memory", "_offset", "_origin", "_remaining")

    _side = "chain"

    def __init__(self, memory, buffers: Buffers) -> None:
        total = 0
        for _addr, length in buffers:
            total += length
        self._memory = memory
        self._bufs = buffers
        self._index = 0
        self._offset = 0
        self._remaining = total
        self._consumed = 0
        self._origin = (0, 0)

    @property
    def remaining(self) -> int:
        """Bytes left between the cursor and its end."""
        return self._remaining

    @property
    def consumed(self) -> int:
        """Bytes this cursor has moved past (read, written or skipped)."""
        return self._consumed

    def __repr__(self) -> str:
        return f"<{type(self).__name__} consumed={self._consumed} remaining={self._remaining}>"

    # -- the walk ------------------------------------------------------------------------
    def _short(self, what: str, n: int) -> ChainBoundsError:
        return ChainBoundsError(
            f"{what} of {n} bytes with {self._remaining} left in the {self._side} buffers", n, self._remaining)

    def _walk(self, index: int, offset: int, n: int) -> tuple[list[tuple[int, int]], int, int]:
        """The pieces covering ``n`` bytes from ``(index, offset)``, and the position after them.

        The caller has checked that the bytes are there; zero-length and used-up
        buffers are stepped over.
        """
        bufs = self._bufs
        pieces = []
        while n:
            addr, length = bufs[index]
            avail = length - offset
            if n < avail:
                pieces.append((addr + offset, n))
                return pieces, index, offset + n
            if avail > 0:
                pieces.append((addr + offset, avail))
                n -= avail
            index += 1
            offset = 0
        return pieces, index, offset

    def _take(self, what: str, n: int) -> list[tuple[int, int]]:
        """Consume ``n`` bytes (all there, or raise having done nothing); their pieces."""
        if not 0 < n <= self._remaining:
            if n == 0:
                return []
            raise self._short(what, n)
        index = self._index
        addr, length = self._bufs[index]
        offset = self._offset
        # All in the current buffer (the common case) without the loop; a buffer
        # used up exactly moves the cursor to the next one, as _walk does.
        if n < length - offset:
            self._offset = offset + n
            pieces = [(addr + offset, n)]
        elif n == length - offset:
            self._index = index + 1
            self._offset = 0
            pieces = [(addr + offset, n)]
        else:
            pieces, self._index, self._offset = self._walk(index, offset, n)
        self._remaining -= n
        self._consumed += n
        return pieces

    # -- operations common to both sides -------------------------------------------------
    def segments(self, n: int) -> list[tuple[int, int]]:
        """Consume ``n`` bytes; their guest ``(address, length)`` pieces in order, none empty."""
        return self._take("segments", n)

    def views(self, n: int) -> list[memoryview]:
        """Consume ``n`` bytes; writable memoryviews into guest RAM covering them, in order."""
        if not 0 <= n <= self._remaining:
            raise self._short("views", n)
        pieces, index, offset = self._walk(self._index, self._offset, n)
        view = self._memory.view
        views = [view(addr, length) for addr, length in pieces]  # may raise: nothing consumed yet
        self._move_to(index, offset, n)
        return views

    def _move_to(self, index: int, offset: int, n: int) -> None:
        self._index = index
        self._offset = offset
        self._remaining -= n
        self._consumed += n

    def skip(self, n: int) -> None:
        """Move past ``n`` bytes without touching them."""
        self._take("skip", n)

    def split_at(self, offset: int):
        """Keep the next ``offset`` bytes; return a new cursor (of the same kind) for the rest.

        The new cursor starts with nothing consumed, at its own origin.
        """
        if not 0 <= offset <= self._remaining:
            raise self._short("split", offset)
        index = self._index
        at = self._offset + offset
        if offset:
            length = self._bufs[index][1]
            if at == length:  # the end of the current buffer: the tail starts at the next
                index += 1
                at = 0
            elif at > length:
                index, at = self._walk(index, self._offset, offset)[1:]
        tail = object.__new__(type(self))
        tail._memory = self._memory
        tail._bufs = self._bufs
        tail._index = index
        tail._offset = at
        tail._remaining = self._remaining - offset
        tail._consumed = 0
        tail._origin = (index, at)
        self._remaining = offset
        return tail


class ChainReader(_ChainCursor):
    """Reads the device-readable buffers of a chain: ``ChainReader(memory, chain.readable)``."""

    __slots__ = ()
    _side = "readable"

    def read(self, n: int) -> bytes:
        """Exactly the next ``n`` bytes, or ``ChainBoundsError``."""
        if not 0 <= n <= self._remaining:
            raise self._short("read", n)
        return b"".join(_ChainCursor.views(self, n))  # one copy, out of guest RAM

    def views(self, n: int) -> list[memoryview]:
        """Consume ``n`` bytes; read-only memoryviews into guest RAM covering them, in order."""
        return [view.toreadonly() for view in _ChainCursor.views(self, n)]

    def readinto(self, buffer) -> int:
        """Fill all of ``buffer`` (anything writable, e.g. a bytearray) from the chain; returns its size."""
        target = memoryview(buffer).cast("B")
        n = target.nbytes
        if n > self._remaining:
            raise self._short("readinto", n)
        at = 0
        for view in _ChainCursor.views(self, n):
            target[at:at + len(view)] = view
            at += len(view)
        return n

    def read_struct(self, layout: struct.Struct) -> tuple:
        """Unpack ``layout`` from the next ``layout.size`` bytes (they may span buffers)."""
        size = layout.size
        if 0 < size <= self._remaining:
            addr, length = self._bufs[self._index]
            offset = self._offset
            if size < length - offset:  # inside the current buffer: unpack in place, no copy
                values = layout.unpack_from(self._memory.view(addr + offset, size))
                self._offset = offset + size
                self._remaining -= size
                self._consumed += size
                return values
            if size == length - offset:  # all the rest of it
                values = layout.unpack_from(self._memory.view(addr + offset, size))
                self._index += 1
                self._offset = 0
                self._remaining -= size
                self._consumed += size
                return values
        return layout.unpack(self.read(size))


class ChainWriter(_ChainCursor):
    """Writes the device-writable buffers of a chain: ``ChainWriter(memory, chain.writable)``.

    ``written`` is what the device reports as the used length for this part
    of the chain (bytes skipped count: the device may leave bytes as they are).
    """

    __slots__ = ()
    _side = "writable"

    @property
    def written(self) -> int:
        """Bytes written (or skipped) so far."""
        return self._consumed

    def _short(self, what: str, n: int) -> ChainBoundsError:
        return ChainBoundsError(
            f"{what}: {n} bytes do not fit in the {self._remaining} writable bytes left", n, self._remaining)

    def write(self, data) -> None:
        """Write all of ``data`` (bytes-like) at the cursor, or raise ``ChainBoundsError`` and write nothing."""
        data = memoryview(data).cast("B")
        n = data.nbytes
        if n > self._remaining:
            raise self._short("write", n)
        if n:
            addr, length = self._bufs[self._index]
            offset = self._offset
            if n <= length - offset:  # all in the current buffer
                self._memory.write(addr + offset, data)
                self._offset = offset + n
                self._remaining -= n
                self._consumed += n
                return
        _copy_into(self.views(n), data)

    def write_struct(self, layout: struct.Struct, *values) -> None:
        """Pack ``values`` with ``layout`` and write them at the cursor."""
        self.write(layout.pack(*values))

    def write_at(self, offset: int, data) -> None:
        """Write ``data`` at ``offset`` bytes from where this writer started.

        The cursor and ``written`` do not move: this is for filling in bytes
        already passed (skipped or written), such as a header whose content is
        known only after the payload.  The range must lie inside the writer's
        span (``written + remaining``); bytes written ahead of the cursor are
        not counted in ``written`` until the cursor passes them.
        """
        data = memoryview(data).cast("B")
        n = data.nbytes
        span = self._consumed + self._remaining
        if offset < 0 or offset + n > span:
            raise ChainBoundsError(
                f"write_at: {n} bytes at offset {offset} do not fit in the writer's {span} bytes", n, span)
        _before, index, at = self._walk(*self._origin, offset)
        pieces = self._walk(index, at, n)[0]
        view = self._memory.view
        _copy_into([view(addr, length) for addr, length in pieces], data)


def _copy_into(views: list[memoryview], data: memoryview) -> None:
    at = 0
    for view in views:
        size = len(view)
        view[:] = data[at:at + size]
        at += size
