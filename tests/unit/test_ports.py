"""Ports to the outside, against raw sockets on loopback and unix paths:
framing, reassembly, bounds, link state, and the spec parser."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from aiokvm.errors import ConfigError
from aiokvm.net import Switch
from aiokvm.net.ports.base import SwitchPort
from aiokvm.net.ports.spec import parse_port_spec, port_from_spec

FRAME = bytes.fromhex("02000000000b" "02000000000a" "88b5") + bytes(range(46))


async def wait_for(predicate, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


class SinkPort(SwitchPort):
    """A port that records every frame the switch sends it."""

    kind = "sink"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.frames: list[bytes] = []

    def send(self, frame: bytes) -> bool:
        self.frames.append(frame)
        return True


class Sink:
    """A sink port added to ``sw`` (the far side of a frame's path)."""

    def __init__(self, sw: Switch, name: str = "sink") -> None:
        self.port = sw.add_port(SinkPort(name))
        self.frames = self.port.frames


async def stream_pair(sw: Switch, path: str):
    """A sink on ``sw``, a stream server port there, and a raw socket connected to it."""
    sink = Sink(sw)
    port = await sw.open_port(f"stream:unix:{path},server,name=peer")
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await asyncio.to_thread(peer.connect, path)
    await wait_for(lambda: port.link_up)
    return sink, port, peer


async def test_stream_frames_are_reassembled_across_any_split(tmp_path):
    path = str(tmp_path / "s.sock")
    async with Switch("sw") as sw:
        sink, port, peer = await stream_pair(sw, path)
        frames = [FRAME[:12] + b"\x88\xb5" + bytes([i]) * (46 + 37 * i) for i in range(20)]
        wire = b"".join(struct.pack(">I", len(f)) + f for f in frames)
        for i in range(0, len(wire), 7):  # 7-byte pieces: lengths and frames cut everywhere
            peer.send(wire[i:i + 7])
            await asyncio.sleep(0)
        await wait_for(lambda: len(sink.frames) == 20)
        assert sink.frames == frames
        # and back: the switch floods a frame from the sink's side to the peer, length-prefixed
        sink.port.incoming(bytes.fromhex("ffffffffffff" "02000000000c" "88b5") + b"x" * 46)
        peer.settimeout(5)
        got = await asyncio.to_thread(peer.recv, 4096)
        assert got[:4] == struct.pack(">I", 60) and got[4:10] == b"\xff" * 6
        peer.close()
        await wait_for(lambda: not port.link_up)


async def test_stream_oversized_length_closes_the_connection_and_counts_it(tmp_path):
    path = str(tmp_path / "s.sock")
    async with Switch("sw") as sw:
        sink, port, peer = await stream_pair(sw, path)
        peer.send(struct.pack(">I", 13) + b"r" * 13)  # a runt: dropped, counted, the stream goes on
        peer.send(struct.pack(">I", len(FRAME)) + FRAME + struct.pack(">I", 4096 + 65536 + 1) + b"junk")
        await wait_for(lambda: not port.link_up)
        assert sink.frames == [FRAME]
        assert port.counters.drops == {"runt": 1, "oversize": 1}
        peer.settimeout(5)
        assert await asyncio.to_thread(peer.recv, 10) == b""  # closed by us
        peer.close()


async def test_a_stream_server_takes_one_peer_at_a_time(tmp_path):
    path = str(tmp_path / "s.sock")
    async with Switch("sw") as sw:
        port = await sw.open_port(f"stream:unix:{path},server,name=peer")
        first, second = (socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2))
        await asyncio.to_thread(first.connect, path)
        await wait_for(lambda: port.link_up)
        await asyncio.to_thread(second.connect, path)
        await wait_for(lambda: port.refused_connections == 1)
        second.settimeout(5)
        assert await asyncio.to_thread(second.recv, 10) == b""
        first.close(), second.close()


async def test_a_stream_port_that_cannot_keep_up_drops_instead_of_buffering_without_bound(tmp_path):
    path = str(tmp_path / "s.sock")
    async with Switch("sw") as sw:
        sink, port, peer = await stream_pair(sw, path)  # a peer that never reads
        big = bytes.fromhex("ffffffffffff" "02000000000c" "88b5") + bytes(1500)
        for _ in range(5000):  # 7.5 MB at a peer that reads nothing
            sink.port.incoming(big)
        assert port.counters.drops["queue_full"] > 0
        assert port._conn.transport.get_write_buffer_size() <= port.max_buffer + len(big) + 4
        peer.close()


