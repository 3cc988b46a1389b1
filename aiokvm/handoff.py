"""Handoff mechanisms: how a loop-hosted exit gets from a vCPU thread to the
asyncio loop and back.  ``Machine(handoff=NAME)`` picks one.

Python-level mechanisms (the vCPU thread returns to Python, takes the GIL,
and blocks until the loop ran the handler):

- ``event``: ``loop.call_soon_threadsafe`` + a per-vCPU ``threading.Event``.
- ``lock``:  ``loop.call_soon_threadsafe`` + a per-vCPU lock used as a
  binary semaphore.

C-level mechanisms (the C vCPU loop posts the exit to a shared slot and
waits without the GIL; a ``SlotServer`` on the loop serves the slots):

- ``spin`` (default): the vCPU spins (bounded by ``spin_us``) before
  sleeping on a futex; the loop polls the slots while exits keep coming and
  sleeps on an eventfd after ``poll_window_us`` without work.  While the
  guest is busy nobody sleeps, so no exit pays a thread wakeup.
- ``wake``: the vCPU sleeps on a futex at once (one wakeup per exit); the
  loop polls as with ``spin``.
- ``futex``: both sides block: the vCPU on a futex, the loop on the eventfd
  (two wakeups per exit; exits of several vCPUs that arrive together are
  served in one loop wakeup).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from . import access
from .errors import AiokvmError, HandoffCancelled
from .kvm import ffi, lib

log = structlog.get_logger("aiokvm.handoff")

DEFAULT_HANDOFF = "spin"
C_MECHANISMS = {"spin": lib.AIOKVM_MECH_SPIN, "wake": lib.AIOKVM_MECH_WAKE, "futex": lib.AIOKVM_MECH_FUTEX}
PYTHON_MECHANISMS = ("event", "lock")
HANDOFFS = tuple(C_MECHANISMS) + PYTHON_MECHANISMS


def held_failure(held: asyncio.Future) -> BaseException | None:
    """Why a held write failed (its exception, or a cancellation), or None."""
    if held.cancelled():
        return asyncio.CancelledError("the held write was cancelled")
    return held.exception()


# -- Python-level mechanisms ------------------------------------------------------------

class _Slot:
    __slots__ = ("event", "lock", "result", "error", "cancelled")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.lock = threading.Lock()
        self.lock.acquire()
        self.result: Any = None
        self.error: BaseException | None = None
        self.cancelled = False


class EventHandoff:
    """``call_soon_threadsafe`` + ``threading.Event``: correct, two wakeups per exit."""

    name = "event"

    def __init__(self, loop: asyncio.AbstractEventLoop, vcpus: int) -> None:
        self._loop = loop
        self._slots = [_Slot() for _ in range(vcpus)]
        self._stopping = False

    def call(self, vcpu: int, fn: Callable[[Any], Any], arg: Any) -> Any:
        slot = self._slots[vcpu]
        if self._stopping:
            raise HandoffCancelled
        slot.error = None
        self._arm(slot)
        try:
            self._loop.call_soon_threadsafe(self._run, slot, fn, arg)
        except RuntimeError:  # loop closed under us
            raise HandoffCancelled from None
        self._wait(slot)
        if slot.cancelled:
            raise HandoffCancelled
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _arm(self, slot: _Slot) -> None:
        slot.event.clear()

    def _wait(self, slot: _Slot) -> None:
        slot.event.wait()

    def _signal(self, slot: _Slot) -> None:
        slot.event.set()

    def _run(self, slot: _Slot, fn: Callable[[Any], Any], arg: Any) -> None:
        try:
            slot.result = fn(arg)
        except BaseException as exc:  # carried back to the vCPU thread
            slot.error = exc
        if isinstance(slot.result, asyncio.Future):
            # A held write (see SlotServer): the vCPU waits until it resolves,
            # and a failed or cancelled one fails the access.
            slot.result.add_done_callback(lambda held: self._held_done(slot, held))
            return
        self._signal(slot)

    def _held_done(self, slot: _Slot, held: asyncio.Future) -> None:
        slot.error = held_failure(held)
        slot.result = 0
        self._signal(slot)

    def cancel_all(self) -> None:
        self._stopping = True
        for slot in self._slots:
            slot.cancelled = True
            self._signal(slot)


class LockHandoff(EventHandoff):
    """``call_soon_threadsafe`` + a lock released by the loop."""

    name = "lock"

    def _arm(self, slot: _Slot) -> None:
        pass  # the lock is held between calls

    def _wait(self, slot: _Slot) -> None:
        slot.lock.acquire()

    def _signal(self, slot: _Slot) -> None:
        try:
            slot.lock.release()
        except RuntimeError:  # already released (double cancel)
            pass


# -- C-level mechanisms: the loop side ------------------------------------------------------

class SlotServer:
    """Serves the vCPU slots of one machine on the asyncio loop.

    ``dispatcher`` provides ``loop_handlers`` (per region id, called as
    ``handler(packed, ctx)``) and ``pre_serve`` (run before each access, to
    drain the coalesced ring).  Each loop-hosted exit costs one C call here:
    ``aiokvm_hub_serve`` completes the previous access and claims the next.

    **Held writes.**  A device's ``write`` may return an ``asyncio.Future``
    instead of None: the write has taken effect, but the vCPU that made it
    stays in its exit until the future resolves, as a vCPU under QEMU stays
    in a register write that drains I/O (a virtio reset waiting for requests
    in flight).  The server lets go of the access (``aiokvm_hub_detach``) and
    serves other vCPUs meanwhile; the future's completion releases the vCPU
    (``aiokvm_complete_held``, a no-op if the machine stopped meanwhile).
    """

    #: longest spin per C call without the GIL, and accesses served per loop turn
    SPIN_NS = 20_000
    BURST = 64
    #: vCPUs one hub serves (the C array's size)
    MAX_VCPUS = lib.AIOKVM_HUB_MAX_VCPUS

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        mech: str,
        vcpu_ctxs: list,
        dispatcher,
        *,
        on_error: Callable[[BaseException], None],
        poll_window_us: float = 500.0,
        spin_yield: bool | None = None,
    ) -> None:
        if len(vcpu_ctxs) > lib.AIOKVM_HUB_MAX_VCPUS:
            raise ValueError(f"the {mech} handoff serves at most {lib.AIOKVM_HUB_MAX_VCPUS} vCPUs")
        self.name = mech
        self._loop = loop
        self._mech = C_MECHANISMS[mech]
        self._dispatcher = dispatcher
        self._handlers = dispatcher.loop_handlers  # rebuilt in place on bus changes
        self._on_error = on_error
        self._ctxs = vcpu_ctxs
        self._poll_window = poll_window_us / 1e6
        self.hub = ffi.new("struct aiokvm_hub *")
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.hub.wake_fd = self.wake_fd
        self.hub.nvcpus = len(vcpu_ctxs)
        self.hub.current = -1  # no access held
        if spin_yield is None:
            # More busy threads (vCPUs + this loop) than cores: a spinning
            # thread would keep the one it waits for off the CPU.
            spin_yield = len(vcpu_ctxs) + 1 > len(os.sched_getaffinity(0))
        self.hub.spin_yield = 1 if spin_yield else 0
        for i, ctx in enumerate(vcpu_ctxs):
            self.hub.vcpus[i] = ctx
            ctx.hub = self.hub
            ctx.mech = self._mech
        self._task: asyncio.Task | None = None
        self._futex_continues = False  # a full futex burst goes on in the next loop turn
        self._sleeper: asyncio.Future | None = None
        self._closed = False
        #: loop wakeups through the eventfd, accesses served, idle sleeps, held writes
        self.wakeups = 0
        self.served = 0
        self.idle_sleeps = 0
        self.held = 0

    def start(self) -> None:
        self._loop.add_reader(self.wake_fd, self._on_wake)
        if self._mech != lib.AIOKVM_MECH_FUTEX:
            self._task = self._loop.create_task(self._poll(), name="aiokvm-slot-poller")

    def _on_wake(self) -> None:
        try:
            os.eventfd_read(self.wake_fd)
        except BlockingIOError:
            return
        self.wakeups += 1
        if self._mech == lib.AIOKVM_MECH_FUTEX:
            if not self._futex_continues:  # else the pending continuation serves it
                self._serve_futex()
        elif self._sleeper is not None and not self._sleeper.done():
            self._sleeper.set_result(None)

    def _serve_futex(self) -> None:
        """At most BURST accesses per loop turn: vCPUs that keep posting must not
        starve the loop (timers, other machines, stop()).  A full burst goes on
        in the next turn, since the wakeups of what is still posted may already
        have been read from the eventfd."""
        self._futex_continues = False
        if self._closed:
            return
        if self._serve_burst(0, self.BURST) == self.BURST:
            self._futex_continues = True
            self._loop.call_soon(self._serve_futex)

    def _serve_burst(self, spin_ns: int, limit: int) -> int:
        """Serve posted accesses until none comes within ``spin_ns`` (or ``limit``)."""
        serve, ctxs, dispatcher = lib.aiokvm_hub_serve, self._ctxs, self._dispatcher
        handlers, writes, reads = self._handlers, dispatcher.loop_writes, dispatcher.loop_reads
        pre_serve = dispatcher.pre_serve  # read once per burst
        hub = self.hub
        hub.spin_ns = spin_ns
        # The packed word's layout (aiokvm/access.py), bound to locals.
        OP_FIELD, WRITE_OP, READ_OP, ALL = access.OP_FIELD, access.WRITE_OP, access.READ_OP, access.ALL_ONES
        REGION_SHIFT, REGION_MASK = access.REGION_SHIFT, access.REGION_MASK
        SIZE_SHIFT, SIZE_MASK, OFFSET_SHIFT = access.SIZE_SHIFT, access.SIZE_MASK, access.OFFSET_SHIFT
        value, served = 0, 0
        while served < limit:
            packed = serve(hub, value)  # completes the previous access with value
            if packed < 0:
                break
            try:
                if pre_serve is not None:
                    pre_serve()
                # One-element writes and reads call the device directly;
                # string I/O goes through the region's handler.
                op = packed & OP_FIELD
                if op == WRITE_OP:
                    held = writes[(packed >> REGION_SHIFT) & REGION_MASK](
                        packed >> OFFSET_SHIFT, (packed >> SIZE_SHIFT) & SIZE_MASK, hub.value)
                    value = 0
                    if held is not None:
                        self._hold(held, packed)
                elif op == READ_OP:
                    value = reads[(packed >> REGION_SHIFT) & REGION_MASK](
                        packed >> OFFSET_SHIFT, (packed >> SIZE_SHIFT) & SIZE_MASK) & ALL
                else:
                    value = handlers[(packed >> REGION_SHIFT) & REGION_MASK](packed, ctxs[hub.current])
            except BaseException as exc:  # a device failed: the machine stops
                ctx = ctxs[hub.current]
                hub.current = -1  # abandoned, not completed: cancelled below
                if isinstance(exc, Exception) and not isinstance(exc, AiokvmError):
                    exc = dispatcher.failure(packed, ctx, exc)
                lib.aiokvm_cancel(ctx)
                self._on_error(exc)
                value = 0
                continue
            served += 1
        lib.aiokvm_hub_finish(hub, value)
        self.served += served
        return served

    def _hold(self, held, packed: int) -> None:
        """Keep the current access's vCPU waiting until ``held`` resolves (see the class docstring)."""
        if not isinstance(held, asyncio.Future):
            raise TypeError(f"write returned {held!r}; return None, or an asyncio.Future to hold the vCPU")
        if held.done():
            error = held_failure(held)
            if error is not None:
                raise error  # the device failed on this access: the machine stops
            return  # nothing to wait for: complete as usual
        ctx = self._ctxs[lib.aiokvm_hub_detach(self.hub)]
        self.held += 1

        def release(held: asyncio.Future) -> None:
            error = held_failure(held)
            if error is not None:  # stop the machine first: the completion below then finds it cancelled
                self._on_error(self._dispatcher.failure(packed, ctx, error))
            lib.aiokvm_complete_held(ctx, 0)

        held.add_done_callback(release)

    async def _poll(self) -> None:
        """Adaptive polling: spin in C while exits keep coming, sleep when idle.

        ``aiokvm_hub_serve`` spins without the GIL for up to ``SPIN_NS`` per
        call.  After ``BURST`` accesses the poller yields to the loop so other
        tasks keep running; after ``poll_window`` without work it clears the
        polling flag and sleeps on the eventfd (a vCPU that posts then
        writes it).
        """
        hub, set_polling = self.hub, lib.aiokvm_hub_set_polling
        monotonic = time.monotonic
        window, spin_ns, burst = self._poll_window, self.SPIN_NS, self.BURST
        set_polling(hub, 1)
        last_busy = monotonic()
        while not self._closed:
            if self._serve_burst(spin_ns, burst):
                last_busy = monotonic()
            elif monotonic() - last_busy > window:
                # Nothing for a while: stop burning CPU.  Clearing the flag
                # returns what was posted in between (then do not sleep).
                if not set_polling(hub, 0):
                    self.idle_sleeps += 1
                    self._sleeper = self._loop.create_future()
                    try:
                        await self._sleeper
                    finally:
                        self._sleeper = None
                set_polling(hub, 1)
                last_busy = monotonic()
                continue
            await asyncio.sleep(0)

    def cancel_all(self) -> None:
        for ctx in self._ctxs:
            lib.aiokvm_cancel(ctx)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.cancel_all()
        try:
            self._loop.remove_reader(self.wake_fd)
        except Exception:  # loop already closed
            pass
        if self._sleeper is not None and not self._sleeper.done():
            self._sleeper.cancel()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        os.close(self.wake_fd)
        self.wake_fd = -1
