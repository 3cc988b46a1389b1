"""The switch on the loop: virtio-net NICs (driven without a guest), VLANs,
cables between switches, captures, and bounded storms."""

from __future__ import annotations

import asyncio

import pytest

from aiokvm.errors import ConfigError
from aiokvm.net import PcapReader, Switch
from aiokvm.net.ports import cable
from tests.unit.test_virtio_net import Nic

BROADCAST = b"\xff" * 6


def mac(n: int) -> str:
    return f"02:00:00:00:00:{n:02x}"


def eth(dst: bytes, src: str, payload: bytes = b"x" * 46) -> bytes:
    return dst + bytes.fromhex(src.replace(":", "")) + b"\x08\x00" + payload


class Host:
    """A NIC with a driver (no guest): sends through its tx ring, receives into rx buffers."""

    def __init__(self, switch: Switch, n: int, *, port: str | None = None, vlan: int | None = None) -> None:
        self.mac = mac(n)
        self.nic = Nic()
        self.nic.device.mac = bytes.fromhex(self.mac.replace(":", ""))
        self.nic.post_rx(32)
        self.port = switch.add_nic(self.nic.device, port=port or f"h{n}", vlan=vlan)

    def send(self, dst: bytes, payload: bytes = b"x" * 46) -> bytes:
        frame = eth(dst, self.mac, payload)
        self.nic.send(frame)
        return frame

    def got(self) -> list[bytes]:
        return [data for _, data in self.nic.received()]


async def test_two_nics_talk_and_the_fdb_learns_both():
    async with Switch("sw") as sw:
        a, b = Host(sw, 1), Host(sw, 2)
        hello = a.send(BROADCAST)
        assert b.got() == [hello] and a.got() == []  # flooded, not back to the sender
        reply = b.send(bytes.fromhex(a.mac.replace(":", "")))
        assert a.got() == [reply]
        learned = {row.mac: row.port for row in sw.fdb() if row.kind == "learned"}
        assert learned == {a.mac: "h1", b.mac: "h2"}
        counters = sw.counters()["ports"]
        assert counters["h1"]["rx_frames"] == 1 and counters["h1"]["tx_frames"] == 1



async def test_one_transmit_notify_crosses_the_switch_as_one_batch_per_port():
    async with Switch("sw") as sw:
        a, b, c = Host(sw, 1), Host(sw, 2), Host(sw, 3)
        b.send(BROADCAST), c.send(BROADCAST)  # the FDB learns b and c
        a.got(), b.got(), c.got()
        calls = {"h2": [], "h3": []}
        for name in calls:
            port = sw.ports[name]
            real = port.send_many
            port.send_many = lambda frames, real=real, name=name: calls[name].append(len(frames)) or real(frames)
        to_b = [eth(bytes.fromhex(b.mac.replace(":", "")), a.mac, bytes([i]) * 46) for i in range(5)]
        to_c = [eth(bytes.fromhex(c.mac.replace(":", "")), a.mac, bytes([i]) * 46) for i in range(3)]
        batch = [to_b[0], to_c[0], to_b[1], to_b[2], to_c[1], to_b[3], to_c[2], to_b[4]]
        for frame in batch:
            a.nic.tx.add([bytes(12), frame], [])
        a.nic.w(0x50, 1)  # QueueNotify: the whole ring in one notify
        assert calls == {"h2": [5], "h3": [3]}
        assert b.got() == to_b and c.got() == to_c  # each port's frames in order
        assert b.nic.irqs <= 2 and sw.counters()["ports"]["h2"]["tx_frames"] == 6

async def test_vlans_isolate_and_a_capture_shows_it(tmp_path):
    async with Switch("sw", vlan_filtering=True) as sw:
        a, b, c = Host(sw, 1, vlan=10), Host(sw, 2, vlan=10), Host(sw, 3, vlan=20)
        sw.capture("h3", tmp_path / "h3.pcap")
        frame = a.send(BROADCAST)
        assert b.got() == [frame] and c.got() == []
        c.send(BROADCAST)
        assert a.got() == [] and b.got() == []
        sw.capture("h3", None)
    with PcapReader(tmp_path / "h3.pcap") as reader:
        captured = [f for _, f in reader]
    assert [f[6:12] for f in captured] == [bytes.fromhex(c.mac.replace(":", ""))]  # only its own frame


async def test_vlans_need_vlan_filtering():
    async with Switch("sw") as sw:
        with pytest.raises(ConfigError, match="vlan_filtering=True"):
            Host(sw, 1, vlan=10)


async def test_linked_switches_carry_frames_across():
    async with Switch("s1") as s1, Switch("s2") as s2:
        s1.link(s2)
        a, b = Host(s1, 1), Host(s2, 2)
        frame = a.send(BROADCAST)
        await asyncio.sleep(0)  # a cable delivers on the next loop turn
        await asyncio.sleep(0)
        assert b.got() == [frame]


async def test_a_ring_without_stp_storms_but_stays_bounded_and_counted():
    async with Switch("s1") as s1, Switch("s2") as s2, Switch("s3") as s3:
        s1.link(s2)
        s2.link(s3)
        s3.link(s1)
        a = Host(s1, 1)
        a.send(BROADCAST)
        for _ in range(300):  # the broadcast circles forever: nothing recurses or grows
            await asyncio.sleep(0)
        queued = sum(len(p._queue) for s in (s1, s2, s3) for p in s.ports.values() if hasattr(p, "_queue"))
        assert queued <= 6 * 1024
        assert a.nic.c.rx_held <= 256  # the NIC's own hold bound


async def test_a_port_goes_away_when_its_device_closes():
    async with Switch("sw") as sw:
        a, b = Host(sw, 1), Host(sw, 2)
        a.send(BROADCAST)
        await b.nic.device.aclose()
        assert set(sw.ports) == {"h1"}
        assert all(row.port != "h2" for row in sw.fdb())
        a.send(BROADCAST)  # flooding to nobody is fine


async def test_port_names_are_unique_and_a_closed_switch_refuses():
    sw = Switch("sw")
    async with sw:
        Host(sw, 1, port="p")
        with pytest.raises(ConfigError, match="already has a port named 'p'"):
            Host(sw, 2, port="p")
    with pytest.raises(ConfigError, match="closed"):
        Host(sw, 3)


async def test_a_cable_pulled_drops_carrier_on_both_ends():
    async with Switch("s1") as s1, Switch("s2") as s2:
        a_end, b_end = s1.link(s2)
        a_end.unplug()
        assert not a_end.link_up and not b_end.link_up
        assert not s1.bridge.ports[a_end.name].link_up and not s2.bridge.ports[b_end.name].link_up


def test_a_cable_outside_a_switch_counts_what_it_cannot_deliver():
    a, b = cable("a", "b")
    b.unplug()
    assert not a.send(b"x" * 60) and a.counters.drops["unplugged"] == 1


async def test_the_bridge_address_is_not_aged_by_the_loops_epoch():
    async with Switch("sw") as sw:
        await asyncio.sleep(0.05)
        [own] = sw.fdb()
        assert own.kind == "permanent" and own.port is None and own.age < 5.0
