"""An ELF32 i386 PVH guest (built by the test with binutils) boots under aiokvm, and the same under QEMU microvm."""

from __future__ import annotations

import subprocess

import pytest

from aiokvm import ExitStatus, Machine
from tests.conftest import QEMU
from tests.pvh32 import BAD_EXIT, GOOD_EXIT, MESSAGE, build_pvh32

pytestmark = pytest.mark.kvm


async def run_aiokvm(path) -> tuple[ExitStatus, bytes]:
    async with Machine(memory="16M") as vm:
        vm.load(path)
        status = await vm.run(timeout=60)
        return status, vm.console.output


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("desc_size", [4, 8])
async def test_elf32_guest_runs_with_ebx_at_the_start_info(tmp_path, desc_size):
    status, output = await run_aiokvm(build_pvh32(tmp_path, desc_size=desc_size))
    # GOOD_EXIT (not BAD_EXIT) means EBX pointed at hvm_start_info in 32-bit protected mode.
    assert status == ExitStatus(GOOD_EXIT, "debug-exit"), (status, BAD_EXIT, output)
    assert output == MESSAGE


@pytest.mark.qemu
@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_elf32_guest_same_under_qemu(tmp_path):
    elf = build_pvh32(tmp_path)
    status, ours = await run_aiokvm(elf)
    qemu = subprocess.run([
        QEMU, "-enable-kvm", "-M", "microvm,acpi=off", "-cpu", "qemu64", "-m", "16M",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", str(elf),
    ], capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert status.code == GOOD_EXIT
    assert qemu.returncode == (GOOD_EXIT << 1) | 1, qemu.stderr  # isa-debug-exit: status (v << 1) | 1
    assert qemu.stdout.replace(b"\r\n", b"\n") == ours == MESSAGE
