"""disktest and diskbench without ``dev=``: they probe for the disk they were
given (a virtio-blk device first, then the ATA primary master, in ata-rep
mode), under aiokvm and QEMU microvm, and exit 2 when there is none."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from aiokvm import Machine, guests
from tests.conftest import QEMU
from tests.kvm.test_disks import QEMU_BASE, qemu_disk_args

pytestmark = pytest.mark.kvm

IMAGE_SIZE = 64 << 10   # 128 sectors: the whole image fits disktest's default sectors=2048
SECTORS = IMAGE_SIZE // 512
FOUND = {"virtio": "virtio", "ata": "ata-rep"}
M64 = (1 << 64) - 1


def mix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def written_image(size: int, sectors: int) -> bytes:
    """A zero image after disktest wrote its pattern to sectors [0, sectors)."""
    pattern = b"".join(struct.pack("<64Q", *(mix64(s * 64 + j) for j in range(64))) for s in range(sectors))
    return pattern + bytes(size - len(pattern))


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & M64
    return h


def fresh_image(path) -> str:
    path.write_bytes(bytes(IMAGE_SIZE))
    return str(path)


async def run_aiokvm(program: str, disks: list[str], cmdline: str) -> tuple[int, str]:
    async with Machine() as vm:
        for disk in disks:
            await vm.add_disk(disk)
        vm.load(program, cmdline=cmdline)
        status = await vm.run(timeout=120)
        return status.code, vm.console.output.decode()


def run_qemu(program: str, disk_args: list[str], cmdline: str) -> tuple[int | None, str]:
    cmd = [QEMU, *QEMU_BASE, *disk_args, "-kernel", str(guests.path(program)), "-append", cmdline]
    proc = subprocess.run(cmd, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    code = (proc.returncode - 1) >> 1 if proc.returncode & 1 else None
    return code, proc.stdout.decode().replace("\r\n", "\n")


def first_line(output: str, program: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(f"{program}: "))


def check_disktest(output: str, image_path: str, found: str, sectors: int) -> None:
    """The run found `found` and really wrote and read it: checksum and image bytes as computed here."""
    assert first_line(output, "disktest") == f"disktest: dev={found} capacity={SECTORS} sectors"
    assert "disktest: ok" in output
    expected = written_image(IMAGE_SIZE, sectors)
    assert f"disktest: checksum {fnv1a64(expected):016x}" in output
    assert Path(image_path).read_bytes() == expected


DISKBENCH_LINE = re.compile(r"diskbench: dev=(\S+) op=read pattern=seq bs=4096 qd=(\d+) bytes=16384 ticks=\d+ ")


@pytest.mark.parametrize("interface", ["ata", "virtio"])
def test_disktest_cli_without_dev_uses_the_disk_it_was_given(tmp_path, interface):
    img = fresh_image(tmp_path / "d.img")
    proc = subprocess.run([sys.executable, "-m", "aiokvm", "run", "disktest", "--disk", f"{img},if={interface}",
                           "--cmdline", "cpl=3"], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"blk: no dev= option: probed, found {FOUND[interface]}" in proc.stdout
    check_disktest(proc.stdout, img, FOUND[interface], SECTORS)


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("interface", ["ata", "virtio"])
async def test_diskbench_without_dev_uses_the_disk_it_was_given(tmp_path, interface):
    img = fresh_image(tmp_path / "d.img")
    code, out = await run_aiokvm("diskbench", [f"{img},if={interface}"], "cpl=3 bytes=16384")
    assert code == 0, out
    match = DISKBENCH_LINE.search(out)
    assert match, out
    assert match.group(1) == FOUND[interface]
    assert match.group(2) == "1"


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("program", ["disktest", "diskbench"])
async def test_no_disk_exits_2_with_a_clear_message(program):
    code, out = await run_aiokvm(program, [], "cpl=3")
    assert code == 2, out
    assert f"{program}: no disk found (probed virtio-mmio slots and ATA 0x1f0)" in out.splitlines()
    assert "ata: no controller at 0x1f0 (status 0xff)" in out


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_virtio_is_probed_before_ata_and_dev_overrides_the_probe(tmp_path):
    virtio_img = fresh_image(tmp_path / "v.img")
    ata_img = fresh_image(tmp_path / "a.img")
    disks = [f"{ata_img},if=ata", f"{virtio_img},if=virtio"]
    code, out = await run_aiokvm("disktest", disks, "cpl=3 sectors=16")
    assert code == 0, out
    check_disktest(out, virtio_img, "virtio", 16)
    assert Path(ata_img).read_bytes() == bytes(IMAGE_SIZE)  # the ATA disk was only identified

    code, out = await run_aiokvm("disktest", disks, "dev=ata-rep cpl=3 sectors=16")
    assert code == 0, out
    assert "blk: no dev= option" not in out
    check_disktest(out, ata_img, "ata-rep", 16)


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_explicit_dev_is_not_replaced_by_the_probe(tmp_path):
    img = fresh_image(tmp_path / "a.img")
    code, out = await run_aiokvm("diskbench", [f"{img},if=ata"], "dev=ata-word cpl=3 bytes=16384")
    assert code == 0, out
    assert DISKBENCH_LINE.search(out).group(1) == "ata-word"
    code, out = await run_aiokvm("disktest", [f"{img},if=ata"], "dev=virtio cpl=3")
    assert code == 2, out
    assert "disktest: no virtio disk" in out


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_bad_announcements_are_reported_and_skipped(tmp_path):
    img = fresh_image(tmp_path / "d.img")
    cmdline = ("cpl=3 sectors=16 virtio_mmio.device=garbage virtio_mmio.device=512@0x100000000:5 "
               "virtio_mmio.device=512@0xfeb00200:6")
    code, out = await run_aiokvm("disktest", [f"{img},if=virtio"], cmdline)
    assert code == 0, out
    assert 'virtio-blk: ignoring "virtio_mmio.device=garbage": malformed (SIZE@BASE:IRQ)' in out
    assert 'virtio-blk: ignoring "virtio_mmio.device=512@0x100000000:5": unusable' in out
    # An unclaimed address reads all-ones under aiokvm.
    assert "virtio-blk: nothing at announced 0xfeb00200 (MagicValue 0xffffffff)" in out
    # aiokvm's own announcement of slot 7 comes after those.
    assert "virtio-blk: slot 7 at 0xfeb00e00 (irq 12 unused, polled, announced on the command line)" in out
    check_disktest(out, img, "virtio", 16)


@pytest.mark.qemu
@pytest.mark.parametrize("interface", ["virtio", "ata"])
@pytest.mark.parametrize("program", ["disktest", "diskbench"])
def test_the_same_elf_finds_qemu_microvm_disks(tmp_path, program, interface):
    img = fresh_image(tmp_path / "d.img")
    cmdline = "cpl=3 sectors=16" if program == "disktest" else "cpl=3 bytes=16384"
    code, out = run_qemu(program, qemu_disk_args(img, interface), cmdline)
    assert code == 0, out
    if program == "disktest":
        check_disktest(out, img, FOUND[interface], 16)
    else:
        assert DISKBENCH_LINE.search(out).group(1) == FOUND[interface], out


@pytest.mark.qemu
@pytest.mark.parametrize("extra", [[], ["-device", "isa-ide,iobase=0x1f0,iobase2=0x3f6,irq=14"]],
                         ids=["nothing", "ide-channel-without-drive"])
def test_qemu_microvm_without_disks_exits_2(extra):
    """QEMU's empty virtio-mmio slots (magic, DeviceID 0), its empty ISA ports
    and an IDE channel with no drive on it are no disk."""
    code, out = run_qemu("disktest", extra, "cpl=3")
    assert code == 2, out
    assert "disktest: no disk found (probed virtio-mmio slots and ATA 0x1f0)" in out.splitlines()
