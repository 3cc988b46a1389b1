"""The guest kit's network programs under QEMU microvm with QEMU's own
virtio-net-device: the same ELFs that run under aiokvm ping each other over
a ``-netdev dgram`` pair on loopback."""

from __future__ import annotations

import socket
import subprocess

import pytest

from aiokvm import guests
from tests.conftest import QEMU
from tests.kvm.test_disks import QEMU_BASE

pytestmark = [pytest.mark.kvm, pytest.mark.qemu]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def qemu_nic(name: str, cmdline: str, mac: str, local: int, remote: int) -> subprocess.Popen:
    netdev = (f"dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port={local},"
              f"remote.type=inet,remote.host=127.0.0.1,remote.port={remote}")
    return subprocess.Popen(
        [QEMU, *QEMU_BASE, "-global", "virtio-mmio.force-legacy=false", "-netdev", netdev,
         "-device", f"virtio-net-device,netdev=n0,mac={mac}", "-kernel", str(guests.path(name)),
         "-append", cmdline],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("opts", ["", "mrg=0", "rxbuf=64 size=1400"])
def test_the_same_elfs_ping_each_other_under_qemu(opts):
    a_port, b_port = free_udp_port(), free_udp_port()
    count = 20
    # netecho stops after the ARP request and the echo requests
    echo = qemu_nic("netecho", f"ip=10.0.0.1 cpl=3 n={count + 1} timeout_ms=30000 {opts}", "02:00:00:00:00:0a",
                    a_port, b_port)
    ping = qemu_nic("ping", f"ip=10.0.0.2 dst=10.0.0.1 count={count} cpl=3 {opts}", "02:00:00:00:00:0b",
                    b_port, a_port)
    try:
        ping_out, _ = ping.communicate(timeout=60)
        echo_out, _ = echo.communicate(timeout=60)
    finally:
        for proc in (ping, echo):
            proc.kill()
    ping_text, echo_text = ping_out.decode(), echo_out.decode()
    assert ping.returncode == 1, ping_text  # isa-debug-exit: (0 << 1) | 1
    assert f"ping: {count}/{count} replies" in ping_text
    assert echo.returncode == 1, echo_text
    assert f"netecho: frames {count + 1} arp 1 icmp {count} udp 0 other 0" in echo_text
