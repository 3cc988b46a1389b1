"""Where a thread's CPU time went: user mode, kernel mode, or guest mode.

Linux keeps three counters per thread, exposed in ``/proc/<pid>/task/<tid>/stat``
(``proc(5)``, 1-based field numbers):

- field 14 ``utime``: time in user mode, **including** guest time;
- field 15 ``stime``: time in kernel mode (for a vCPU thread: the KVM_RUN
  ioctl, the exit handling in KVM, page faults, ...);
- field 43 ``guest_time``: time spent running a guest (vCPU in guest mode).

All three are in clock ticks (``os.sysconf("SC_CLK_TCK")``, usually 100 Hz,
so 10 ms granularity).  A vCPU thread's three modes are therefore::

    guest  = guest_time
    user   = utime - guest_time      (the VMM's own code: Python, device models)
    kernel = stime

Caveats:

- ``utime`` and ``stime`` are tick-sampled and then rescaled by the kernel so
  that their sum matches the thread's precise runtime, while ``guest_time``
  is the raw tick count.  The two can disagree by a tick or so; that is why
  ``ThreadTimes.user_s`` clamps at zero.  Intervals shorter than a few
  ticks are noise; measure over hundreds of milliseconds or more.
- ``read_thread_times_precise()`` adds the thread's on-CPU time in
  nanoseconds from ``/proc/<pid>/task/<tid>/schedstat`` (first field) when the
  kernel provides it (``CONFIG_SCHED_INFO``).  It is the total only, not split
  by mode, but exact; use it to check that the tick-based split adds up.
- **Nested KVM under PVM** (this project's development host runs KVM as
  ``kvm_pvm`` inside a VM): PVM runs the guest deprivileged and emulates its
  CPL-0 (guest kernel) mode in the host kernel, so guest-kernel time is
  charged as ``stime`` and ``guest_time`` stays near zero (measured: a vCPU
  thread running 200,000 port-I/O exits had 0.98 s user, 2.04 s stime and
  0.03 s guest_time).  On such a host the "kernel" share of a vCPU thread
  includes guest time; do not read it as pure KVM exit-handling overhead.
- Time spent in system calls is ``stime`` of course, including cheap-looking
  ones: ``time.thread_time()`` is a real ``clock_gettime`` syscall, while
  ``time.perf_counter()`` is served by the vDSO in user mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["ThreadTimes", "diff", "parse_stat", "read_on_cpu_ns", "read_schedstat_ns", "read_thread_times",
           "read_thread_times_precise"]

# 1-based field numbers in proc(5); fields after comm are counted from 3 (state).
_UTIME, _STIME, _GUEST_TIME = 14, 15, 43
_FIRST_AFTER_COMM = 3


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ThreadTimes:
    """CPU time of one thread, in seconds.

    ``utime_s``, ``stime_s`` and ``guest_s`` are the kernel's raw counters
    (``utime_s`` includes ``guest_s``); the properties split them into three
    disjoint modes.  ``on_cpu_s`` is the precise total from schedstat, or
    ``None`` when it was not read or is unavailable.
    """

    utime_s: float
    stime_s: float
    guest_s: float
    on_cpu_s: float | None = None
    #: time runnable but waiting for a CPU (schedstat field 2), or None
    runqueue_s: float | None = None

    @property
    def guest_mode_s(self) -> float:
        """Time running guest code."""
        return self.guest_s

    @property
    def user_s(self) -> float:
        """Time in host user mode, guest time excluded (clamped at 0)."""
        return max(self.utime_s - self.guest_s, 0.0)

    @property
    def kernel_s(self) -> float:
        """Time in host kernel mode."""
        return self.stime_s

    @property
    def total_s(self) -> float:
        """``utime + stime`` (tick-based; compare with ``on_cpu_s``)."""
        return self.utime_s + self.stime_s

    def as_dict(self) -> dict:
        return {
            "user_s": self.user_s, "kernel_s": self.kernel_s, "guest_s": self.guest_s,
            "utime_s": self.utime_s, "stime_s": self.stime_s, "on_cpu_s": self.on_cpu_s,
        }


def _task_dir(tid: int, pid: int | None) -> str:
    return f"/proc/{'self' if pid is None else pid}/task/{tid}"


def parse_stat(line: str, clk_tck: int | None = None) -> ThreadTimes:
    """Parse one ``stat`` line into ``ThreadTimes``.

    ``comm`` (field 2) is in parentheses and may itself contain spaces and
    parentheses, so the fixed fields are taken from after the **last** ``)``.
    Raises ``ValueError`` on a line that is not a ``stat`` line.
    """
    close = line.rfind(")")
    if close < 0 or "(" not in line[:close]:
        raise ValueError(f"not a /proc stat line (no '(comm)'): {line[:80]!r}")
    rest = line[close + 1:].split()
    if len(rest) < _STIME - _FIRST_AFTER_COMM + 1:
        raise ValueError(f"/proc stat line too short: {len(rest) + 2} fields")
    hz = clk_tck or _clock_ticks()

    def field(number: int) -> int:
        index = number - _FIRST_AFTER_COMM
        return int(rest[index]) if index < len(rest) else 0  # guest_time: absent before 2.6.24

    return ThreadTimes(
        utime_s=field(_UTIME) / hz,
        stime_s=field(_STIME) / hz,
        guest_s=field(_GUEST_TIME) / hz,
    )


def read_thread_times(tid: int, pid: int | None = None) -> ThreadTimes:
    """User, kernel and guest time of thread ``tid`` (of this process unless ``pid``).

    ``tid`` is a kernel thread id (``threading.get_native_id()``,
    ``Thread.native_id``).  Raises ``FileNotFoundError`` if the thread is gone.
    """
    with open(f"{_task_dir(tid, pid)}/stat") as f:
        return parse_stat(f.read())


def read_schedstat_ns(tid: int, pid: int | None = None) -> tuple[int, int] | None:
    """A thread's schedstat in ns: (on CPU, waiting on a run queue), or ``None``."""
    try:
        with open(f"{_task_dir(tid, pid)}/schedstat") as f:
            fields = f.read().split()
    except (FileNotFoundError, PermissionError):
        return None
    try:
        return int(fields[0]), int(fields[1])
    except (IndexError, ValueError):
        return None


