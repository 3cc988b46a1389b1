"""A raw disk image (regular file or block device) read and written in place.

I/O runs in a small thread pool so the event loop never blocks on the disk,
and several requests proceed at once (one blocking syscall per worker):

- ``readv`` / ``writev`` call ``os.preadv`` / ``os.pwritev`` with the
  caller's memoryviews, so bytes go straight between the page cache and
  guest RAM.  Short transfers are continued until done; a read that meets
  end-of-file inside ``size`` (a file truncated behind our back) fills the
  rest with zeroes (as QEMU does), counted in ``reads_past_eof`` and
  logged once.  At most ``IOV_MAX`` buffers go to one syscall.
- ``flush`` is ``fdatasync``.  It fails if a write, discard or write-zeroes
  failed on the host since the last flush (ENOSPC on tmpfs fails the write
  and nothing later: the barrier must not say "all is durable").  Once
  ``fdatasync`` itself has failed, every later flush fails: the kernel may
  have dropped the dirty pages and would report success next time (the
  "fsyncgate" lesson; QEMU does the same).
- ``discard`` punches a hole (``fallocate(PUNCH_HOLE | KEEP_SIZE)`` via
  ctypes, as ``os.posix_fallocate`` cannot punch).  Where the file system
  cannot punch, it writes zeroes instead, so a discarded range always reads
  back as zeroes.
- ``write_zeroes`` tries ``fallocate(ZERO_RANGE)``, then a punched hole,
  then writes zeroes in 1 MiB chunks.  A mode the file system refused once
  is not tried again.

A cancelled request may still finish in its worker thread; ``close`` waits
for every started syscall before it closes the descriptor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno as errno_mod
import os
import stat
import threading
from collections.abc import Callable
from typing import Any

import structlog

from aiokvm.errors import ConfigError

from .base import (
    SECTOR_SIZE,
    BackendIOError,
    check_range,
    check_writable,
    checked_views,
    make_serial,
)

log = structlog.get_logger("aiokvm.devices.raw")

DEFAULT_WORKERS = 4
ZERO_CHUNK = bytes(1 << 20)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# Errors meaning "this fallocate mode is not available here", as opposed to a real I/O failure.
_FALLOC_UNSUPPORTED = {errno_mod.EOPNOTSUPP, errno_mod.ENOSYS, errno_mod.EINVAL}

try:
    _IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (ValueError, OSError):
    _IOV_MAX = 1024


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func


_fallocate = _load_fallocate()


def _fallocate_or_raise(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate is None:
        raise OSError(errno_mod.ENOSYS, "fallocate is not available")
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _advance(views: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes of ``views`` (in place)."""
    while n:
        first = views[0]
        if first.nbytes <= n:
            n -= first.nbytes
            views.pop(0)
        else:
            views[0] = first[n:]
            n = 0


def _zero_fill(view: memoryview) -> None:
    while view.nbytes:
        take = min(view.nbytes, len(ZERO_CHUNK))
        view[:take] = ZERO_CHUNK[:take]
        view = view[take:]


_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
#: largest read done on the caller's thread: a bigger copy would hold up the loop
NOWAIT_LIMIT = 256 * 1024


def _preadv_all(fd: int, offset: int, views: list[memoryview]) -> bool:
    """True if the read met end of file (the file shrank under us)."""
    views = list(views)
    while views:
        n = os.preadv(fd, views[:_IOV_MAX], offset)
        if n == 0:  # end of file inside the disk: the rest reads as zeroes, never stale bytes
            for view in views:
                _zero_fill(view)
            return True
        offset += n
        _advance(views, n)
    return False


def _pwritev_all(fd: int, offset: int, views: list[memoryview]) -> None:
    views = list(views)
    while views:
        n = os.pwritev(fd, views[:_IOV_MAX], offset)
        if n == 0:
            raise OSError(errno_mod.EIO, "write made no progress")
        offset += n
        _advance(views, n)


