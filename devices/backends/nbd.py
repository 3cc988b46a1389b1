"""A disk served over NBD (the Network Block Device protocol), client side.

``await NbdBackend.connect(url)`` with ``nbd+unix:///EXPORT?socket=PATH`` or
``nbd://HOST[:PORT]/EXPORT`` (port 10809 by default).  No TLS: ``nbds``
URLs are refused.

Handshake (fixed newstyle): the server sends ``NBDMAGIC``, ``IHAVEOPT`` and
its handshake flags; we answer with ``FIXED_NEWSTYLE`` (and ``NO_ZEROES`` if
offered), then send ``NBD_OPT_GO`` with the export name and a request for
``NBD_INFO_BLOCK_SIZE``.  The server answers with ``NBD_REP_INFO`` items
(size and transmission flags, block sizes) and ``NBD_REP_ACK``, or an error
reply, which becomes a ``ConfigError`` naming the export.  A server that
does not know ``NBD_OPT_GO`` (or is not fixed-newstyle) gets the older
``NBD_OPT_EXPORT_NAME`` instead.

Transmission: simple replies only (structured replies are never asked for).
Every request carries a fresh 64-bit cookie and is written whole (header and
payload, no await in between), so any number may be in flight; one reader
task reads replies as they come and completes the matching future.  A reply
with a nonzero error fails that request with ``BackendIOError`` naming the
error; a lost connection or a protocol violation fails every pending request
and every later one.

Copies: a write's header and payload go to the transport in one
``writelines`` call (asyncio may join them into one buffer).  A read's
payload arrives through ``StreamReader.readexactly`` and is then copied into
the caller's memoryviews, one copy per buffer; asyncio streams have no
``readinto``.

Limits honoured: requests are split at the server's maximum payload (at
most 32 MiB; ``SPLIT_WINDOW`` pieces of one request in flight at a time),
and offsets and lengths must be multiples of the server's minimum block
size (``BackendIOError`` otherwise; 1 or 512 in practice).
Without ``SEND_FLUSH`` the server has no cache to flush and ``flush`` only
checks the connection; without ``SEND_TRIM``, ``discard`` (a hint) does
nothing; without ``SEND_WRITE_ZEROES``, ``write_zeroes`` writes zero-filled
buffers.  With ``SEND_TRIM``, what a discarded range reads back is up to the
server.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import socket
import struct
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

import structlog

from aiokvm.errors import ConfigError

from .base import (
    SECTOR_SIZE,
    BackendIOError,
    check_range,
    check_writable,
    checked_views,
    make_serial,
    split_views,
    total_length,
)

log = structlog.get_logger("aiokvm.devices.nbd")

DEFAULT_PORT = 10809

# Magic numbers (big-endian on the wire).
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
CLISERV_MAGIC = 0x00420281861253  # oldstyle negotiation
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Transmission flags.
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_GO = 7

# Option replies.
REP_ACK = 1
REP_INFO = 3
REP_ERROR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERROR_BIT + 1
REP_ERROR_NAMES = {
    REP_ERR_UNSUP: "NBD_REP_ERR_UNSUP (option not supported)",
    REP_ERROR_BIT + 2: "NBD_REP_ERR_POLICY (forbidden by server policy)",
    REP_ERROR_BIT + 3: "NBD_REP_ERR_INVALID (invalid request)",
    REP_ERROR_BIT + 4: "NBD_REP_ERR_PLATFORM (not supported on the server's platform)",
    REP_ERROR_BIT + 5: "NBD_REP_ERR_TLS_REQD (server requires TLS, which aiokvm does not support)",
    REP_ERROR_BIT + 6: "NBD_REP_ERR_UNKNOWN (no such export)",
    REP_ERROR_BIT + 7: "NBD_REP_ERR_SHUTDOWN (server is shutting down)",
    REP_ERROR_BIT + 8: "NBD_REP_ERR_BLOCK_SIZE_REQD (server requires block-size negotiation)",
    REP_ERROR_BIT + 9: "NBD_REP_ERR_TOO_BIG (request too large)",
}

# Information types for NBD_OPT_GO / NBD_REP_INFO.
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# Commands.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_DISC: "disconnect", CMD_FLUSH: "flush",
             CMD_TRIM: "trim", CMD_WRITE_ZEROES: "write zeroes"}

# Error values in simple replies (the protocol fixes these numbers).
NBD_ERROR_NAMES = {1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC",
                   75: "EOVERFLOW", 95: "ENOTSUP", 108: "ESHUTDOWN"}
NBD_ESHUTDOWN = 108

REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY_HEADER = struct.Struct(">QIII")

DEFAULT_MAX_PAYLOAD = 1 << 25  # 32 MiB: the protocol's safe default, and our cap
MAX_OPTION_REPLY = 1 << 20
MAX_EXPORT_NAME = 4096
COOKIE_MASK = (1 << 64) - 1
CONNECT_TIMEOUT = 10.0
CLOSE_TIMEOUT = 10.0
STREAM_LIMIT = 1 << 22
SPLIT_WINDOW = 16  # pieces of one large transfer, trim or write-zeroes in flight at once


# ----------------------------------------------------------------------
# URLs
# ----------------------------------------------------------------------


@dataclass(frozen=True)
class NbdAddress:
    """Where an NBD export lives: a unix socket path or a TCP host and port."""

    export: str
    socket_path: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT

    @property
    def where(self) -> str:
        if self.socket_path is not None:
            return f"unix socket {self.socket_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_nbd_url(url: str) -> NbdAddress:
    """Parse ``nbd://HOST[:PORT]/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH``.  Raises ConfigError."""
    hint = "use nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid NBD URL {url!r} ({exc}): {hint}") from None
    scheme = parts.scheme.lower()
    if scheme in ("nbds", "nbds+unix"):
        raise ConfigError(f"NBD URL {url!r} asks for TLS, which aiokvm does not support: use nbd:// or nbd+unix://")
    if scheme not in ("nbd", "nbd+unix"):
        raise ConfigError(f"NBD URL {url!r} has scheme {parts.scheme!r}: {hint}")
    if parts.fragment:
        raise ConfigError(f"NBD URL {url!r} has a #fragment: {hint}")
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if "\0" in export or len(export.encode()) > MAX_EXPORT_NAME:
        raise ConfigError(f"NBD export name in {url!r} is invalid: no NUL, at most {MAX_EXPORT_NAME} bytes")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ConfigError(f"NBD URL {url!r} has a malformed query: {hint}") from None
    for key, values in query.items():
        if key != "socket" or scheme != "nbd+unix":
            raise ConfigError(f"NBD URL {url!r} has unknown parameter {key!r}: {hint}")
        if len(values) != 1 or not values[0]:
            raise ConfigError(f"NBD URL {url!r} needs exactly one non-empty socket=PATH")
    if scheme == "nbd+unix":
        if parts.netloc:
            raise ConfigError(f"NBD URL {url!r} names a host, but nbd+unix takes none: "
                              f"write nbd+unix:///EXPORT?socket=PATH")
        if "socket" not in query:
            raise ConfigError(f"NBD URL {url!r} has no socket=PATH: write nbd+unix:///EXPORT?socket=PATH")
        return NbdAddress(export=export, socket_path=query["socket"][0])
    if not parts.hostname:
        raise ConfigError(f"NBD URL {url!r} has no host: write nbd://HOST[:PORT]/EXPORT")
    if parts.username or parts.password:
        raise ConfigError(f"NBD URL {url!r} has user info, which is only used with TLS: remove it")
    return NbdAddress(export=export, host=parts.hostname, port=port if port is not None else DEFAULT_PORT)


