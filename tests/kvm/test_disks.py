"""Disks against real peers: the same disktest ELF and image under aiokvm and
QEMU microvm (virtio-blk and isa-ide), read-only images, qemu-nbd with qcow2.
Crash consistency of flushed data: test_crash_consistency.py."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from aiokvm import Machine, guests
from tests.conftest import QEMU

pytestmark = pytest.mark.kvm

QEMU_BASE = ["-enable-kvm", "-M", "microvm,acpi=off", "-cpu", "qemu64", "-m", "64M", "-nodefaults",
             "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
             "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]


def qemu_disk_args(image: str, interface: str, read_only: bool = False) -> list[str]:
    ro = ",readonly=on" if read_only else ""
    if interface == "virtio":
        return ["-global", "virtio-mmio.force-legacy=false",
                "-drive", f"id=d0,file={image},format=raw,if=none{ro}", "-device", "virtio-blk-device,drive=d0"]
    return ["-device", "isa-ide,iobase=0x1f0,iobase2=0x3f6,irq=14",
            "-drive", f"id=d1,file={image},format=raw,if=none{ro}", "-device", "ide-hd,drive=d1,bus=ide.0"]


def run_qemu(image: str, interface: str, cmdline: str, *, read_only: bool = False, timeout: float = 300):
    cmd = [QEMU, *QEMU_BASE, *qemu_disk_args(image, interface, read_only),
           "-kernel", str(guests.path("disktest")), "-append", cmdline]
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return (proc.returncode - 1) >> 1 if proc.returncode & 1 else None, proc.stdout.decode().replace("\r\n", "\n")


async def run_aiokvm(disk_spec: str, cmdline: str, *, timeout: float = 300):
    async with Machine() as vm:
        await vm.add_disk(disk_spec)
        vm.load("disktest", cmdline=cmdline)
        status = await vm.run(timeout=timeout)
        return status.code, vm.console.output.decode()


def disktest_lines(output: str) -> list[str]:
    """The lines that must agree between VMMs.  Left out: driver banners
    (features and serials differ by design) and the TSC timing line."""
    skip = ("disktest: ticks", "disktest: id")
    return [line for line in output.splitlines() if line.startswith("disktest:") and not line.startswith(skip)]


def fresh_image(path, size: int) -> str:
    with open(path, "wb") as fh:
        fh.truncate(size)
    return str(path)


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.qemu
@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize(("interface", "dev", "size", "cmdline"), [
    ("virtio", "virtio", 8 << 20, "dev=virtio cpl=3"),
    ("virtio", "virtio", 8 << 20, "dev=virtio cpl=3 indirect=0 event_idx=0 qd=16"),
    ("ata", "ata-rep", 256 << 10, "dev=ata-rep cpl=3 sectors=64"),
    ("ata", "ata-word", 64 << 10, "dev=ata-word cpl=3 sectors=16"),
])
async def test_disktest_matches_qemu(tmp_path, interface, dev, size, cmdline):
    ours_img = fresh_image(tmp_path / "ours.img", size)
    qemu_img = fresh_image(tmp_path / "qemu.img", size)
    code, ours = await run_aiokvm(f"{ours_img},if={interface}", cmdline)
    qcode, theirs = run_qemu(qemu_img, interface, cmdline)
    assert code == 0, ours
    assert qcode == 0, theirs
    assert "disktest: ok" in ours
    assert disktest_lines(ours) == disktest_lines(theirs)
    assert sha256(ours_img) == sha256(qemu_img)


@pytest.mark.qemu
@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize("interface", ["virtio", "ata"])
async def test_read_only_image_is_untouched_and_errors_are_reported(tmp_path, interface):
    size = 64 << 10
    img = str(tmp_path / "ro.img")
    with open(img, "wb") as fh:
        fh.write(bytes(range(256)) * (size // 256))
    before = sha256(img)
    dev = "virtio" if interface == "virtio" else "ata-rep"
    code, out = await run_aiokvm(f"{img},ro,if={interface}", f"dev={dev} cpl=3 sectors=16")
    assert code == 3, out  # disktest's "write errors" exit
    assert "write errors" in out
    assert sha256(img) == before
    if interface == "virtio" and QEMU:
        # QEMU agrees on everything the guest reports (it cannot attach a read-only ide-hd).
        qcode, theirs = run_qemu(img, "virtio", f"dev={dev} cpl=3 sectors=16", read_only=True)
        assert qcode == 3
        assert disktest_lines(out) == disktest_lines(theirs)
        assert sha256(img) == before


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-nbd") is None or shutil.which("qemu-img") is None,
                    reason="qemu-nbd / qemu-img not installed (.ci/run installs qemu-utils)")
@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_disk_on_qemu_nbd_serving_qcow2(tmp_path):
    qcow = str(tmp_path / "disk.qcow2")
    sock = str(tmp_path / "nbd.sock")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qcow, "1M"], check=True)
    server = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "--socket", sock, "--export-name", "disk",
                               "--persistent", "--shared", "2", qcow], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.01)
        code, out = await run_aiokvm(f"nbd+unix:///disk?socket={sock}", "dev=virtio cpl=3 sectors=256")
        assert code == 0, out
    finally:
        server.terminate()
        server.wait(timeout=10)
    raw = str(tmp_path / "out.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", qcow, raw], check=True)
    # The same guest on a plain 1 MiB raw image gives the reference bytes.
    ref = fresh_image(tmp_path / "ref.img", 1 << 20)
    code, ref_out = await run_aiokvm(f"{ref},if=virtio", "dev=virtio cpl=3 sectors=256")
    assert code == 0
    assert sha256(raw) == sha256(ref)
    assert disktest_lines(out) == disktest_lines(ref_out)
