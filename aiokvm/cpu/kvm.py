"""The KVM CPU backend: one thread per vCPU running KVM_RUN with the GIL released.

The thread decodes each exit from the shared ``kvm_run`` page into a value
from ``exits.py``, hands I/O to the ``Dispatcher`` and writes IN/MMIO-read
results back before re-entering the guest.  Anything else it cannot continue
from is reported to the owner (``on_stop``) and ends the thread.

Kicking: ``kick()`` sets ``kvm_run.immediate_exit`` and sends the kick signal
(SIGUSR1, no-op handler) to the thread.  Whether the thread is inside KVM_RUN
(the signal interrupts it) or about to enter (immediate_exit makes it return
at once), KVM_RUN returns ``-EINTR`` and the thread looks at its flags.
"""

from __future__ import annotations

import errno
import signal
import threading
from collections.abc import Callable

import structlog

from ..errors import GuestError, KvmError
from ..kvm import VcpuFd, ffi, lib
from ..metrics import VcpuMetrics
from .exits import (
    Direction,
    FailEntry,
    Halt,
    InternalError,
    Interrupted,
    IoExit,
    MmioExit,
    Shutdown,
    SystemEvent,
    UnknownExit,
)

log = structlog.get_logger("aiokvm.cpu")

KICK_SIGNAL = signal.SIGUSR1

_EXIT_NAMES = {
    getattr(lib, name): name[len("KVM_EXIT_"):].lower()
    for name in dir(lib)
    if name.startswith("KVM_EXIT_") and name not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")
}

_kick_handler_lock = threading.Lock()
_kick_handler_installed = False


def ensure_kick_handler() -> None:
    """Install the no-op kick-signal handler once per process."""
    global _kick_handler_installed
    with _kick_handler_lock:
        if not _kick_handler_installed:
            rc = lib.aiokvm_install_kick_handler(int(KICK_SIGNAL))
            if rc < 0:
                raise KvmError(-rc, "installing the vCPU kick signal handler")
            _kick_handler_installed = True


def decode_exit(run) -> object:
    """Turn ``struct kvm_run`` into a normalized exit value."""
    reason = run.exit_reason
    if reason == lib.KVM_EXIT_IO:
        io = run.io
        direction = Direction(io.direction)
        data = b""
        if direction is Direction.OUT:
            data = bytes(ffi.buffer(ffi.cast("uint8_t *", run) + io.data_offset, io.size * io.count))
        return IoExit(io.port, io.size, direction, io.count, data)
    if reason == lib.KVM_EXIT_MMIO:
        mmio = run.mmio
        size = min(mmio.len, 8)
        data = bytes(mmio.data[0:size]) if mmio.is_write else b""
        return MmioExit(mmio.phys_addr, size, bool(mmio.is_write), data)
    if reason == lib.KVM_EXIT_INTR:
        return Interrupted()
    if reason == lib.KVM_EXIT_HLT:
        return Halt()
    if reason == lib.KVM_EXIT_SHUTDOWN:
        return Shutdown()
    if reason == lib.KVM_EXIT_INTERNAL_ERROR:
        internal = run.internal
        n = min(internal.ndata, 16)
        return InternalError(internal.suberror, tuple(internal.data[i] for i in range(n)))
    if reason == lib.KVM_EXIT_FAIL_ENTRY:
        return FailEntry(run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)
    if reason == lib.KVM_EXIT_SYSTEM_EVENT:
        ev = run.system_event
        n = min(ev.ndata, 16)
        return SystemEvent(ev.type, tuple(ev.data[i] for i in range(n)))
    return UnknownExit(reason, _EXIT_NAMES.get(reason, ""))


