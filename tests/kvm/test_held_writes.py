"""Held writes (a device's write returns a Future and the vCPU waits for it),
the slot state machine under stop races, and the bus refusing changes under
running vCPUs."""

from __future__ import annotations

import asyncio
import random

import pytest

from aiokvm import ConfigError, Machine

pytestmark = pytest.mark.kvm


class Gate:
    """Each write is held until the loop releases it a little later; a write
    that arrives while the previous one is still held is a violation."""

    def __init__(self, delay_s: float = 0.001) -> None:
        self.delay_s = delay_s
        self.writes = 0
        self.violations = 0
        self.pending: asyncio.Future | None = None

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int):
        if self.pending is not None and not self.pending.done():
            self.violations += 1
        self.writes += 1
        loop = asyncio.get_running_loop()
        self.pending = loop.create_future()
        loop.call_later(self.delay_s, self.pending.set_result, None)
        return self.pending


@pytest.mark.parametrize("handoff", ["spin", "futex", "event"])
async def test_a_held_write_keeps_its_vcpu_until_the_future_resolves(handoff):
    n = 30
    async with Machine(handoff=handoff) as vm:
        gate = Gate()
        vm.add_device(gate, pio=(0x80, 1), name="gate")
        vm.load("exitloop", cmdline=f"n={n} port=0x80")
        status = await vm.run(timeout=60)
        stats = vm.stats()
    assert status.code == 0
    assert gate.writes == n
    assert gate.violations == 0  # the guest never got past a write still held
    if handoff != "event":
        assert stats["loop"]["held_writes"] == n


