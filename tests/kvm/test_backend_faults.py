"""Backends that fail under a running guest (docs/threat-model.md, "Backends that fail").

Each test runs a real guest doing I/O, breaks its backend mid-run and checks
four things: the guest sees the failure (IOERR / ATA ERR, or frames stop and
are counted), the VMM logs it once (not per request), the machine goes on
and stops cleanly while a neighbour on the same loop is unaffected, and
nothing is retried without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from structlog.testing import capture_logs

from aiokvm import ConfigError, Machine
from aiokvm.devices.backends import MemoryBackend, RawFileBackend
from aiokvm.devices.backends.base import BackendIOError
from aiokvm.net import Switch
from aiokvm.net.ports.base import SwitchPort
from aiokvm.net.ports.stream import StreamPort

pytestmark = pytest.mark.kvm

uvloop_only = pytest.mark.asyncio(loop_factories=["uvloop"])
SECTOR = 512


# ----------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------


async def until(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def make_image(path, size: int) -> str:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return str(path)


def warnings(logs: list[dict], event: str | None = None) -> list[dict]:
    return [e for e in logs if e["log_level"] == "warning" and (event is None or e["event"] == event)]


@contextlib.asynccontextmanager
async def neighbour():
    """Another machine on the same loop, doing disk I/O while the fault plays out: it must not notice."""
    async with Machine(name="neighbour") as vm:
        await vm.add_disk(MemoryBackend(1 << 20))
        vm.load("disktest", cmdline="dev=virtio cpl=3 sectors=512 rounds=3")
        task = asyncio.create_task(vm.run(timeout=60))
        try:
            yield
        except BaseException:
            vm.stop()
            await asyncio.wait([task])
            raise
        status = await task
        out = vm.console.output.decode()
        assert status.code == 0 and out.count("write_errors=0 bad=0") == 3, out


@contextlib.asynccontextmanager
async def running(vm: Machine):
    """``vm.run()`` as a task, stopped cleanly at the end (the fault must not keep it from stopping)."""
    task = asyncio.create_task(vm.run(timeout=60))
    try:
        yield task
    finally:
        vm.stop()
        status = await asyncio.wait_for(task, 30)
    assert status.reason in ("stopped", "debug-exit"), status


def rounds(output: bytes) -> list[tuple[int, int, int, str]]:
    """disktest's ``round R write_errors=W bad=B checksum X`` lines."""
    return [(int(r), int(w), int(b), c) for r, w, b, c in re.findall(
        r"disktest: round (\d+) write_errors=(\d+) bad=(\d+) checksum ([0-9a-f]{16})", output.decode())]


# disktest's pattern and checksum, to know what a round must report
def _mix64(x: int) -> int:
    m = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def pattern(sectors: int) -> bytes:
    return b"".join(_mix64(s * 64 + j).to_bytes(8, "little") for s in range(sectors) for j in range(64))


FNV_PRIME = 0x100000001B3


def fnv1a(data: bytes, zeroes_after: int = 0) -> str:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    h = h * pow(FNV_PRIME, zeroes_after, 1 << 64) & 0xFFFFFFFFFFFFFFFF  # a zero byte only multiplies
    return f"{h:016x}"


# ----------------------------------------------------------------------
# 1. the NBD server killed
# ----------------------------------------------------------------------


