"""Stop, pause and resume of a vCPU thread, shared by every CPU backend.

The requester sets the request (``_stop`` or ``_paused``), then calls
``kick()``, which each backend implements (a signal into KVM_RUN, or
``emu_stop``).  The thread looks at the requests between runs and parks in
``_park()`` while paused; ``parked`` is set while it waits there.
"""

from __future__ import annotations

import threading
from typing import Protocol


class VcpuRunner(Protocol):
    """What ``Machine`` and ``metrics`` need of a vCPU thread, whatever the CPU backend
    (``vcpu_thread.VcpuThread`` on KVM, ``emulated.EmulatedVcpuThread`` on Unicorn):

    - ``start()``, ``kick()``, ``request_stop()``, ``pause()``, ``resume()``, ``join()``
      and the ``parked`` event (``ThreadControl`` gives all but ``start`` and ``kick``);
    - ``index``, ``thread`` (the ``threading.Thread``), ``native_id``;
    - the counters ``metrics`` reads: ``ctx`` (the C loop's ``struct aiokvm_vcpu``, which
      the emulated backend fills from Python), ``pio_counts``, ``latency``, ``metrics``,
      ``started_ns``/``ended_ns``, ``times_start``/``times_end``; and ``accel``
      ("kvm" unless said otherwise), which picks how the mode split is made.
    """

    index: int
    parked: threading.Event

    def start(self) -> None: ...
    def kick(self) -> None: ...
    def request_stop(self) -> None: ...


class ThreadControl:
    def _init_control(self, on_park) -> None:
        self._on_park = on_park
        self._stop = False
        self._paused = False
        self._resume = threading.Condition()
        self.parked = threading.Event()  # set while the thread waits in pause

    def kick(self) -> None:  # pragma: no cover - every backend defines it
        raise NotImplementedError

    def request_stop(self) -> None:
        """Ask the thread to leave its loop and end (asynchronous; use ``join``)."""
        self._stop = True
        with self._resume:
            self._resume.notify_all()
        self.kick()

    def pause(self) -> None:
        """Ask the thread to park outside the guest (asynchronous; see ``parked``)."""
        self._paused = True
        self.kick()

    def resume(self) -> None:
        with self._resume:
            self._paused = False
            self._resume.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def _park(self) -> None:
        with self._resume:
            self.parked.set()
            if self._on_park is not None:
                self._on_park(self.index)
            while self._paused and not self._stop:
                self._resume.wait()
            self.parked.clear()