class VcpuThread:
    """Runs one vCPU in its own thread.

    ``handle_exit(vcpu, exit) -> bytes | None`` is called in this thread for
    every exit that is not I/O; ``dispatcher`` handles I/O.  ``on_stop(vcpu,
    error)`` is called once from this thread when it ends (``error`` is None
    for a requested stop).
    """

    def __init__(
        self,
        vcpu: VcpuFd,
        dispatcher,
        *,
        on_exit: Callable[[int, object], None],
        on_stop: Callable[[int, BaseException | None], None],
        context: dict | None = None,
    ) -> None:
        self.vcpu = vcpu
        self.index = vcpu.index
        self.dispatcher = dispatcher
        self.metrics = VcpuMetrics(vcpu.index)
        self._on_exit = on_exit
        self._on_stop = on_stop
        self._context = context or {}
        self._stop = False
        self._alive_lock = threading.Lock()
        self._alive = False
        self.native_id: int | None = None
        self.thread = threading.Thread(target=self._main, name=f"aiokvm-vcpu{self.index}", daemon=True)

    def start(self) -> None:
        ensure_kick_handler()
        with self._alive_lock:
            self._alive = True
        self.thread.start()

    def request_stop(self) -> None:
        """Ask the thread to leave its loop and end (asynchronous; use ``join``)."""
        self._stop = True
        self.kick()

    def kick(self) -> None:
        """Make the current or next KVM_RUN return with EINTR."""
        run = self.vcpu.run_struct
        if run is not None:
            run.immediate_exit = 1
        with self._alive_lock:
            if self._alive and self.thread.ident is not None:
                try:
                    signal.pthread_kill(self.thread.ident, KICK_SIGNAL)
                except ProcessLookupError:  # pragma: no cover - thread just ended
                    pass

    def join(self, timeout: float | None = None) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    # -- the thread ---------------------------------------------------------------
    def _main(self) -> None:
        self.native_id = threading.get_native_id()
        structlog.contextvars.bind_contextvars(vcpu=self.index, **self._context)
        error: BaseException | None = None
        try:
            self._loop()
        except BaseException as exc:  # reported to the owner, never lost
            error = exc
        finally:
            with self._alive_lock:
                self._alive = False
            try:
                self._on_stop(self.index, error)
            except Exception:  # pragma: no cover - owner bug; do not kill the thread noisily
                log.exception("on_stop failed")

    def _loop(self) -> None:
        from ..dispatch import HandoffCancelled

        vcpu, run, metrics = self.vcpu, self.vcpu.run_struct, self.metrics
        run_base = ffi.cast("uint8_t *", run)
        dispatch_io, dispatch_mmio = self.dispatcher.dispatch_io, self.dispatcher.dispatch_mmio
        exits = metrics.exits
        EXIT_IO, EXIT_MMIO, EXIT_INTR = lib.KVM_EXIT_IO, lib.KVM_EXIT_MMIO, lib.KVM_EXIT_INTR
        IN = Direction.IN
        index = self.index
        while not self._stop:
            rc = vcpu.run()
            if rc < 0:
                if rc == -errno.EINTR or rc == -errno.EAGAIN:
                    metrics.kicks += 1
                    run.immediate_exit = 0
                    continue
                raise KvmError(-rc, f"KVM_RUN on vCPU {index}")
            reason = run.exit_reason
            if reason == EXIT_IO:
                exits["io"] += 1
                exit = decode_exit(run)
                try:
                    result = dispatch_io(index, metrics, exit)
                except HandoffCancelled:
                    return
                if exit.direction is IN:
                    ffi.memmove(run_base + run.io.data_offset, result, len(result))
            elif reason == EXIT_MMIO:
                exits["mmio"] += 1
                exit = decode_exit(run)
                try:
                    result = dispatch_mmio(index, metrics, exit)
                except HandoffCancelled:
                    return
                if not exit.is_write:
                    ffi.memmove(run.mmio.data, result, len(result))
            elif reason == EXIT_INTR:
                exits["intr"] += 1
                run.immediate_exit = 0
            else:
                exit = decode_exit(run)
                exits[exit.reason] += 1
                # The owner decides; raising GuestError ends this vCPU.
                self._on_exit(index, exit)

    def describe_exit(self, exit) -> str:
        rip = self.vcpu.rip()
        where = f" at RIP {rip:#x}" if rip is not None else ""
        return f"vCPU {self.index}: {type(exit).__name__}{where}"


def guest_error(vcpu: VcpuThread, exit, what: str) -> GuestError:
    rip = vcpu.vcpu.rip()
    where = f" at RIP {rip:#x}" if rip is not None else ""
    return GuestError(f"{what} (vCPU {vcpu.index}{where})", exit=exit, vcpu=vcpu.index, rip=rip)
