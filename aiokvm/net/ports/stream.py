"""QEMU's ``-netdev stream`` (and ``socket`` listen/connect) as a switch port.

Each frame is preceded by its length as 4 bytes big-endian: no vnet header,
no padding.  Frames are reassembled across reads, whatever the split.  A
length above QEMU's own buffer (4096 + 65536) closes the connection and is
counted (``oversize``), as QEMU does; a frame under 14 bytes is dropped and
counted (``runt``).

Either side may listen.  A server takes one peer at a time (as QEMU's does);
another that connects meanwhile is closed and counted
(``refused_connections``).  A client connects, and reconnects every
``reconnect_s`` while the peer is away (each attempt counted in
``connect_attempts``; ``reconnect_s=0`` connects once and never again, as in
QEMU; a negative or non-finite period is refused: it would retry without
bound).  The link is down while there is no peer, and a frame the peer was
in the middle of when it went is dropped and counted (``partial``).  What
the peer does not read piles up in the transport's buffer: past
``max_buffer`` bytes frames are dropped and counted (``queue_full``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import stat
import struct

import structlog

from ...errors import ConfigError
from ..frames import ETH_HLEN
from .base import SwitchPort

log = structlog.get_logger("aiokvm.net")

QEMU_MAX_PACKET = 4096 + 65536
MAX_BUFFER = 1 << 20
RECONNECT_S = 1.0
_LEN = struct.Struct(">I")


class _Connection(asyncio.Protocol):
    def __init__(self, port: StreamPort) -> None:
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.live = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        sockname, peername = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
        if isinstance(sockname, tuple) and sockname == peername:
            # TCP "self-connect": retrying a local port nobody listens on can land on the
            # ephemeral port equal to it, and the socket connects to itself.  Not a peer.
            self.port.self_connects += 1
            transport.close()
            return
        self.live = self.port._connected(self)

    def data_received(self, data: bytes) -> None:
        if not self.live:
            return
        buffer = self.buffer
        buffer += data
        frames: list[bytes] = []
        pos, end = 0, len(buffer)
        port = self.port
        while end - pos >= 4:
            length = _LEN.unpack_from(buffer, pos)[0]
            if length > QEMU_MAX_PACKET:
                port.counters.drops["oversize"] += 1
                log.warning("stream peer sent an oversized length: closing", port=port.name, length=length)
                self.live = False
                self.transport.close()
                break
            if end - pos - 4 < length:
                break
            frame = bytes(buffer[pos + 4:pos + 4 + length])
            pos += 4 + length
            if length < ETH_HLEN:
                port.counters.drops["runt"] += 1
                continue
            frames.append(frame)
        del buffer[:pos]
        if frames:
            port.incoming_many(frames)

    def connection_lost(self, exc) -> None:
        if self.live and self.buffer:  # the peer went mid-frame: that frame never reaches the switch
            self.port.counters.drops["partial"] += 1
        self.live = False
        self.port._disconnected(self)  # a no-op for a connection that never became the peer


def _check_stale_unix_socket(path: str) -> None:
    """A server's path: free, or a socket nobody listens on (removed); else ConfigError."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path} exists and is not a socket: give another path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # left by a process that died
            return
    raise ConfigError(f"{path}: another process is listening there; give another path")


class StreamPort(SwitchPort):
    kind = "stream"

    def __init__(self, address: str | tuple[str, int], *, server: bool, name: str | None = None,
                 reconnect_s: float = RECONNECT_S, max_buffer: int = MAX_BUFFER) -> None:
        """``address``: a unix socket path, or (host, port) for TCP."""
        self.address = address
        self.server = server
        where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
        if not (math.isfinite(reconnect_s) and reconnect_s >= 0):
            raise ConfigError(f"reconnect={reconnect_s} for stream {where}: give seconds >= 0 (0: never reconnect)")
        super().__init__(name or f"stream-{os.path.basename(where) if isinstance(address, str) else where}")
        self.reconnect_s = reconnect_s
        self.max_buffer = max_buffer
        self.link_up = False
        self._conn: _Connection | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connector: asyncio.Task | None = None
        self._closing = False
        self.connections = 0
        self.refused_connections = 0
        self.self_connects = 0
        self.connect_attempts = 0

    @property
    def describe(self) -> str:
        kind = "unix" if isinstance(self.address, str) else "tcp"
        where = self.address if isinstance(self.address, str) else f"{self.address[0]}:{self.address[1]}"
        return f"stream:{kind}:{where}{',server' if self.server else ''}"

    async def open(self) -> StreamPort:
        loop = asyncio.get_running_loop()
        if self.server:
            try:
                if isinstance(self.address, str):
                    _check_stale_unix_socket(self.address)
                    self._server = await loop.create_unix_server(lambda: _Connection(self), self.address)
                else:
                    host, port = self.address
                    self._server = await loop.create_server(lambda: _Connection(self), host, port,
                                                            reuse_address=True)
            except OSError as exc:
                raise ConfigError(f"cannot listen on {self.describe}: {exc.strerror or exc}") from None
        else:
            self._connector = loop.create_task(self._connect_until_closed())
        return self

    @property
    def bound_port(self) -> int | None:
        """The TCP port a server listens on (useful with port 0)."""
        if self._server is None or isinstance(self.address, str):
            return None
        return self._server.sockets[0].getsockname()[1]

    async def _connect_until_closed(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._closing:
            if self._conn is None:
                self.connect_attempts += 1
                try:
                    if isinstance(self.address, str):
                        await loop.create_unix_connection(lambda: _Connection(self), self.address)
                    else:
                        await loop.create_connection(lambda: _Connection(self), *self.address)
                    failures = 0
                except OSError as exc:
                    failures += 1
                    if failures == 1:
                        log.info("stream peer not there yet: retrying", port=self.name, error=str(exc))
            if not self.reconnect_s:  # sleep(0) here would be a busy connect loop
                return
            await asyncio.sleep(self.reconnect_s)

    def _connected(self, conn: _Connection) -> bool:
        if self._conn is not None or self._closing:
            self.refused_connections += 1
            conn.transport.close()
            return False
        self._conn = conn
        self.connections += 1
        log.info("stream peer connected", port=self.name)
        self.set_link(True)
        return True

    def _disconnected(self, conn: _Connection) -> None:
        if self._conn is not conn:
            return
        self._conn = None
        log.info("stream peer gone", port=self.name)
        self.set_link(False)

    def send(self, frame: bytes) -> bool:
        conn = self._conn
        counters = self.counters
        # is_closing(): lost, but connection_lost() has not run yet; writing on would
        # make the stdlib transport log "socket.send() raised exception." per frame.
        if conn is None or not conn.live or conn.transport.is_closing():
            counters.drops["link_down"] += 1
            return False
        transport = conn.transport
        if transport.get_write_buffer_size() > self.max_buffer:
            counters.drops["queue_full"] += 1
            return False
        transport.write(_LEN.pack(len(frame)) + frame)
        self._sent(frame)
        return True

    def metrics(self) -> dict:
        return {**super().metrics(), "peer": self.describe, "connections": self.connections,
                "refused_connections": self.refused_connections, "connect_attempts": self.connect_attempts}

    async def aclose(self) -> None:
        self._closing = True
        if self._connector is not None:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connector
        if self._conn is not None:
            self._conn.transport.close()
            self._conn = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            if isinstance(self.address, str):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.address)
        self.link_up = False
        await super().aclose()