def _write_zero_chunks(fd: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        n = os.pwrite(fd, memoryview(ZERO_CHUNK)[: min(len(ZERO_CHUNK), end - offset)], offset)
        if n == 0:
            raise OSError(errno_mod.EIO, "write made no progress")
        offset += n


def _open_image(path: str, read_only: bool) -> tuple[int, int, bool]:
    """Open and validate ``path``; returns ``(fd, size, is_block_device)``.  Raises ConfigError."""
    # O_NONBLOCK so that opening a FIFO by mistake fails below instead of hanging;
    # it means nothing for regular files and block devices, and is cleared anyway.
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ConfigError(f"disk image {path} does not exist: fix the path or create it "
                          f"(e.g. truncate -s 64M {path})") from None
    except IsADirectoryError:
        raise ConfigError(f"disk image {path} is a directory: give a raw image file or block device") from None
    except PermissionError:
        if read_only:
            raise ConfigError(f"cannot read disk image {path}: permission denied; fix its permissions") from None
        raise ConfigError(f"cannot open disk image {path} for writing: permission denied; "
                          f"fix its permissions or add ,ro") from None
    except OSError as exc:
        if exc.errno == errno_mod.EROFS:
            raise ConfigError(f"disk image {path} is on a read-only file system: add ,ro") from None
        raise ConfigError(f"cannot open disk image {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"disk image {path} is a directory: give a raw image file or block device")
        is_block = stat.S_ISBLK(st.st_mode)
        if not (is_block or stat.S_ISREG(st.st_mode)):
            raise ConfigError(f"disk image {path} is not a regular file or block device: give a raw image")
        os.set_blocking(fd, True)
        size = os.lseek(fd, 0, os.SEEK_END) if is_block else st.st_size
        if size == 0:
            raise ConfigError(f"disk image {path} is empty: give it a size (e.g. truncate -s 64M {path})")
        if size % SECTOR_SIZE:
            raise ConfigError(f"disk image {path} is {size} bytes, not a multiple of 512: "
                              f"resize it (e.g. truncate -s 64M {path})")
        # Probe one byte so unreadable media fail here, not later in the guest.
        os.pread(fd, 1, 0)
    except ConfigError:
        os.close(fd)
        raise
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"cannot read disk image {path}: {exc.strerror}") from None
    return fd, size, is_block


class RawFileBackend:
    """A raw image file or block device; create with ``await RawFileBackend.open(path)``."""

    def __init__(self, path: str, fd: int, size: int, *, read_only: bool,
                 executor: concurrent.futures.Executor, owns_executor: bool) -> None:
        self.path = path
        self.size = size
        self.read_only = read_only
        self.serial = make_serial(os.path.basename(path)) or "aiokvm-raw"
        self.supports_discard = not read_only
        self.supports_write_zeroes = not read_only
        self._fd = fd
        self._executor = executor
        self._owns_executor = owns_executor
        self._inflight: set[concurrent.futures.Future] = set()
        self._inflight_lock = threading.Lock()
        self._closed = False
        self._close_done: asyncio.Future | None = None
        self._can_zero_range = True
        self._can_punch = True
        self.reads_past_eof = 0
        self._write_error: BackendIOError | None = None  # since the last flush
        self._flush_error: BackendIOError | None = None  # sticky: fdatasync failed once

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, read_only: bool = False,
                   executor: concurrent.futures.Executor | None = None,
                   workers: int = DEFAULT_WORKERS) -> RawFileBackend:
        """Open a raw image.  Bad paths and files raise ``ConfigError``.

        Without ``executor`` the backend makes its own pool of ``workers``
        threads and shuts it down in ``close``.
        """
        path = os.fspath(path)
        owns = executor is None
        if executor is None:
            executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix=f"aiokvm-raw-{os.path.basename(path)[:16]}")
        try:
            loop = asyncio.get_running_loop()
            fd, size, _ = await loop.run_in_executor(executor, _open_image, path, read_only)
        except BaseException:
            if owns:
                executor.shutdown(wait=False)
            raise
        return cls(path, fd, size, read_only=read_only, executor=executor, owns_executor=owns)

    def __repr__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        return f"<RawFileBackend {self.path!r} {self.size} bytes {mode}{' closed' if self._closed else ''}>"

    # -- running work in the pool -----------------------------------------------
    def _forget(self, fut: concurrent.futures.Future) -> None:
        with self._inflight_lock:
            self._inflight.discard(fut)

    async def _run(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        if self._closed:
            raise BackendIOError(f"{what} on closed disk {self.path}")
        try:
            fut = self._executor.submit(fn, *args)
        except RuntimeError as exc:  # the shared executor was shut down
            raise BackendIOError(f"{what} on {self.path} failed: {exc}") from exc
        with self._inflight_lock:
            self._inflight.add(fut)
        fut.add_done_callback(self._forget)
        try:
            return await asyncio.wrap_future(fut)
        except OSError as exc:
            raise BackendIOError(f"{what} on {self.path} failed: {exc.strerror or exc}", errno=exc.errno) from exc

    # -- BlockBackend ---------------------------------------------------------------
    async def readv(self, offset: int, buffers: list[memoryview]) -> None:
        views, length = checked_views(self.size, offset, buffers, writable=True, what="read")
        what = f"read of {length} bytes at offset {offset}"
        if self._closed:
            raise BackendIOError(f"{what} on closed disk {self.path}")
        if length and await self._run(what, _preadv_all, self._fd, offset, views):
            self.reads_past_eof += 1
            if self.reads_past_eof == 1:  # the operator shrank the image: say so once
                log.warning("disk image is shorter than the disk: reads past its end return zeroes",
                            path=self.path, size=self.size)

    def readv_nowait(self, offset: int, buffers: list[memoryview]) -> bool:
        """Read now, on the calling thread, if the data is in the page cache.

        ``preadv2(RWF_NOWAIT)`` never blocks: it returns what is cached or
        EAGAIN.  True means the buffers are filled; False means nothing
        useful happened and the caller should use ``readv``.  A cached read
        this way skips the thread-pool handoff, two thread wakeups that cost
        more than the copy on this project's hosts.
        """
        if self._closed or not _RWF_NOWAIT:
            return False
        views, length = checked_views(self.size, offset, buffers, writable=True, what="read")
        if length > NOWAIT_LIMIT:
            return False
        try:
            n = os.preadv(self._fd, views[:_IOV_MAX], offset, _RWF_NOWAIT)
        except OSError:  # EAGAIN (not cached) included
            return False
        # Partly cached, or at EOF: False lets the thread pool do it properly.
        return n == length

    async def writev(self, offset: int, buffers: list[memoryview]) -> None:
        check_writable(self.read_only, f"write to {self.path}")
        views, length = checked_views(self.size, offset, buffers, writable=False, what="write")
        what = f"write of {length} bytes at offset {offset}"
        if self._closed:
            raise BackendIOError(f"{what} on closed disk {self.path}")
        if length:
            await self._run_write(what, _pwritev_all, self._fd, offset, views)

    async def _run_write(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            await self._run(what, fn, *args)
        except BackendIOError as exc:
            if exc.errno is not None:  # a host error (not a closed disk): the next flush reports it
                self._write_error = exc
            raise

    async def flush(self) -> None:
        if self._flush_error is not None:
            raise BackendIOError(f"flush on {self.path} failed: an earlier flush failed ({self._flush_error}); "
                                 f"data may be lost", errno=self._flush_error.errno)
        failed_write, self._write_error = self._write_error, None
        try:
            await self._run("flush", os.fdatasync, self._fd)
        except BackendIOError as exc:
            if exc.errno is not None:
                self._flush_error = exc
            raise
        if failed_write is not None:
            raise BackendIOError(f"flush on {self.path}: a write since the last flush failed ({failed_write})",
                                 errno=failed_write.errno)

    async def discard(self, offset: int, length: int) -> None:
        check_writable(self.read_only, f"discard on {self.path}")
        check_range(self.size, offset, length, "discard")
        if length:
            await self._run_write(f"discard of {length} bytes at offset {offset}", self._discard_sync, offset, length)

    async def write_zeroes(self, offset: int, length: int) -> None:
        check_writable(self.read_only, f"write zeroes on {self.path}")
        check_range(self.size, offset, length, "write zeroes")
        if length:
            await self._run_write(f"write zeroes of {length} bytes at offset {offset}",
                                  self._write_zeroes_sync, offset, length)

    async def close(self) -> None:
        if self._close_done is not None:
            await asyncio.shield(self._close_done)
            return
        self._closed = True
        self._close_done = asyncio.get_running_loop().create_future()
        try:
            with self._inflight_lock:
                pending = list(self._inflight)
            if pending:
                await asyncio.gather(*(asyncio.wrap_future(f) for f in pending), return_exceptions=True)
            os.close(self._fd)
            if self._owns_executor:
                self._executor.shutdown(wait=False)
        finally:
            self._close_done.set_result(None)

    # -- worker-thread bodies -------------------------------------------------------
    def _punch(self, offset: int, length: int) -> bool:
        if not self._can_punch:
            return False
        try:
            _fallocate_or_raise(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            return True
        except OSError as exc:
            if exc.errno not in _FALLOC_UNSUPPORTED:
                raise
            self._can_punch = False
            return False

    def _discard_sync(self, offset: int, length: int) -> None:
        if not self._punch(offset, length):
            _write_zero_chunks(self._fd, offset, length)

    def _write_zeroes_sync(self, offset: int, length: int) -> None:
        if self._can_zero_range:
            try:
                _fallocate_or_raise(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in _FALLOC_UNSUPPORTED:
                    raise
                self._can_zero_range = False
        self._discard_sync(offset, length)