@contextlib.contextmanager
def qemu_nbd(image: str, sock: str):
    server = subprocess.Popen(["qemu-nbd", "-f", "raw", "--socket", sock, "--export-name", "disk", image],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(500):
            if os.path.exists(sock):
                break
            time.sleep(0.01)
        yield server
    finally:
        server.kill()
        server.wait(timeout=10)


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd not installed (.ci/run installs qemu-utils)")
@uvloop_only
async def test_nbd_server_killed_while_the_guest_writes(tmp_path):
    image, sock = make_image(tmp_path / "disk.img", 64 * SECTOR), str(tmp_path / "nbd.sock")
    with qemu_nbd(image, sock) as server, capture_logs() as logs:
        async with Machine(name="nbd") as vm:
            blk = await vm.add_disk(f"nbd+unix:///disk?socket={sock}")
            vm.load("disktest", cmdline="dev=virtio cpl=3 sectors=64 gen=1000000000")
            async with running(vm):
                await until(lambda: vm.console.output.count(b"flushed generation") >= 20, "flushed generations")
                server.send_signal(signal.SIGKILL)  # mid-write: no goodbye on the socket
                async with neighbour():
                    await until(lambda: blk.counters.ioerr >= 300, "I/O errors in the guest")
    out = vm.console.output.decode()
    assert "disktest: write error at sector" in out  # (a) the guest got IOERR, and went on
    # (b) one line from the backend (the cause), one from the device (what the guest gets), not one per request
    assert [e["reason"] for e in warnings(logs, "NBD backend failed")] == ["the server closed the connection"]
    assert len(warnings(logs)) == 2, warnings(logs)
    assert blk.counters.backend_errors == {"EIO": blk.counters.ioerr}
    # (d) no retry at all: the connection is given up, later requests fail at once without I/O
    assert "failed" in repr(blk.backend) or "closed" in repr(blk.backend)
    assert blk.backend._reader_task.done()


# ----------------------------------------------------------------------
# 2. the raw image truncated under the VM
# ----------------------------------------------------------------------


@uvloop_only
@pytest.mark.parametrize(("interface", "sectors"), [("virtio", 512), ("ata", 64)])  # ATA PIO is slow
async def test_reads_past_a_truncated_image_return_zeroes_not_stale_bytes(tmp_path, interface, sectors):
    """QEMU's rule (block layer: "reading beyond end of file is supposed to produce
    zeroes"): the disk keeps its size, the missing half reads as zeroes, no IOERR."""
    image = str(tmp_path / "disk.img")
    data = pattern(sectors)
    with open(image, "wb") as fh:
        fh.write(data)
    half = sectors // 2 * SECTOR
    dev = "virtio" if interface == "virtio" else "ata-rep"
    with capture_logs() as logs:
        async with Machine(name="trunc") as vm:
            disk = await vm.add_disk(f"{image},if={interface}")
            vm.load("disktest", cmdline=f"dev={dev} cpl=3 sectors={sectors} write=0 rounds=1000000")
            async with running(vm):
                await until(lambda: len(rounds(vm.console.output)) >= 1, "a first round")
                os.truncate(image, half)
                seen = len(rounds(vm.console.output))
                async with neighbour():
                    # the round after the next one started after the truncation
                    await until(lambda: len(rounds(vm.console.output)) >= seen + 2, "rounds after truncation")
    first, last = rounds(vm.console.output)[0], rounds(vm.console.output)[seen + 1]
    assert first[1:] == (0, 0, fnv1a(data))
    # (a) the upper half reads as zeroes: exactly those sectors mismatch, and the checksum says zeroes
    assert last[1:] == (0, sectors // 2, fnv1a(data[:half], zeroes_after=half))
    assert disk.counters.backend_errors == {}  # not an I/O error
    assert disk.backend.reads_past_eof > 0
    # (b) said once, for the operator
    assert [e["path"] for e in warnings(logs)] == [image]
    assert os.path.getsize(image) == half  # reads never grow the file


@uvloop_only
async def test_writes_after_a_truncation_extend_the_image_again(tmp_path):
    sectors = 256
    image = make_image(tmp_path / "disk.img", sectors * SECTOR)
    async with Machine(name="trunc") as vm:
        blk = await vm.add_disk(image)
        vm.load("disktest", cmdline=f"dev=virtio cpl=3 sectors={sectors} rounds=1000000")
        async with running(vm):
            await until(lambda: len(rounds(vm.console.output)) >= 1, "a first round")
            os.truncate(image, 0)
            seen = len(rounds(vm.console.output))
            await until(lambda: len(rounds(vm.console.output)) >= seen + 2, "rounds after truncation")
    done = rounds(vm.console.output)
    assert done[seen + 1][1:] == done[0][1:] == (0, 0, fnv1a(pattern(sectors)))
    assert blk.counters.ioerr == 0
    assert os.path.getsize(image) == sectors * SECTOR


# ----------------------------------------------------------------------
# 3. ENOSPC on a small tmpfs
# ----------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(size: str):
    where = tempfile.mkdtemp(prefix="aiokvm-enospc-")
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where], check=True,
                       capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        os.rmdir(where)
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", where], capture_output=True).returncode:
            subprocess.run(["umount", "-l", where], capture_output=True)
        os.rmdir(where)


@pytest.mark.root
@uvloop_only
@pytest.mark.parametrize(("interface", "fs_size"), [("virtio", 64 << 10), ("ata", 4 << 10)])  # ATA PIO is slow
async def test_enospc_fails_the_writes_and_the_next_flush(interface, fs_size):
    dev = "virtio" if interface == "virtio" else "ata-rep"
    with small_tmpfs(f"{fs_size // 1024}k") as where, capture_logs() as logs:
        image = make_image(os.path.join(where, "sparse.img"), 4 * fs_size)  # four times what the file system holds
        async with Machine(name="full") as vm:
            disk = await vm.add_disk(f"{image},if={interface}")
            vm.load("disktest", cmdline=f"dev={dev} cpl=3 sectors={4 * fs_size // SECTOR}")
            async with neighbour():
                status = await vm.run(timeout=60)  # (c) the guest finishes
    out = vm.console.output.decode()
    assert status.code == 3, out  # disktest: "write errors", no bad sectors among those written
    assert "disktest: write error at sector" in out  # (a)
    assert "disktest: flush error" in out  # the flush after the failed writes does not say "durable"
    # (d) one backend attempt per guest request: every failure is one the guest saw
    failed = out.count("disktest: write error at sector") + out.count("disktest: flush error")
    assert disk.counters.backend_errors == {"ENOSPC": failed}
    # (b) logged once
    assert len(warnings(logs)) == 1 and "No space left" in warnings(logs)[0]["error"]


async def test_a_failed_fdatasync_fails_every_later_flush(tmp_path, monkeypatch):
    """The fsyncgate lesson: after a failed fdatasync the kernel may have
    dropped the dirty pages and report success next time; we must not."""
    from aiokvm.devices.backends import raw

    image = make_image(tmp_path / "disk.img", 1 << 16)
    backend = await RawFileBackend.open(image)
    try:
        def failing(fd):
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(raw.os, "fdatasync", failing)
        with pytest.raises(BackendIOError):
            await backend.flush()
        monkeypatch.undo()
        for _ in range(2):
            with pytest.raises(BackendIOError, match="an earlier flush failed") as info:
                await backend.flush()
            assert info.value.errno == errno.EIO
    finally:
        await backend.close()


# ----------------------------------------------------------------------
# network: a guest floods broadcast frames; a recorder port is the neighbour
# ----------------------------------------------------------------------


class Recorder(SwitchPort):
    kind = "recorder"

    def send(self, frame: bytes) -> bool:
        self._sent(frame)
        return True


@contextlib.asynccontextmanager
async def flooding_guest(sw: Switch):
    async with Machine(name="tx") as vm:
        vm.add_nic(sw, "02:00:00:00:00:0a")
        vm.load("netbench", cmdline="mode=tx n=1000000000 size=64 cpl=3")
        async with running(vm):
            yield vm


# ----------------------------------------------------------------------
# 4. a TAP device deleted
# ----------------------------------------------------------------------


@pytest.mark.root
async def test_a_deleted_tap_goes_link_down_once_without_spinning():
    from tests.integration.netns import in_ns, netns

    with netns("gone") as ns, capture_logs() as logs:
        async with Switch("br0") as sw:
            tap = await sw.open_port(f"tap:tap0,netns={ns},name=host")
            in_ns(ns, "ip", "link", "set", "tap0", "up")
            recorder = sw.add_port(Recorder("rec"))
            await until(lambda: tap.link_up, "the tap's carrier")
            async with flooding_guest(sw):
                await until(lambda: tap.counters.tx_frames > 1000, "frames to the tap")
                in_ns(ns, "ip", "link", "del", "tap0")
                await until(lambda: not tap.link_up, "link down")
                sent, seen = tap.counters.tx_frames, recorder.counters.tx_frames
                await asyncio.sleep(1.0)  # the stdlib loop used to spin here, 100,000 reads a second
                assert tap.counters.tx_frames == sent  # (a) frames to it stop, and are counted
                assert tap.counters.drops["link_down"] > 0
                assert recorder.counters.tx_frames > seen + 1000  # the switch and the other port go on
            assert tap.failed == "EBADFD"
            assert sum(tap.errors.values()) == 1, tap.errors  # (d) one failed read (or write), then none
            await asyncio.sleep(1.2)  # a new tap0 would not bring this port's link back: the poll stopped
            assert not tap.link_up
    gone = warnings(logs)
    assert [e["event"] for e in gone] == ["port device gone: link down until the port is removed"]  # (b)


# ----------------------------------------------------------------------
# 5. a stream peer vanishing
# ----------------------------------------------------------------------

PEER = """
import socket, sys, time
path, mode = sys.argv[1], sys.argv[2]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path); srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept()
frame = bytes.fromhex("ffffffffffff" "02000000000b" "88b5") + bytes(46)
if mode == "half":
    conn.sendall(len(frame).to_bytes(4, "big") + frame[:30])  # then dies mid-frame
else:
    conn.sendall(len(frame).to_bytes(4, "big") + frame)
while conn.recv(1 << 16):
    pass
"""


@contextlib.contextmanager
def stream_peer(path: str, mode: str):
    if os.path.exists(path):
        os.unlink(path)
    proc = subprocess.Popen([sys.executable, "-c", PEER, path, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline() == b"ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()


async def test_a_stream_peer_killed_mid_frame(tmp_path, caplog):
    path = str(tmp_path / "peer.sock")
    with capture_logs() as logs:
        async with Switch("br0") as sw:
            recorder = sw.add_port(Recorder("rec"))
            with stream_peer(path, "half") as peer:
                port = await sw.open_port(f"stream:unix:{path},reconnect=0.2,name=up")
                async with flooding_guest(sw):
                    await until(lambda: port.link_up and port.counters.tx_frames > 100, "frames to the peer")
                    await until(lambda: port._conn is not None and port._conn.buffer, "the half frame")
                    peer.send_signal(signal.SIGKILL)
                    await until(lambda: not port.link_up, "link down")
                    seen, attempts, sent = recorder.counters.tx_frames, port.connect_attempts, port.counters.tx_frames
                    await asyncio.sleep(1.0)
                    # (d) reconnects every 0.2 s, no faster
                    assert 3 <= port.connect_attempts - attempts <= 7, port.connect_attempts - attempts
                    assert port.counters.tx_frames == sent  # (a) frames to it stop (the bridge holds them)
                    assert recorder.counters.tx_frames > seen + 1000  # the switch goes on
                    assert port.counters.drops["partial"] == 1 and port.counters.rx_frames == 0
                    with stream_peer(path, "whole"):
                        await until(lambda: port.link_up and port.counters.rx_frames, "the peer back")
                        # the half frame was dropped, not glued to the new peer's bytes
                        assert port.counters.rx_frames == 1 and port.counters.drops["runt"] == 0
    # (b) once per change, not per attempt (the last: the second peer killed at the end)
    assert [e["event"] for e in logs if e.get("port") == "up"] == [
        "port added", "stream peer connected", "stream peer gone", "stream peer not there yet: retrying",
        "stream peer connected", "stream peer gone"]
    assert warnings(logs) == []
    # the stdlib transport logs every write after the connection broke: none may reach it
    assert not [r for r in caplog.records if "socket.send() raised" in r.getMessage()]


@pytest.mark.parametrize("period", [-1.0, math.nan, math.inf])
def test_a_reconnect_period_that_would_retry_without_bound_is_refused(period):
    with pytest.raises(ConfigError, match="give seconds >= 0"):
        StreamPort("/nonexistent", server=False, reconnect_s=period)


async def test_reconnect_0_connects_once_as_in_qemu(tmp_path):
    port = await StreamPort(str(tmp_path / "nobody.sock"), server=False, reconnect_s=0).open()
    try:
        await asyncio.sleep(0.3)  # sleep(0) between attempts would have made thousands
        assert port.connect_attempts == 1
    finally:
        await port.aclose()
