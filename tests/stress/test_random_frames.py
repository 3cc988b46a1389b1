"""Random frames into every port type (issue 14): 10^6 per kind in the slow
run, a few thousand by default.  Each kind is fed from its real outside:
a guest's transmit ring for a NIC, the other end of a cable, the host
kernel for a TAP (a packet socket in a namespace), a QEMU-style stream
peer, a datagram peer, VXLAN datagrams, a VDE switch's data socket.  The
frames are runts, giants, garbage, and well-formed frames with random
addresses, VLAN tags and BPDUs, so the bridge's every branch sees them.

The switch must take them all without an error reaching the loop, keep
its FDB at its limit and its memory bounded, and still forward between
two other ports afterwards."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time

import pytest

from aiokvm.devices.virtio import mmio
from aiokvm.devices.virtio.net import HDR_SIZE
from aiokvm.net import Switch
from aiokvm.net.netns import run_in_netns
from aiokvm.net.ports.link import cable
from aiokvm.net.ports.vde import VdeDataPort
from aiokvm.net.ports.vxlan import vxlan_header
from aiokvm.net.vde_server import VdeServer
from tests.stress.test_bounds import Sink, resources

BROADCAST = b"\xff" * 6
STP_GROUP = bytes.fromhex("0180c2000000")
MACS = [bytes([0x02, 0, 0, 0, i >> 8, i & 0xFF]) for i in range(1, 65)]
ETHERTYPES = (0x0800, 0x86DD, 0x0806, 0x8100, 0x88A8, 0x88B5)
FDB_LIMIT = 512
PROBE_SOURCE = bytes.fromhex("02aa00000001")


class Catcher(Sink):
    """A host-side port that counts the probe frames it gets (the bridge's own
    hello BPDUs also come out of it every 2 s)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.probes = 0

    def send(self, frame: bytes) -> bool:
        self.probes += frame[6:12] == PROBE_SOURCE
        return super().send(frame)


def random_bpdu(rng: random.Random) -> bytes:
    """A BPDU: TCN, truncated or malformed, or a configuration with random
    root, cost, bridge, port, flags and version.  Its timers stay short
    (the bridge adopts a root's forward delay, and a random one would hold
    the port out of forwarding for minutes, as it would on Linux)."""
    if rng.random() < 0.4:
        body = bytes([0, 0, rng.choice((0, 2)), rng.choice((0x80, 0, rng.randrange(256)))]) + rng.randbytes(
            rng.randrange(32))
    else:
        max_age = rng.uniform(6, 8)
        body = struct.pack(">HBBB8sI8sHHHHH", 0, rng.choice((0, 0, 0, 2, rng.randrange(256))), rng.choice((0, 2)),
                           rng.randrange(256), rng.randbytes(8), rng.randrange(1 << 32), rng.randbytes(8),
                           rng.randrange(1 << 16), int(rng.uniform(0, max_age + 1) * 256), int(max_age * 256),
                           int(rng.uniform(1, 2) * 256), int(rng.uniform(2, 3) * 256))
    llc = b"\x42\x42\x03"
    return STP_GROUP + rng.choice(MACS) + struct.pack(">H", len(llc) + len(body)) + llc + body


def random_frame(rng: random.Random, max_len: int) -> bytes:
    """One hostile frame: a fifth pure garbage of any length, a tenth BPDUs,
    the rest shaped enough to reach learning, VLAN filtering and forwarding."""
    kind = rng.random()
    if kind < 0.2:
        return rng.randbytes(rng.randrange(max_len + 1))
    if kind < 0.3:
        return random_bpdu(rng)
    dst = rng.choice((BROADCAST, rng.choice(MACS), bytes([0x01, 0, 0x5E, 0, 0, rng.randrange(256)]),
                      bytes([0x01, 0x80, 0xC2, 0, 0, rng.randrange(16)]), rng.randbytes(6)))
    # Sources: a pool the FDB learns and moves, fresh ones past its limit, and multicast (invalid).
    src = rng.choice((rng.choice(MACS), bytes([0x02]) + rng.randbytes(5), bytes([0x01]) + rng.randbytes(5)))
    ethertype = rng.choice(ETHERTYPES)
    head = dst + src + struct.pack(">H", ethertype)
    if ethertype in (0x8100, 0x88A8):  # a tag: VLANs 10 and 20 are the port's, the rest are not
        head += struct.pack(">HH", rng.randrange(8) << 13 | rng.choice((0, 1, 10, 20, 4095, rng.randrange(4096))),
                            rng.choice(ETHERTYPES))
    room = max(0, max_len - len(head))
    return head + rng.randbytes(min(room, rng.choice((0, 46, rng.randrange(room + 1)))))


