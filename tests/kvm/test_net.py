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



async def test_a_hostile_guest_gets_needs_reset_while_its_neighbours_go_on():
    """nethostile breaks the ring rules six ways (bad address, length, loop, avail.idx, head, a
    read-only receive buffer) on the switch where a and b ping; each is refused with NEEDS_RESET,
    the hostile guest recovers after a reset, and the neighbours lose nothing."""
    async with Switch("br0") as sw, Machine(name="h") as h:
        nic_h = h.add_nic(sw, "02:00:00:00:00:0e")
        h.load("nethostile", cmdline="cpl=3 wait_ms=5000")
        hostile = asyncio.create_task(h.run(timeout=120))

        async def frame_when_rx_is_armed():
            while b"rxro armed" not in h.console.output:
                await asyncio.sleep(0.005)
            sw.ports["h"].send(bytes.fromhex("ffffffffffff" "02000000000b" "88b5") + bytes(46))

        arm = asyncio.create_task(frame_when_rx_is_armed())
        status, out, counters, fdb = await ping_pair(sw, count=100)
        await arm
        hostile_status = await hostile
        h_out = h.console.output.decode()
        h_stats = h.stats()["devices"]["net-h"]
    assert status.code == 0 and "ping: 100/100 replies" in out, out
    assert counters["tx_packets_count"] == counters["rx_packets_count"] == 101
    assert hostile_status.code == 0, h_out
    assert "6/6 modes reset, good frame after reset sent" in h_out
    assert h_stats["transport"]["needs_reset"] == 6
    assert nic_h.counters.rx_dropped_bad_ring == 1 and nic_h.counters.tx_packets_count == 1

STP_TIMERS = {"hello_time": 1.0, "max_age": 6.0, "forward_delay": 2.0}  # the fastest Linux allows


async def converged(switches, timeout: float = 30.0) -> None:
    """Until every port of every switch is forwarding or blocking (no listening/learning left)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        states = [p["state"] for sw in switches for p in sw.stp_state()["ports"].values()]
        if all(state in ("forwarding", "blocking", "disabled") for state in states):
            return
        await asyncio.sleep(0.2)
    raise AssertionError("STP did not converge")


@pytest.mark.slow
@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_vms_on_a_ring_of_stp_switches_reach_each_other_before_and_after_a_cut():
    ips = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    switches = [Switch(f"s{i}", stp=True, **STP_TIMERS) for i in range(3)]
    async with switches[0], switches[1], switches[2]:
        s0, s1, s2 = switches
        s0.link(s1)
        s1.link(s2)
        cut, _ = s2.link(s0)
        machines = [Machine(name=f"vm{i}") for i in range(3)]
        for i, (vm, sw) in enumerate(zip(machines, switches, strict=True)):
            await vm.__aenter__()
            vm.add_nic(sw, f"02:00:00:00:00:{i + 1:02x}")
        try:
            await converged(switches)
            blocked = [(sw.name, name) for sw in switches for name, p in sw.stp_state()["ports"].items()
                       if p["state"] == "blocking"]
            assert len(blocked) == 1  # one port of the ring is cut by STP
            for i, vm in enumerate(machines):
                others = ",".join(ip for j, ip in enumerate(ips) if j != i)
                vm.load("ping", cmdline=f"ip={ips[i]} dst={others} count=5 rounds=2 gap_ms=12000 "
                                        "linger_ms=4000 arp_ms=8000 cpl=3")
            runs = [asyncio.create_task(vm.run(timeout=120)) for vm in machines]
            while not all(vm.console.output.count(b"round 1 to") == 2 for vm in machines):
                assert not any(run.done() for run in runs), [vm.console.output for vm in machines]
                await asyncio.sleep(0.1)
            cut.unplug()  # a link of the ring goes: STP opens the blocked port within the gap
            statuses = await asyncio.gather(*runs)
            outputs = [vm.console.output.decode() for vm in machines]
        finally:
            for vm in machines:
                await vm.aclose()
        for status, out in zip(statuses, outputs, strict=True):
            assert status.code == 0, out
            assert "ping: 20/20 replies" in out  # 2 peers x 5 x 2 rounds, before and after the cut
        # No storm: the cables never filled up, and the switches forwarded a bounded number of frames.
        for sw in switches:
            for name, counters in sw.counters()["ports"].items():
                assert counters["drops"].get("queue_full", 0) == 0, (sw.name, name)
                assert counters["tx_frames"] < 2000, (sw.name, name, counters)