# ----------------------------------------------------------------------
# Handshake
# ----------------------------------------------------------------------


class _HandshakeError(Exception):
    """The server broke the handshake protocol (becomes a ConfigError)."""


@dataclass
class ExportInfo:
    size: int
    flags: int
    min_block: int = 1
    preferred_block: int = 4096
    max_payload: int = DEFAULT_MAX_PAYLOAD


def _option(option: int, data: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def _error_text(reply_type: int, data: bytes) -> str:
    name = REP_ERROR_NAMES.get(reply_type, f"error {reply_type - REP_ERROR_BIT}")
    message = data.decode("utf-8", "replace").strip()
    return f"{name}: {message}" if message else name


async def _handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     address: NbdAddress) -> ExportInfo:
    magic, second = struct.unpack(">QQ", await reader.readexactly(16))
    if magic != NBDMAGIC:
        raise _HandshakeError(f"does not speak NBD (greeting {magic:#018x})")
    if second == CLISERV_MAGIC:
        raise _HandshakeError("uses the oldstyle handshake, which aiokvm does not support; "
                              "run the server in newstyle mode")
    if second != IHAVEOPT:
        raise _HandshakeError(f"sent an unknown handshake magic {second:#018x}")
    (server_flags,) = struct.unpack(">H", await reader.readexactly(2))
    fixed = bool(server_flags & FLAG_FIXED_NEWSTYLE)
    no_zeroes = bool(server_flags & FLAG_NO_ZEROES)
    client_flags = (FLAG_C_FIXED_NEWSTYLE if fixed else 0) | (FLAG_C_NO_ZEROES if no_zeroes else 0)
    writer.write(struct.pack(">I", client_flags))
    name = address.export.encode()
    if fixed:
        go = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_BLOCK_SIZE)
        writer.write(_option(OPT_GO, go))
        await writer.drain()
        info = await _go_replies(reader, writer, address)
        if info is not None:
            return info
    # NBD_OPT_EXPORT_NAME: no error replies; an unknown export just closes the connection.
    writer.write(_option(OPT_EXPORT_NAME, name))
    await writer.drain()
    try:
        size, flags = struct.unpack(">QH", await reader.readexactly(10))
        if not no_zeroes:
            await reader.readexactly(124)
    except asyncio.IncompleteReadError:
        raise ConfigError(f"NBD server at {address.where} refused export {address.export!r}: "
                          f"it closed the connection; check the export name") from None
    return ExportInfo(size=size, flags=flags)


