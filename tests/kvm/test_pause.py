"""Pause, resume and the kick signal: no kick is ever lost, and the signal
stays out of the embedding application's way."""

from __future__ import annotations

import asyncio
import random
import signal
import statistics
import time

import pytest

from aiokvm import ConfigError, Machine
from aiokvm.cpu.vcpu_thread import KICK_SIGNAL, VcpuThread

pytestmark = pytest.mark.kvm


class Counter:
    """iostress's register per CPU (write v, read ~v), counting the writes."""

    def __init__(self, vcpus: int) -> None:
        self.writes = [0] * vcpus
        self.last = [0] * vcpus

    def read(self, offset: int, size: int) -> int:
        return ~self.last[offset // 4] & 0xFFFFFFFF

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes[offset // 4] += 1
        self.last[offset // 4] = value


async def started(vcpus: int = 2, **kw):
    vm = Machine(vcpus=vcpus, **kw)
    await vm.__aenter__()
    counter = Counter(vcpus)
    vm.add_device(counter, pio=(0x510, 4 * vcpus), name="counter")
    vm.load("iostress", cmdline="n=100000000 seed=7")
    task = asyncio.create_task(vm.run(timeout=600))
    while sum(counter.writes) < 200:
        await asyncio.sleep(0.002)
    return vm, counter, task


async def stopped(vm: Machine, task: asyncio.Task) -> None:
    vm.stop()
    status = await task
    assert status.reason == "stopped"
    await vm.aclose()


async def test_a_pause_that_lands_while_the_vcpu_handles_a_kick_is_not_lost(monkeypatch):
    """The race of the lost kick, made deterministic: a pause() arrives just as
    the vCPU thread comes back from handling the previous one.  The thread
    must see it and park again instead of clearing the kick and running on."""
    real_park = VcpuThread._park
    injected: list[int] = []

    def park_then_get_paused_again(self):
        real_park(self)
        if not injected:  # once: what a pause() racing with this wake-up does
            injected.append(self.index)
            self.pause()

    monkeypatch.setattr(VcpuThread, "_park", park_then_get_paused_again)
    vm, counter, task = await started(vcpus=1)
    try:
        await vm.pause()
        vm.resume()
        thread = vm._threads[0]
        for _ in range(400):  # up to 2 s for the thread to notice the second kick
            if injected and thread.parked.is_set():
                break
            await asyncio.sleep(0.005)
        assert injected and thread.parked.is_set(), "the kick was lost: the vCPU runs on"
        frozen = counter.writes[0]
        await asyncio.sleep(0.05)
        assert counter.writes[0] == frozen
        thread.resume()
    finally:
        await stopped(vm, task)


async def pause_resume_cycles(cycles: int, seed: int) -> list[float]:
    """``cycles`` pause/resume cycles on 2 busy vCPUs with random delays; the pause latencies."""
    rng = random.Random(seed)
    vm, counter, task = await started(vcpus=2)
    latencies = []
    try:
        for i in range(cycles):
            # Random gaps, from none (the kick lands while the vCPU is still
            # waking from the last resume) to a fraction of a millisecond.
            gap = rng.choice((0.0, 0.0, rng.uniform(0, 20e-6), rng.uniform(0, 300e-6)))
            end = time.perf_counter() + gap
            while time.perf_counter() < end:
                pass
            if rng.random() < 0.3:
                await asyncio.sleep(0)
            t0 = time.perf_counter()
            await vm.pause(timeout=5.0)
            latencies.append(time.perf_counter() - t0)
            if i % 500 == 0:  # paused means nobody moves
                frozen = list(counter.writes)
                await asyncio.sleep(0.01)
                assert counter.writes == frozen
            vm.resume()
        assert not task.done(), task
        before = sum(counter.writes)
        while sum(counter.writes) < before + 100:  # and the guest still runs after all that
            await asyncio.sleep(0.002)
    finally:
        await stopped(vm, task)
    return latencies


def report(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[int(len(ordered) * 0.99)]
    return (f"{len(latencies)} cycles: pause latency median {statistics.median(ordered) * 1e6:.0f} us, "
            f"p99 {p99 * 1e6:.0f} us, worst {ordered[-1] * 1e6:.0f} us")


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_pause_resume_cycles_under_exit_load():
    latencies = await pause_resume_cycles(300, seed=1)
    assert len(latencies) == 300
    print(report(latencies))


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_ten_thousand_pause_resume_cycles_under_exit_load():
    latencies = await pause_resume_cycles(10_000, seed=2)
    assert len(latencies) == 10_000
    print(report(latencies))


async def test_the_kick_signal_is_a_real_time_signal_the_application_never_sees():
    assert signal.SIGRTMIN <= KICK_SIGNAL <= signal.SIGRTMAX
    seen = []
    old = signal.signal(signal.SIGUSR1, lambda *_: seen.append(1))
    try:
        vm, counter, task = await started(vcpus=2)
        await vm.pause()
        vm.resume()
        await stopped(vm, task)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert seen == []


async def test_a_vm_refuses_to_start_when_the_application_handles_the_kick_signal():
    signal.signal(KICK_SIGNAL, lambda *_: None)
    try:
        async with Machine() as vm:
            vm.load("hello")
            with pytest.raises(ConfigError, match=r"SIGRTMIN\+4.*already has a handler"):
                await vm.run(timeout=30)
    finally:
        signal.signal(KICK_SIGNAL, signal.SIG_DFL)
    async with Machine() as vm:  # with the handler gone, aiokvm installs its own again
        vm.load("hello")
        assert (await vm.run(timeout=30)).code == 0
