"""The KVM CPU backend: one thread per vCPU, running the C vCPU loop.

The thread calls ``aiokvm_vcpu_run`` (``aiokvm/kvm/_vcpu_loop.h``) with the
GIL released.  The C loop finishes unclaimed accesses and loop-hosted ones
(under a C handoff) itself and returns only for inline handlers, non-I/O
exits, kicks and errors.  Non-I/O exits are decoded into values from
``exits.py``; anything the owner cannot continue from ends the thread and is
reported through ``on_stop``.

Kicking (``kick()``, any thread) sets three things, in this order: the
request (``_stop`` or ``_paused``, set by the caller before it kicks), the
C loop's ``ctx.stop`` flag and ``kvm_run.immediate_exit``, then sends the
kick signal to the thread.  Wherever the thread is, one of them makes the C
loop return ``AIOKVM_RC_INTR``: inside KVM_RUN the signal interrupts it,
just before it ``immediate_exit`` makes it return at once, and between runs
the loop looks at ``ctx.stop``.  The thread then **clears** ``ctx.stop`` and
``immediate_exit`` **before** it looks at the requests, so a kick that lands
between the two is never erased: either the thread sees its request now, or
the flags stay set and the next run returns at once.  (Python code of both
threads is ordered by the GIL, whose handoffs are full barriers.)

The kick signal is ``KICK_SIGNAL``, a real-time signal (``SIGRTMIN + 4``)
with a no-op handler.  Its only job is to interrupt KVM_RUN; it is
thread-directed (``pthread_kill``) and never reaches an application that
does not handle it.  Starting a vCPU refuses, with ``ConfigError``, when the
application already handles that signal, because its handler would run on
every kick.  (QEMU uses SIGUSR1 and Firecracker ``SIGRTMIN + 0``; SIGUSR1 is
commonly used by applications, and the first real-time signals by threading
libraries, hence the offset.)
"""

from __future__ import annotations

import errno
import signal
import threading
import time
from collections.abc import Callable

import structlog

from .. import access
from ..errors import ConfigError, DeviceError, GuestError, HandoffCancelled, KvmError
from ..kvm import VcpuFd, ffi, lib
from ..metrics import LatencyHistograms, VcpuMetrics
from ..procstat import read_thread_times_precise
from .control import ThreadControl
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

#: the real-time signal that interrupts KVM_RUN (see the module docstring)
KICK_SIGNAL = signal.SIGRTMIN + 4

_EXIT_NAMES = {
    getattr(lib, name): name[len("KVM_EXIT_"):].lower()
    for name in dir(lib)
    if name.startswith("KVM_EXIT_") and name not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")
}


def ensure_kick_handler() -> None:
    """Install the no-op kick-signal handler (once; checked at every vCPU start).

    Raises ``ConfigError`` when the application handles ``KICK_SIGNAL`` itself.
    """
    rc = lib.aiokvm_install_kick_handler(int(KICK_SIGNAL))
    if rc == -errno.EBUSY:
        raise ConfigError(
            f"signal SIGRTMIN+{int(KICK_SIGNAL) - int(signal.SIGRTMIN)} ({int(KICK_SIGNAL)}) already has a handler; "
            "aiokvm uses it to kick vCPU threads out of KVM_RUN: remove that handler (signal.signal(..., SIG_DFL))"
        )
    if rc < 0:
        raise KvmError(-rc, "installing the vCPU kick signal handler")


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


