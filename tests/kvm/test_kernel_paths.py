"""ioeventfd, coalesced MMIO/PIO, and KVM's own counters against ours."""

from __future__ import annotations

import pytest

from aiokvm import ConfigError, IoEvent, Machine
from tests.kvm.host import pvm_host

pytestmark = pytest.mark.kvm


class Recorder:
    def __init__(self) -> None:
        self.writes: list[int] = []
        self.events: list[tuple[int, int | None, int]] = []

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        self.writes.append(value)

    def ioevent(self, offset, datamatch, count):
        self.events.append((offset, datamatch, count))


async def run_exitloop(cmdline: str, **device):
    async with Machine() as vm:
        rec = Recorder()
        vm.add_device(rec, name="sink", **device)
        vm.load("exitloop", cmdline=cmdline)
        status = await vm.run(timeout=60)
        assert status.code == 0, vm.console.output
        return rec, vm.stats()


async def test_ioeventfd_writes_never_reach_user_mode():
    n = 5000
    rec, stats = await run_exitloop(f"n={n} port=0x80", pio=(0x80, 1), ioeventfds=[IoEvent(0, 1)])
    assert sum(count for _, _, count in rec.events) == n  # every write signalled, none lost
    assert rec.writes == []
    assert stats["paths"]["sink/ioeventfd"] == n
    assert stats["vcpus"][0]["user_exits"] < 500  # only the console and debug-exit exit
    assert "0x80/out" not in stats["pio"]


async def test_ioeventfd_datamatch_takes_only_its_value():
    n = 2560
    rec, stats = await run_exitloop(f"n={n} port=0x80", pio=(0x80, 1), ioeventfds=[IoEvent(0, 1, datamatch=7)])
    matched = sum(count for _, _, count in rec.events)
    assert matched == n // 256  # exitloop writes i & 0xff
    assert all(dm == 7 for _, dm, _ in rec.events)
    assert len(rec.writes) == n - matched  # the rest exit to the device as usual
    assert 7 not in rec.writes


async def test_coalesced_mmio_delivers_every_write_in_order():
    n = 5000
    rec, stats = await run_exitloop(f"n={n} mmio=0xd0000000", mmio=(0xD000_0000, 0x1000), coalesced=True)
    assert rec.writes == list(range(n))
    coalesced = stats["paths"].get("sink/coalesced", 0)
    assert coalesced > n // 2  # most writes never exited
    assert coalesced + stats["paths"].get("sink/loop", 0) == n
    assert stats["vcpus"][0]["user_exits"] < n // 2


async def test_coalesced_pio_delivers_every_write_in_order():
    n = 3000
    rec, stats = await run_exitloop(f"n={n} port=0x80 size=4", pio=(0x80, 4), coalesced=True)
    assert rec.writes == list(range(n))
    assert stats["paths"].get("sink/coalesced", 0) > n // 2


async def test_coalesced_needs_a_loop_hosted_device():
    async with Machine() as vm:
        with pytest.raises(ConfigError, match="mode='loop'"):
            vm.add_device(Recorder(), mmio=(0xD000_0000, 0x1000), mode="inline", coalesced=True)
        with pytest.raises(ConfigError, match="outside"):
            vm.add_device(Recorder(), pio=(0x80, 1), ioeventfds=[IoEvent(4, 1)])
        vm.add_device(Recorder(), pio=(0x80, 1))  # the failed attempts left nothing claimed


@pytest.mark.parametrize("mmio", [False, True])
async def test_our_user_exit_count_matches_kvms(mmio):
    n = 20000
    cmdline = f"n={n} mmio=0xd0000000" if mmio else f"n={n} port=0x80"
    async with Machine() as vm:
        vm.load("exitloop", cmdline=cmdline)
        await vm.run(timeout=60)
        v = vm.stats()["vcpus"][0]
    ours, kvm = v["user_exits"], v["kvm"]
    if mmio:
        assert kvm["mmio_exits"] == n  # KVM counts MMIO exits to user mode exactly
    if pvm_host():
        # PVM never counts io_exits; its "exits" counts (almost) only exits to user mode.
        assert abs(kvm["exits"] - ours) <= 0.005 * ours, (kvm["exits"], ours)
        assert kvm["fpu_reload"] == ours  # one FPU reload per return to user mode
    else:
        user = kvm["io_exits"] + kvm["mmio_exits"]
        assert abs(user - ours) <= 0.005 * ours, (user, ours)
        assert kvm["exits"] >= ours
