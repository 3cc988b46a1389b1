"""A TAP device as a switch port: the host kernel's side of the wire.

``/dev/net/tun`` with ``IFF_TAP | IFF_NO_PI`` (one Ethernet frame per read
and per write, no packet-information prefix and no vnet header: the switch
carries no offloads).  The port creates the device, or attaches to an
existing persistent one, optionally inside a named network namespace (the
device lives where the opening thread was).  A device made here goes away
when the port closes; a persistent one stays.

The link state the switch sees is the host side's: the interface's IFF_UP,
polled once a second (the kernel drops frames written to a tap that is
down, and the guest sees carrier follow).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import struct

from ...errors import ConfigError
from ..netns import run_in_netns
from .fd import FramedFdPort

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_UP = 0x1
SIOCGIFFLAGS = 0x8913
IFNAMSIZ = 16
LINK_POLL_S = 1.0


def _ifreq(name: str, flags: int = 0) -> bytes:
    return struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), flags)


def check_ifname(name: str) -> None:
    if not name or len(name.encode()) >= IFNAMSIZ or any(c in name for c in "/ \t\n:") or name in (".", ".."):
        raise ConfigError(f"tap name {name!r} is not a valid interface name (1-15 characters, no '/', ':' or "
                          "spaces)")


def open_tap(ifname: str) -> tuple[int, socket.socket]:
    """The tap's fd, and a socket for its flags, in the calling thread's namespace."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError("no /dev/net/tun on this host: load the tun module (`modprobe tun`)") from None
    except PermissionError:
        raise ConfigError("cannot open /dev/net/tun: run as root, or give your user access to it") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(ifname, IFF_TAP | IFF_NO_PI))
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EPERM:
            raise ConfigError(f"no permission to create or attach tap {ifname}: run as root, or make it "
                              f"persistent and yours first (`ip tuntap add {ifname} mode tap user $USER`)") from None
        if exc.errno == errno.EBUSY:
            raise ConfigError(f"tap {ifname} is busy: another process has it open (close it, or pick another "
                              "name)") from None
        if exc.errno == errno.EINVAL:
            raise ConfigError(f"{ifname} exists and is not a tap device (a tun, or another kind of interface): "
                              "pick another name") from None
        raise ConfigError(f"cannot set up tap {ifname}: {exc.strerror}") from None
    flags_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    return fd, flags_socket


class TapPort(FramedFdPort):
    kind = "tap"

    def __init__(self, ifname: str, *, name: str | None = None, netns: str | None = None, **kw) -> None:
        check_ifname(ifname)
        super().__init__(name or ifname, **kw)
        self.ifname = ifname
        self.netns = netns
        self._flags_socket: socket.socket | None = None
        self._poll: asyncio.TimerHandle | None = None

    async def open(self) -> TapPort:
        fd, self._flags_socket = run_in_netns(self.netns, lambda: open_tap(self.ifname))
        self._start_io(fd)
        self.link_up = self._host_up()
        self._poll = self._loop.call_later(LINK_POLL_S, self._poll_link)
        return self

    def _host_up(self) -> bool:
        try:
            raw = fcntl.ioctl(self._flags_socket.fileno(), SIOCGIFFLAGS, _ifreq(self.ifname))
        except OSError:
            return False  # gone (deleted under us): no carrier
        return bool(struct.unpack_from("H", raw, IFNAMSIZ)[0] & IFF_UP)

    def _poll_link(self) -> None:
        if self.failed:  # our fd is dead: a new device of that name is not ours (no link up)
            self._poll = None
            return
        self.set_link(self._host_up())
        self._poll = self._loop.call_later(LINK_POLL_S, self._poll_link)

    def metrics(self) -> dict:
        return {**super().metrics(), "ifname": self.ifname, "netns": self.netns}

    async def aclose(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        self._close_io()
        if self._flags_socket is not None:
            self._flags_socket.close()
            self._flags_socket = None
        self.link_up = False
        await super().aclose()
