"""VDE: joining a ``vde_switch`` (``VdePort``), and the port a VDE client
gets on our own switch (``VdeDataPort``, made by ``aiokvm.net.vde_server``).

The protocol, as libvdeplug (vdeplug4: ``vde_plug`` and QEMU's ``-netdev
vde`` share it) speaks it, checked on this project's machines:

1. The client connects a stream socket to ``DIR/ctl`` and binds a datagram
   socket of its own at ``DIR/.PID-N``.
2. It sends, in one write, little-endian: ``u32 0xfeedface, u32 3, u32 type``
   (0, or ``port << 8`` to ask for a port), a whole 110-byte ``sockaddr_un``
   naming its datagram socket, and a description with no NUL.
3. The switch makes a datagram socket for the port, *connects it to the
   client's path first* (the client unlinks that path after the reply), binds
   it at ``DIR/NNN.M`` and answers with its 110-byte ``sockaddr_un``, once.
4. The client connects its datagram socket there and unlinks its own path.
   From then on each datagram is one raw Ethernet frame.
5. Closing the control connection closes the port; a client watching it
   (``vde_plug``) exits when the switch closes it.

The two sides are connected to each other, so the kernel's
``max_dgram_qlen`` (10) does not apply; the sender's socket buffer does, and
a full one is EAGAIN: the bounded queue of ``FramedFdPort`` takes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import socket
import struct

import structlog

from ...errors import ConfigError
from .fd import FramedFdPort

log = structlog.get_logger("aiokvm.net")

VDE_MAGIC = 0xFEEDFACE
VDE_VERSION = 3
SUN_LEN = 110  # sizeof(struct sockaddr_un) on Linux: u16 family + 108 bytes of path
REQUEST_HEAD = struct.Struct("<III")
HANDSHAKE_TIMEOUT_S = 5.0


def pack_sockaddr_un(path: str) -> bytes:
    raw = path.encode()
    if len(raw) >= SUN_LEN - 2:
        raise ConfigError(f"the socket path {path} is too long for a unix socket (108 bytes at most)")
    return struct.pack("<H", socket.AF_UNIX) + raw.ljust(SUN_LEN - 2, b"\0")


def unpack_sockaddr_un(data: bytes) -> str | None:
    """The path in a sockaddr_un, or None if it is not one."""
    if len(data) < 3 or struct.unpack_from("<H", data)[0] != socket.AF_UNIX:
        return None
    path = data[2:SUN_LEN].split(b"\0", 1)[0]
    return path.decode(errors="replace") if path else None


class VdeDataPort(FramedFdPort):
    """A connected datagram socket carrying one frame per datagram, with the
    VDE control connection that keeps it alive."""

    kind = "vde"

    def __init__(self, name: str, **kw) -> None:
        super().__init__(name, **kw)
        self._sock: socket.socket | None = None
        self.peer = ""
        self.bound_path: str | None = None  # the server side's DIR/NNN.M, removed when the port goes

    def _serve(self, sock: socket.socket, peer: str) -> None:
        # A connected datagram socket: FramedFdPort's read/write of the fd are recv/send.
        self._sock, self.peer = sock, peer
        self._start_io(sock.fileno(), sock)

    def metrics(self) -> dict:
        return {**super().metrics(), "peer": self.peer}

    async def aclose(self) -> None:
        self._close_io()
        self._sock = None
        await super().aclose()


class VdePort(VdeDataPort):
    """Joins the VDE switch (``vde_switch``, or ``aiokvm switch``) listening in ``directory``."""

    def __init__(self, directory: str, *, name: str | None = None, port: int = 0, description: str = "",
                 **kw) -> None:
        self.directory = os.path.realpath(directory)  # the request carries an absolute path, as libvdeplug's
        super().__init__(name or f"vde-{os.path.basename(self.directory) or 'root'}", **kw)
        if not 0 <= port < 1 << 24:
            raise ConfigError(f"VDE port number {port} is out of range")
        self.port_number = port
        self.description = description or f"aiokvm: user={getpass.getuser()} pid={os.getpid()}"
        self._ctl_writer: asyncio.StreamWriter | None = None
        self._watch: asyncio.Task | None = None

    async def open(self) -> VdePort:
        ctl_path = os.path.join(self.directory, "ctl")
        try:
            reader, writer = await asyncio.open_unix_connection(ctl_path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise ConfigError(f"no VDE switch at {self.directory} (start one: `vde_switch -sock {self.directory}` "
                              f"or `aiokvm switch {self.directory}`)") from None
        except PermissionError:
            raise ConfigError(f"no permission to join the VDE switch at {self.directory}") from None
        data = own_path = None
        try:
            data, own_path = self._bind_own()
            writer.write(REQUEST_HEAD.pack(VDE_MAGIC, VDE_VERSION, self.port_number << 8)
                         + pack_sockaddr_un(own_path) + self.description.encode())
            try:
                reply = await asyncio.wait_for(reader.read(SUN_LEN), HANDSHAKE_TIMEOUT_S)
            except TimeoutError:
                raise ConfigError(f"the VDE switch at {self.directory} did not answer") from None
            path = unpack_sockaddr_un(reply)
            if path is None:
                raise ConfigError(f"the VDE switch at {self.directory} refused the port"
                                  f"{f' {self.port_number} (taken?)' if self.port_number else ''}")
            try:
                data.connect(path)
            except OSError as exc:
                raise ConfigError(f"cannot reach the VDE switch's port socket {path}: {exc.strerror}") from None
        except BaseException:
            writer.close()
            if data is not None:
                data.close()
            raise
        finally:
            if own_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(own_path)
        self._ctl_writer = writer
        self._serve(data, f"vde:{self.directory} ({path})")
        self._watch = asyncio.get_running_loop().create_task(self._watch_ctl(reader))
        return self

    def _bind_own(self) -> tuple[socket.socket, str]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        for counter in range(1000):
            path = os.path.join(self.directory, f".{os.getpid():05d}-{counter:05d}")
            try:
                sock.bind(path)
            except OSError as exc:
                if exc.errno == 98:  # EADDRINUSE: another of ours, or a leftover
                    continue
                sock.close()
                raise ConfigError(f"cannot bind a socket in {self.directory}: {exc.strerror}") from None
            os.chmod(path, 0o700)
            return sock, path
        sock.close()
        raise ConfigError(f"no free socket name in {self.directory}")

    async def _watch_ctl(self, reader: asyncio.StreamReader) -> None:
        """The switch closing the control connection closes the port: no carrier from then on."""
        with contextlib.suppress(ConnectionError):
            while await reader.read(4096):
                pass  # nothing more is ever said on it; ignore whatever is
        log.info("vde switch closed the port", port=self.name, switch=self.directory)
        self.set_link(False)

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._ctl_writer is not None:
            self._ctl_writer.close()
            self._ctl_writer = None
        await super().aclose()
