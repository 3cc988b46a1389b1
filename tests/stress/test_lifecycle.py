"""Lifecycle stress (issue 14): pause, resume and stop in random order with
random timing on 2 busy vCPUs, stop sometimes from another thread while a
pause is in flight, machine after machine on one loop.  Every operation
must finish within its bound, a stopped machine must say ``stopped``, a
paused one must not move, and no fd or thread may be left behind."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter as Tally

import pytest

from aiokvm import ConfigError, Machine
from tests.kvm.test_pause import Counter
from tests.stress.test_bounds import resources

pytestmark = [pytest.mark.kvm, pytest.mark.asyncio(loop_factories=["uvloop"])]

# The operations and their weights: a machine lives for about 20 of them.
OPERATIONS = {"pause": 8, "resume": 7, "double-pause": 1, "resume-unpaused": 1, "stop": 1,
              "stop-while-paused": 1, "stop-from-thread-during-pause": 1}


def random_gap(rng: random.Random) -> float:
    # From none (the kick lands while the vCPU still wakes from the last
    # operation) to a fraction of a millisecond of guest exits.
    return rng.choice((0.0, 0.0, rng.uniform(0, 20e-6), rng.uniform(0, 300e-6)))


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def start(rng: random.Random) -> tuple[Machine, Counter, asyncio.Task]:
    vm = Machine(vcpus=2, serial_output=lambda b: None)
    await vm.__aenter__()
    counter = Counter(2)
    vm.add_device(counter, pio=(0x510, 8), name="counter")
    vm.load("iostress", cmdline=f"n=100000000 seed={rng.randrange(1 << 16)}")
    task = asyncio.create_task(vm.run(timeout=600))
    while not vm._threads:  # run() has made its threads: pause() has something to hold
        await asyncio.sleep(0)
    return vm, counter, task


async def ended(vm: Machine, task: asyncio.Task) -> None:
    status = await asyncio.wait_for(task, 10)  # a stop that hangs fails here, not at the test timeout
    assert status.reason == "stopped", status
    with pytest.raises(ConfigError):
        await vm.pause(timeout=1)  # a stopped machine refuses, it does not wait
    await vm.aclose()


async def lifecycle(operations: int, seed: int) -> Tally:
    rng = random.Random(seed)
    names, weights = zip(*OPERATIONS.items(), strict=True)
    done: Tally = Tally()
    vm, counter, task = await start(rng)
    for _ in range(operations):
        spin(random_gap(rng))
        if rng.random() < 0.3:
            await asyncio.sleep(0)
        op = rng.choices(names, weights)[0]
        if op == "pause" or (op == "resume" and not vm.paused):
            await vm.pause(timeout=5)
            frozen = list(counter.writes)
            spin(random_gap(rng))
            assert counter.writes == frozen, "a paused vCPU moved"
        elif op in ("resume", "resume-unpaused"):
            vm.resume()
        elif op == "double-pause":  # two callers at once: both return with the vCPUs parked
            await asyncio.gather(vm.pause(timeout=5), vm.pause(timeout=5))
            assert all(t.parked.is_set() or not t.thread.is_alive() for t in vm._threads)
        else:
            if op == "stop":
                vm.stop()
            elif op == "stop-while-paused":
                await vm.pause(timeout=5)
                vm.stop()  # parked vCPUs must wake up to end
            else:  # a stop from another thread lands at a random point of a pause
                stopper = threading.Timer(rng.uniform(0, 200e-6), vm.stop)
                stopper.start()
                try:
                    await vm.pause(timeout=5)
                except ConfigError:
                    pass  # the stop won the race: the machine is no longer running
                stopper.join()
            await ended(vm, task)
            done["machines"] += 1
            vm, counter, task = await start(rng)
        done[op] += 1
    vm.stop()
    await ended(vm, task)
    done["machines"] += 1
    return done


async def run_and_check(operations: int, seed: int, halves: int = 1) -> list[int]:
    """The operations in ``halves`` blocks; the RSS after each."""
    await lifecycle(20, seed=seed ^ 0xFFFF)  # warm-up: imports, the kick handler, the first arenas
    fds0, threads0, rss0 = resources()
    t0 = time.perf_counter()
    done: Tally = Tally()
    rss = [rss0]
    for block in range(halves):
        done += await lifecycle(operations // halves, seed + block)
        fds1, threads1, rss1 = resources()
        rss.append(rss1)
    print(f"lifecycle: {operations} operations on {done['machines']} machines in "
          f"{time.perf_counter() - t0:.1f} s; {dict(done)}; fds {fds0}->{fds1}, threads {threads0}->{threads1}, "
          f"rss {' -> '.join(str(r >> 20) for r in rss)} MiB")
    assert sum(done[name] for name in OPERATIONS) == operations
    assert all(done[name] for name in OPERATIONS)  # every kind of operation ran
    assert fds1 <= fds0 and threads1 <= threads0
    assert rss[-1] - rss[0] < 16 << 20
    return rss


async def test_pause_resume_and_stop_in_random_order_on_two_vcpus():
    await run_and_check(600, seed=14)


@pytest.mark.slow
@pytest.mark.timeout(1800)
async def test_ten_thousand_pause_resume_and_stop_operations_on_two_vcpus():
    rss = await run_and_check(10_000, seed=10_000, halves=2)
    assert rss[2] - rss[1] < 8 << 20  # ~750 machines: a leak of 10 KiB each would show