def read_on_cpu_ns(tid: int, pid: int | None = None) -> int | None:
    """Precise on-CPU time of a thread in ns (schedstat field 1), or ``None``."""
    sched = read_schedstat_ns(tid, pid)
    return None if sched is None else sched[0]


def read_thread_times_precise(tid: int, pid: int | None = None) -> ThreadTimes:
    """``read_thread_times`` plus ``on_cpu_s`` and ``runqueue_s`` from schedstat (``None`` if unavailable)."""
    times = read_thread_times(tid, pid)
    sched = read_schedstat_ns(tid, pid)
    if sched is None:
        return times
    return ThreadTimes(times.utime_s, times.stime_s, times.guest_s, sched[0] / 1e9, sched[1] / 1e9)


def diff(a: ThreadTimes, b: ThreadTimes) -> ThreadTimes:
    """The time spent between two samples: ``b - a`` (``a`` is the earlier one).

    ``on_cpu_s`` is ``None`` unless both samples have it.
    """
    on_cpu = None if a.on_cpu_s is None or b.on_cpu_s is None else b.on_cpu_s - a.on_cpu_s
    runqueue = None if a.runqueue_s is None or b.runqueue_s is None else b.runqueue_s - a.runqueue_s
    return ThreadTimes(
        utime_s=b.utime_s - a.utime_s,
        stime_s=b.stime_s - a.stime_s,
        guest_s=b.guest_s - a.guest_s,
        on_cpu_s=on_cpu,
        runqueue_s=runqueue,
    )
