"""Block backends without root or KVM: memory, raw files, the disk spec, and NBD against a fake server."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import random
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiokvm.errors import ConfigError

# isort: split
from aiokvm.devices.backends import (
    BackendIOError,
    BlockBackend,
    DiskSpec,
    MemoryBackend,
    NbdBackend,
    RawFileBackend,
    open_backend,
    parse_disk_spec,
    parse_nbd_url,
)
from aiokvm.devices.backends import base as base_mod
from aiokvm.devices.backends import nbd as nbd_mod
from aiokvm.devices.backends import raw as raw_mod

DISK = 64 * 1024


def make_image(path: Path, size: int = DISK, seed: int = 1) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def views_of(*chunks: bytes | bytearray) -> list[memoryview]:
    return [memoryview(bytearray(c)) for c in chunks]


async def read(backend, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await backend.readv(offset, [memoryview(buf)])
    return bytes(buf)


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.img"
    return path, make_image(path)


# ----------------------------------------------------------------------
# Memory and raw backends agree, under random scatter-gather traffic
# ----------------------------------------------------------------------

_ops = st.lists(
    st.tuples(
        st.sampled_from(["read", "write", "discard", "zeroes"]),
        st.integers(0, DISK - 1),
        st.lists(st.integers(0, 3000), min_size=1, max_size=5),
        st.integers(0, 2**32 - 1),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops)
def test_memory_and_raw_backends_agree(ops):
    async def scenario(path: Path) -> None:
        initial = make_image(path, seed=7)
        mem = MemoryBackend(DISK, data=initial)
        raw = await RawFileBackend.open(path)
        try:
            for kind, offset, lengths, seed in ops:
                total = sum(lengths)
                if offset + total > DISK:
                    offset = DISK - total
                rng = random.Random(seed)
                if kind == "write":
                    chunks = [rng.randbytes(n) for n in lengths]
                    await mem.writev(offset, views_of(*chunks))
                    await raw.writev(offset, views_of(*chunks))
                elif kind == "read":
                    bufs_m = [bytearray(n) for n in lengths]
                    bufs_r = [bytearray(n) for n in lengths]
                    await mem.readv(offset, [memoryview(b) for b in bufs_m])
                    await raw.readv(offset, [memoryview(b) for b in bufs_r])
                    assert bufs_m == bufs_r
                elif kind == "discard":
                    await mem.discard(offset, total)
                    await raw.discard(offset, total)
                else:
                    await mem.write_zeroes(offset, total)
                    await raw.write_zeroes(offset, total)
            await raw.flush()
            assert await read(raw, 0, DISK) == mem.contents
        finally:
            await raw.close()
        assert path.read_bytes() == mem.contents

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp) / "disk.img"))


async def test_backends_satisfy_the_protocol(image):
    path, _ = image
    raw = await RawFileBackend.open(path)
    try:
        for backend in (MemoryBackend(DISK), raw):
            assert isinstance(backend, BlockBackend)
            assert backend.size % 512 == 0
            assert len(backend.serial) <= 20 and backend.serial.isascii()
    finally:
        await raw.close()


async def test_concurrent_requests_on_a_raw_file(image):
    path, data = image
    raw = await RawFileBackend.open(path, workers=3)
    try:
        chunks = [random.Random(i).randbytes(4096) for i in range(16)]
        await asyncio.gather(*(raw.writev(i * 4096, views_of(c)) for i, c in enumerate(chunks)))
        bufs = [bytearray(4096) for _ in range(16)]
        await asyncio.gather(*(raw.readv(i * 4096, [memoryview(b)]) for i, b in enumerate(bufs)))
        assert [bytes(b) for b in bufs] == chunks
    finally:
        await raw.close()
    assert path.read_bytes() == b"".join(chunks)


async def test_more_buffers_than_iov_max(image):
    path, data = image
    count = raw_mod._IOV_MAX + 300
    raw = await RawFileBackend.open(path)
    try:
        bufs = [bytearray(8) for _ in range(count)]
        await raw.readv(0, [memoryview(b) for b in bufs])
        assert b"".join(bufs) == data[: 8 * count]
        await raw.writev(8, [memoryview(bytes([i % 251]) * 8) for i in range(count)])
        assert await read(raw, 8, 8 * count) == b"".join(bytes([i % 251]) * 8 for i in range(count))
    finally:
        await raw.close()


async def test_reads_go_into_a_slice_of_a_larger_buffer(image):
    path, data = image
    raw = await RawFileBackend.open(path)
    try:
        ram = bytearray(b"\xaa" * 10000)
        await raw.readv(512, [memoryview(ram)[100:600], memoryview(ram)[1000:1012]])
        assert ram[100:600] == data[512:1012]
        assert ram[1000:1012] == data[1012:1024]
        assert ram[:100] == b"\xaa" * 100 and ram[600:1000] == b"\xaa" * 400
    finally:
        await raw.close()


async def test_end_of_file_inside_the_size_reads_as_zeroes(image):
    path, data = image
    raw = await RawFileBackend.open(path)
    try:
        os.truncate(path, 4096)  # shrunk behind the backend's back
        got = await read(raw, 2048, 8192)
        assert got == data[2048:4096] + bytes(6144)
    finally:
        await raw.close()


# ----------------------------------------------------------------------
# Bounds, read-only, closed
# ----------------------------------------------------------------------


@pytest.mark.parametrize(("offset", "length"), [(DISK - 511, 512), (DISK, 1), (-1, 1), (0, DISK + 1)])
async def test_out_of_range_requests_raise_backend_io_error(image, offset, length):
    path, _ = image
    raw = await RawFileBackend.open(path)
    try:
        for backend in (MemoryBackend(DISK), raw):
            with pytest.raises(BackendIOError):
                await backend.readv(offset, [memoryview(bytearray(length))])
            with pytest.raises(BackendIOError):
                await backend.writev(offset, [memoryview(bytearray(length))])
            with pytest.raises(BackendIOError):
                await backend.discard(offset, length)
            with pytest.raises(BackendIOError):
                await backend.write_zeroes(offset, length)
    finally:
        await raw.close()
    assert digest(path) == hashlib.sha256(image[1]).hexdigest()


async def test_read_only_raw_refuses_writes_and_leaves_the_file_identical(image):
    path, data = image
    before = digest(path)
    raw = await RawFileBackend.open(path, read_only=True)
    try:
        assert raw.read_only and not raw.supports_discard and not raw.supports_write_zeroes
        assert fcntl.fcntl(raw._fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        with pytest.raises(BackendIOError, match="read-only"):
            await raw.writev(0, views_of(b"x" * 512))
        with pytest.raises(BackendIOError, match="read-only"):
            await raw.discard(0, 4096)
        with pytest.raises(BackendIOError, match="read-only"):
            await raw.write_zeroes(0, 4096)
        assert await read(raw, 0, DISK) == data
        await raw.flush()
    finally:
        await raw.close()
    assert digest(path) == before


async def test_read_only_memory_refuses_writes():
    mem = MemoryBackend(4096, read_only=True, data=b"abc")
    for attempt in (mem.writev(0, views_of(b"z")), mem.discard(0, 512), mem.write_zeroes(0, 512)):
        with pytest.raises(BackendIOError):
            await attempt
    assert mem.contents == b"abc" + bytes(4093)


async def test_read_into_a_read_only_buffer_is_refused():
    mem = MemoryBackend(4096)
    with pytest.raises(BackendIOError):
        await mem.readv(0, [memoryview(b"immutable")])


async def test_closed_backends_refuse_requests(image):
    path, _ = image
    raw = await RawFileBackend.open(path)
    mem = MemoryBackend(DISK)
    for backend in (raw, mem):
        await backend.close()
        await backend.close()  # twice is fine
        with pytest.raises(BackendIOError):
            await backend.readv(0, [memoryview(bytearray(512))])
        with pytest.raises(BackendIOError):
            await backend.flush()


# ----------------------------------------------------------------------
# Bad files are ConfigError, one line
# ----------------------------------------------------------------------


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


async def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        await RawFileBackend.open(tmp_path / "nope.img")
    assert "does not exist" in _one_line(exc)


@pytest.mark.parametrize("read_only", [False, True])
async def test_directory(tmp_path, read_only):
    with pytest.raises(ConfigError) as exc:
        await RawFileBackend.open(tmp_path, read_only=read_only)
    assert "directory" in _one_line(exc)


@pytest.mark.parametrize(("size", "words"), [(1000, "multiple of 512"), (0, "empty")])
async def test_bad_sizes(tmp_path, size, words):
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(size))
    with pytest.raises(ConfigError) as exc:
        await RawFileBackend.open(path)
    assert words in _one_line(exc)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes any file")
async def test_unreadable_and_unwritable_files(tmp_path):
    path = tmp_path / "locked.img"
    path.write_bytes(bytes(4096))
    path.chmod(0o444)
    with pytest.raises(ConfigError) as exc:
        await RawFileBackend.open(path)
    assert ",ro" in _one_line(exc)
    raw = await RawFileBackend.open(path, read_only=True)
    await raw.close()
    path.chmod(0o000)
    with pytest.raises(ConfigError) as exc:
        await RawFileBackend.open(path, read_only=True)
    _one_line(exc)


@pytest.mark.parametrize(("read_only", "hint"), [(False, ",ro"), (True, "permissions")])
async def test_permission_denied_says_what_to_do(tmp_path, monkeypatch, read_only, hint):
    path = tmp_path / "locked.img"
    path.write_bytes(bytes(4096))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", denied)  # works as root too
    with pytest.raises(ConfigError) as exc:
        await RawFileBackend.open(path, read_only=read_only)
    assert hint in _one_line(exc)


async def test_not_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError) as exc:
        await RawFileBackend.open(fifo, read_only=True)
    assert "not a regular file" in _one_line(exc)


def test_memory_backend_rejects_bad_sizes():
    for bad in (0, 1000, -512):
        with pytest.raises(ConfigError):
            MemoryBackend(bad)
    with pytest.raises(ConfigError):
        MemoryBackend(512, data=bytes(513))


# ----------------------------------------------------------------------
# flush, discard, write zeroes, serial
# ----------------------------------------------------------------------


async def test_flush_calls_fdatasync_and_data_is_in_the_file(image, monkeypatch):
    path, data = image
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    raw = await RawFileBackend.open(path)
    try:
        await raw.writev(512, views_of(b"durable!"))
        await raw.flush()
        assert calls == [raw._fd]
        with open(path, "rb") as f:
            f.seek(512)
            assert f.read(8) == b"durable!"
    finally:
        await raw.close()
    await MemoryBackend(512).flush()


@pytest.mark.parametrize("fallocate", ["available", "missing"])
async def test_discard_and_write_zeroes_read_back_zeroes(image, monkeypatch, fallocate):
    path, data = image
    if fallocate == "missing":
        monkeypatch.setattr(raw_mod, "_fallocate", None)
    raw = await RawFileBackend.open(path)
    mem = MemoryBackend(DISK, data=data)
    try:
        for backend in (raw, mem):
            assert backend.supports_discard and backend.supports_write_zeroes
            await backend.discard(4096, 8192)
            await backend.write_zeroes(20000, 1234)  # unaligned on purpose
            await backend.discard(DISK - 100, 100)
            await backend.write_zeroes(0, 0)
            got = await read(backend, 0, DISK)
            expected = bytearray(data)
            expected[4096:12288] = bytes(8192)
            expected[20000:21234] = bytes(1234)
            expected[DISK - 100 :] = bytes(100)
            assert got == bytes(expected)
    finally:
        await raw.close()
    assert path.stat().st_size == DISK


async def test_fallocate_modes_that_fail_fall_back_to_writing_zeroes(image, monkeypatch):
    path, data = image
    modes = []

    def refuse(fd, mode, offset, length):
        modes.append(mode)
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(raw_mod, "_fallocate_or_raise", refuse)
    raw = await RawFileBackend.open(path)
    try:
        await raw.write_zeroes(0, 4096)
        await raw.write_zeroes(8192, 4096)  # the refused modes are not tried again
        assert await read(raw, 0, 12288) == bytes(4096) + data[4096:8192] + bytes(4096)
    finally:
        await raw.close()
    assert modes == [raw_mod.FALLOC_FL_ZERO_RANGE | raw_mod.FALLOC_FL_KEEP_SIZE,
                     raw_mod.FALLOC_FL_PUNCH_HOLE | raw_mod.FALLOC_FL_KEEP_SIZE]


async def test_host_io_errors_become_backend_io_errors(image, monkeypatch):
    path, _ = image

    def broken(fd, views, offset):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "preadv", broken)
    raw = await RawFileBackend.open(path)
    try:
        with pytest.raises(BackendIOError, match="Input/output error") as exc:
            await raw.readv(0, [memoryview(bytearray(512))])
        assert exc.value.errno == 5
    finally:
        await raw.close()


async def test_serial_comes_from_the_file_name(tmp_path):
    path = tmp_path / "a-very-long-disk-image-name.img"
    make_image(path, 4096)
    raw = await RawFileBackend.open(path)
    await raw.close()
    assert raw.serial == "a-very-long-disk-ima"
    assert base_mod.make_serial("d\u00e9j\u00e0\n") == "d_j__"


async def test_shared_executor_is_left_running(image):
    import concurrent.futures

    path, data = image
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        raw = await RawFileBackend.open(path, executor=pool)
        assert await read(raw, 0, 512) == data[:512]
        await raw.close()
        assert pool.submit(lambda: 42).result() == 42


# ----------------------------------------------------------------------
# The disk spec
# ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("disk.img", DiskSpec("disk.img")),
        ("/x/disk.img,ro", DiskSpec("/x/disk.img", read_only=True)),
        ("d.img,if=ata,ro", DiskSpec("d.img", read_only=True, interface="ata")),
        ("d.img,format=raw,if=virtio", DiskSpec("d.img")),
        ("d.img,ro=off", DiskSpec("d.img")),
        ("nbd.img", DiskSpec("nbd.img")),
        ("a,,b.img,ro", DiskSpec("a,b.img", read_only=True)),
        ("nbd+unix:///disk?socket=/run/n.sock", DiskSpec("nbd+unix:///disk?socket=/run/n.sock", format="nbd")),
        ("nbd://127.0.0.1:10809/disk,ro,if=ata",
         DiskSpec("nbd://127.0.0.1:10809/disk", read_only=True, format="nbd", interface="ata")),
        ("nbd://localhost,format=nbd", DiskSpec("nbd://localhost", format="nbd")),
    ],
)
def test_parse_disk_spec(text, expected):
    assert parse_disk_spec(text) == expected


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("", "empty"),
        (",ro", "no path"),
        ("d.img,rw", "'rw'"),
        ("d.img,format=qcow2", "qcow2"),
        ("d.img,if=scsi", "scsi"),
        ("d.img,ro=maybe", "maybe"),
        ("d.img,ro,ro", "twice"),
        ("d.img,ro,", "empty option"),
        ("d.img,cache=none", "cache"),
        ("d.img,=x", "empty option"),
        ("nbd://h/x,format=raw", "format=raw"),
        ("d.img,format=nbd", "d.img"),
        ("nbds://h/x", "TLS"),
        ("nbd+unix:///x", "socket"),
    ],
)
def test_parse_disk_spec_rejects(text, names):
    with pytest.raises(ConfigError) as exc:
        parse_disk_spec(text)
    message = _one_line(exc)
    if names:
        assert names in message


@pytest.mark.parametrize(
    ("url", "export", "socket_path", "host", "port"),
    [
        ("nbd+unix:///disk?socket=/tmp/s", "disk", "/tmp/s", None, 10809),
        ("nbd+unix:///?socket=s", "", "s", None, 10809),
        ("nbd://127.0.0.1:1234/disk", "disk", None, "127.0.0.1", 1234),
        ("nbd://[::1]/a%20b", "a b", None, "::1", 10809),
        ("nbd://host//x", "/x", None, "host", 10809),
        ("nbd://host", "", None, "host", 10809),
    ],
)
def test_parse_nbd_url(url, export, socket_path, host, port):
    address = parse_nbd_url(url)
    assert (address.export, address.socket_path, address.host, address.port) == (export, socket_path, host, port)


@pytest.mark.parametrize("url", ["nbd://", "nbd://h:99999/x", "nbd://h/x?socket=s", "nbd+unix://h/x?socket=s",
                                 "nbd+unix:///x?socket=a&socket=b", "nbd+unix:///x?socket=s&tls=1",
                                 "http://h/x", "nbd://u:p@h/x", "nbd://h/x#frag"])
def test_parse_nbd_url_rejects(url):
    with pytest.raises(ConfigError) as exc:
        parse_nbd_url(url)
    _one_line(exc)


async def test_open_backend(image, tmp_path):
    path, data = image
    backend = await open_backend(parse_disk_spec(f"{path},ro"))
    try:
        assert isinstance(backend, RawFileBackend) and backend.read_only
        assert await read(backend, 0, 512) == data[:512]
    finally:
        await backend.close()
    with pytest.raises(ConfigError):
        await open_backend(parse_disk_spec(f"nbd+unix:///x?socket={tmp_path}/none.sock"))


# ----------------------------------------------------------------------
# NBD client against a small in-process server
# ----------------------------------------------------------------------


class FakeNbdServer:
    """Just enough of an NBD server to exercise the client's edge cases.

    Replies to requests in reverse order of arrival within each batch (a small
    delay per request), can fail chosen offsets, refuse NBD_OPT_GO, or drop the
    connection after a number of requests.
    """

    def __init__(self, size: int = DISK, *, export: str = "disk", flags: int | None = None,
                 go_supported: bool = True, fail: dict[int, int] | None = None,
                 drop_after: int | None = None, block_sizes: tuple[int, int, int] | None = None,
                 cut_read_payload: bool = False) -> None:
        self.data = bytearray(size)
        self.cut_read_payload = cut_read_payload  # a read's reply stops halfway, and the connection with it
        self.export = export
        self.flags = flags if flags is not None else (
            nbd_mod.FLAG_HAS_FLAGS | nbd_mod.FLAG_SEND_FLUSH | nbd_mod.FLAG_SEND_TRIM
            | nbd_mod.FLAG_SEND_WRITE_ZEROES)
        self.go_supported = go_supported
        self.fail = fail or {}
        self.drop_after = drop_after
        self.block_sizes = block_sizes
        self.commands: list[tuple[int, int, int]] = []
        self.client_flags: int | None = None
        self.disconnected = False
        self.tasks: set[asyncio.Task] = set()
        self.handlers: set[asyncio.Task] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handlers.add(asyncio.current_task())
        try:
            if await self._negotiate(reader, writer):
                await self._transmit(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            try:
                if self.tasks:
                    await asyncio.gather(*self.tasks, return_exceptions=True)
            finally:
                writer.close()

    async def stop(self) -> None:
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, *self.tasks, return_exceptions=True)

    def _option_reply(self, writer, option: int, reply_type: int, data: bytes = b"") -> None:
        writer.write(struct.pack(">QIII", nbd_mod.OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data)

    async def _negotiate(self, reader, writer) -> bool:
        writer.write(struct.pack(">QQH", nbd_mod.NBDMAGIC, nbd_mod.IHAVEOPT,
                                 nbd_mod.FLAG_FIXED_NEWSTYLE | nbd_mod.FLAG_NO_ZEROES))
        (self.client_flags,) = struct.unpack(">I", await reader.readexactly(4))
        while True:
            magic, option, length = struct.unpack(">QII", await reader.readexactly(16))
            assert magic == nbd_mod.IHAVEOPT
            data = await reader.readexactly(length)
            if option == nbd_mod.OPT_GO:
                if not self.go_supported:
                    self._option_reply(writer, option, nbd_mod.REP_ERR_UNSUP)
                    continue
                (name_len,) = struct.unpack_from(">I", data)
                name = data[4 : 4 + name_len].decode()
                if name != self.export:
                    self._option_reply(writer, option, nbd_mod.REP_ERROR_BIT + 6, b"no such export")
                    continue
                self._option_reply(writer, option, nbd_mod.REP_INFO, struct.pack(">HH", 2, 0))  # ignored
                self._option_reply(writer, option, nbd_mod.REP_INFO,
                                   struct.pack(">HQH", nbd_mod.INFO_EXPORT, len(self.data), self.flags))
                if self.block_sizes:
                    self._option_reply(writer, option, nbd_mod.REP_INFO,
                                       struct.pack(">HIII", nbd_mod.INFO_BLOCK_SIZE, *self.block_sizes))
                self._option_reply(writer, option, nbd_mod.REP_ACK)
                return True
            if option == nbd_mod.OPT_EXPORT_NAME:
                if data.decode() != self.export:
                    return False
                writer.write(struct.pack(">QH", len(self.data), self.flags))  # NO_ZEROES was negotiated
                return True
            if option == nbd_mod.OPT_ABORT:
                return False
            self._option_reply(writer, option, nbd_mod.REP_ERR_UNSUP)

    async def _transmit(self, reader, writer) -> None:
        count = 0
        while True:
            magic, flags, command, cookie, offset, length = struct.unpack(">IHHQQI", await reader.readexactly(28))
            assert magic == nbd_mod.REQUEST_MAGIC and flags == 0
            payload = await reader.readexactly(length) if command == nbd_mod.CMD_WRITE else b""
            if command == nbd_mod.CMD_DISC:
                self.disconnected = True
                return
            self.commands.append((command, offset, length))
            count += 1
            if self.drop_after is not None and count > self.drop_after:
                return
            delay = 0.02 / count  # later requests answer sooner: replies come out of order
            task = asyncio.ensure_future(self._reply(writer, command, cookie, offset, length, payload, delay))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _reply(self, writer, command, cookie, offset, length, payload, delay) -> None:
        await asyncio.sleep(delay)
        error = self.fail.get(offset, 0)
        body = b""
        if not error:
            if command == nbd_mod.CMD_READ:
                body = bytes(self.data[offset : offset + length])
            elif command == nbd_mod.CMD_WRITE:
                self.data[offset : offset + length] = payload
            elif command in (nbd_mod.CMD_TRIM, nbd_mod.CMD_WRITE_ZEROES):
                self.data[offset : offset + length] = bytes(length)
        if not writer.is_closing():
            if self.cut_read_payload and command == nbd_mod.CMD_READ:
                writer.write(struct.pack(">IIQ", nbd_mod.SIMPLE_REPLY_MAGIC, error, cookie) + body[: length // 2])
                writer.close()
                return
            writer.write(struct.pack(">IIQ", nbd_mod.SIMPLE_REPLY_MAGIC, error, cookie) + body)


@contextlib.asynccontextmanager
async def fake_server(**kwargs):
    server_state = FakeNbdServer(**kwargs)
    with tempfile.TemporaryDirectory(prefix="nbd") as tmp:
        sock = os.path.join(tmp, "s")
        server = await asyncio.start_unix_server(server_state.handle, sock)
        try:
            yield server_state, f"nbd+unix:///{server_state.export}?socket={sock}"
        finally:
            server.close()
            await server.wait_closed()
            await server_state.stop()
            await asyncio.sleep(0)  # let the transports finish closing


async def test_nbd_handshake_and_out_of_order_replies():
    async with fake_server() as (server, url):
        backend = await NbdBackend.connect(url)
        try:
            assert server.client_flags == nbd_mod.FLAG_C_FIXED_NEWSTYLE | nbd_mod.FLAG_C_NO_ZEROES
            assert backend.size == DISK and not backend.read_only and backend.serial == "disk"
            assert backend.supports_discard and backend.supports_write_zeroes
            chunks = [random.Random(i).randbytes(4096) for i in range(8)]
            await asyncio.gather(*(backend.writev(i * 4096, views_of(c)) for i, c in enumerate(chunks)))
            bufs = [bytearray(4096) for _ in range(8)]
            await asyncio.gather(*(backend.readv(i * 4096, [memoryview(b)]) for i, b in enumerate(bufs)))
            assert [bytes(b) for b in bufs] == chunks
            await backend.write_zeroes(0, 4096)
            await backend.discard(4096, 4096)
            await backend.flush()
            assert await read(backend, 0, 12288) == bytes(8192) + chunks[2]
        finally:
            await backend.close()
        await asyncio.sleep(0.01)
        assert server.disconnected
        assert server.data[8192:8192 * 4] == b"".join(chunks[2:8])[: 8192 * 3]


async def test_nbd_server_errors_name_the_errno():
    async with fake_server(fail={4096: 28, 8192: 5}) as (server, url):
        backend = await NbdBackend.connect(url)
        try:
            results = await asyncio.gather(
                backend.writev(4096, views_of(bytes(512))),
                backend.readv(8192, [memoryview(bytearray(512))]),
                backend.readv(0, [memoryview(bytearray(512))]),
                return_exceptions=True)
            assert isinstance(results[0], BackendIOError) and "ENOSPC" in str(results[0])
            assert results[0].errno == 28
            assert isinstance(results[1], BackendIOError) and "EIO" in str(results[1])
            assert results[2] is None  # the connection survives request errors
            assert await read(backend, 512, 512) == bytes(512)
        finally:
            await backend.close()


async def test_nbd_connection_loss_fails_everything_pending():
    async with fake_server(drop_after=2) as (server, url):
        backend = await NbdBackend.connect(url)
        try:
            results = await asyncio.gather(
                *(backend.readv(i * 512, [memoryview(bytearray(512))]) for i in range(4)),
                return_exceptions=True)
            assert all(isinstance(r, BackendIOError) for r in results[2:]), results
            with pytest.raises(BackendIOError, match="down"):
                await backend.readv(0, [memoryview(bytearray(512))])
        finally:
            await backend.close()


async def test_nbd_connection_lost_mid_payload_fails_that_read():
    # Found by the nbd_client fuzz target: a read whose reply header had
    # arrived was no longer pending, so losing the connection during its
    # payload left its caller waiting forever.
    async with fake_server(cut_read_payload=True) as (server, url):
        backend = await NbdBackend.connect(url)
        try:
            with pytest.raises(BackendIOError, match="lost"):
                await asyncio.wait_for(backend.readv(0, [memoryview(bytearray(4096))]), 5)
        finally:
            await backend.close()


async def test_nbd_splits_large_transfers_at_the_max_payload():
    async with fake_server(size=1 << 20, block_sizes=(512, 4096, 64 * 1024)) as (server, url):
        backend = await NbdBackend.connect(url)
        try:
            assert (backend.min_block, backend.max_payload) == (512, 64 * 1024)
            data = random.Random(3).randbytes(200 * 1024)
            await backend.writev(4096, [memoryview(data[:1000 * 100]), memoryview(data[1000 * 100 :])])
            assert await read(backend, 4096, len(data)) == data
            writes = [c for c in server.commands if c[0] == nbd_mod.CMD_WRITE]
            assert len(writes) == 4 and max(c[2] for c in writes) == 64 * 1024
            with pytest.raises(BackendIOError, match="minimum block size"):
                await backend.readv(100, [memoryview(bytearray(512))])
            server.commands.clear()
            await backend.write_zeroes(0, 1 << 20)
            assert server.commands == [(nbd_mod.CMD_WRITE_ZEROES, i * 65536, 65536) for i in range(16)]
            assert await read(backend, 0, 1 << 20) == bytes(1 << 20)
        finally:
            await backend.close()


async def test_nbd_small_max_payload_keeps_one_window_of_pieces_in_flight():
    # Regression (fuzz target nbd_client): a server that claims a 512-byte maximum payload
    # made a large read or write put every piece (a request, task and future each) in flight at once.
    async with fake_server(size=1 << 20, block_sizes=(512, 512, 512)) as (server, url):
        backend = await NbdBackend.connect(url)
        try:
            data = random.Random(5).randbytes(128 * 1024)
            most = 0
            for transfer in (backend.writev(0, views_of(data)), read(backend, 0, len(data))):
                task = asyncio.ensure_future(transfer)
                while not task.done():
                    most = max(most, len(backend._pending))
                    await asyncio.sleep(0)
                result = await task
            assert result == data
            assert 0 < most <= nbd_mod.SPLIT_WINDOW
            assert len(server.commands) == 2 * 256 and {c[2] for c in server.commands} == {512}
        finally:
            await backend.close()


async def test_nbd_falls_back_to_export_name_when_go_is_unsupported():
    async with fake_server(go_supported=False) as (server, url):
        backend = await NbdBackend.connect(url)
        try:
            assert backend.size == DISK
            await backend.writev(0, views_of(b"hello"))
            assert await read(backend, 0, 5) == b"hello"
        finally:
            await backend.close()


async def test_nbd_read_only_flag_and_missing_features():
    flags = nbd_mod.FLAG_HAS_FLAGS | nbd_mod.FLAG_READ_ONLY
    async with fake_server(flags=flags) as (server, url):
        backend = await NbdBackend.connect(url)
        try:
            assert backend.read_only and not backend.supports_discard and not backend.supports_write_zeroes
            with pytest.raises(BackendIOError, match="read-only"):
                await backend.writev(0, views_of(b"x"))
            await backend.flush()  # no SEND_FLUSH: nothing to send
            assert server.commands == []
        finally:
            await backend.close()
    async with fake_server(flags=nbd_mod.FLAG_HAS_FLAGS) as (server, url):
        backend = await NbdBackend.connect(url)
        try:
            server.data[0:4096] = b"\xff" * 4096
            await backend.discard(0, 512)  # a hint the server did not offer: nothing sent
            await backend.write_zeroes(0, 4096)  # emulated with writes
            assert await read(backend, 0, 4096) == bytes(4096)
            assert {c[0] for c in server.commands} == {nbd_mod.CMD_WRITE, nbd_mod.CMD_READ}
        finally:
            await backend.close()


async def test_nbd_unknown_export_and_missing_socket_are_config_errors(tmp_path):
    async with fake_server() as (server, url):
        with pytest.raises(ConfigError, match="refused export 'other'") as exc:
            await NbdBackend.connect(url.replace("/disk?", "/other?"))
        _one_line(exc)
    with pytest.raises(ConfigError, match="cannot connect") as exc:
        await NbdBackend.connect(f"nbd+unix:///disk?socket={tmp_path}/missing.sock")
    _one_line(exc)


async def test_nbd_non_nbd_server_is_a_config_error():
    async def not_nbd(reader, writer):
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n" + bytes(32))
        await writer.drain()
        writer.close()

    with tempfile.TemporaryDirectory(prefix="nbd") as tmp:
        sock = os.path.join(tmp, "s")
        server = await asyncio.start_unix_server(not_nbd, sock)
        try:
            with pytest.raises(ConfigError, match="does not speak NBD"):
                await NbdBackend.connect(f"nbd+unix:///?socket={sock}")
        finally:
            server.close()
            await server.wait_closed()


async def test_nbd_cancelled_read_does_not_break_the_connection():
    async with fake_server() as (server, url):
        backend = await NbdBackend.connect(url)
        try:
            await backend.writev(0, views_of(b"abc"))
            task = asyncio.ensure_future(read(backend, 0, 4096))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await read(backend, 0, 3) == b"abc"
        finally:
            await backend.close()


async def test_raw_readv_nowait_serves_cached_data_at_once(tmp_path):
    from aiokvm.devices.backends.raw import RawFileBackend

    path = tmp_path / "cached.img"
    path.write_bytes(bytes(range(256)) * 64)
    backend = await RawFileBackend.open(str(path))
    try:
        buf = bytearray(4096)
        assert backend.readv_nowait(4096, [memoryview(buf)])  # just written: in the page cache
        assert bytes(buf) == (bytes(range(256)) * 16)
    finally:
        await backend.close()