def frames(rng: random.Random, count: int, max_len: int, batch: int = 64):
    for start in range(0, count, batch):
        yield [random_frame(rng, max_len) for _ in range(min(batch, count - start))]


# -- feeders: one per port kind, each from the port's real outside --------------------
class Feeder:
    """Opens the port under test on ``switch`` as ``port``; ``feed`` offers frames
    and returns how many the outside accepted (a kernel queue may refuse some)."""

    max_len = 1600
    sock: socket.socket | None = None  # the outside's socket, where it has one

    async def feed(self, batches) -> int:
        raise NotImplementedError

    async def aclose(self) -> None:
        if self.sock is not None:
            self.sock.close()


class NicFeeder(Feeder):
    """A guest driver's transmit ring: a random virtio-net header now and then."""

    max_len = 1540

    async def open(self, switch, rng, tmp_path) -> None:
        from tests.unit.test_virtio_net import Nic

        self.rng = rng
        self.nic = Nic()
        self.port = switch.add_nic(self.nic.device, port="under-test", tagged=(10, 20))

    async def feed(self, batches) -> int:
        nic, rng, offered = self.nic, self.rng, 0
        for batch in batches:
            for start in range(0, len(batch), 16):  # 16 two-buffer chains fit the 64-entry ring
                for frame in batch[start:start + 16]:
                    header = rng.randbytes(HDR_SIZE) if rng.random() < 0.05 else bytes(HDR_SIZE)
                    nic.tx.add([header, frame], [])
                nic.w(mmio.QUEUE_NOTIFY, 1)
                nic.tx.used()
            offered += len(batch)
            await asyncio.sleep(0)
        return offered


class LinkFeeder(Feeder):
    """The other end of a cable."""

    async def open(self, switch, rng, tmp_path) -> None:
        ours, self.theirs = cable("under-test", "far")
        self.port = switch.add_port(ours, tagged=(10, 20))

    async def feed(self, batches) -> int:
        offered = 0
        for batch in batches:
            offered += self.theirs.send_many(batch)
            await asyncio.sleep(0)  # the cable delivers on the next turn of the loop
        return offered


class TapFeeder(Feeder):
    """The host kernel: a packet socket on the TAP's own interface, in a namespace."""

    max_len = 1514  # the interface's MTU plus its header; the kernel refuses more

    async def open(self, switch, rng, tmp_path) -> None:
        from tests.integration.netns import netns, run

        self._ns = netns("rf")
        ns = self._ns.__enter__()
        self.port = await switch.open_port(f"tap:rf0,netns={ns},name=under-test", tagged=(10, 20))
        run("ip", "-n", ns, "link", "set", "rf0", "up")
        self.sock = run_in_netns(ns, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))
        self.sock.bind(("rf0", 0))

    async def feed(self, batches) -> int:
        offered = 0
        for batch in batches:
            for frame in batch:
                if len(frame) < 14:
                    continue  # a packet socket cannot send less than a header
                try:
                    self.sock.send(frame)
                    offered += 1
                except OSError:  # the TAP's queue is full: the kernel refuses it
                    pass
            await asyncio.sleep(0)
        return offered

    async def aclose(self) -> None:
        await super().aclose()
        self._ns.__exit__(None, None, None)


