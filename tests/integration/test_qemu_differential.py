"""The same guest ELF under aiokvm and under QEMU microvm gives the same output.

QEMU's isa-debug-exit turns the guest's code v into the status (v << 1) | 1;
aiokvm reports v itself.
"""

from __future__ import annotations

import subprocess

import pytest

from aiokvm import GuestError, Machine, guests
from tests.conftest import QEMU

pytestmark = [pytest.mark.kvm, pytest.mark.qemu]


def run_qemu(name: str, cmdline: str = "", *, smp: int = 1, memory: str = "64M",
             timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [
        QEMU, "-enable-kvm", "-M", "microvm,acpi=off", "-cpu", "qemu64", "-m", memory, "-smp", str(smp),
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
        "-kernel", str(guests.path(name)), "-append", cmdline,
    ]
    return subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


async def run_aiokvm(name: str, cmdline: str = "", *, vcpus: int = 1, memory: str = "64M"):
    async with Machine(memory=memory, vcpus=vcpus) as vm:
        vm.load(name, cmdline=cmdline)
        try:
            status = await vm.run(timeout=120)
        except GuestError as exc:
            return exc, vm.console.output
        return status, vm.console.output


def normalize(output: bytes) -> bytes:
    return output.replace(b"\r\n", b"\n")


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize(("name", "cmdline", "vcpus"), [
    ("hello", "", 1),
    ("exitloop", "n=2000 port=0x80", 1),
    ("exitloop", "n=2000 port=0x80 cpl=3", 1),
    ("exitloop", "n=1000 mmio=0xd0000000", 1),
    ("unclaimed", "", 1),
    ("smp", "cpus=2", 2),
])
async def test_same_output_and_exit_code(name, cmdline, vcpus):
    status, ours = await run_aiokvm(name, cmdline, vcpus=vcpus)
    qemu = run_qemu(name, cmdline, smp=vcpus)
    assert status.code == 0, ours
    assert qemu.returncode == (status.code << 1) | 1, qemu.stderr
    assert normalize(ours) == normalize(qemu.stdout)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_memory_size_agrees():
    status, ours = await run_aiokvm("hello", memory="128M")
    qemu = run_qemu("hello", memory="128M")
    assert b"memory: 127 MiB" in ours
    assert normalize(ours) == normalize(qemu.stdout)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_triple_fault_under_both():
    error, ours = await run_aiokvm("triplefault")
    assert isinstance(error, GuestError)
    qemu = run_qemu("triplefault")  # -no-reboot: a triple fault ends QEMU with status 0
    assert qemu.returncode == 0
    assert normalize(ours) == normalize(qemu.stdout)
