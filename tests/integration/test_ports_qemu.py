"""QEMU joins aiokvm's switch: a QEMU microvm running the guest kit's
``netecho`` (the same ELF aiokvm runs) on ``-netdev stream`` or ``dgram``
answers an aiokvm VM's ``ping`` through the switch.  Loopback and unix
sockets only."""

from __future__ import annotations

import asyncio
import socket
import subprocess

import pytest

from aiokvm import Machine, guests
from aiokvm.net import Switch
from tests.conftest import QEMU
from tests.integration.test_net_tshark import tshark_protocols
from tests.kvm.test_disks import QEMU_BASE

pytestmark = [pytest.mark.kvm, pytest.mark.qemu]

ECHO_MAC, PING_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def qemu_netecho(netdev: str, count: int) -> subprocess.Popen:
    """netecho under QEMU at 10.0.0.1; it ends after the ARP request and ``count`` echo requests."""
    return subprocess.Popen(
        [QEMU, *QEMU_BASE, "-global", "virtio-mmio.force-legacy=false", "-netdev", f"{netdev},id=n0",
         "-device", f"virtio-net-device,netdev=n0,mac={ECHO_MAC}", "-kernel", str(guests.path("netecho")),
         "-append", f"ip=10.0.0.1 cpl=3 n={count + 1} timeout_ms=60000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


async def ping_qemu(sw: Switch, qemu: subprocess.Popen, count: int) -> tuple[str, str]:
    """ping from an aiokvm VM (10.0.0.2) on ``sw`` to the QEMU netecho; (ping's output, netecho's)."""
    try:
        async with Machine(name="pinger") as vm:
            vm.add_nic(sw, PING_MAC)
            vm.load("ping", cmdline=f"ip=10.0.0.2 dst=10.0.0.1 count={count} cpl=3 arp_ms=20000")
            status = await vm.run(timeout=120)
            out = vm.console.output.decode()
        echo_out, _ = await asyncio.to_thread(qemu.communicate, timeout=60)
    finally:
        qemu.kill()
    assert status.code == 0, out
    return out, echo_out.decode()


async def test_qemu_joins_over_stream_to_our_unix_server(tmp_path):
    path = str(tmp_path / "qemu.sock")
    async with Switch("br0") as sw:
        port = await sw.open_port(f"stream:unix:{path},server,name=qemu")
        assert not port.link_up  # nobody connected yet
        sw.capture("qemu", tmp_path / "qemu.pcap")
        qemu = qemu_netecho(f"stream,server=off,addr.type=unix,addr.path={path}", 100)
        out, echo = await ping_qemu(sw, qemu, 100)
        # QEMU has exited; its connection's end reaches the loop in a callback of its own
        # (CI once read the FDB a moment before it under the asyncio loop).
        async with asyncio.timeout(10):
            while port.link_up:
                await asyncio.sleep(0.01)
        counters = sw.counters()["ports"]["qemu"]
        fdb = {row.mac: row.port for row in sw.fdb() if row.kind == "learned"}
    assert "ping: 100/100 replies" in out
    assert "netecho: frames 101 arp 1 icmp 100 udp 0 other 0" in echo
    assert counters["rx_frames"] == 101 and counters["drops"] == {}
    assert tshark_protocols(tmp_path / "qemu.pcap").count("eth:ethertype:ip:icmp:data") == 200
    assert fdb == {}  # QEMU left (link down) and the pinger closed: both ports' entries flushed, as Linux does


async def test_our_stream_client_waits_for_a_qemu_tcp_server_and_connects(tmp_path):
    tcp = free_port()
    async with Switch("br0") as sw:
        port = await sw.open_port(f"stream:tcp:127.0.0.1:{tcp},reconnect=0.1,name=qemu")
        await asyncio.sleep(0.3)
        assert not port.link_up  # no server yet: retrying
        qemu = qemu_netecho(f"stream,server=on,addr.type=inet,addr.host=127.0.0.1,addr.port={tcp}", 20)
        out, echo = await ping_qemu(sw, qemu, 20)
        async with asyncio.timeout(10):  # QEMU exited: the link goes down with it
            while port.link_up:
                await asyncio.sleep(0.01)
        assert port.connections == 1
    assert "ping: 20/20 replies" in out and "icmp 20" in echo


async def test_qemu_joins_over_dgram():
    ours, theirs = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    async with Switch("br0") as sw:
        await sw.open_port(f"dgram:udp:127.0.0.1:{ours},remote=127.0.0.1:{theirs},name=qemu")
        qemu = qemu_netecho(f"dgram,local.type=inet,local.host=127.0.0.1,local.port={theirs},"
                            f"remote.type=inet,remote.host=127.0.0.1,remote.port={ours}", 20)
        out, echo = await ping_qemu(sw, qemu, 20)
    assert "ping: 20/20 replies" in out and "netecho: frames 21 arp 1 icmp 20" in echo