async def in_thread(work) -> int:
    """Blocking socket writers run in a thread of their own (joined before it
    returns, so the thread count stays exact), and the switch reads meanwhile."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def body() -> None:
        try:
            result = work()
        except BaseException as exc:  # handed to the test
            loop.call_soon_threadsafe(done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(done.set_result, result)

    thread = threading.Thread(target=body, name="feeder")
    thread.start()
    try:
        return await done
    finally:
        thread.join()


class StreamFeeder(Feeder):
    """A QEMU ``-netdev stream`` peer: 4-byte lengths, the bytes split at random."""

    async def open(self, switch, rng, tmp_path) -> None:
        self.rng = rng
        path = str(tmp_path / "stream.sock")
        self.port = await switch.open_port(f"stream:unix:{path},server,name=under-test", tagged=(10, 20))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        while not self.port.link_up:  # accepted: the port's own fd is open before the count starts
            await asyncio.sleep(0.01)

    async def feed(self, batches) -> int:
        rng = random.Random(self.rng.random())

        def write() -> int:
            offered = 0
            for batch in batches:
                data = b"".join(struct.pack(">I", len(f)) + f for f in batch)
                while data:  # split anywhere, a header included
                    cut = rng.randrange(1, len(data) + 1)
                    self.sock.sendall(data[:cut])
                    data = data[cut:]
                offered += len(batch)
            return offered

        return await in_thread(write)

class DgramFeeder(Feeder):
    """A QEMU ``-netdev dgram`` peer on unix datagram sockets (a full queue blocks the writer)."""

    async def open(self, switch, rng, tmp_path) -> None:
        ours, theirs = str(tmp_path / "ours.sock"), str(tmp_path / "theirs.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(theirs)
        self.port = await switch.open_port(f"dgram:unix:{ours},remote={theirs},name=under-test", tagged=(10, 20))
        self.sock.connect(ours)
        self.sock.settimeout(5)

    async def feed(self, batches) -> int:
        def write() -> int:
            offered = 0
            for batch in batches:
                for frame in batch:
                    self.sock.send(frame)
                    offered += 1
            return offered

        return await in_thread(write)

class VxlanFeeder(Feeder):
    """A VTEP on loopback: mostly our VNI, sometimes another, bad flags or garbage."""

    async def open(self, switch, rng, tmp_path) -> None:
        self.rng = rng
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        remote_port = self.sock.getsockname()[1]
        self.port = await switch.open_port(
            f"vxlan:42,local=127.0.0.1:0,remote=127.0.0.1,dst_port={remote_port},name=under-test",
            tagged=(10, 20))
        self.sock.connect(("127.0.0.1", self.port.bound_port))

    def arrived(self) -> int:
        counters = self.port.counters
        return counters.rx_frames + sum(n for why, n in counters.drops.items() if why != "learn_limit")

    async def feed(self, batches) -> int:
        rng = random.Random(self.rng.random())
        ours, other = vxlan_header(42), vxlan_header(43)

        def write() -> int:
            offered = 0
            for batch in batches:
                for frame in batch:
                    pick = rng.random()
                    header = ours if pick < 0.9 else other if pick < 0.95 else rng.randbytes(8)
                    try:
                        self.sock.send(header + frame)
                        offered += 1
                    except OSError:  # ENOBUFS, or ECONNREFUSED from an earlier datagram's ICMP
                        pass
                # Loopback UDP drops what the reader has no room for (the
                # kernel's choice, not the port's): stay a few batches ahead.
                deadline = time.monotonic() + 1
                while offered - self.arrived() > 128 and time.monotonic() < deadline:
                    time.sleep(0.0005)
            return offered

        return await in_thread(write)

class VdeFeeder(Feeder):
    """A VDE switch (aiokvm's own server, another switch) sending on the port's data socket."""

    async def open(self, switch, rng, tmp_path) -> None:
        directory = tmp_path / "vde"
        directory.mkdir()
        self.far = Switch("far")
        self.far.start()
        self.server = VdeServer(self.far, str(directory))
        await self.server.start()
        self.port = await switch.open_port(f"vde:{directory},name=under-test", tagged=(10, 20))
        for _ in range(500):
            data_ports = [p for p in self.far.ports.values() if isinstance(p, VdeDataPort)]
            if data_ports:
                break
            await asyncio.sleep(0.01)
        self.theirs = data_ports[0]

    async def feed(self, batches) -> int:
        offered = 0
        for batch in batches:
            offered += self.theirs.send_many(batch)
            await asyncio.sleep(0)  # let the port read: 256 frames wait behind EAGAIN, more are dropped
        return offered

    async def aclose(self) -> None:
        await self.server.aclose()
        await self.far.aclose()


FEEDERS = {"nic": NicFeeder, "link": LinkFeeder, "tap": TapFeeder, "stream": StreamFeeder, "dgram": DgramFeeder,
           "vxlan": VxlanFeeder, "vde": VdeFeeder}
NEEDS_ROOT = {"tap"}


async def forwarding(switch, port: str) -> None:
    for _ in range(400):
        if switch.stp_state()["ports"][port]["state"] == "forwarding":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"port {port} never reached forwarding: {switch.stp_state()['ports'][port]}")


async def flood(kind: str, count: int, tmp_path, seed: int = 14) -> dict:
    """Half the frames while the port listens and learns (STP parses the
    BPDUs, nothing is forwarded), half once it forwards."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    feeder = FEEDERS[kind]()
    async with Switch("rf", stp=True, forward_delay=2, vlan_filtering=True, fdb_max_learned=FDB_LIMIT) as switch:
        left, right = switch.add_port(Sink("left")), switch.add_port(Catcher("right"))
        await feeder.open(switch, rng, tmp_path)
        try:
            fds0, threads0, rss0 = resources()
            t0 = time.perf_counter()
            offered = await feeder.feed(frames(rng, count // 2, feeder.max_len))
            await forwarding(switch, "under-test")
            offered += await feeder.feed(frames(rng, count - count // 2, feeder.max_len))
            for _ in range(200):  # the last reads land
                await asyncio.sleep(0.01)
                if feeder.port.counters.rx_frames + sum(feeder.port.counters.drops.values()) >= offered:
                    break
            seconds = time.perf_counter() - t0
            fds1, threads1, rss1 = resources()
            port = feeder.port.metrics()
            bridge = switch.counters()
            learned = sum(1 for row in switch.fdb() if row.kind == "learned")
            # Afterwards the switch still forwards between two other ports, as before.
            await forwarding(switch, "right")
            left.incoming(BROADCAST + PROBE_SOURCE + b"\x08\x00" + bytes(46))
            await asyncio.sleep(0.05)
            forwarded = right.probes
        finally:
            await feeder.aclose()
    figures = {"kind": kind, "offered": offered, "rx_frames": port["rx_frames"], "drops": port["drops"],
               "learned": learned, "bridge": bridge["ports"]["under-test"] if "ports" in bridge else bridge,
               "rss_growth_mib": round((rss1 - rss0) / 2**20, 1), "seconds": round(seconds, 1)}
    print(f"random frames into {kind}: {figures}")
    assert not errors, errors[:3]
    assert offered >= count // 2  # the outside really took most of them
    assert port["rx_frames"] + sum(port["drops"].values()) >= offered // 2  # and they reached the port
    assert 0 < learned <= FDB_LIMIT
    assert forwarded == 1
    assert fds1 <= fds0 and threads1 <= threads0
    assert rss1 - rss0 < 32 << 20
    return figures


def marks(kind: str):
    return [pytest.mark.root] if kind in NEEDS_ROOT else []


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("kind", [pytest.param(k, marks=marks(k)) for k in FEEDERS])
async def test_random_frames_into_every_port_kind(kind, tmp_path):
    await flood(kind, 5_000, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("kind", [pytest.param(k, marks=marks(k)) for k in FEEDERS])
async def test_a_million_random_frames_into_every_port_kind(kind, tmp_path):
    await flood(kind, 1_000_000, tmp_path, seed=10**6)

