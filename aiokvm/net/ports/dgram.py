"""QEMU's ``-netdev dgram`` as a switch port: one frame per datagram.

Unix (a local path and a remote path) or UDP (a local and a remote
host:port).  Frames go to the remote with ``sendto``, so the peer may come
and go: while it is away, sends fail and are counted by errno
(``write_ECONNREFUSED``, ``write_ENOENT``).  Frames come in from anyone who
sends to the local address, as with QEMU.  The link is always up: there is
no connection to lose.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from ...errors import ConfigError
from .fd import FramedFdPort


class DgramPort(FramedFdPort):
    kind = "dgram"

    def __init__(self, local: str | tuple[str, int], remote: str | tuple[str, int], *,
                 name: str | None = None, **kw) -> None:
        if isinstance(local, str) != isinstance(remote, str):
            raise ConfigError("dgram: local and remote must both be unix paths or both host:port")
        self.local, self.remote = local, remote
        self.family = socket.AF_UNIX if isinstance(local, str) else socket.AF_INET
        label = os.path.basename(local) if isinstance(local, str) else f"{local[0]}:{local[1]}"
        super().__init__(name or f"dgram-{label}", **kw)
        self._sock: socket.socket | None = None

    @property
    def describe(self) -> str:
        if self.family == socket.AF_UNIX:
            return f"dgram:unix:{self.local},remote={self.remote}"
        return f"dgram:udp:{self.local[0]}:{self.local[1]},remote={self.remote[0]}:{self.remote[1]}"

    async def open(self) -> DgramPort:
        sock = socket.socket(self.family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            if self.family == socket.AF_UNIX and os.path.exists(self.local):
                if not stat.S_ISSOCK(os.stat(self.local).st_mode):
                    raise ConfigError(f"{self.local} exists and is not a socket: give another path")
                os.unlink(self.local)  # a stale datagram socket file: binding needs the name free
            sock.bind(self.local)
        except ConfigError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot bind {self.describe}: {exc.strerror or exc}") from None
        self._sock = sock
        self._start_io(sock.fileno(), sock)
        return self

    @property
    def bound_port(self) -> int | None:
        return None if self._sock is None or self.family == socket.AF_UNIX else self._sock.getsockname()[1]

    def _write(self, frame: bytes) -> None:
        self._sock.sendto(frame, self.remote)

    def metrics(self) -> dict:
        return {**super().metrics(), "peer": self.describe}

    async def aclose(self) -> None:
        if self._sock is not None and self.family == socket.AF_UNIX:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.local)
        self._close_io()
        self._sock = None
        await super().aclose()