class Echo:
    """iostress's register per CPU (write v, read ~v); write i % 7 == 0 is held forever."""

    def __init__(self, hold: bool) -> None:
        self.last = [0, 0]
        self.writes = 0
        self.hold = hold
        self.held: list[asyncio.Future] = []

    def read(self, offset: int, size: int) -> int:
        return ~self.last[offset // 4] & 0xFFFFFFFF

    def write(self, offset: int, size: int, value: int):
        self.last[offset // 4] = value
        self.writes += 1
        if self.hold and self.writes % 7 == 0:
            future = asyncio.get_running_loop().create_future()
            self.held.append(future)
            return future
        return None


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("handoff", ["spin", "wake", "futex"])
async def test_stopping_at_random_moments_never_hangs_and_late_completions_are_harmless(handoff):
    """Stop races against posts, claims, completions and held writes: every
    run ends within its timeout, and completing a held write after the stop
    (a cancelled slot) changes nothing."""
    rng = random.Random(handoff)
    for i in range(25):
        async with Machine(vcpus=2, handoff=handoff) as vm:
            echo = Echo(hold=i % 2 == 1)
            vm.add_device(echo, pio=(0x510, 8), name="echo")
            vm.load("iostress", cmdline=f"n=1000000 seed={i + 1}")
            task = asyncio.create_task(vm.run(timeout=30))
            await asyncio.sleep(rng.uniform(0, 0.02))
            vm.stop()
            status = await asyncio.wait_for(task, 10)
            assert status.reason == "stopped"
            for future in echo.held:  # the machine has stopped: completing now must be a no-op
                future.set_result(None)
            await asyncio.sleep(0)
            assert all(not t.thread.is_alive() for t in vm._threads)


async def test_the_bus_refuses_changes_while_vcpus_run_and_takes_them_while_paused():
    n = 200_000
    async with Machine() as vm:
        vm.load("exitloop", cmdline=f"n={n} port=0x80")  # nobody claims 0x80 yet
        task = asyncio.create_task(vm.run(timeout=120))
        while vm.stats()["unclaimed"]["pio"]["writes"] < 1000:
            await asyncio.sleep(0.002)

        class Sink:
            writes = 0

            def read(self, offset, size):
                return 0

            def write(self, offset, size, value):
                Sink.writes += 1

        with pytest.raises(ConfigError, match="while vCPUs of .* run: pause"):
            vm.add_device(Sink(), pio=(0x80, 1), name="sink")
        await vm.pause()
        vm.add_device(Sink(), pio=(0x80, 1), name="sink")
        vm.resume()
        status = await task
        stats = vm.stats()
    assert status.code == 0
    assert Sink.writes > 0
    # Every write went either to nobody (before) or to the sink (after): none lost, none twice.
    assert stats["unclaimed"]["pio"]["writes"] + Sink.writes == n
    assert stats["paths"]["sink/loop"] == Sink.writes


@pytest.mark.parametrize("handoff", ["spin", "event"])
async def test_a_write_returning_something_else_is_a_device_error(handoff):
    from aiokvm import DeviceError

    class Confused:
        def read(self, offset, size):
            return 0

        def write(self, offset, size, value):
            return 42  # neither None nor a Future

    async with Machine(handoff=handoff) as vm:
        vm.add_device(Confused(), pio=(0x80, 1), name="confused")
        vm.load("exitloop", cmdline="n=10 port=0x80")
        with pytest.raises(DeviceError, match="confused.*write returned 42; return None, or an asyncio.Future"):
            await vm.run(timeout=30)


class HoldFirst:
    """The first write is held until the test resolves (or fails) it."""

    def __init__(self) -> None:
        self.writes = 0
        self.held: asyncio.Future | None = None

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int):
        self.writes += 1
        if self.held is None:
            self.held = asyncio.get_running_loop().create_future()
            return self.held
        return None


async def started_with_a_held_write(vm: Machine, n: int = 50):
    gate = HoldFirst()
    vm.add_device(gate, pio=(0x80, 1), name="gate")
    vm.load("exitloop", cmdline=f"n={n} port=0x80")
    task = asyncio.create_task(vm.run(timeout=60))
    while gate.held is None:
        await asyncio.sleep(0.002)
    return gate, task


@pytest.mark.parametrize("handoff", ["spin", "event"])
async def test_a_held_write_that_fails_stops_the_machine_with_a_device_error(handoff):
    from aiokvm import DeviceError

    async with Machine(handoff=handoff) as vm:
        gate, task = await started_with_a_held_write(vm)
        gate.held.set_exception(OSError("backend gone"))
        with pytest.raises(DeviceError, match="gate.*backend gone"):
            await task
    assert gate.writes == 1  # the guest never got past it


async def test_a_pause_that_cannot_complete_rolls_back_and_the_machine_runs_on():
    from aiokvm import MachineTimeout

    async with Machine() as vm:
        gate, task = await started_with_a_held_write(vm, n=50)
        with pytest.raises(MachineTimeout, match="held by a device write"):
            await vm.pause(timeout=0.2)
        assert not vm.paused  # not left half-paused
        gate.held.set_result(None)
        status = await task
    assert status.code == 0 and gate.writes == 50


async def test_closing_a_machine_whose_run_is_pending_ends_the_run():
    vm = Machine()
    await vm.__aenter__()
    gate, task = await started_with_a_held_write(vm)
    await asyncio.wait_for(vm.aclose(), 10)  # never resolved: the stop cancels the held access
    status = await asyncio.wait_for(task, 5)
    assert status.reason == "stopped"
    assert all(not t.thread.is_alive() for t in vm._threads)
    assert vm.stats()["kernel_paths"]["irqfd"] == {}  # readable after close (no irqfd here)


async def test_the_bus_guard_refuses_changes_right_after_resume():
    async with Machine() as vm:
        vm.load("exitloop", cmdline="n=2000000 port=0x80")
        task = asyncio.create_task(vm.run(timeout=60))
        await asyncio.sleep(0.01)
        await vm.pause()
        vm.resume()  # the vCPU's parked flag is still set until it wakes
        with pytest.raises(ConfigError, match="pause"):
            vm.add_device(HoldFirst(), pio=(0x81, 1), name="late")
        vm.stop()
        await task


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_the_futex_handoff_leaves_the_loop_free_for_timers_while_vcpus_keep_posting():
    """Two vCPUs exiting back to back: the loop still runs its other work
    (a timer ticking every 5 ms) instead of serving them forever in one go."""
    async with Machine(vcpus=2, handoff="futex") as vm:
        vm.add_device(Echo(hold=False), pio=(0x510, 8), name="echo")
        vm.load("iostress", cmdline="n=1000000 seed=3")
        task = asyncio.create_task(vm.run(timeout=60))
        await asyncio.sleep(0.05)
        ticks, started = 0, asyncio.get_running_loop().time()
        while asyncio.get_running_loop().time() - started < 0.5:
            await asyncio.sleep(0.005)
            ticks += 1
        vm.stop()
        assert (await asyncio.wait_for(task, 10)).reason == "stopped"
    print("timer ticks in 0.5 s:", ticks)
    assert ticks >= 20  # a starved loop would manage a handful at most