async def _go_replies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      address: NbdAddress) -> ExportInfo | None:
    """Read the replies to NBD_OPT_GO; ``None`` means "not supported, fall back"."""
    info: ExportInfo | None = None
    block_sizes: tuple[int, int, int] | None = None
    while True:
        magic, option, reply_type, length = OPTION_REPLY_HEADER.unpack(
            await reader.readexactly(OPTION_REPLY_HEADER.size))
        if magic != OPTION_REPLY_MAGIC:
            raise _HandshakeError(f"sent a bad option reply magic {magic:#x}")
        if option != OPT_GO:
            raise _HandshakeError(f"answered option {option} when {OPT_GO} (GO) was asked")
        if length > MAX_OPTION_REPLY:
            raise _HandshakeError(f"sent an option reply of {length} bytes")
        data = await reader.readexactly(length)
        if reply_type == REP_INFO:
            if len(data) < 2:
                raise _HandshakeError("sent an empty NBD_REP_INFO")
            (info_type,) = struct.unpack_from(">H", data)
            if info_type == INFO_EXPORT:
                if len(data) != 12:
                    raise _HandshakeError(f"sent NBD_INFO_EXPORT of {len(data)} bytes (12 expected)")
                size, flags = struct.unpack_from(">QH", data, 2)
                info = ExportInfo(size=size, flags=flags)
            elif info_type == INFO_BLOCK_SIZE:
                if len(data) != 14:
                    raise _HandshakeError(f"sent NBD_INFO_BLOCK_SIZE of {len(data)} bytes (14 expected)")
                block_sizes = struct.unpack_from(">III", data, 2)
            # Other information types (name, description, ...) are ignored, as the protocol asks.
        elif reply_type == REP_ACK:
            if info is None:
                raise _HandshakeError("accepted the export without sending its size (NBD_INFO_EXPORT)")
            if block_sizes is not None:
                _apply_block_sizes(info, block_sizes)
            return info
        elif reply_type == REP_ERR_UNSUP:
            return None
        elif reply_type & REP_ERROR_BIT:
            writer.write(_option(OPT_ABORT))  # soft disconnect; the reply is not awaited
            raise ConfigError(f"NBD server at {address.where} refused export {address.export!r}: "
                              f"{_error_text(reply_type, data)}")
        else:
            raise _HandshakeError(f"sent an unexpected option reply type {reply_type}")


