"""NbdBackend against a real server: qemu-nbd serving raw and qcow2 images.

Each test starts its own ``qemu-nbd`` (unix socket or TCP on 127.0.0.1),
and the ``qemu_nbd`` fixture kills every server it started, pass or fail.
After the client disconnects and the server stops, ``qemu-img convert -O raw``
shows what really reached the image.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from aiokvm.errors import ConfigError

# isort: split
from aiokvm.devices.backends import BackendIOError, NbdBackend, open_backend, parse_disk_spec
from aiokvm.devices.backends import nbd as nbd_mod

QEMU_NBD = shutil.which("qemu-nbd")
QEMU_IMG = shutil.which("qemu-img")

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(QEMU_NBD is None or QEMU_IMG is None, reason="qemu-nbd and qemu-img are not installed"),
]

MiB = 1 << 20
IMAGE_SIZE = 48 * MiB


@dataclass
class NbdServer:
    proc: subprocess.Popen
    url: str
    image: Path
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def create_image(path: Path, fmt: str, size: int = IMAGE_SIZE) -> Path:
    subprocess.run([QEMU_IMG, "create", "-q", "-f", fmt, str(path), str(size)], check=True)
    return path


def image_as_raw(image: Path, fmt: str, tmp_path: Path) -> bytes:
    out = tmp_path / f"{image.name}.converted.raw"
    subprocess.run([QEMU_IMG, "convert", "-f", fmt, "-O", "raw", str(image), str(out)], check=True)
    return out.read_bytes()


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(server: NbdServer, address: str | tuple[str, int]) -> bool:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(address)
            # Greeting, client flags (fixed newstyle), then NBD_OPT_ABORT: a clean goodbye.
            probe.recv(18, socket.MSG_WAITALL)
            probe.sendall(struct.pack(">IQII", 1, nbd_mod.IHAVEOPT, nbd_mod.OPT_ABORT, 0))
            probe.recv(20, socket.MSG_WAITALL)
        except OSError:
            return False
        return True


@pytest.fixture
def qemu_nbd(tmp_path: Path) -> Iterator:
    """A factory starting qemu-nbd; every server it started is killed at teardown."""
    servers: list[NbdServer] = []
    # Unix socket paths are limited to ~107 bytes; tmp_path can be long.
    sock_dir = Path(tempfile.mkdtemp(prefix="nbd")) if len(str(tmp_path)) > 80 else tmp_path

    def start(image: Path, fmt: str, *, export: str = "disk", read_only: bool = False,
              tcp: bool = False) -> NbdServer:
        log = tmp_path / f"qemu-nbd-{len(servers)}.log"
        args = [QEMU_NBD, "-f", fmt, f"--export-name={export}", "--persistent", "--shared=4"]
        if read_only:
            args.append("--read-only")
        if tcp:
            port = free_tcp_port()
            args += ["--bind=127.0.0.1", f"--port={port}"]
            address: str | tuple[str, int] = ("127.0.0.1", port)
            url = f"nbd://127.0.0.1:{port}/{export}"
        else:
            path = str(sock_dir / f"nbd{len(servers)}.sock")
            args.append(f"--socket={path}")
            address = path
            url = f"nbd+unix:///{export}?socket={path}"
        args.append(str(image))
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
        server = NbdServer(proc, url, image, log)
        servers.append(server)
        deadline = time.monotonic() + 15
        while not _ready(server, address):
            if proc.poll() is not None:
                pytest.fail(f"qemu-nbd exited with {proc.returncode}: {log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"qemu-nbd did not start listening within 15s: {log.read_text()}")
            time.sleep(0.02)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.kill()
        if sock_dir != tmp_path:
            shutil.rmtree(sock_dir, ignore_errors=True)


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def read(backend: NbdBackend, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await backend.readv(offset, [memoryview(buf)])
    return bytes(buf)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_concurrent_writes_reach_the_image(qemu_nbd, tmp_path, fmt):
    image = create_image(tmp_path / f"disk.{fmt}", fmt)
    server = qemu_nbd(image, fmt)
    expected = bytearray(IMAGE_SIZE)
    backend = await NbdBackend.connect(server.url)
    try:
        assert backend.size == IMAGE_SIZE
        assert not backend.read_only and backend.serial == "disk"

        # 24 scatter-gather writes in flight at once, each of three buffers.
        writes = []
        for i in range(24):
            offset = i * 512 * 1024 + (i % 4) * 4096
            parts = [pattern(i * 3 + k, n) for k, n in enumerate((4096, 512, 60 * 1024))]
            writes.append(backend.writev(offset, [memoryview(bytearray(p)) for p in parts]))
            blob = b"".join(parts)
            expected[offset : offset + len(blob)] = blob
        # One write above the 32 MiB payload limit, split into several requests.
        big_offset = 13 * MiB
        big = pattern(1000, 34 * MiB)
        writes.append(backend.writev(big_offset, [memoryview(big)]))
        expected[big_offset : big_offset + len(big)] = big
        await asyncio.gather(*writes)

        await backend.write_zeroes(big_offset + MiB, 2 * MiB)
        expected[big_offset + MiB : big_offset + 3 * MiB] = bytes(2 * MiB)
        await backend.flush()

        # Read everything back, 48 reads of 1 MiB in flight together.
        bufs = [bytearray(MiB) for _ in range(IMAGE_SIZE // MiB)]
        await asyncio.gather(*(backend.readv(i * MiB, [memoryview(b)]) for i, b in enumerate(bufs)))
        assert b"".join(bufs) == expected
        # And scattered into slices of one buffer.
        ram = bytearray(3 * 4096)
        await backend.readv(4096, [memoryview(ram)[8192:], memoryview(ram)[:8192]])
        assert bytes(ram) == expected[8192:16384] + expected[4096:8192]
    finally:
        await backend.close()
    server.stop()
    assert image_as_raw(image, fmt, tmp_path) == expected


async def test_read_only_export_refuses_writes(qemu_nbd, tmp_path):
    image = create_image(tmp_path / "ro.raw", "raw", 4 * MiB)
    with open(image, "r+b") as f:
        f.write(pattern(5, MiB))
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    server = qemu_nbd(image, "raw", read_only=True)
    backend = await NbdBackend.connect(server.url)
    try:
        assert backend.read_only and not backend.supports_discard and not backend.supports_write_zeroes
        with pytest.raises(BackendIOError, match="read-only"):
            await backend.writev(0, [memoryview(bytearray(512))])
        with pytest.raises(BackendIOError, match="read-only"):
            await backend.write_zeroes(0, 512)
        assert await read(backend, 0, MiB) == pattern(5, MiB)

        # Skip the client-side check to see the server refuse too (test-only poke).
        # qemu-nbd 7.2 answers EINVAL here, where the protocol suggests EPERM.
        backend.read_only = False
        with pytest.raises(BackendIOError, match="failed on the server: (EPERM|EINVAL)") as exc:
            await backend.writev(0, [memoryview(bytearray(512))])
        assert exc.value.errno in (1, 22)
        assert await read(backend, 0, 512) == pattern(5, MiB)[:512]  # the connection survives
    finally:
        await backend.close()
    server.stop()
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


async def test_client_side_read_only_on_a_writable_export(qemu_nbd, tmp_path):
    image = create_image(tmp_path / "rw.raw", "raw", MiB)
    server = qemu_nbd(image, "raw")
    backend = await open_backend(parse_disk_spec(f"{server.url},ro"))
    try:
        assert isinstance(backend, NbdBackend) and backend.read_only
        with pytest.raises(BackendIOError):
            await backend.writev(0, [memoryview(bytearray(512))])
    finally:
        await backend.close()


async def test_wrong_export_name_is_a_config_error(qemu_nbd, tmp_path):
    image = create_image(tmp_path / "d.qcow2", "qcow2", MiB)
    server = qemu_nbd(image, "qcow2")
    with pytest.raises(ConfigError, match="refused export 'nope'") as exc:
        await NbdBackend.connect(server.url.replace("/disk?", "/nope?"))
    assert "\n" not in str(exc.value)
    backend = await NbdBackend.connect(server.url)  # the server is fine afterwards
    await backend.close()


async def test_tcp_on_loopback(qemu_nbd, tmp_path):
    image = create_image(tmp_path / "tcp.qcow2", "qcow2", 8 * MiB)
    server = qemu_nbd(image, "qcow2", tcp=True)
    backend = await NbdBackend.connect(server.url)
    data = [pattern(i, 128 * 1024) for i in range(8)]
    try:
        await asyncio.gather(*(backend.writev(i * MiB, [memoryview(d)]) for i, d in enumerate(data)))
        await backend.flush()
        got = await asyncio.gather(*(read(backend, i * MiB, len(d)) for i, d in enumerate(data)))
        assert got == data
    finally:
        await backend.close()
    server.stop()
    raw = image_as_raw(image, "qcow2", tmp_path)
    assert all(raw[i * MiB : i * MiB + len(d)] == d for i, d in enumerate(data))


async def test_server_death_fails_requests(qemu_nbd, tmp_path):
    image = create_image(tmp_path / "gone.raw", "raw", 4 * MiB)
    server = qemu_nbd(image, "raw")
    backend = await NbdBackend.connect(server.url)
    try:
        await backend.writev(0, [memoryview(bytearray(b"x" * 512))])
        with capture_logs() as logs:
            server.kill()
            with pytest.raises(BackendIOError):
                for _ in range(100):  # the first request may still be written before the loss is seen
                    await backend.readv(0, [memoryview(bytearray(512))])
                    await asyncio.sleep(0.01)
            with pytest.raises(BackendIOError):
                await backend.flush()
        # the operator is told once, with the server named
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["NBD backend failed"]
    finally:
        await backend.close()


async def test_no_server_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot connect"):
        await NbdBackend.connect(f"nbd+unix:///disk?socket={tmp_path}/none.sock")
    port = free_tcp_port()
    with pytest.raises(ConfigError, match="cannot connect"):
        await NbdBackend.connect(f"nbd://127.0.0.1:{port}/disk")
