"""virtio-net NICs on machines, through the switch (guest-driven tests come with the guest kit's driver)."""

from __future__ import annotations

import asyncio

import pytest

from aiokvm import ConfigError, Machine
from aiokvm.net import Switch

pytestmark = pytest.mark.kvm


async def test_add_nic_puts_a_virtio_net_device_on_a_switch_port_named_after_the_vm():
    async with Switch("br0", vlan_filtering=True) as sw:
        async with Machine(name="a") as a, Machine(name="b") as b:
            nic_a = a.add_nic(sw, "02:00:00:00:00:0a")
            b.add_nic(sw, "02:00:00:00:00:0b", port="b0", vlan=10)
            a.load("hello")
            assert "virtio_mmio.device=512@0xfeb00e00:12" in a.cmdline
            assert set(sw.ports) == {"a", "b0"}
            assert a.stats()["devices"]["net-a"]["kind"] == "virtio-net"
            assert nic_a.mac == bytes.fromhex("02000000000a")
            with pytest.raises(ConfigError, match="already has a port named 'a'"):
                b.add_nic(sw, "02:00:00:00:00:0c", port="a")
            assert len(b.devices.virtio) == 1  # the refused NIC took no slot
        assert sw.ports == {}  # both machines closed: their ports went with them


async def ping_pair(sw: Switch, *, echo_cmd: str = "", ping_cmd: str = "", vlan_a=None, vlan_b=None,
                    count: int = 100):
    """netecho on VM a (10.0.0.1), ping from VM b (10.0.0.2); returns ping's status, output and a's stats."""
    async with Machine(name="a") as a, Machine(name="b") as b:
        a.add_nic(sw, "02:00:00:00:00:0a", vlan=vlan_a)
        b.add_nic(sw, "02:00:00:00:00:0b", vlan=vlan_b)
        # netecho ends after the ARP request and the echo requests (as under QEMU, tests/integration)
        a.load("netecho", cmdline=f"ip=10.0.0.1 cpl=3 n={count + 1} timeout_ms=30000 {echo_cmd}")
        b.load("ping", cmdline=f"ip=10.0.0.2 dst=10.0.0.1 count={count} cpl=3 {ping_cmd}")
        echo = asyncio.create_task(a.run(timeout=120))
        status = await b.run(timeout=120)
        fdb = {row.mac: row.port for row in sw.fdb() if row.kind == "learned"}
        assert (await echo).code == 0
        assert f"netecho: frames {count + 1} arp 1 icmp {count} udp 0 other 0" in a.console.output.decode()
        return status, b.console.output.decode(), a.stats()["devices"]["net-a"]["counters"], fdb


@pytest.mark.parametrize("opts", ["", "mrg=0", "rxbuf=64 size=1400"],
                         ids=["mrg_rxbuf", "no_mrg_rxbuf", "frames_span_64_byte_buffers"])
async def test_two_vms_ping_each_other_through_the_switch(opts):
    async with Switch("br0") as sw:
        status, out, counters, fdb = await ping_pair(sw, echo_cmd=opts, ping_cmd=opts)
    assert status.code == 0, out
    assert "ping: 100/100 replies" in out
    assert fdb == {"02:00:00:00:00:0a": "a", "02:00:00:00:00:0b": "b"}
    # ARP reply plus 100 echo replies out of a, ARP request plus 100 requests in
    assert counters["tx_packets_count"] == counters["rx_packets_count"] == 101
    assert counters["tx_malformed_frames"] == counters["rx_dropped_queue_full"] == 0


async def test_vlans_isolate_vms_end_to_end(tmp_path):
    async with Switch("br0", vlan_filtering=True) as sw:
        status, out, _, _ = await ping_pair(sw, vlan_a=10, vlan_b=10, count=20)
        assert status.code == 0 and "ping: 20/20 replies" in out, out
        # A VM in VLAN 20 pings the address in VLAN 10: nobody answers its ARP.
        async with Machine(name="a") as a, Machine(name="c") as c:
            a.add_nic(sw, "02:00:00:00:00:0a", vlan=10)
            c.add_nic(sw, "02:00:00:00:00:0c", vlan=20)
            sw.capture("c", tmp_path / "c.pcap")
            a.load("netecho", cmdline="ip=10.0.0.1 cpl=3 timeout_ms=0")
            c.load("ping", cmdline="ip=10.0.0.3 dst=10.0.0.1 count=3 cpl=3")
            echo = asyncio.create_task(a.run(timeout=120))
            status = await c.run(timeout=120)
            a.stop()
            await echo
            sw.capture("c", None)
        assert status.code == 1 and "ping: 0/3 replies" in c.console.output.decode()
    from aiokvm.net import PcapReader

    with PcapReader(tmp_path / "c.pcap") as reader:
        sources = {frame[6:12].hex(":") for _, frame in reader}
    assert sources == {"02:00:00:00:00:0c"}  # only its own ARP requests, nothing from VLAN 10


async def test_a_guest_that_never_posts_buffers_costs_bounded_memory():
    import tracemalloc

    async with Switch("br0") as sw, Machine(name="mute") as vm:
        nic = vm.add_nic(sw, "02:00:00:00:00:0a")  # the guest (hello) has no virtio-net driver
        vm.load("hello")
        frame = bytes.fromhex("02000000000a" "02000000000b" "0800") + bytes(1500)
        port = sw.ports["mute"]  # the switch's side: what it sends towards the VM
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(100_000):
            port.send(frame)
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        counters = nic.counters
        assert counters.rx_held == 256 and counters.rx_dropped_queue_full == 100_000 - 256
        assert grown < 2 << 20  # the 1 MiB hold bound plus bookkeeping