def _apply_block_sizes(info: ExportInfo, sizes: tuple[int, int, int]) -> None:
    minimum, preferred, maximum = sizes
    if minimum == 0 or minimum & (minimum - 1) or minimum > 65536:
        raise _HandshakeError(f"advertised an invalid minimum block size {minimum}")
    if maximum < minimum:
        raise _HandshakeError(f"advertised a maximum payload {maximum} below its minimum block {minimum}")
    info.min_block = minimum
    info.preferred_block = preferred
    info.max_payload = maximum


# ----------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------


@dataclass(eq=False)
class _Request:
    command: int
    offset: int
    length: int
    future: asyncio.Future
    views: list[memoryview] = field(default_factory=list)  # where a read's payload goes


class NbdBackend:
    """An NBD export; create with ``await NbdBackend.connect(url)``."""

    def __init__(self, url: str, address: NbdAddress, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, info: ExportInfo, *, read_only: bool) -> None:
        self.url = url
        self.address = address
        self.export_name = address.export
        self.transmission_flags = info.flags
        self.size = info.size
        self.read_only = read_only or bool(info.flags & FLAG_READ_ONLY)
        self.serial = make_serial(address.export) or "aiokvm-nbd"
        self.supports_discard = not self.read_only and bool(info.flags & FLAG_SEND_TRIM)
        # Emulated with zero-filled writes when the server lacks NBD_CMD_WRITE_ZEROES.
        self.supports_write_zeroes = not self.read_only
        self.can_multi_conn = bool(info.flags & FLAG_CAN_MULTI_CONN)
        self.rotational = bool(info.flags & FLAG_ROTATIONAL)
        self.min_block = info.min_block
        self.preferred_block = info.preferred_block
        step = max(info.min_block, SECTOR_SIZE)
        self.max_payload = max(step, min(info.max_payload, DEFAULT_MAX_PAYLOAD) // step * step)
        self._reader = reader
        self._writer = writer
        self._pending: dict[int, _Request] = {}
        self._cookie = 0
        self._failure: str | None = None
        self._closing = False
        self._server_shutdown = False
        self._disconnect_sent = False
        self._close_done: asyncio.Future | None = None
        self._idle = asyncio.Event()  # set while nothing is in flight (cancelled requests included)
        self._idle.set()
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read_replies(), name=f"nbd-replies {address.where}")

    @classmethod
    async def connect(cls, url: str, *, read_only: bool = False,
                      timeout: float = CONNECT_TIMEOUT) -> NbdBackend:
        """Connect and negotiate.  Anything that keeps the disk from opening raises ``ConfigError``."""
        address = parse_nbd_url(url)
        where = address.where
        try:
            async with asyncio.timeout(timeout):
                if address.socket_path is not None:
                    reader, writer = await asyncio.open_unix_connection(address.socket_path, limit=STREAM_LIMIT)
                else:
                    reader, writer = await asyncio.open_connection(address.host, address.port, limit=STREAM_LIMIT)
        except TimeoutError:
            raise ConfigError(f"cannot connect to NBD server at {where}: no answer within {timeout:g}s") from None
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(f"cannot connect to NBD server at {where}: {reason}; "
                              f"start the server or fix the URL") from None
        try:
            _set_nodelay(writer)
            try:
                async with asyncio.timeout(timeout):
                    info = await _handshake(reader, writer, address)
            except TimeoutError:
                raise ConfigError(f"NBD server at {where} did not finish the handshake within {timeout:g}s") from None
            except _HandshakeError as exc:
                raise ConfigError(f"NBD server at {where} {exc}") from None
            except (asyncio.IncompleteReadError, OSError) as exc:
                detail = "it closed the connection" if isinstance(exc, asyncio.IncompleteReadError) else exc
                raise ConfigError(f"NBD handshake with {where} failed ({detail}); "
                                  f"check the server and export {address.export!r}") from None
            if info.size % SECTOR_SIZE:
                writer.write(REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
                raise ConfigError(f"NBD export {address.export!r} at {where} is {info.size} bytes, "
                                  f"not a multiple of 512: resize the image")
        except BaseException:
            await _close_writer(writer)
            raise
        return cls(url, address, reader, writer, info, read_only=read_only)

    def __repr__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        state = " closed" if self._closing else (" failed" if self._failure else "")
        return f"<NbdBackend {self.url!r} {self.size} bytes {mode}{state}>"

    # -- requests ---------------------------------------------------------------------
    def _check_usable(self, what: str) -> None:
        if self._closing:
            raise BackendIOError(f"NBD {what} on closed disk {self.url}")
        if self._failure is not None:
            raise BackendIOError(f"NBD {what} failed: the connection to {self.address.where} is down "
                                 f"({self._failure})", errno=errno_mod.EIO)

    def _check_aligned(self, offset: int, length: int, what: str) -> None:
        if self.min_block > 1 and (offset % self.min_block or length % self.min_block):
            raise BackendIOError(f"NBD {what} of {length} bytes at offset {offset} is not aligned to the "
                                 f"server's minimum block size {self.min_block}", errno=errno_mod.EINVAL)

    def _next_cookie(self) -> int:
        while True:
            self._cookie = (self._cookie + 1) & COOKIE_MASK
            if self._cookie not in self._pending:
                return self._cookie

    async def _request(self, command: int, offset: int, length: int, *,
                       views: list[memoryview] | None = None) -> None:
        """Send one request and wait for its reply.  ``views``: a read's destination or a write's payload."""
        what = CMD_NAMES[command]
        self._check_usable(what)
        cookie = self._next_cookie()
        future = asyncio.get_running_loop().create_future()
        self._pending[cookie] = _Request(command, offset, length, future,
                                         views if command == CMD_READ and views else [])
        self._idle.clear()
        header = REQUEST.pack(REQUEST_MAGIC, 0, command, cookie, offset, length)
        try:
            # Header and payload in one call with no await between requests' pieces,
            # so concurrent requests never interleave on the wire.
            if command == CMD_WRITE and views:
                self._writer.writelines([header, *views])
            else:
                self._writer.write(header)
            await self._writer.drain()
        except (ConnectionError, OSError, RuntimeError) as exc:
            self._fail(f"sending failed: {exc}")
        except BaseException:
            future.cancel()
            raise
        await future

    async def _split_transfer(self, command: int, offset: int, views: list[memoryview], length: int) -> None:
        if length <= self.max_payload:
            await self._request(command, offset, length, views=views)
            return
        # A window of pieces in flight at a time, as in _split_effect: the piece count is
        # the server's to set (it may claim a maximum payload of 512 bytes), and every
        # piece in flight holds a request, a task and a future, so gathering them all at
        # once let a server turn one large guest read into a quarter-million of each.
        # The pieces' list, too, is built one window at a time.
        for base, span in split_views(views, self.max_payload * SPLIT_WINDOW):
            pieces = split_views(span, self.max_payload)
            _raise_first(await asyncio.gather(
                *(self._request(command, offset + base + rel, total_length(part), views=part) for rel, part in pieces),
                return_exceptions=True))

    async def _split_effect(self, command: int, offset: int, length: int, *, step: int | None = None,
                            payload: memoryview | None = None) -> None:
        """A payload-less range command (or zero-fill writes) in pieces, a window of them in flight at a time."""
        step = step or self.max_payload
        end = offset + length
        starts = range(offset, end, step)
        for first in range(0, len(starts), SPLIT_WINDOW):
            batch = []
            for start in starts[first : first + SPLIT_WINDOW]:
                n = min(step, end - start)
                views = [payload[:n]] if payload is not None else None
                batch.append(self._request(command, start, n, views=views))
            _raise_first(await asyncio.gather(*batch, return_exceptions=True))

    # -- BlockBackend -------------------------------------------------------------------
    async def readv(self, offset: int, buffers: list[memoryview]) -> None:
        views, length = checked_views(self.size, offset, buffers, writable=True, what="read")
        self._check_aligned(offset, length, "read")
        self._check_usable("read")
        if length:
            await self._split_transfer(CMD_READ, offset, views, length)

    async def writev(self, offset: int, buffers: list[memoryview]) -> None:
        check_writable(self.read_only, f"write to NBD export {self.export_name!r}")
        views, length = checked_views(self.size, offset, buffers, writable=False, what="write")
        self._check_aligned(offset, length, "write")
        self._check_usable("write")
        if length:
            await self._split_transfer(CMD_WRITE, offset, views, length)

    async def flush(self) -> None:
        self._check_usable("flush")
        if self.transmission_flags & FLAG_SEND_FLUSH:
            await self._request(CMD_FLUSH, 0, 0)

    async def discard(self, offset: int, length: int) -> None:
        check_writable(self.read_only, f"discard on NBD export {self.export_name!r}")
        check_range(self.size, offset, length, "discard")
        self._check_aligned(offset, length, "discard")
        self._check_usable("trim")
        if length and self.transmission_flags & FLAG_SEND_TRIM:
            await self._split_effect(CMD_TRIM, offset, length)

    async def write_zeroes(self, offset: int, length: int) -> None:
        check_writable(self.read_only, f"write zeroes on NBD export {self.export_name!r}")
        check_range(self.size, offset, length, "write zeroes")
        self._check_aligned(offset, length, "write zeroes")
        self._check_usable("write zeroes")
        if not length:
            return
        if self.transmission_flags & FLAG_SEND_WRITE_ZEROES:
            await self._split_effect(CMD_WRITE_ZEROES, offset, length)
            return
        zeroes = memoryview(bytes(min(length, self.max_payload, 1 << 20)))
        await self._split_effect(CMD_WRITE, offset, length, step=zeroes.nbytes, payload=zeroes)

    async def close(self) -> None:
        """Wait for requests in flight, send NBD_CMD_DISC and close the connection."""
        if self._close_done is not None:
            await asyncio.shield(self._close_done)
            return
        self._closing = True
        self._close_done = asyncio.get_running_loop().create_future()
        try:
            if self._pending and self._failure is None:
                # The protocol asks clients to wait for every reply before NBD_CMD_DISC,
                # including replies to requests whose callers were cancelled.
                with _suppress_io():
                    async with asyncio.timeout(CLOSE_TIMEOUT):
                        await self._idle.wait()
            if self._failure is None and not self._disconnect_sent:
                self._send_disconnect()
                with _suppress_io():
                    async with asyncio.timeout(CLOSE_TIMEOUT):
                        await self._writer.drain()
        finally:
            self._reader_task.cancel()
            await asyncio.wait([self._reader_task])
            self._fail("the backend was closed")
            await _close_writer(self._writer)
            self._close_done.set_result(None)

    # -- connection state --------------------------------------------------------------
    def _send_disconnect(self) -> None:
        self._disconnect_sent = True
        with _suppress_io():
            self._writer.write(REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, self._next_cookie(), 0, 0))

    def _fail(self, reason: str) -> None:
        """The connection is unusable: fail everything pending and refuse new requests."""
        if self._failure is None:
            self._failure = reason
            if not self._disconnect_sent:  # not our own close: the operator wants to know
                log.warning("NBD backend failed", server=self.address.where, reason=reason,
                            pending=len(self._pending))
        pending, self._pending = self._pending, {}
        self._idle.set()
        for request in pending.values():
            if not request.future.done():
                request.future.set_exception(BackendIOError(
                    f"NBD {CMD_NAMES[request.command]} of {request.length} bytes at offset {request.offset} "
                    f"failed: connection to {self.address.where} lost ({reason})", errno=errno_mod.EIO))
        self._writer.close()

    async def _read_replies(self) -> None:
        """The reader task: match replies to pending requests by cookie."""
        try:
            while True:
                header = await self._reader.readexactly(SIMPLE_REPLY.size)
                magic, error, cookie = SIMPLE_REPLY.unpack(header)
                if magic != SIMPLE_REPLY_MAGIC:
                    kind = "a structured reply, never negotiated" if magic == STRUCTURED_REPLY_MAGIC else (
                        f"bad reply magic {magic:#x}")
                    raise _ProtocolError(f"server sent {kind}")
                request = self._pending.get(cookie)
                if request is None:
                    raise _ProtocolError(f"server replied to unknown cookie {cookie}")
                if error:
                    del self._pending[cookie]
                    self._complete_with_error(request, error)
                else:
                    if request.command == CMD_READ:
                        # Still pending while its payload arrives: if the connection
                        # ends mid-payload, _fail() must find it and fail it.
                        await self._receive_payload(request)
                    self._pending.pop(cookie, None)  # _fail() may have taken the table meanwhile
                    if not request.future.done():
                        request.future.set_result(None)
                if not self._pending:
                    self._idle.set()
                    if self._server_shutdown and not self._disconnect_sent:
                        self._send_disconnect()  # the protocol asks for a soft disconnect after ESHUTDOWN
        except asyncio.CancelledError:
            raise
        except asyncio.IncompleteReadError:
            self._fail("the server closed the connection")
        except _ProtocolError as exc:
            self._fail(f"protocol error: {exc}")
        except Exception as exc:  # any failure here must reach the waiters
            self._fail(f"{type(exc).__name__}: {exc}")

    async def _receive_payload(self, request: _Request) -> None:
        if request.future.done():  # cancelled or failed: nobody wants the data; drain it, buffers untouched
            remaining = request.length
            while remaining:
                remaining -= len(await self._reader.readexactly(min(remaining, 1 << 20)))
            return
        for view in request.views:
            data = await self._reader.readexactly(view.nbytes)
            if not request.future.done():  # failed meanwhile: its caller has been told; leave its buffers be
                view[:] = data

    def _complete_with_error(self, request: _Request, error: int) -> None:
        if error == NBD_ESHUTDOWN:
            self._server_shutdown = True
            self._failure = self._failure or "the server is shutting down"
        name = NBD_ERROR_NAMES.get(error) or errno_mod.errorcode.get(error, f"error {error}")
        if not request.future.done():
            request.future.set_exception(BackendIOError(
                f"NBD {CMD_NAMES[request.command]} of {request.length} bytes at offset {request.offset} "
                f"failed on the server: {name}", errno=error))


class _ProtocolError(Exception):
    pass


class _suppress_io:
    """Suppress the errors a dying connection raises, and our own close timeouts."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        return exc_type is not None and issubclass(
            exc_type, (OSError, RuntimeError, TimeoutError))


def _raise_first(results: list) -> None:
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with _suppress_io():
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with _suppress_io():
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()
