"""The CLI as a user runs it: exit statuses and one-line errors, no tracebacks."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest


def aiokvm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aiokvm", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line_error(proc: subprocess.CompletedProcess, status: int, fragment: str) -> None:
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert fragment in lines[0]


@pytest.mark.kvm
def test_run_hello_prints_and_exits_with_the_guest_code():
    proc = aiokvm("run", "hello")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Hello from aiokvm guest\nmemory: 63 MiB\n"
    assert "Traceback" not in proc.stderr


@pytest.mark.kvm
def test_run_stats_reports_exact_port_writes():
    proc = aiokvm("run", "exitloop", "--cmdline", "n=10000 port=0x80", "--stats")
    assert proc.returncode == 0, proc.stderr
    assert "exitloop: done 10000" in proc.stdout
    line = next(line for line in proc.stderr.splitlines() if "0x80/out" in line)
    assert line.split()[-1] == "10000"


@pytest.mark.kvm
def test_guest_exit_code_becomes_process_status():
    # smp waits for 2 CPUs but gets 1: it reports the timeout and exits with 1.
    proc = aiokvm("run", "smp", "--vcpus", "1", "--cmdline", "cpus=2 timeout_ms=200")
    assert "smp: timeout, 1 of 2 online" in proc.stdout
    assert proc.returncode == 1, proc.stderr


@pytest.mark.kvm
def test_triple_fault_is_one_line_status_2():
    proc = aiokvm("run", "triplefault")
    assert_one_line_error(proc, 2, "triple-fault")


@pytest.mark.kvm
def test_timeout_is_one_line_status_124():
    proc = aiokvm("run", "exitloop", "--cmdline", "n=1000000000", "--timeout", "0.5")
    assert_one_line_error(proc, 124, "did not finish")


@pytest.mark.parametrize(("args", "fragment"), [
    (("run", "no-such-guest"), "no bundled guest named"),
    (("run", "/etc/passwd"), "not an ELF"),
    (("run", "/nonexistent/dir/x.elf"), "no such guest image"),
    (("run", "hello", "--memory", "lots"), "invalid memory size"),
    (("run", "hello", "--memory", "100T"), "exceeds host RAM"),
    (("run", "hello", "--vcpus", "0"), "vcpus"),
    (("run", "hello", "--vcpus", "two"), "invalid int"),
    (("run", "hello", "--handoff", "pigeon"), "unknown handoff"),
    (("run",), "required"),
    (("frobnicate",), "invalid choice"),
])
def test_bad_arguments_are_one_line_status_2(args, fragment):
    assert_one_line_error(aiokvm(*args), 2, fragment)


def test_truncated_elf_is_one_line(tmp_path):
    from aiokvm import guests

    bad = tmp_path / "cut.elf"
    bad.write_bytes(guests.path("hello").read_bytes()[:100])
    assert_one_line_error(aiokvm("run", str(bad)), 2, "truncated")


def test_debug_shows_the_traceback():
    proc = aiokvm("run", "/etc/passwd", "--debug")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr


@pytest.mark.kvm
def test_info_lists_capabilities_and_guests():
    proc = aiokvm("info")
    assert proc.returncode == 0
    assert "KVM API version 12" in proc.stdout
    assert "IOEVENTFD" in proc.stdout
    assert "hello" in proc.stdout


@pytest.mark.kvm
def test_run_with_a_virtio_disk(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(64 << 10))
    proc = aiokvm("run", "disktest", "--disk", f"{img},if=virtio", "--cmdline", "dev=virtio cpl=3 sectors=16",
                  "--stats")
    assert proc.returncode == 0, proc.stderr
    assert "disktest: ok" in proc.stdout
    assert "virtio7/ioeventfd" in proc.stderr  # QueueNotify never exited to user mode


@pytest.mark.kvm
def test_stats_show_every_devices_own_counters(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(64 << 10))
    out = tmp_path / "stats.json"
    proc = aiokvm("run", "disktest", "--disk", f"{img},if=virtio", "--disk", f"{img},ro,if=ata",
                  "--cmdline", "dev=virtio cpl=3 sectors=16", "--stats", "--stats-json", str(out))
    assert proc.returncode == 0, proc.stderr
    devices = json.loads(out.read_text())["devices"]
    assert {name: d["kind"] for name, d in devices.items()} == {
        "serial0": "serial", "debug-exit": "debug-exit", "virtio7": "virtio-blk", "ata0": "ata", "fw_cfg": "fw_cfg"}
    assert devices["fw_cfg"]["counters"]["selects"] == 0  # there, as on microvm; the guest kit never asks
    blk, serial = devices["virtio7"], devices["serial0"]["counters"]
    # disktest writes 16 sectors, flushes, reads them back, then reads the whole 128-sector disk
    assert blk["counters"]["bytes_written"] == 16 * 512
    assert blk["counters"]["flushes"] >= 1
    assert blk["counters"]["bytes_read"] >= (16 + 128) * 512
    assert blk["transport"]["notifies"] >= 1 and blk["transport"]["resets"] >= 1
    assert serial["tx_bytes"] == len(proc.stdout.encode())  # every byte the guest printed
    assert devices["debug-exit"]["counters"]["writes"] == 1
    assert devices["ata0"]["counters"]["commands"] == 0  # attached, never used
    assert "virtio7 (virtio-blk)" in proc.stderr and "bytes_written" in proc.stderr


@pytest.mark.kvm
def test_no_ioeventfd_makes_queue_notify_an_exit(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(64 << 10))
    proc = aiokvm("run", "disktest", "--disk", f"{img},if=virtio", "--no-ioeventfd", "--cmdline",
                  "dev=virtio cpl=3 sectors=16", "--stats")
    assert proc.returncode == 0, proc.stderr
    assert "virtio7/ioeventfd" not in proc.stderr
    line = next(line for line in proc.stderr.splitlines() if "virtio7/loop" in line)
    notifies = int(re.search(r"notifies=(\d+)", proc.stdout).group(1))
    assert notifies > 0
    # every QueueNotify the driver wrote is an exit, on top of its ~40 register accesses
    assert int(line.split()[-1]) >= notifies + 20


@pytest.mark.parametrize(("spec", "fragment"), [
    ("/nonexistent.img", "does not exist"),
    ("{tmp}/odd.img", "multiple of 512"),
    ("{tmp}/ok.img,bogus=1", "bogus"),
    ("{tmp}/ok.img,if=scsi", "scsi"),
    ("nbd+unix:///disk?socket=/nonexistent.sock", "NBD"),
])
def test_bad_disks_are_one_line_errors(tmp_path, spec, fragment):
    (tmp_path / "odd.img").write_bytes(b"x" * 1000)
    (tmp_path / "ok.img").write_bytes(bytes(4096))
    proc = aiokvm("run", "hello", "--disk", spec.format(tmp=tmp_path))
    assert_one_line_error(proc, 2, "")
    assert fragment.lower() in proc.stderr.lower(), proc.stderr


@pytest.mark.kvm
def test_two_machines_in_one_process_ping_through_an_in_process_switch():
    proc = aiokvm("run", "netecho", "--name", "a", "--net", "02:00:00:00:00:0a", "--cmdline",
                  "ip=10.0.0.1 cpl=3 n=6", "+", "ping", "--name", "b", "--net", "02:00:00:00:00:0b",
                  "--cmdline", "ip=10.0.0.2 dst=10.0.0.1 count=5 cpl=3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert all(line.startswith(("[a] ", "[b] ")) for line in lines), proc.stdout  # whole lines, never mixed
    assert any(line.startswith("[b] ping: 5/5 replies") for line in lines)
    assert "[a] netecho: frames 6 arp 1 icmp 5 udp 0 other 0 rx_errors 0" in lines


@pytest.mark.kvm
def test_the_first_failing_machine_gives_the_status():
    # different VLANs: nobody answers, ping exits 1, netecho times out cleanly (0)
    proc = aiokvm("run", "netecho", "--net", "02:00:00:00:00:0a,vlan=10", "--cmdline",
                  "ip=10.0.0.1 cpl=3 timeout_ms=1500", "+", "ping", "--net", "02:00:00:00:00:0b,vlan=20",
                  "--cmdline", "ip=10.0.0.2 dst=10.0.0.1 count=1 arp_ms=500 cpl=3")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[vm2] ping: 0/1 replies" in proc.stdout
