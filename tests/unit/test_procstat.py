"""Per-thread user / kernel / guest CPU accounting from /proc."""

from __future__ import annotations

import os
import threading
import time

import pytest

from aiokvm.procstat import ThreadTimes, diff, parse_stat, read_thread_times, read_thread_times_precise


def _stat_line(comm: str, utime: int, stime: int, guest: int) -> str:
    """A stat line in proc(5) layout: fields 1..52, with chosen comm and times."""
    fields = [str(n) for n in range(1, 53)]
    fields[0] = "4242"
    fields[1] = f"({comm})"
    fields[2] = "R"
    fields[13], fields[14], fields[42] = str(utime), str(stime), str(guest)
    return " ".join(fields) + "\n"


def test_parse_takes_fields_after_the_last_paren_of_comm():
    line = _stat_line("a b) (c) 7 8 9 )", utime=250, stime=30, guest=200)
    times = parse_stat(line, clk_tck=100)
    assert times == ThreadTimes(utime_s=2.5, stime_s=0.3, guest_s=2.0)
    assert times.user_s == pytest.approx(0.5)
    assert times.kernel_s == pytest.approx(0.3)
    assert times.guest_mode_s == pytest.approx(2.0)
    assert times.on_cpu_s is None


def test_parse_plain_comm_and_clamped_user_time():
    times = parse_stat(_stat_line("python3", utime=10, stime=5, guest=12), clk_tck=100)
    assert times.user_s == 0.0  # guest_time is raw ticks, utime rescaled: may exceed it by a tick


def test_parse_rejects_garbage():
    with pytest.raises(ValueError):
        parse_stat("no comm here 1 2 3")
    with pytest.raises(ValueError):
        parse_stat("1 (x) R 1 2")


def test_diff_subtracts_earlier_from_later():
    a = ThreadTimes(1.0, 2.0, 0.5, on_cpu_s=3.0)
    b = ThreadTimes(1.5, 2.25, 0.75, on_cpu_s=3.8)
    d = diff(a, b)
    assert (d.utime_s, d.stime_s, d.guest_s) == (0.5, 0.25, 0.25)
    assert d.on_cpu_s == pytest.approx(0.8)
    assert diff(a, ThreadTimes(1.5, 2.25, 0.75)).on_cpu_s is None


def _busy(seconds: float) -> None:
    """Spin in user mode.  perf_counter() is a vDSO call; time.thread_time()
    would be a real syscall per iteration and turn most of the loop into stime."""
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1


def _burn_cpu(tid: int, seconds: float) -> None:
    """Spin until the thread has had ``seconds`` of CPU (wall time is not CPU
    time on a loaded machine); falls back to wall time without schedstat."""
    start = read_thread_times_precise(tid).on_cpu_s
    deadline = time.monotonic() + 5
    _busy(seconds)
    if start is None:
        return
    while read_thread_times_precise(tid).on_cpu_s - start < seconds and time.monotonic() < deadline:
        _busy(0.005)


def test_real_thread_times_grow_with_user_work():
    tid = threading.get_native_id()
    before = read_thread_times_precise(tid)
    for value in (before.utime_s, before.stime_s, before.guest_s, before.user_s, before.kernel_s):
        assert value >= 0
    # Ticks are ~10 ms and utime is rescaled against the precise runtime, so
    # burn several ticks of CPU (~50 ms of pure user work).
    _burn_cpu(tid, 0.05)
    after = read_thread_times_precise(tid)
    delta = diff(before, after)
    assert delta.utime_s > 0
    assert delta.stime_s >= 0 and delta.guest_s == 0
    if before.on_cpu_s is not None:
        assert delta.on_cpu_s >= 0.05
    same = read_thread_times(tid, pid=os.getpid())
    assert same.utime_s >= after.utime_s


def test_other_thread_is_read_by_tid():
    busy_done, release = threading.Event(), threading.Event()
    tids = []

    def worker():
        tids.append(threading.get_native_id())
        _burn_cpu(tids[0], 0.05)
        busy_done.set()
        release.wait(5)

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert busy_done.wait(5)
        times = read_thread_times_precise(tids[0])
        assert times.utime_s > 0
        if times.on_cpu_s is not None:
            assert times.on_cpu_s >= 0.05
    finally:
        release.set()
        t.join()
    deadline = time.monotonic() + 5  # join() returns a moment before the kernel reaps the thread
    while os.path.exists(f"/proc/self/task/{tids[0]}") and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(FileNotFoundError):
        read_thread_times(tids[0])
