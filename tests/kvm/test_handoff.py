"""Loop-hosted exits under every handoff, on uvloop and asyncio: nothing lost,
nothing doubled, every value round-trips; plus pause/resume and idle CPU."""

from __future__ import annotations

import asyncio
import random
import resource
import threading

import pytest

from aiokvm import Machine
from aiokvm.handoff import HANDOFFS

pytestmark = pytest.mark.kvm

MASKS = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF}


def lcg_values(seed: int, cpu: int, n: int, mask: int) -> list[int]:
    """The values iostress's CPU ``cpu`` writes (see guest/programs/iostress.c)."""
    x = (seed ^ (cpu * 0x9E3779B9)) & 0xFFFFFFFF
    out = []
    for _ in range(n):
        x = (x * 1664525 + 1013904223) & 0xFFFFFFFF
        out.append(x & mask)
    return out


class Echo:
    """Register per CPU: write v stores v, read returns ~v (the iostress protocol)."""

    def __init__(self, stride: int, size: int) -> None:
        self.stride = stride
        self.mask = MASKS[size]
        self.last: dict[int, int] = {}
        self.writes: dict[int, list[int]] = {}
        self.threads: set[int] = set()

    def read(self, offset: int, size: int) -> int:
        self.threads.add(threading.get_ident())
        return ~self.last.get(offset // self.stride, 0) & MASKS[size]

    def write(self, offset: int, size: int, value: int) -> None:
        self.threads.add(threading.get_ident())
        cpu = offset // self.stride
        self.last[cpu] = value
        self.writes.setdefault(cpu, []).append(value)


async def stress(handoff: str, *, vcpus: int, n: int, seed: int, size: int, mmio: bool, mode: str = "loop"):
    async with Machine(vcpus=vcpus, handoff=handoff) as vm:
        if mmio:
            echo = Echo(8, 4)
            vm.add_device(echo, mmio=(0xD000_0000, 8 * vcpus), name="echo", mode=mode)
            cmdline = f"n={n} seed={seed} mmio=0xd0000000"
            size = 4
        else:
            echo = Echo(4, size)
            vm.add_device(echo, pio=(0x510, 4 * vcpus), name="echo", mode=mode)
            cmdline = f"n={n} seed={seed} size={size} base=0x510"
        vm.load("iostress", cmdline=cmdline)
        status = await vm.run(timeout=120)
        return status, vm.console.output.decode(), echo, vm.stats()


@pytest.mark.parametrize("handoff", HANDOFFS)
@pytest.mark.parametrize("case", range(3))
async def test_two_vcpus_hammering_one_loop_lose_nothing(handoff, case):
    rng = random.Random(f"{handoff}-{case}")
    seed = rng.randrange(1, 2**32)
    size = rng.choice([1, 2, 4])
    mmio = rng.random() < 0.4
    n = rng.randrange(200, 1500)
    status, output, echo, stats = await stress(handoff, vcpus=2, n=n, seed=seed, size=size, mmio=mmio)
    assert status.code == 0, output
    assert "2 cpus, 0 errors" in output
    loop_thread = threading.get_ident()
    assert echo.threads == {loop_thread}  # loop-hosted means the loop thread
    mask = MASKS[4 if mmio else size]
    for cpu in range(2):
        assert echo.writes[cpu] == lcg_values(seed, cpu, n, mask), f"cpu {cpu}: lost, doubled or reordered"
    assert stats["paths"]["echo/loop"] == 2 * 2 * n  # a write and a read per iteration


@pytest.mark.parametrize(("size", "mmio"), [(1, False), (2, False), (4, False), (4, True)])
async def test_inline_handlers_round_trip_every_value(size, mmio):
    seed, n = 0x5EED + size, 700
    status, output, echo, stats = await stress("spin", vcpus=2, n=n, seed=seed, size=size, mmio=mmio,
                                               mode="inline")
    assert status.code == 0, output
    assert "2 cpus, 0 errors" in output  # every read returned ~(the last write), per CPU
    assert threading.get_ident() not in echo.threads  # inline means the vCPU threads
    mask = MASKS[size]
    for cpu in range(2):
        assert echo.writes[cpu] == lcg_values(seed, cpu, n, mask)
    assert stats["paths"]["echo/inline"] == 2 * 2 * n


async def test_pause_holds_every_vcpu_and_resume_loses_nothing():
    n = 40_000
    async with Machine(vcpus=2) as vm:
        echo = Echo(4, 4)
        vm.add_device(echo, pio=(0x510, 8), name="echo")
        vm.load("iostress", cmdline=f"n={n} seed=7")
        task = asyncio.create_task(vm.run(timeout=300))
        while sum(len(w) for w in echo.writes.values()) < 1000:
            await asyncio.sleep(0.005)
        for _ in range(3):
            await vm.pause()
            assert vm.paused
            frozen = {cpu: len(w) for cpu, w in echo.writes.items()}
            await asyncio.sleep(0.1)
            assert {cpu: len(w) for cpu, w in echo.writes.items()} == frozen  # nobody moved
            assert sum(frozen.values()) < 2 * n
            vm.resume()
            await asyncio.sleep(0.05)
        status = await task
    assert status.code == 0
    for cpu in range(2):
        assert echo.writes[cpu] == lcg_values(7, cpu, n, 0xFFFFFFFF)


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("handoff", ["spin", "wake"])
async def test_an_idle_vm_stops_burning_cpu(handoff):
    """After the guest stops exiting, polling stops: < 5% of a core over 1 s."""
    async with Machine(handoff=handoff) as vm:
        vm.add_device(Echo(4, 1), pio=(0x80, 1), name="sink")
        vm.load("idle", cmdline="n=20000 port=0x80")
        task = asyncio.create_task(vm.run())
        while b"idle: halting" not in vm.console.output:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # past the poll window
        before = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.sleep(1.0)
        after = resource.getrusage(resource.RUSAGE_SELF)
        vm.stop()
        await task
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 0.05, f"idle VM used {cpu:.3f} s of CPU in 1 s"
