"""The host kernel joins aiokvm's switch: a TAP port and a VXLAN port, each
against the kernel's own devices in network namespaces this test creates and
removes.  Only addresses inside those namespaces are used."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess

import pytest

from aiokvm import Machine
from aiokvm.net import Switch
from tests.integration.netns import in_ns, netns
from tests.integration.test_net_tshark import tshark_protocols

pytestmark = [pytest.mark.kvm, pytest.mark.root]

GUEST_MAC = "02:00:00:00:00:0a"


async def netecho_vm(sw: Switch, ip: str = "10.0.0.1"):
    vm = Machine(name="guest")
    await vm.__aenter__()
    vm.add_nic(sw, GUEST_MAC)
    vm.load("netecho", cmdline=f"ip={ip} cpl=3 timeout_ms=0")
    return vm, asyncio.create_task(vm.run(timeout=120))


async def guest_pings(sw: Switch, dst: str, count: int = 10) -> str:
    async with Machine(name="pinger") as vm:
        vm.add_nic(sw, "02:00:00:00:00:0b")
        vm.load("ping", cmdline=f"ip=10.0.0.2 dst={dst} count={count} cpl=3")
        status = await vm.run(timeout=120)
        out = vm.console.output.decode()
    assert status.code == 0, out
    return out


async def test_a_tap_port_in_a_namespace_reaches_the_guest_both_ways(tmp_path):
    with netns("tap") as ns:
        async with Switch("br0") as sw:
            port = await sw.open_port(f"tap:tap0,netns={ns},name=host")
            assert not port.link_up  # created down, as the kernel makes it
            in_ns(ns, "ip", "addr", "add", "10.0.0.9/24", "dev", "tap0")
            in_ns(ns, "ip", "link", "set", "tap0", "up")
            sw.capture("host", tmp_path / "tap.pcap")
            vm, echo = await netecho_vm(sw)
            try:
                result = await asyncio.to_thread(in_ns, ns, "ping", "-c", "20", "-i", "0.05", "-W", "5", "10.0.0.1",
                                                 check=False)
                neigh = in_ns(ns, "ip", "-j", "neigh", "show", "dev", "tap0").stdout
                out = await guest_pings(sw, "10.0.0.9")
            finally:
                vm.stop()
                await echo
                await vm.__aexit__(None, None, None)
            assert port.link_up
            sw.capture("host", None)
            in_ns(ns, "ip", "link", "set", "tap0", "down")
            await asyncio.sleep(1.5)
            assert not port.link_up  # the host side's state reaches the switch
    assert " 0% packet loss" in result.stdout and "20 received" in result.stdout, result.stdout
    assert {row["dst"]: row.get("lladdr") for row in json.loads(neigh)}["10.0.0.1"] == GUEST_MAC
    assert "ping: 10/10 replies" in out
    protocols = tshark_protocols(tmp_path / "tap.pcap")
    assert protocols.count("eth:ethertype:ip:icmp:data") == 2 * 20 + 2 * 10  # both pings, both ways
    assert "eth:ethertype:arp" in protocols


async def test_tap_errors_are_one_line_config_errors():
    from aiokvm import ConfigError

    async with Switch("br0") as sw:
        with pytest.raises(ConfigError, match="no network namespace 'aiokvm-nope'"):
            await sw.open_port("tap:tap0,netns=aiokvm-nope")
        with netns("tap") as ns:
            first = await sw.open_port(f"tap:tap0,netns={ns},name=t1")
            with pytest.raises(ConfigError, match="tap tap0 is busy"):
                await sw.open_port(f"tap:tap0,netns={ns},name=t2")
            in_ns(ns, "ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
            with pytest.raises(ConfigError, match="veth0 exists and is not a tap"):
                await sw.open_port(f"tap:veth0,netns={ns},name=t3")
            await sw.remove_port(first.name)
            assert set(sw.ports) == set()
            assert in_ns(ns, "ip", "link", "show", "tap0", check=False).returncode != 0  # ours: gone with the port
            # a persistent tap made beforehand (`ip tuntap add`) is attached to, and stays after
            in_ns(ns, "ip", "tuntap", "add", "ptap", "mode", "tap")
            persistent = await sw.open_port(f"tap:ptap,netns={ns}")
            await sw.remove_port(persistent.name)
            assert in_ns(ns, "ip", "link", "show", "ptap").returncode == 0


def test_without_cap_net_admin_a_tap_port_is_a_one_line_error_that_says_what_to_do(tmp_path):
    import sys

    proc = subprocess.run(["setpriv", "--bounding-set", "-net_admin", sys.executable, "-m", "aiokvm", "switch",
                           str(tmp_path / "sw"), "--port", "tap:aiokvmx0"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "aiokvm: error: no permission to create or attach tap aiokvmx0: run as root, or make it persistent and "
        "yours first (`ip tuntap add aiokvmx0 mode tap user $USER`)"]
    assert not (tmp_path / "sw").exists()  # nothing left behind


def vxlan_underlay(ours: str, theirs: str):
    """Two namespaces joined by a veth pair: 10.99.0.1 (ours: our VTEP's socket) and 10.99.0.2 (theirs)."""
    in_ns(ours, "ip", "link", "add", "u0", "type", "veth", "peer", "name", "u1", "netns", theirs)
    in_ns(ours, "ip", "addr", "add", "10.99.0.1/24", "dev", "u0")
    in_ns(ours, "ip", "link", "set", "u0", "up")
    in_ns(theirs, "ip", "addr", "add", "10.99.0.2/24", "dev", "u1")
    in_ns(theirs, "ip", "link", "set", "u1", "up")


@pytest.mark.parametrize("udp_port", [4789, 8472])
async def test_our_vxlan_port_and_a_linux_vxlan_device_carry_a_ping(udp_port, tmp_path):
    with netns("vx") as ours, netns("vx") as theirs:
        vxlan_underlay(ours, theirs)
        in_ns(theirs, "ip", "link", "add", "vxlan0", "type", "vxlan", "id", "42", "dstport", str(udp_port),
              "local", "10.99.0.2", "dev", "u1")
        in_ns(theirs, "bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "vxlan0", "dst", "10.99.0.1")
        in_ns(theirs, "ip", "addr", "add", "10.0.0.9/24", "dev", "vxlan0")
        in_ns(theirs, "ip", "link", "set", "vxlan0", "up")
        underlay = tmp_path / "underlay.pcap"  # the kernel's view of our VTEP's UDP packets
        tshark = subprocess.Popen(["ip", "netns", "exec", theirs, "tshark", "-q", "-i", "u1", "-f",
                                   f"udp and src host 10.99.0.1 and dst port {udp_port}", "-c", "10",
                                   "-a", "duration:60", "-w", str(underlay)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        async with Switch("br0") as sw:
            port = await sw.open_port(f"vxlan:42,local=10.99.0.1:{udp_port},remote=10.99.0.2,netns={ours},name=vx")
            sw.capture("vx", tmp_path / "vx.pcap")
            vm, echo = await netecho_vm(sw)
            await asyncio.sleep(1.0)  # tshark is capturing before the first packet
            try:
                result = await asyncio.to_thread(in_ns, theirs, "ping", "-c", "20", "-i", "0.05", "-W", "5",
                                                 "10.0.0.1", check=False)
                out = await guest_pings(sw, "10.0.0.9")
                fdb = in_ns(theirs, "bridge", "fdb", "show", "dev", "vxlan0").stdout
            finally:
                vm.stop()
                await echo
                await vm.__aexit__(None, None, None)
            learned = port.learned()
            drops = dict(port.counters.drops)
    assert "20 received" in result.stdout, result.stdout
    assert "ping: 10/10 replies" in out
    assert "10.99.0.2" in set(learned.values())  # the kernel side's MAC, learned behind its VTEP
    assert re.search(rf"{GUEST_MAC} dst 10\.99\.0\.1", fdb), fdb  # Linux learned the guest behind ours
    assert drops == {}
    assert tshark_protocols(tmp_path / "vx.pcap").count("eth:ethertype:ip:icmp:data") == 2 * 20 + 2 * 10
    try:
        tshark.wait(timeout=30)
    finally:
        tshark.kill()
    fields = subprocess.run(["tshark", "-n", "-r", str(underlay), "-d", f"udp.port=={udp_port},vxlan", "-T", "fields",
                             "-e", "udp.checksum", "-e", "vxlan.vni", "-e", "vxlan.flags"],
                            capture_output=True, text=True, check=True).stdout.split("\n")
    rows = [line.split("\t") for line in fields if line]
    assert len(rows) == 10 and all(r[0] == "0x0000" and r[1] == "42" for r in rows), rows  # RFC 7348: zero checksum


async def test_vxlan_drops_bad_headers_and_other_vnis_as_linux_does():
    async with Switch("br0") as sw:
        port = await sw.open_port("vxlan:42,local=127.0.0.1:0,remote=127.0.0.1,name=vx")
        inner = bytes.fromhex("ffffffffffff" "02000000000c" "88b5") + bytes(46)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            target = ("127.0.0.1", port.bound_port)
            raw.sendto(bytes.fromhex("0c000000" "00002a00") + inner, target)  # another flag bit
            raw.sendto(bytes.fromhex("08000000" "00002b00") + inner, target)  # VNI 43
            raw.sendto(bytes.fromhex("08000000" "00002a01") + inner, target)  # reserved byte set
            raw.sendto(bytes.fromhex("0800"), target)  # a runt
            raw.sendto(bytes.fromhex("08000000" "00002a00") + inner, target)  # the good one
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while port.counters.rx_frames < 1 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert port.counters.rx_frames == 1
        assert dict(port.counters.drops) == {"bad_header": 2, "other_vni": 1, "runt": 1}
        assert port.learned() == {"02:00:00:00:00:0c": "127.0.0.1"}


async def test_vxlan_learned_vteps_age_out_and_unknown_destinations_flood():
    async with Switch("br0") as sw:
        port = await sw.open_port("vxlan:42,local=127.0.0.1:0,remote=127.0.0.2,remote=127.0.0.3,name=vx")
        port.ageing_s = 0.2
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            raw.sendto(bytes.fromhex("08000000" "00002a00" "ffffffffffff" "02000000000c" "88b5") + bytes(46),
                       ("127.0.0.1", port.bound_port))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not port.learned() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert port.learned() == {"02:00:00:00:00:0c": "127.0.0.1"}
        assert port._targets(bytes.fromhex("02000000000c") + bytes(54)) == ["127.0.0.1"]
        await asyncio.sleep(0.3)
        assert port.learned() == {}  # aged, like an FDB entry
        assert port._targets(bytes.fromhex("02000000000c") + bytes(54)) == ["127.0.0.2", "127.0.0.3"]  # flooded


async def test_two_aiokvm_switches_joined_by_vxlan_carry_a_ping():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
        a.bind(("127.0.0.1", 0)), b.bind(("127.0.0.1", 0))
        pa, pb = a.getsockname()[1], b.getsockname()[1]
    async with Switch("one") as one, Switch("two") as two:
        await one.open_port(f"vxlan:7,local=127.0.0.1:{pa},remote=127.0.0.1,dst_port={pb},name=vx")
        vx2 = await two.open_port(f"vxlan:7,local=127.0.0.1:{pb},remote=127.0.0.1,dst_port={pa},name=vx")
        vm, echo = await netecho_vm(one)
        try:
            out = await guest_pings(two, "10.0.0.1", count=20)
        finally:
            vm.stop()
            await echo
            await vm.__aexit__(None, None, None)
        assert vx2.learned() == {GUEST_MAC: "127.0.0.1"}
    assert "ping: 20/20 replies" in out


STP_TIMERS = {"hello_time": 1.0, "max_age": 6.0, "forward_delay": 2.0}  # the fastest Linux allows


def kernel_bridge_ports(ns: str) -> dict[str, str]:
    return {row["ifname"]: row["state"] for row in json.loads(in_ns(ns, "bridge", "-j", "link", "show").stdout)
            if row.get("master") == "br0"}


def kernel_root(ns: str) -> str:
    """The kernel's root bridge id as ``PPPP.MMMMMMMMMMMM`` (iproute2 prints MAC bytes without
    leading zeros: ``8000.2:a0:b:0:0:1``)."""
    info = json.loads(in_ns(ns, "ip", "-j", "-d", "link", "show", "br0").stdout)[0]["linkinfo"]["info_data"]
    priority, _, mac = info["root_id"].partition(".")
    return f"{int(priority, 16):04x}." + "".join(f"{int(b, 16):02x}" for b in mac.split(":"))


async def stp_settled(sw: Switch, ns: str, timeout: float = 40.0) -> tuple[dict, dict]:
    """Until no port on either side is listening or learning (and each side has its ports)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        ours = {name: p["state"] for name, p in sw.stp_state()["ports"].items() if name.startswith("tap")}
        theirs = kernel_bridge_ports(ns)
        states = [*ours.values(), *(s for name, s in theirs.items() if name.startswith("tap"))]
        if len(states) == 4 and all(s in ("forwarding", "blocking", "disabled") for s in states):
            return ours, theirs
        await asyncio.sleep(0.25)
    raise AssertionError(f"STP did not settle: ours {sw.stp_state()['ports']}, kernel {kernel_bridge_ports(ns)}")


@pytest.mark.slow
@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_our_switch_and_a_kernel_bridge_joined_twice_break_the_loop_with_stp():
    with netns("stp") as ns:
        in_ns(ns, "ip", "link", "add", "br0", "type", "bridge", "stp_state", "1", "priority", "4096",
              "hello_time", "100", "max_age", "600", "forward_delay", "200")
        in_ns(ns, "ip", "link", "add", "h0", "type", "veth", "peer", "name", "h1")
        in_ns(ns, "ip", "link", "set", "h1", "master", "br0")
        in_ns(ns, "ip", "addr", "add", "10.0.0.9/24", "dev", "h0")
        async with Switch("ours", stp=True, **STP_TIMERS) as sw:
            for tap in ("tapa", "tapb"):
                await sw.open_port(f"tap:{tap},netns={ns}")
                in_ns(ns, "ip", "link", "set", tap, "master", "br0")
            for dev in ("tapa", "tapb", "h0", "h1", "br0"):
                in_ns(ns, "ip", "link", "set", dev, "up")
            vm, echo = await netecho_vm(sw)
            try:
                ours, theirs = await stp_settled(sw, ns)
                blocked = [s for s in [*ours.values(), theirs["tapa"], theirs["tapb"]] if s == "blocking"]
                assert len(blocked) == 1, (ours, theirs)  # the loop is cut in one place
                assert ours["tapa"] == "blocking" or ours["tapb"] == "blocking"  # the kernel (4096) is root
                assert sw.stp_state()["root_id"].lower() == kernel_root(ns)
                first = await asyncio.to_thread(in_ns, ns, "ping", "-c", "5", "-i", "0.2", "-W", "3", "10.0.0.1",
                                                check=False)
                before = sum(p["rx_frames"] for name, p in sw.counters()["ports"].items() if name.startswith("tap"))
                await asyncio.to_thread(in_ns, ns, "ping", "-c", "1", "-W", "1", "-b", "10.0.0.255", check=False)
                await asyncio.sleep(3)  # a broadcast in a loop would circle forever: it must not
                after = sum(p["rx_frames"] for name, p in sw.counters()["ports"].items() if name.startswith("tap"))
                assert after - before < 40, after - before  # BPDUs (1/s per port) and the one broadcast
                # cut the link that forwards: the blocked one takes over once the tree reconverges
                forwarding = next(name for name, state in ours.items() if state == "forwarding")
                in_ns(ns, "ip", "link", "set", forwarding, "down")
                await asyncio.sleep(2)  # our side sees carrier go within a second
                ours, theirs = await stp_settled(sw, ns)
                assert ours[forwarding] == "disabled" and "forwarding" in ours.values()
                second = await asyncio.to_thread(in_ns, ns, "ping", "-c", "5", "-i", "0.2", "-W", "3", "10.0.0.1",
                                                 check=False)
            finally:
                vm.stop()
                await echo
                await vm.__aexit__(None, None, None)
    assert "5 received" in first.stdout, first.stdout
    assert "5 received" in second.stdout, second.stdout
