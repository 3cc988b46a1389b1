"""The Unicorn software CPU runs the bundled guests as KVM does: the same
serial output and exit status, the same devices, the same lifecycle.

One parametrized test covers every guest that runs without an interrupt
controller: add a guest to ``SAME_AS_KVM`` to cover it.  Lines that carry
timings (TSC ticks) differ by nature and are left out of the comparison."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
import sys

import pytest

from aiokvm import ConfigError, GuestError, Machine, MachineTimeout

pytestmark = pytest.mark.skipif(__import__("importlib").util.find_spec("unicorn") is None,
                                reason="unicorn is not installed (pip install -e '.[test]' installs it)")

#: case -> (guest, command line, a disk "if=" of 64 KiB or None)
SAME_AS_KVM = {
    "hello": ("hello", "", None),
    "exitloop": ("exitloop", "n=2000 port=0x80 cpl=3", None),
    "exitloop-work": ("exitloop", "n=500 port=0x80 work=100 cpl=3", None),
    "unclaimed": ("unclaimed", "", None),
    "smp": ("smp", "", None),
    "iostress": ("iostress", "", None),  # no device at its port: the same errors, counted the same
    # small disks: Unicorn hands rep insw to the device a word at a time
    "disktest-ata": ("disktest", "sectors=16 cpl=3", "ata"),
    "disktest-virtio": ("disktest", "sectors=16 cpl=3", "virtio"),
}
TIMING = re.compile(r"ticks|cycles|tsc|rtt", re.IGNORECASE)


async def run_guest(accel: str, guest: str, cmdline: str, disk: str | None) -> tuple[object, str]:
    async with Machine(accel=accel, name=f"{guest}-{accel}") as vm:
        if disk is not None:
            await vm.add_disk(disk)
        vm.load(guest, cmdline=cmdline)
        try:
            outcome = await vm.run(timeout=120)
        except GuestError as exc:
            outcome = type(exc).__name__
        output = "\n".join(line for line in vm.console.output.decode().splitlines() if not TIMING.search(line))
        return outcome, output


@pytest.mark.kvm
@pytest.mark.parametrize("case", sorted(SAME_AS_KVM))
async def test_a_guest_behaves_the_same_under_unicorn_as_under_kvm(case, tmp_path):
    guest, cmdline, interface = SAME_AS_KVM[case]
    results, images = {}, {}
    for accel in ("kvm", "unicorn"):
        disk = None
        image = tmp_path / accel / "disk.img"  # one name: virtio-blk's ID string is the file's name
        if interface:
            image.parent.mkdir()
            image.write_bytes(bytes(64 << 10))
            disk = f"{image},if={interface}"
        results[accel] = await run_guest(accel, guest, cmdline, disk)
        if interface:
            images[accel] = hashlib.sha256(image.read_bytes()).hexdigest()
    assert results["unicorn"] == results["kvm"]
    assert results["kvm"][1]  # it said something
    assert images.get("unicorn") == images.get("kvm")  # byte-identical disks


@pytest.mark.kvm
async def test_emulated_and_kvm_machines_share_a_loop_and_a_switch():
    from aiokvm.net import Switch

    async with Switch("br0") as sw, Machine(name="a", accel="kvm") as a, Machine(name="b", accel="unicorn") as b:
        a.add_nic(sw, "02:00:00:00:00:0a")
        b.add_nic(sw, "02:00:00:00:00:0b")
        a.load("netecho", cmdline="ip=10.0.0.1 cpl=3 n=21 timeout_ms=30000")
        b.load("ping", cmdline="ip=10.0.0.2 dst=10.0.0.1 count=20 cpl=3")
        echo = asyncio.create_task(a.run(timeout=60))
        status = await b.run(timeout=60)
        assert (await echo).code == 0
        stats = b.stats()
    assert status.code == 0 and "ping: 20/20 replies" in b.console.output.decode()
    assert "netecho: frames 21 arp 1 icmp 20 udp 0 other 0" in a.console.output.decode()
    # QueueNotify went to the loop without an exit, as an ioeventfd would have
    assert stats["paths"]["net-b/notify"] > 0 and stats["accel"] == "unicorn"


@pytest.mark.kvm
@pytest.mark.parametrize("how, unicorn_says", [("ud2", "instruction it cannot run at 0x"),
                                               ("de", "CPU exception at 0x[0-9a-f]+, which accel=unicorn cannot")])
async def test_a_faulting_guest_ends_with_a_one_line_guest_error_under_both(how, unicorn_says):
    for accel, message in (("kvm", "triple-faulted"), ("unicorn", unicorn_says)):
        async with Machine(accel=accel) as vm:
            vm.load("triplefault", cmdline=f"how={how}")
            with pytest.raises(GuestError, match=message) as raised:
                await vm.run(timeout=60)
            assert "\n" not in str(raised.value)
            assert "about to fault" in vm.console.output.decode()


@pytest.mark.parametrize("guest", ["idle", "irqtest"])
async def test_a_guest_waiting_for_an_interrupt_ends_with_a_halt_not_a_hang(guest):
    """There is no interrupt controller: a guest that halts to wait for one halts for good."""
    async with Machine(accel="unicorn") as vm:
        vm.load(guest)
        status = await vm.run(timeout=60)
        stats = vm.stats()
    assert status.reason == "halt" and stats["exits"]["hlt"] == 1 and stats["accel"] == "unicorn"


async def test_stop_pause_resume_and_timeout_reach_an_emulated_vcpu():
    async with Machine(accel="unicorn") as vm:
        vm.load("exitloop", cmdline="n=100000000 port=0x80 cpl=3")
        run = asyncio.create_task(vm.run(timeout=60))
        await asyncio.sleep(0.3)
        await vm.pause()
        paused_at = vm.stats()["exits"]["io"]
        await asyncio.sleep(0.2)
        assert vm.stats()["exits"]["io"] == paused_at  # nothing runs while paused
        vm.resume()
        await asyncio.sleep(0.2)
        assert vm.stats()["exits"]["io"] > paused_at
        vm.stop()
        assert (await run).reason == "stopped"
    async with Machine(accel="unicorn") as vm:
        vm.load("exitloop", cmdline="n=100000000 port=0x80 cpl=3")
        with pytest.raises(MachineTimeout):
            await vm.run(timeout=0.3)


async def test_loop_hosted_devices_and_inline_ones_both_see_the_guest():
    class Sink:
        def __init__(self):
            self.writes = 0

        def read(self, offset, size):
            return 0

        def write(self, offset, size, value):
            self.writes += 1

    for mode in ("inline", "loop"):
        sink = Sink()
        async with Machine(accel="unicorn") as vm:
            vm.add_device(sink, pio=(0x80, 1), mode=mode, name="sink")
            vm.load("exitloop", cmdline="n=500 port=0x80 cpl=3")
            assert (await vm.run(timeout=60)).code == 0
            stats = vm.stats()
        assert sink.writes == 500 and stats["paths"][f"sink/{mode}"] == 500
        assert stats["vcpus"][0]["latency"]["handler"]["count"] >= 500  # the sink's and the serial port's
        assert stats["vcpus"][0]["pio"]["0x80/out"] == 500 and stats["vcpus"][0]["modes"]["guest_s"] > 0


async def test_what_unicorn_lacks_is_a_clear_config_error():
    with pytest.raises(ConfigError, match="runs one vCPU"):
        async with Machine(accel="unicorn", vcpus=2):
            pass
    async with Machine(accel="unicorn") as vm:
        with pytest.raises(ConfigError, match="has no irqfd interrupt lines"):
            vm.irqfd(5)
        with pytest.raises(ConfigError, match="no coalesced MMIO"):
            vm.add_device(object(), mmio=(0xD0000000, 0x1000), mode="loop", coalesced=True)


def test_auto_falls_back_to_unicorn_where_kvm_is_unusable_and_says_so():
    env = {**os.environ, "AIOKVM_KVM_DEVICE": "/nonexistent/kvm"}
    proc = subprocess.run([sys.executable, "-m", "aiokvm", "run", "hello", "--accel", "auto"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Hello from aiokvm guest" in proc.stdout
    assert proc.stderr.strip().splitlines() == [
        "aiokvm: /nonexistent/kvm does not exist: running on the unicorn software CPU (accel=auto)"]
    info = subprocess.run([sys.executable, "-m", "aiokvm", "info"], capture_output=True, text=True, timeout=60, env=env)
    assert "unicorn   usable" in info.stdout
