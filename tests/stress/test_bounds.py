"""Resource bounds under floods and lifecycle churn (issue 14): the figures
go in the note; the tests assert the bounds hold and nothing leaks."""

from __future__ import annotations

import ctypes
import gc
import os
import random
import threading
import tracemalloc

import pytest

from aiokvm import Machine
from aiokvm.net import Switch
from aiokvm.net.ports.base import SwitchPort


class Sink(SwitchPort):
    kind = "sink"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.received = 0

    def send(self, frame: bytes) -> bool:
        self.received += 1
        return True


async def test_a_mac_flood_keeps_the_fdb_at_its_limit_and_memory_bounded():
    async with Switch("sw", fdb_max_learned=1000) as sw:
        attacker, victim = sw.add_port(Sink("attacker")), sw.add_port(Sink("victim"))
        rng = random.Random(14)
        frames = [bytes.fromhex("ffffffffffff") + bytes([0x02]) + rng.randbytes(5) + b"\x88\xb5" + bytes(46)
                  for _ in range(1000)]
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for round_no in range(100):  # 100,000 frames, each from a fresh source MAC
            for i, frame in enumerate(frames):
                attacker.incoming(frame[:7] + bytes([round_no, i & 0xFF, i >> 8]) + frame[10:])
        grown = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        learned = [row for row in sw.fdb() if row.kind == "learned"]
    assert len(learned) == 1000  # the limit, as Linux's fdb_max_learned
    assert victim.received == 100_000  # flooded, never dropped for it
    assert grown < 4 << 20


async def test_a_broadcast_storm_between_switches_without_stp_is_bounded_and_counted():
    import asyncio

    async with Switch("a") as a, Switch("b") as b:
        # three cables between the same two switches and no STP: a broadcast doubles on each pass
        for k in (1, 2, 3):
            a.link(b, port=f"x{k}", other_port=f"y{k}")
        src = a.add_port(Sink("src"))
        src.incoming(bytes.fromhex("ffffffffffff" "020000000001" "88b5") + bytes(46))
        await asyncio.sleep(1.0)  # the storm runs on the loop
        drops = sum(p.counters.drops.get("queue_full", 0) for sw in (a, b) for p in sw.ports.values())
        queued = sum(len(getattr(p, "_queue", ())) for sw in (a, b) for p in sw.ports.values())
        seen = src.received
    print(f"storm: {seen} copies reached the host port in 1 s, {drops} dropped at full queues, {queued} queued")
    assert drops > 0  # the cables' queues filled: dropped and counted, not grown
    assert queued <= 6 * 1024  # six cable ends, 1024 frames each at most


def resources() -> tuple[int, int, int]:
    """Open fds, live threads and RSS.  RSS is read after ``malloc_trim``: glibc
    keeps freed heap pages mapped (RSS climbs by ~100 KiB per machine over the
    first few hundred, then levels off), and only memory still in use is a leak."""
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    fds = len(os.listdir("/proc/self/fd"))
    threads = threading.active_count()
    with open("/proc/self/statm") as fh:
        rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return fds, threads, rss


@pytest.mark.kvm
@pytest.mark.slow
async def test_a_thousand_machines_come_and_go_without_leaking_fds_threads_or_memory():
    async def one(i: int) -> None:
        async with Machine(name=f"churn{i}", serial_output=lambda b: None) as vm:
            vm.load("hello")
            assert (await vm.run(timeout=60)).code == 0

    for i in range(20):  # warm-up: imports, caches, the first arenas
        await one(i)
    fds0, threads0, rss0 = resources()
    for i in range(1000):
        await one(i)
    fds1, threads1, rss1 = resources()
    print(f"churn: fds {fds0}->{fds1}, threads {threads0}->{threads1}, rss {rss0 >> 20}->{rss1 >> 20} MiB")
    assert fds1 <= fds0 and threads1 <= threads0
    assert rss1 - rss0 < 64 << 20
