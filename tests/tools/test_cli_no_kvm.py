"""Input errors of `aiokvm run` are reported before /dev/kvm is opened.

Each case runs the CLI in a private mount namespace with an empty tmpfs over
/dev, so /dev/kvm is missing exactly as on a host without the kvm module.  A
bad guest, disk, size or option must still name itself in one line (status
2); only a good command line gets as far as the KVM error.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys

import pytest

# An empty /dev in a private mount namespace: the host's /dev is untouched.
HIDE_DEV = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs none /dev && exec "$@"', "sh"]

pytestmark = pytest.mark.root


def aiokvm_without_kvm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*HIDE_DEV, sys.executable, "-m", "aiokvm", *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module", autouse=True)
def _namespace_works():
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run([*HIDE_DEV, "test", "!", "-e", "/dev/kvm"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot hide /dev in a mount namespace here: {probe.stderr.strip()}")


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert re.match(r"aiokvm( run)?: error: ", lines[0]), lines[0]  # argparse names the subcommand
    return lines[0]


@pytest.fixture
def files(tmp_path):
    from aiokvm import guests

    (tmp_path / "cut.elf").write_bytes(guests.path("hello").read_bytes()[:100])
    (tmp_path / "odd.img").write_bytes(b"x" * 1000)
    (tmp_path / "empty.img").write_bytes(b"")
    (tmp_path / "ok.img").write_bytes(bytes(64 << 10))
    (tmp_path / "dir.elf").mkdir()
    os.mkfifo(tmp_path / "fifo.img")
    flags = 1 << 3  # a required feature no loader knows
    (tmp_path / "mb-bad.img").write_bytes(struct.pack("<III", 0x1BADB002, flags, -(0x1BADB002 + flags) & 0xFFFFFFFF))
    return tmp_path


@pytest.mark.parametrize(("args", "fragment"), [
    # the guest
    (("no-such-guest",), "no bundled guest named 'no-such-guest'"),
    (("/nonexistent/dir/x.elf",), "no such guest image"),
    (("{tmp}/dir.elf",), "is a directory, not a guest image"),
    (("/etc/passwd",), "not an ELF"),
    (("{tmp}/cut.elf",), "truncated"),
    (("{tmp}/fifo.img",), "is not a regular file"),  # reading it would block forever
    # --disk syntax
    (("hello", "--disk", "{tmp}/ok.img,format=qcow2"), "format='qcow2' is unknown"),
    (("hello", "--disk", "{tmp}/ok.img,bogus=1"), "unknown option 'bogus=1'"),
    (("hello", "--disk", "{tmp}/ok.img,if=scsi"), "if='scsi' is unknown"),
    (("hello", "--disk", "{tmp}/ok.img,ro,ro"), "gives 'ro' twice"),
    (("hello", "--disk", ",ro"), "has no path"),
    (("hello", "--disk", "nbd://127.0.0.1:99999/x"), "NBD"),
    # --disk images that cannot be used
    (("hello", "--disk", "/nonexistent.img"), "disk image /nonexistent.img does not exist"),
    (("hello", "--disk", "{tmp}"), "is a directory"),
    (("hello", "--disk", "{tmp}/odd.img"), "not a multiple of 512"),
    (("hello", "--disk", "{tmp}/empty.img"), "is empty"),
    (("hello", "--disk", "{tmp}/fifo.img"), "not a regular file or block device"),
    (("hello", "--disk", "nbd+unix:///d?socket={tmp}/none.sock"), "cannot connect to NBD server"),
    # a good disk does not hide a bad one after it
    (("hello", "--disk", "{tmp}/ok.img", "--disk", "{tmp}/odd.img"), "not a multiple of 512"),
    (("hello", "--disk", "{tmp}/ok.img,if=ata", "--disk", "{tmp}/ok.img,ro,if=ata"), "only one ATA disk"),
    # --net and several machines
    (("hello", "--net", "01:00:00:00:00:01"), "is a multicast address"),
    (("hello", "--net", "02:00:00:00:00:01,vlan=5000"), "vlan= must be a VLAN id in 1-4094"),
    (("hello", "--net", "02:00:00:00:00:01,speed=10"), "unknown option 'speed=10'"),
    (("hello", "--switch", "br0,rstp"), "give NAME[,stp][,vlan_filtering]"),
    (("hello", "+", "hello", "--name", "vm1"), "two machines are named 'vm1'"),
    (("hello", "+", "no-such-guest"), "no bundled guest named 'no-such-guest'"),
    # sizes and options
    (("hello", "--stats-json", "/nonexistent/dir/stats.json"), "cannot write stats to /nonexistent/dir"),
    (("hello", "--memory", "lots"), "invalid memory size 'lots'"),
    (("hello", "--memory", "1K"), "too small"),
    (("hello", "--memory", "100T"), "exceeds host RAM"),
    (("hello", "--vcpus", "0"), "vcpus must be a positive integer"),
    (("hello", "--vcpus", "two"), "invalid int value"),
    (("hello", "--handoff", "pigeon"), "unknown handoff 'pigeon'"),
    # Multiboot images, boot modules, CPU models
    (("{tmp}/mb-bad.img",), "requires features 0x8"),
    (("hello", "--initrd", "/nonexistent/env"), "no such boot module"),
    (("hello", "--initrd", "{tmp}/dir.elf"), "is a directory, not a boot module"),
    (("hello", "--cpu", "pentium9"), "unknown CPU model 'pentium9'"),
    (("hello", "--cpu", "qemu64,+warp-drive"), "unknown CPU feature 'warp-drive'"),
])
def test_bad_input_is_named_without_kvm(files, args, fragment):
    line = error_line(aiokvm_without_kvm("run", *(a.format(tmp=files) for a in args)))
    assert fragment in line
    assert "/dev/kvm" not in line and "modprobe" not in line


@pytest.mark.parametrize("disks", [(), ("{tmp}/ok.img",), ("{tmp}/ok.img,ro,if=ata",)])
def test_good_input_without_kvm_names_kvm(files, disks):
    # Shows that /dev/kvm really is hidden, and that good disks opened early are closed cleanly.
    disk_args = [arg for disk in disks for arg in ("--disk", disk.format(tmp=files))]
    line = error_line(aiokvm_without_kvm("run", "hello", *disk_args))
    assert "opening /dev/kvm failed: No such file or directory" in line


def test_kut_without_a_suite_is_one_line(tmp_path):
    line = error_line(aiokvm_without_kvm("kut", str(tmp_path)))
    assert "x86/unittests.cfg not found" in line and "./configure && make" in line