class VcpuThread(ThreadControl):
    """Runs one vCPU in its own thread, through the C run loop.

    ``ctx`` is this vCPU's ``struct aiokvm_vcpu``: the C loop's tables,
    counters, current access and handoff slot.  ``dispatcher`` handles the
    accesses the C loop returns to Python; ``on_exit(vcpu, exit)`` every
    non-I/O exit (it raises ``GuestError`` to stop); ``on_stop(vcpu, error)``
    is called once from this thread when it ends (``error`` is None for a
    requested stop); ``on_park(vcpu)`` from this thread when it has parked.
    """

    def __init__(
        self,
        vcpu: VcpuFd,
        dispatcher,
        *,
        on_exit: Callable[[int, object], None],
        on_stop: Callable[[int, BaseException | None], None],
        context: dict | None = None,
        sample_every: int = 1,
        spin_us: float = 200.0,
        on_park: Callable[[int], None] | None = None,
    ) -> None:
        self.vcpu = vcpu
        self.index = vcpu.index
        self.dispatcher = dispatcher
        self.metrics = VcpuMetrics(vcpu.index)
        self.ctx = ffi.new("struct aiokvm_vcpu *")
        self.pio_counts = ffi.new("uint64_t[]", 0x20000)
        ctx = self.ctx
        ctx.fd = vcpu.fd
        ctx.index = vcpu.index
        ctx.run = vcpu.run_struct
        ctx.pio_table = dispatcher.bus.pio_table
        ctx.pio_counts = self.pio_counts
        ctx.mech = lib.AIOKVM_MECH_PYTHON
        ctx.spin_ns = int(spin_us * 1000)
        ctx.sample_every = max(1, sample_every)
        self.latency = LatencyHistograms(ctx)
        dispatcher.bus.fill_tables(ctx)
        self._on_exit = on_exit
        self._on_stop = on_stop
        self._context = context or {}
        self._init_control(on_park)
        self._alive_lock = threading.Lock()
        self._alive = False
        self.native_id: int | None = None
        self.started_ns: int | None = None
        self.ended_ns: int | None = None
        self.times_start = self.times_end = None  # procstat.ThreadTimes at start / end
        self.thread = threading.Thread(target=self._main, name=f"aiokvm-vcpu{self.index}", daemon=True)

    def start(self) -> None:
        ensure_kick_handler()
        with self._alive_lock:
            self._alive = True
        self.thread.start()

    def kick(self) -> None:
        """Make the current or next KVM_RUN return; the C loop checks ``stop`` too."""
        self.ctx.stop = 1
        run = self.vcpu.run_struct
        if run is not None:
            run.immediate_exit = 1
        with self._alive_lock:
            if self._alive and self.thread.ident is not None:
                try:
                    signal.pthread_kill(self.thread.ident, KICK_SIGNAL)
                except ProcessLookupError:  # pragma: no cover - thread just ended
                    pass

    # -- the thread ---------------------------------------------------------------
    def _main(self) -> None:
        self.native_id = threading.get_native_id()
        # The wall-clock window encloses the CPU-time window (wall first, CPU
        # times inside), so that on-CPU time can never exceed wall time.
        self.started_ns = time.monotonic_ns()
        self.times_start = _thread_times(self.native_id)
        structlog.contextvars.bind_contextvars(vcpu=self.index, **self._context)
        error: BaseException | None = None
        try:
            self._loop()
        except BaseException as exc:  # reported to the owner, never lost
            error = exc
        finally:
            self.times_end = _thread_times(self.native_id)
            self.ended_ns = time.monotonic_ns()
            with self._alive_lock:
                self._alive = False
            try:
                self._on_stop(self.index, error)
            except Exception:  # pragma: no cover - owner bug; do not kill the thread noisily
                log.exception("on_stop failed")

    def _loop(self) -> None:
        ctx, index = self.ctx, self.index
        run, run_read = lib.aiokvm_vcpu_run, lib.aiokvm_vcpu_run_read
        dispatcher = self.dispatcher
        handlers = dispatcher.vcpu_handlers  # updated in place on bus changes
        writes, reads = dispatcher.vcpu_tables(ctx)  # likewise
        RC_PYTHON, RC_INTR, RC_OTHER = lib.AIOKVM_RC_PYTHON, lib.AIOKVM_RC_INTR, lib.AIOKVM_RC_OTHER
        RC_CANCELLED = lib.AIOKVM_RC_CANCELLED
        # The packed word's layout (aiokvm/access.py), bound to locals.
        ONE_ELEMENT_MASK, ONE_ELEMENT, WRITE_OP = access.ONE_ELEMENT_MASK, access.ONE_ELEMENT, access.WRITE_OP
        CODE_MASK, ALL = access.CODE_MASK, access.ALL_ONES
        REGION_SHIFT, REGION_MASK = access.REGION_SHIFT, access.REGION_MASK
        SIZE_SHIFT, SIZE_MASK, OFFSET_SHIFT = access.SIZE_SHIFT, access.SIZE_MASK, access.OFFSET_SHIFT
        rc = run(ctx)
        while True:
            # The hot cases first: one device call and one C call per exit.
            # run()/run_read() never raise (they return codes), so whatever is
            # caught here came from the device or from converting its result.
            if rc & ONE_ELEMENT_MASK == ONE_ELEMENT and rc > 0:
                try:
                    if rc & WRITE_OP:
                        writes[(rc >> REGION_SHIFT) & REGION_MASK](rc >> OFFSET_SHIFT, (rc >> SIZE_SHIFT) & SIZE_MASK,
                                                                   ctx.value)
                        rc = run(ctx)
                    else:
                        rc = run_read(ctx, reads[(rc >> REGION_SHIFT) & REGION_MASK](
                            rc >> OFFSET_SHIFT, (rc >> SIZE_SHIFT) & SIZE_MASK) & ALL)
                    continue
                except HandoffCancelled:
                    return
                except DeviceError:
                    raise
                except Exception as exc:
                    raise dispatcher.failure(rc, ctx, exc) from exc
            if rc & CODE_MASK == RC_PYTHON and rc > 0:  # string I/O
                try:
                    handlers[(rc >> REGION_SHIFT) & REGION_MASK](rc, ctx)
                except HandoffCancelled:
                    return
            elif rc == RC_INTR:
                # Clear first, look after: a kick landing in between keeps its
                # flags set and makes the next run return at once.
                ctx.stop = 0
                self.vcpu.run_struct.immediate_exit = 0
                if self._stop:
                    return
                if self._paused:
                    self._park()
                    if self._stop:
                        return
            elif rc == RC_OTHER:
                exit = decode_exit(self.vcpu.run_struct)
                self.metrics.exits[exit.reason] += 1
                # The owner decides; raising GuestError ends this vCPU.
                self._on_exit(index, exit)
            elif rc == RC_CANCELLED:
                return
            else:
                raise KvmError(-rc, f"KVM_RUN on vCPU {index}")
            rc = run(ctx)


def _thread_times(tid: int):
    try:
        return read_thread_times_precise(tid)
    except OSError:  # pragma: no cover - /proc not mounted
        return None


def guest_error(vcpu: VcpuThread, exit, what: str) -> GuestError:
    rip = vcpu.vcpu.rip()
    where = f" at RIP {rip:#x}" if rip is not None else ""
    return GuestError(f"{what} (vCPU {vcpu.index}{where})", exit=exit, vcpu=vcpu.index, rip=rip)