async def test_dgram_ports_carry_one_frame_per_datagram_and_count_runts(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    async with Switch("one") as one, Switch("two") as two:
        sink1, sink2 = Sink(one), Sink(two)
        await one.open_port(f"dgram:unix:{a},remote={b},name=d")
        port2 = await two.open_port(f"dgram:unix:{b},remote={a},name=d")
        sink1.port.incoming(bytes.fromhex("ffffffffffff") + FRAME[6:])
        await wait_for(lambda: len(sink2.frames) == 1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as raw:
            raw.sendto(b"short", b)
        await wait_for(lambda: port2.counters.drops.get("runt") == 1)
        assert sink2.frames[0][6:] == FRAME[6:]


@pytest.mark.parametrize("text, why", [
    ("ftp:x", "give one of"),
    ("tap:", "nothing after"),
    ("tap:tap0,vlan=5000", "vlan="),
    ("tap:tap0,bogus=1", "unknown option 'bogus'"),
    ("tap:this-name-is-too-long", "not a valid interface name"),
    ("stream:udp:x", "stream:unix:PATH or stream:tcp"),
    ("stream:tcp:localhost", "HOST:PORT"),
    ("dgram:unix:/tmp/a", "remote="),
    ("vxlan:42", "at least one remote"),
    ("vxlan:99999999,remote=10.0.0.1", "out of range"),
    ("vxlan:x,remote=10.0.0.1", "needs a number"),
    ("stream:unix:/tmp/x,server=yes", "takes no value"),
])
def test_bad_port_specs_say_what_to_do(text, why):
    with pytest.raises(ConfigError, match=why):
        port_from_spec(text)


def test_port_spec_common_options():
    spec = parse_port_spec("vxlan:42,local=127.0.0.1:8472,remote=10.0.0.1,remote=10.0.0.2,name=v,vlan=7")
    assert (spec.kind, spec.where, spec.name, spec.vlan) == ("vxlan", "42", "v", 7)
    port, _ = port_from_spec("vxlan:42,local=127.0.0.1:8472,remote=10.0.0.1,remote=10.0.0.2")
    assert port.local == ("127.0.0.1", 8472) and port.dst_port == 8472 and port.remotes == ["10.0.0.1", "10.0.0.2"]


async def test_a_port_that_cannot_open_leaves_nothing_behind(tmp_path):
    path = tmp_path / "plain-file"
    path.write_text("not a socket")
    async with Switch("sw") as sw:
        with pytest.raises(ConfigError, match="not a socket"):
            await sw.open_port(f"stream:unix:{path},server")
        assert sw.ports == {}


async def test_the_vde_server_refuses_hostile_requests_and_serves_a_good_one(tmp_path):
    from aiokvm.net.ports.vde import REQUEST_HEAD, VdePort, pack_sockaddr_un
    from aiokvm.net.vde_server import VdeServer, prepare_directory

    directory = prepare_directory(str(tmp_path / "sw"))
    async with Switch("sw", vlan_filtering=True) as sw:
        server = VdeServer(sw, directory)
        await server.start()
        try:
            client_path = str(tmp_path / "client")
            client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            client.bind(client_path)
            bad = [
                b"short",
                REQUEST_HEAD.pack(0xDEADBEEF, 3, 0) + pack_sockaddr_un(client_path),  # magic
                REQUEST_HEAD.pack(0xFEEDFACE, 2, 0) + pack_sockaddr_un(client_path),  # version
                REQUEST_HEAD.pack(0xFEEDFACE, 3, 0) + b"\x02\x00" + bytes(108),  # not AF_UNIX
                REQUEST_HEAD.pack(0xFEEDFACE, 3, 0) + pack_sockaddr_un(str(tmp_path / "nobody")),  # unreachable
            ]
            for request in bad:
                reader, writer = await asyncio.open_unix_connection(server.ctl_path)
                writer.write(request)
                if request == b"short":
                    writer.write_eof()
                assert await asyncio.wait_for(reader.read(200), 10) == b""  # closed, no answer
                writer.close()
            assert server.refused == len(bad) and sw.ports == {}
            # aiokvm's own client, asking for port 7 and VLAN 10 (what `aiokvm run --net vde=DIR,vlan=10` sends)
            port = await VdePort(directory, port=7, description="test vlan=10").open()
            await wait_for(lambda: "vde7" in sw.ports)
            assert sw.vlans()["vde7"] == {"pvid": 10, "vlans": {10: True}}
            taken = VdePort(directory, port=7)
            with pytest.raises(ConfigError, match="refused the port 7"):
                await taken.open()
            await port.aclose()
            await wait_for(lambda: "vde7" not in sw.ports)
            client.close()
        finally:
            await server.aclose()


async def test_a_vde_port_without_a_switch_says_how_to_start_one(tmp_path):
    from aiokvm.net.ports.vde import VdePort

    with pytest.raises(ConfigError, match="no VDE switch at .*vde_switch -sock"):
        await VdePort(str(tmp_path)).open()


async def test_a_stream_client_reconnects_when_its_server_comes_back(tmp_path):
    path = str(tmp_path / "s.sock")
    async with Switch("client") as client_sw:
        client = await client_sw.open_port(f"stream:unix:{path},reconnect=0.05,name=up")
        for round_no in range(2):  # the server comes, goes, and comes back
            async with Switch("server") as server_sw:
                server = await server_sw.open_port(f"stream:unix:{path},server,name=down")
                await wait_for(lambda server=server: client.link_up and server.link_up)
                sink = Sink(server_sw)
                Sink(client_sw, f"src{round_no}").port.incoming(
                    bytes.fromhex("ffffffffffff" "02000000000c" "88b5") + bytes([round_no]) * 46)
                await wait_for(lambda sink=sink: len(sink.frames) == 1)
            await wait_for(lambda: not client.link_up)
        assert client.connections == 2


async def test_the_switch_program_logs_link_changes_stp_and_drop_summaries(tmp_path):
    from structlog.testing import capture_logs

    from aiokvm.net.daemon import Watcher

    async with Switch("sw", stp=True) as sw:
        sink = Sink(sw)
        watcher = Watcher(sw, summary_s=0.0)
        with capture_logs() as logs:
            watcher.poll(0.0)
            sink.port.set_link(False)
            sink.port.counters.drops["queue_full"] += 3
            watcher.poll(1.0)
            watcher.poll(2.0)  # nothing new: nothing logged
    events = [(e["event"], e.get("port"), e.get("up")) for e in logs]
    assert ("port link", "sink", False) in events
    assert ("stp port", "sink", None) in events  # designated/forwarding -> disabled
    drops = [e for e in logs if e["event"] == "drops"]
    assert len(drops) == 1 and drops[0]["sink/queue_full"] == 3
