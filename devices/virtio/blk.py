"""virtio-blk: the request parser (pure) and the device (asyncio, over a BlockBackend).

Requests: IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES.  Several requests
are in flight at once (one task each) and complete in whatever order the
backend finishes them; each completion writes the status byte, pushes the
used element and interrupts the driver if the ring's notification rules say
so.

Threat model: the guest controls every descriptor and header.  Buffers are
validated by ``SplitQueue.pop`` (inside RAM, no loops, read-before-write);
here, a request whose shape is wrong (no header, no status byte, data in the
wrong direction, length not a multiple of 512, sectors beyond capacity,
discard segments out of range) completes with IOERR or UNSUPP and never
reaches the backend.  A write to a read-only disk is IOERR and the image is
untouched.  Nothing the guest sends raises out of the device.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import asdict, dataclass, field
from operator import itemgetter
from typing import NamedTuple

import structlog

from ..backends.base import SECTOR_SIZE, BackendIOError, count_backend_error
from .chain import ChainReader, ChainWriter
from .device import F_EVENT_IDX, F_INDIRECT_DESC, InterruptKind
from .queue import DescriptorChain, VirtqueueError

log = structlog.get_logger("aiokvm.devices.virtio")

DEVICE_ID_BLOCK = 2
SECTOR = SECTOR_SIZE

# Request types and status values.
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
_STATUS_BYTES = {status: bytes([status]) for status in (S_OK, S_IOERR, S_UNSUPP)}

# Feature bits.
F_SIZE_MAX, F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH = 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 9
F_DISCARD, F_WRITE_ZEROES = 1 << 13, 1 << 14

QUEUE_SIZE = 256
SEG_MAX = 126          # data segments per request (queue size minus header and status)
SIZE_MAX = 1 << 20     # bytes per segment
MAX_DISCARD_SECTORS = 1 << 22
MAX_DISCARD_SEG = 16
ID_BYTES = 20

HEADER = struct.Struct("<IIQ")
HEADER_SIZE = HEADER.size
DISCARD_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags


class BlkRequest(NamedTuple):
    """A parsed request: what to do, and where its buffers are (one per request: a named tuple)."""

    type: int
    sector: int
    data: tuple[tuple[int, int], ...]   # (addr, len): device-readable for OUT, writable for IN/GET_ID
    status_addr: int
    data_len: int                       # sum of the data lengths


class BadRequest(Exception):
    """The request is malformed; complete it with ``status`` (if it has a status byte)."""

    def __init__(self, status: int, why: str, status_addr: int | None) -> None:
        super().__init__(why)
        self.status = status
        self.status_addr = status_addr


def parse_request(chain: DescriptorChain, memory, capacity_sectors: int, read_only: bool) -> BlkRequest:
    """Turn a descriptor chain into a request, or raise ``BadRequest``.  (Once per request.)

    Any framing is accepted (VIRTIO_F_ANY_LAYOUT is implied by version 1):
    the header is the first 16 readable bytes, the status the last writable
    byte, wherever the descriptor boundaries fall, and zero-length buffers
    count for nothing.
    """
    readable, writable = chain.readable, chain.writable
    # Fast path for the framing Linux always uses, header and status byte in
    # descriptors of their own: nothing to split, so no cursor (it would cost
    # about as much again as the whole parse).  Anything else takes the cursor.
    if readable and writable and readable[0][1] == HEADER_SIZE and writable[-1][1] == 1:
        readable_data, writable_data = readable[1:], writable[:-1]
        if 0 not in map(_length, readable_data) and 0 not in map(_length, writable_data):
            rtype, _reserved, sector = HEADER.unpack_from(memory.view(readable[0][0], HEADER_SIZE))
            return _check_request(rtype, sector, readable_data, writable_data, writable[-1][0],
                                  capacity_sectors, read_only)
    writer = ChainWriter(memory, writable)
    if not writer.remaining:
        raise BadRequest(S_IOERR, "no status byte", None)
    status_addr = writer.split_at(writer.remaining - 1).segments(1)[0][0]
    reader = ChainReader(memory, readable)
    if reader.remaining < HEADER_SIZE:
        raise BadRequest(S_IOERR, "header shorter than 16 bytes", status_addr)
    rtype, _reserved, sector = reader.read_struct(HEADER)
    return _check_request(rtype, sector, tuple(reader.segments(reader.remaining)),
                          tuple(writer.segments(writer.remaining)), status_addr, capacity_sectors, read_only)


_length = itemgetter(1)


def _check_request(rtype: int, sector: int, readable: tuple[tuple[int, int], ...],
                   writable: tuple[tuple[int, int], ...], status_addr: int,
                   capacity_sectors: int, read_only: bool) -> BlkRequest:
    """The request from its header and data pieces (none empty): the data
    after the header, the data before the status byte."""
    if rtype in (T_IN, T_GET_ID):
        if readable:
            raise BadRequest(S_IOERR, "device-readable data in a read request", status_addr)
        data = writable
    elif rtype in (T_OUT, T_DISCARD, T_WRITE_ZEROES):
        if writable:
            raise BadRequest(S_IOERR, "device-writable data in a write request", status_addr)
        data = readable
    elif rtype == T_FLUSH:
        return BlkRequest(rtype, sector, (), status_addr, 0)  # any data is ignored
    else:
        raise BadRequest(S_UNSUPP, f"unsupported request type {rtype}", status_addr)
    length = 0
    largest = 0
    for _addr, n in data:
        length += n
        if n > largest:
            largest = n

    if rtype in (T_IN, T_OUT):
        if length % SECTOR:
            raise BadRequest(S_IOERR, f"data length {length} is not a multiple of 512", status_addr)
        if sector + length // SECTOR > capacity_sectors:
            raise BadRequest(S_IOERR, f"sectors {sector}+{length // SECTOR} beyond capacity {capacity_sectors}",
                             status_addr)
        if largest > SIZE_MAX or len(data) > SEG_MAX:
            raise BadRequest(S_IOERR, "segment count or size beyond what was advertised", status_addr)
    if read_only and rtype in (T_OUT, T_DISCARD, T_WRITE_ZEROES):
        raise BadRequest(S_IOERR, "write to a read-only disk", status_addr)
    return BlkRequest(rtype, sector, data, status_addr, length)


def parse_segments(request: BlkRequest, memory, capacity_sectors: int) -> list[tuple[int, int, int]]:
    """DISCARD / WRITE_ZEROES segments: ``(sector, count, flags)``, range-checked."""
    raw = b"".join(memory.read(a, n) for a, n in request.data)
    if not raw or len(raw) % DISCARD_SEGMENT.size or len(raw) // DISCARD_SEGMENT.size > MAX_DISCARD_SEG:
        raise BadRequest(S_IOERR, "bad discard/write-zeroes segment list", request.status_addr)
    segments = [DISCARD_SEGMENT.unpack_from(raw, i) for i in range(0, len(raw), DISCARD_SEGMENT.size)]
    for sector, count, _flags in segments:
        if count > MAX_DISCARD_SECTORS or sector + count > capacity_sectors:
            raise BadRequest(S_IOERR, f"segment {sector}+{count} out of range", request.status_addr)
    return segments


@dataclass
class BlkCounters:
    requests: int = 0
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    ioerr: int = 0
    unsupp: int = 0
    in_flight_max: int = 0
    reads_inline: int = 0       # reads served at once from the page cache, without a task
    errors: list[str] = field(default_factory=list)
    backend_errors: dict[str, int] = field(default_factory=dict)  # by errno name


class VirtioBlk:
    """A virtio-blk device over a ``BlockBackend``.  Lives on the asyncio loop."""

    device_id = DEVICE_ID_BLOCK
    kind = "virtio-blk"
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, backend, *, serial: str | None = None) -> None:
        if backend.size % SECTOR:
            raise ValueError("backend size must be a multiple of 512")
        self.backend = backend
        # page-cached reads served on the loop (see _read_now); None if the backend cannot
        self._readv_nowait = getattr(backend, "readv_nowait", None)
        self.read_only = bool(backend.read_only)
        self.capacity = backend.size // SECTOR
        self.serial = (serial if serial is not None else getattr(backend, "serial", "aiokvm"))[:ID_BYTES]
        features = F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_EVENT_IDX | F_INDIRECT_DESC
        if self.read_only:
            features |= F_RO
        else:
            if getattr(backend, "supports_discard", False):
                features |= F_DISCARD
            if getattr(backend, "supports_write_zeroes", False):
                features |= F_WRITE_ZEROES
        self.features = features
        self.counters = BlkCounters()
        self.log = log  # the device manager binds vm= and device=
        self._config = self._build_config()
        self._queue = None
        self._memory = None
        self._interrupt = None
        self._tasks: set[asyncio.Task] = set()
        self._generation = 0  # bumps on reset: completions of an older generation are dropped

    def _build_config(self) -> bytes:
        cfg = bytearray(60)
        struct.pack_into("<QII", cfg, 0, self.capacity, SIZE_MAX, SEG_MAX)
        struct.pack_into("<I", cfg, 20, SECTOR)                    # blk_size
        struct.pack_into("<H", cfg, 34, 1)                         # num_queues
        struct.pack_into("<III", cfg, 36, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1)
        struct.pack_into("<II", cfg, 48, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG)
        cfg[56] = 0                                                # write_zeroes_may_unmap
        return bytes(cfg)

    # -- VirtioDevice ---------------------------------------------------------------------
    def read_config(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4, 8) or offset < 0 or offset + size > len(self._config):
            return 0
        return int.from_bytes(self._config[offset:offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        pass  # writeback toggling is not offered: the config space is read-only

    def activate(self, memory, queues, features: int, interrupt) -> None:
        self._memory = memory
        self._queue = queues[0]
        self._interrupt = interrupt
        self._generation += 1

    def reset(self) -> asyncio.Future | None:
        """Forget the driver's queue.  Requests in flight are not cancelled:
        a worker thread may be reading from or writing into buffers the
        driver will reuse once the reset completes, so the reset returns a
        future that resolves when every one has finished (their completions
        are dropped: a new generation), and the transport holds the
        resetting vCPU until then.  QEMU drains on reset the same way."""
        self._generation += 1
        self._queue = None
        pending = [task for task in self._tasks if not task.done()]
        if not pending:
            return None
        return asyncio.gather(*pending, return_exceptions=True)

    def metrics(self) -> dict:
        return {"kind": self.kind, "counters": asdict(self.counters)}

    async def aclose(self) -> None:
        """Wait for requests in flight, then close the backend."""
        await self.drain()
        await self.backend.close()

    def notify(self, queue: int) -> None:
        q = self._queue
        if q is None:
            return
        # Reads completed right here publish their used entries at once; the
        # interrupt decision (a barrier and a look at used_event) is taken
        # once per SIGNAL_BATCH of them and when the pass ends.
        unsignalled = 0
        try:
            while True:
                chain = q.pop()  # VirtqueueError propagates to the transport: NEEDS_RESET
                if chain is None:
                    # Ask for a kick on the next add (avail_event under EVENT_IDX),
                    # then look once more: a chain added meanwhile sent no kick.
                    q.set_notification(True)
                    if q.has_available():
                        continue
                    break
                self.counters.requests += 1
                try:
                    request = parse_request(chain, self._memory, self.capacity, self.read_only)
                except BadRequest as bad:
                    self._finish_bad(chain, bad)
                    continue
                views = self._read_views(request) if request.type == T_IN else None
                if views is not None and self._read_now(chain, request, views):
                    unsignalled += 1
                    if unsignalled >= self.SIGNAL_BATCH:
                        unsignalled = 0
                        self._signal_if_needed()
                    continue
                self._spawn(chain, request, views)
        finally:
            if unsignalled:
                self._signal_if_needed()

    #: inline completions between interrupt decisions within one notify pass
    SIGNAL_BATCH = 16

    def _spawn(self, chain: DescriptorChain, request: BlkRequest, views: list[memoryview] | None = None) -> None:
        """Run a request that must wait (backend I/O) as a task; it completes out of order."""
        task = asyncio.get_running_loop().create_task(self._execute(chain, request, self._generation, views))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.counters.in_flight_max = max(self.counters.in_flight_max, len(self._tasks))

    # -- execution -------------------------------------------------------------------------
    def _read_views(self, request: BlkRequest) -> list[memoryview] | None:
        """Guest-RAM views of a read's buffers, or None (the task reports why)."""
        view = self._memory.view
        try:
            return [view(a, n) for a, n in request.data]
        except Exception:
            return None

    def _read_now(self, chain: DescriptorChain, request: BlkRequest, views: list[memoryview]) -> bool:
        """Complete a read without a task when the backend can serve it at once
        (page-cached data, memory): no thread handoff, no task, no extra loop turn."""
        nowait = self._readv_nowait
        if nowait is None:
            return False
        try:
            if not nowait(request.sector * SECTOR, views):
                return False
        except Exception:
            return False  # let the general path report it
        self.counters.reads += 1
        self.counters.bytes_read += request.data_len
        self.counters.reads_inline += 1
        self._complete(chain.head, request.status_addr, S_OK, request.data_len, signal=False)
        return True

    async def _execute(self, chain: DescriptorChain, request: BlkRequest, generation: int,
                       views: list[memoryview] | None = None) -> None:
        """``views``: a read's buffers, when notify() already built them."""
        status, written = S_OK, 0
        backend, memory = self.backend, self._memory
        offset = request.sector * SECTOR
        try:
            if request.type == T_IN:
                if views is None:
                    views = [memory.view(a, n) for a, n in request.data]
                await backend.readv(offset, views)
                written = request.data_len
                self.counters.reads += 1
                self.counters.bytes_read += written
            elif request.type == T_OUT:
                views = [memory.view(a, n) for a, n in request.data]
                await backend.writev(offset, views)
                self.counters.writes += 1
                self.counters.bytes_written += request.data_len
            elif request.type == T_FLUSH:
                await backend.flush()
                self.counters.flushes += 1
            elif request.type == T_GET_ID:
                ident = self.serial.encode("ascii", "replace")[:ID_BYTES].ljust(ID_BYTES, b"\0")
                for addr, n in request.data:
                    take = ident[:n]
                    memory.write(addr, take)
                    written += len(take)
                    ident = ident[n:]
                    if not ident:
                        break
            elif request.type == T_DISCARD:
                for sector, count, _flags in parse_segments(request, memory, self.capacity):
                    await backend.discard(sector * SECTOR, count * SECTOR)
            elif request.type == T_WRITE_ZEROES:
                for sector, count, _flags in parse_segments(request, memory, self.capacity):
                    await backend.write_zeroes(sector * SECTOR, count * SECTOR)
        except BadRequest as bad:
            status = bad.status
        except BackendIOError as exc:
            status = S_IOERR
            self._backend_error(exc)
        except asyncio.CancelledError:
            return  # reset: the driver forgot this request
        except Exception as exc:  # a bug or a GuestMemoryError: fail the request, keep the device
            status = S_IOERR
            self._note(f"{type(exc).__name__}: {exc}")
        if generation != self._generation or self._queue is None:
            return
        self._complete(chain.head, request.status_addr, status, written)

    def _finish_bad(self, chain: DescriptorChain, bad: BadRequest) -> None:
        self._note(str(bad))
        if bad.status_addr is None:
            # No status byte to write: return the chain with nothing written.
            self._push(chain.head, 0)
            return
        self._complete(chain.head, bad.status_addr, bad.status, 0)

    def _complete(self, head: int, status_addr: int, status: int, written: int, *, signal: bool = True) -> None:
        if status == S_IOERR:
            self.counters.ioerr += 1
        elif status == S_UNSUPP:
            self.counters.unsupp += 1
        try:
            self._memory.write(status_addr, _STATUS_BYTES[status])
        except Exception as exc:  # validated by pop(); a remap would be a bug
            self._note(f"status byte: {exc}")
            return
        self._push(head, written + 1, signal=signal)

    def _push(self, head: int, written: int, *, signal: bool = True) -> None:
        try:
            self._queue.push(head, written)
        except VirtqueueError as exc:
            self._note(f"used ring: {exc}")
            return
        if signal:
            self._signal_if_needed()

    def _signal_if_needed(self) -> None:
        q = self._queue
        if q is not None and q.needs_notification():
            self._interrupt.trigger(InterruptKind.USED_BUFFER)

    def _backend_error(self, exc: BackendIOError) -> None:
        # Not _note: a dead backend fails every request, so logging each (even
        # 32) floods the log; count by errno, log the first of each kind.
        if count_backend_error(self.counters.backend_errors, exc):
            self.log.warning("virtio-blk backend error: the guest gets IOERR", error=str(exc),
                             count=sum(self.counters.backend_errors.values()))

    def _note(self, what: str) -> None:
        # Bounded: a guest can send bad requests forever.
        if len(self.counters.errors) < 32:
            self.counters.errors.append(what)
            self.log.warning("virtio-blk request failed", reason=what)

    async def drain(self) -> None:
        """Wait for every request in flight (e.g. before closing the backend)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
