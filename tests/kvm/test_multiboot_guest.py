"""A Multiboot guest built by the test boots under aiokvm with fw_cfg,
pc-testdev and a CPU model, and reports the same as under QEMU microvm."""

from __future__ import annotations

import subprocess

import pytest

from aiokvm import ExitStatus, Machine
from tests.conftest import QEMU
from tests.multiboot_guest import EXIT_CODE, build_multiboot_guest, parse_report

pytestmark = pytest.mark.kvm

ENV = b"NR_CPUS=2\nMEMSIZE=64\n"


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mbguest")
    (directory / "env").write_bytes(ENV)
    return build_multiboot_guest(directory), directory / "env"


async def run_aiokvm(elf, env, cpu: str) -> tuple[ExitStatus, dict, dict]:
    async with Machine(memory="64M", vcpus=2, cpu=cpu) as vm:
        vm.add_pc_testdev()
        vm.load(elf, "first second", modules=[f"{env} module args"])
        assert vm.boot_protocol == "multiboot"
        status = await vm.run(timeout=120)
        return status, parse_report(vm.console.output), vm.stats()["devices"]


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize(("cpu", "x2apic"), [("qemu64", "1"), ("qemu64,-x2apic", "0")])
async def test_multiboot_guest_sees_its_boot_info_fw_cfg_and_testdev(guest, cpu, x2apic):
    elf, env = guest
    status, report, devices = await run_aiokvm(elf, env, cpu)
    assert status == ExitStatus(EXIT_CODE, "debug-exit")
    assert report["magic"] == str(0x2BADB002)
    assert int(report["flags"]) & 0b1001001111 == 0b1001001111
    assert (report["mem_lower"], report["mem_upper"]) == ("639", str(63 * 1024))
    assert report["cmdline"] == f"{elf} first second"  # argv[0] is the image, as QEMU writes it
    assert report["mods_count"] == "1" and report["mod0"] == ENV.decode().replace("\n", ";")
    assert report["mod0_string"] == f"{env} module args"
    assert report["mmap_ram_kib"] == str(639 + 63 * 1024)
    assert report["fw_cfg_signature"] == "QEMU" and report["fw_cfg_nb_cpus"] == "2"
    assert report["fw_cfg_ram_size"] == str(64 << 20)
    assert report["testdev_scratch"] == str(0x12AB5678) and report["testdev_iomem"] == str(0xDEADBEEF)
    assert report["after_flush"] == "1" and report["x2apic"] == x2apic
    counters = devices["pc-testdev"]["counters"]
    assert counters["page_flushes"] == 1 and counters["iomem_accesses"] == 2 and counters["scratch_accesses"] == 3
    assert devices["fw_cfg"]["counters"]["selects"] == 3


@pytest.mark.qemu
@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("cpu", ["qemu64", "qemu64,-x2apic,vendor=AuthenticAMD", "qemu64,-pcid,+invpcid,x2apic=off",
                                 "kvm64", "Opteron_G1,vendor=AuthenticAMD", "host", "max,-pku"])
async def test_multiboot_guest_reports_the_same_under_qemu_microvm(guest, cpu):
    elf, env = guest
    status, ours, _ = await run_aiokvm(elf, env, cpu)
    qemu = subprocess.run([
        QEMU, "-M", "microvm", "-enable-kvm", "-cpu", cpu, "-smp", "2", "-m", "64M", "-nodefaults",
        "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-device", "pc-testdev", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
        "-kernel", str(elf), "-append", "first second", "-initrd", f"{env} module args",
    ], capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert qemu.returncode == (EXIT_CODE << 1) | 1, qemu.stderr
    theirs = parse_report(qemu.stdout)
    assert status.code == EXIT_CODE
    # The CPUID lines (vendor, leaf 0's level, leaves 1, 7 and 0x80000001) too: the model is QEMU's.
    assert ours == theirs and ours["flags"] == "591" and "cpuid1_ecx" in ours


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_fw_cfg_is_there_after_load_unless_the_application_holds_its_ports():
    class Mine:
        def read(self, offset, size):
            return 0

        def write(self, offset, size, value):
            pass

    async with Machine(memory="16M") as vm:
        vm.load("hello")
        assert vm.devices.get("fw_cfg") is vm.fw_cfg is not None
    async with Machine(memory="16M") as vm:
        vm.add_device(Mine(), pio=(0x510, 4), name="mine")
        vm.load("hello")
        assert vm.fw_cfg is None and vm.devices.get("fw_cfg") is None
