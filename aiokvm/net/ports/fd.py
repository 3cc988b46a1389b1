"""A port over a file descriptor where one read is one frame and one write
is one frame: a TAP device, a datagram socket (QEMU ``dgram``, a VDE data
socket, VXLAN's UDP).

Reads drain up to ``READ_BATCH`` frames per readiness event and hand them
to the switch as one batch.  Writes are non-blocking; a frame that meets
EAGAIN waits in a bounded queue that is flushed when the fd is writable
again, and past the bound frames are dropped and counted (``queue_full``).
Read and write errors are counted by errno name, never raised into the loop.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections import deque

import structlog

from ..frames import ETH_HLEN
from .base import SwitchPort

log = structlog.get_logger("aiokvm.net")

READ_BATCH = 256
OUT_QUEUE = 256
READ_SIZE = 65536 + 4096  # above any frame a peer may send: QEMU's own buffer size
#: read errors after which the fd never works again: a TAP whose device was deleted
#: (``ip link del``) reads EBADFD and polls as EPOLLERR for ever
DEAD_FD_ERRORS = frozenset({errno.EBADFD, errno.EBADF, errno.ENODEV, errno.ENXIO})


def errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "EIO")


class FramedFdPort(SwitchPort):
    """Subclasses give ``_recv()`` and ``_write(frame)`` for their fd, and call
    ``_start_io(fd)`` once it is open."""

    def __init__(self, name: str, *, out_queue: int = OUT_QUEUE) -> None:
        super().__init__(name)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1
        self._out: deque[bytes] = deque()
        self._out_limit = out_queue
        self._writer_armed = False
        self._owner = None
        self.errors: dict[str, int] = {}
        self.failed: str | None = None  # why the fd was given up (it is dead), else None

    # -- what a subclass provides ---------------------------------------------------------
    def _recv(self) -> bytes | None:
        """One read; None if what came was not a frame (the subclass counted why)."""
        return os.read(self._fd, READ_SIZE)

    def _write(self, frame: bytes) -> None:
        os.write(self._fd, frame)

    def _accept(self, data: bytes) -> bytes | None:
        """The frame a read carries, or None to drop it (counted by the subclass)."""
        if len(data) < ETH_HLEN:
            self.counters.drops["runt"] += 1
            return None
        return data

    # -- the loop side ----------------------------------------------------------------------
    def _start_io(self, fd: int, owner=None) -> None:
        """Serve ``fd`` on the running loop; ``owner`` (a socket) is what to close
        with the port, else the fd itself is closed."""
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._owner = owner
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._on_readable)

    def _stop_io(self) -> None:
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            if self._writer_armed:
                self._loop.remove_writer(self._fd)
        self._writer_armed = False
        self._out.clear()

    def _close_io(self) -> None:
        """Stop serving the fd and close it (or its owner)."""
        self._stop_io()
        if self._fd >= 0:
            if self._owner is not None:
                self._owner.close()
            else:
                os.close(self._fd)
        self._fd, self._owner = -1, None

    def _count_error(self, what: str, exc: OSError) -> None:
        key = f"{what}_{errno_name(exc)}"
        count = self.errors.get(key, 0) + 1
        self.errors[key] = count
        if count == 1 or count % 10000 == 0:  # a peer can repeat it: the log stays bounded
            log.warning("port i/o error", port=self.name, kind=self.kind, op=what, error=str(exc), count=count)

    def _on_readable(self) -> None:
        frames: list[bytes] = []
        recv, accept = self._recv, self._accept
        for _ in range(READ_BATCH):
            try:
                data = recv()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._io_error("read", exc)
                break  # this round of reads ends; the next readiness event tries again
            if data is None:
                continue
            frame = accept(data)
            if frame is not None:
                frames.append(frame)
        if frames:
            self.incoming_many(frames)

    def _io_error(self, what: str, exc: OSError) -> None:
        if exc.errno not in DEAD_FD_ERRORS or self.failed:
            self._count_error(what, exc)
            return
        # The fd is dead for good.  A level-triggered error keeps it "readable",
        # so serving it on would spin the loop (the stdlib loop called us about
        # 100,000 times a second after `ip link del`): stop polling it, link down,
        # one log line.  The fd stays open until aclose (its number must not be reused).
        self.failed = errno_name(exc)
        key = f"{what}_{self.failed}"
        self.errors[key] = self.errors.get(key, 0) + 1
        log.warning("port device gone: link down until the port is removed", port=self.name, kind=self.kind,
                    op=what, error=str(exc))
        self._stop_io()
        self.set_link(False)

    def send(self, frame: bytes) -> bool:
        counters = self.counters
        if not self.link_up or self._fd < 0:
            counters.drops["link_down"] += 1
            return False
        out = self._out
        if out:
            if len(out) >= self._out_limit:
                counters.drops["queue_full"] += 1
                return False
            out.append(frame)
            self._sent(frame)
            return True
        try:
            self._write(frame)
        except (BlockingIOError, InterruptedError):
            out.append(frame)
            self._arm_writer()
        except OSError as exc:
            self._io_error("write", exc)
            counters.drops["write_error"] += 1
            return False
        self._sent(frame)
        return True

    def _arm_writer(self) -> None:
        if not self._writer_armed and self._loop is not None:
            self._writer_armed = True
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        out = self._out
        while out:
            try:
                self._write(out[0])
            except (BlockingIOError, InterruptedError):
                return  # still full: wait for the next writable event
            except OSError as exc:
                self._io_error("write", exc)
                self.counters.drops["write_error"] += 1
                if self.failed:
                    return  # _stop_io dropped the queue and the writer
            out.popleft()
        self._writer_armed = False
        self._loop.remove_writer(self._fd)

    def metrics(self) -> dict:
        return {**super().metrics(), "queued": len(self._out), "errors": dict(self.errors), "failed": self.failed}
