"""A VDE-compatible control socket for a ``Switch``: ``vde_plug``, QEMU's
``-netdev vde,sock=DIR`` and other aiokvm processes join it as they would a
``vde_switch`` (the protocol is in ``ports/vde.py``).

Each client gets a port named ``vdeN`` (N the lowest free number from 1, or
the one it asked for), a ``VdeDataPort`` on a datagram socket bound at
``DIR/NNN.M`` and connected to the client.  A description containing
``vlan=V`` (what ``aiokvm run --net vde=DIR,vlan=V`` sends) makes the port an
untagged member of VLAN V on a VLAN-filtering switch.  The port goes when
the control connection closes.

Frame sizes: vde_switch truncates at 1518 bytes; here a datagram is read
whole up to 69,632 bytes (QEMU's own buffer), so jumbo frames pass between
our ports, and the limits that remain are the peers' (vde_plug reads 9,234
bytes at a time; QEMU 69,632) and the receiving NIC's MTU.

A hostile client: a request that is short, has the wrong magic or version,
or names no socket is answered by closing the connection (counted in
``refused``); a request is read for at most 5 s and 512 bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import stat

import structlog

from ..errors import ConfigError
from .ports.vde import (
    REQUEST_HEAD,
    SUN_LEN,
    VDE_MAGIC,
    VDE_VERSION,
    VdeDataPort,
    pack_sockaddr_un,
    unpack_sockaddr_un,
)

log = structlog.get_logger("aiokvm.net")

CTL_NAME = "ctl"
MAX_REQUEST = 512
REQUEST_TIMEOUT_S = 5.0
MAX_PORT_NUMBER = 65535
_VLAN = re.compile(r"(?:^|\s)vlan=(\d{1,4})(?:\s|$)")


def prepare_directory(directory: str) -> str:
    """Create ``directory`` if needed; refuse one that a live switch holds."""
    directory = os.path.realpath(directory)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the switch directory {directory}: {exc.strerror}") from None
    ctl = os.path.join(directory, CTL_NAME)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.stat(ctl).st_mode):
            raise ConfigError(f"{ctl} exists and is not a socket: give another directory")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(ctl)
            except ConnectionRefusedError:
                os.unlink(ctl)  # left by a switch that died
            else:
                raise ConfigError(f"a switch is already running in {directory}")
    return directory


class VdeServer:
    def __init__(self, switch, directory: str) -> None:
        self.switch = switch
        self.directory = os.path.realpath(directory)
        self.ctl_path = os.path.join(self.directory, CTL_NAME)
        self.refused = 0
        self.joined = 0
        self._server: asyncio.AbstractServer | None = None
        self._numbers: set[int] = set()
        self._clients: dict[asyncio.Task, asyncio.StreamWriter] = {}

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._client, self.ctl_path, limit=MAX_REQUEST)
        os.chmod(self.ctl_path, 0o700)

    def _pick_number(self, wanted: int) -> int | None:
        if wanted:
            return None if wanted in self._numbers or wanted > MAX_PORT_NUMBER else wanted
        number = 1
        while number in self._numbers:
            number += 1
        return number

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._clients[task] = writer
        port = None
        number = None
        try:
            request = await self._read_request(reader)
            parsed = self._parse(request)
            if parsed is None:
                self.refused += 1
                return
            wanted, client_path, description = parsed
            number = self._pick_number(wanted)
            if number is None:
                self.refused += 1
                return
            self._numbers.add(number)
            port = self._make_port(number, client_path, description)
            if port is None:
                self.refused += 1
                return
            writer.write(pack_sockaddr_un(port.bound_path))  # one write of 110 bytes, then nothing more
            vlan = _VLAN.search(description)
            try:
                self.switch.add_port(port, vlan=int(vlan[1]) if vlan and self.switch.bridge.vlan_filtering else None)
            except ConfigError as exc:
                log.warning("vde client refused", error=str(exc))
                self.refused += 1
                await port.aclose()
                port = None
                return
            self.joined += 1
            log.info("vde client joined", port=port.name, description=description)
            with contextlib.suppress(ConnectionError):
                while await reader.read(4096):
                    pass  # clients say nothing more; whatever they do say is ignored
        finally:
            if port is not None:
                with contextlib.suppress(ConfigError):
                    await self.switch.remove_port(port.name)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(port.bound_path)
                log.info("vde client left", port=port.name)
            if number is not None:
                self._numbers.discard(number)
            writer.close()
            self._clients.pop(task, None)

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> bytes:
        """The request: libvdeplug sends it in one write, but a stream may split it."""
        request = b""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REQUEST_TIMEOUT_S
        try:
            while len(request) < REQUEST_HEAD.size + SUN_LEN:
                chunk = await asyncio.wait_for(reader.read(MAX_REQUEST - len(request)),
                                               max(deadline - loop.time(), 0.001))
                if not chunk:
                    break
                request += chunk
        except (TimeoutError, ConnectionError):
            pass
        return request

    def _parse(self, request: bytes) -> tuple[int, str, str] | None:
        if len(request) < REQUEST_HEAD.size + SUN_LEN:
            return None
        magic, version, kind = REQUEST_HEAD.unpack_from(request)
        if magic != VDE_MAGIC or version != VDE_VERSION or kind & 0xFF:
            return None
        path = unpack_sockaddr_un(request[REQUEST_HEAD.size:REQUEST_HEAD.size + SUN_LEN])
        if path is None:
            return None
        description = request[REQUEST_HEAD.size + SUN_LEN:].split(b"\0", 1)[0].decode(errors="replace")
        return kind >> 8, path, description[:200]

    def _make_port(self, number: int, client_path: str, description: str) -> VdeDataPort | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(client_path)  # before the reply: the client unlinks its path after it
            path = os.path.join(self.directory, f"{number:03d}.{sock.fileno()}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            sock.bind(path)
            os.chmod(path, 0o600)
        except OSError as exc:
            log.warning("vde client's socket unreachable", path=client_path, error=str(exc))
            sock.close()
            return None
        port = VdeDataPort(f"vde{number}")
        port.bound_path = path
        port._serve(sock, description or client_path)
        return port

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        # Close the clients' connections and let their tasks end on the EOF,
        # rather than cancel them: Python 3.11's start_unix_server logs a
        # cancelled client task as "Exception in callback" (fixed in 3.12).
        for writer in list(self._clients.values()):
            writer.close()
        if self._clients:
            _done, stuck = await asyncio.wait(list(self._clients), timeout=REQUEST_TIMEOUT_S)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ctl_path)
