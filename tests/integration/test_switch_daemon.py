"""``aiokvm switch DIR`` as a program, joined by real VDE peers: vde_plug,
QEMU's ``-netdev vde`` and ``aiokvm run --net vde=DIR`` in other processes;
and aiokvm's VDE client joining a real ``vde_switch``.  Unix sockets only."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest

from aiokvm import guests
from tests.conftest import QEMU
from tests.kvm.test_disks import QEMU_BASE

AIOKVM = [sys.executable, "-m", "aiokvm"]
VDE_PLUG = shutil.which("vde_plug")
VDE_SWITCH = shutil.which("vde_switch")
needs_vde = pytest.mark.skipif(VDE_PLUG is None or VDE_SWITCH is None,
                               reason="vde2 is not installed (.ci/run installs it)")


@contextlib.contextmanager
def aiokvm_switch(directory, *options: str):
    proc = subprocess.Popen([*AIOKVM, "--log-level", "info", "switch", str(directory), *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "running in" in line, line + proc.stderr.read()
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        finally:
            err = proc.stderr.read()
            proc.stdout.close(), proc.stderr.close()
    assert proc.returncode == 0, err


def ask(directory, *words: str):
    out = subprocess.run([*AIOKVM, "switch", *words[:1], str(directory), *words[1:], "--json"], check=True,
                         capture_output=True, text=True, timeout=30).stdout
    return json.loads(out)


def plug(directory) -> subprocess.Popen:
    return subprocess.Popen([VDE_PLUG, str(directory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def plug_send(proc: subprocess.Popen, frame: bytes) -> None:
    proc.stdin.write(struct.pack(">H", len(frame)) + frame)  # vde_plug's stdio framing
    proc.stdin.flush()


def plug_recv(proc: subprocess.Popen) -> bytes:
    length = struct.unpack(">H", proc.stdout.read(2))[0]
    return proc.stdout.read(length)


def wait_ports(directory, count: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ports = ask(directory, "show")["ports"]
        if len(ports) == count:
            return ports
        time.sleep(0.05)
    raise AssertionError(f"{count} ports did not join")


@needs_vde
def test_vde_plugs_join_aiokvm_switch_and_frames_flow_both_ways(tmp_path):
    directory = tmp_path / "sw"
    with aiokvm_switch(directory):
        one, two = plug(directory), plug(directory)
        try:
            ports = wait_ports(directory, 2)
            assert {p["kind"] for p in ports.values()} == {"vde"} and set(ports) == {"vde1", "vde2"}
            hello = bytes.fromhex("ffffffffffff" "020000000001" "88b5") + b"hello".ljust(46, b".")
            plug_send(one, hello)
            assert plug_recv(two) == hello
            reply = bytes.fromhex("020000000001" "020000000002" "88b5") + b"reply".ljust(46, b".")
            plug_send(two, reply)
            assert plug_recv(one) == reply
            fdb = {row["mac"]: row["port"] for row in ask(directory, "fdb") if row["kind"] == "learned"}
            # which plug got vde1 depends on which connected first; each MAC sits on its own plug's port
            assert set(fdb) == {"02:00:00:00:00:01", "02:00:00:00:00:02"}
            assert {fdb["02:00:00:00:00:01"], fdb["02:00:00:00:00:02"]} == {"vde1", "vde2"}
        finally:
            for proc in (one, two):
                proc.stdin.close()
                proc.wait(timeout=10)
                proc.stdout.close()
        wait_ports(directory, 0)  # a plug that leaves takes its port with it
    assert not directory.exists()  # the switch cleans up after itself, as vde_switch does


@pytest.mark.kvm
@pytest.mark.qemu
@needs_vde
def test_qemu_on_netdev_vde_answers_an_aiokvm_vm_in_another_process(tmp_path):
    directory = tmp_path / "sw"
    with aiokvm_switch(directory, "--vlan-filtering"):
        echo = subprocess.Popen(
            [QEMU, *QEMU_BASE, "-global", "virtio-mmio.force-legacy=false", "-netdev",
             f"vde,id=n0,sock={directory}", "-device", "virtio-net-device,netdev=n0,mac=02:00:00:00:00:0a",
             "-kernel", str(guests.path("netecho")), "-append", "ip=10.0.0.1 cpl=3 n=101 timeout_ms=60000"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            wait_ports(directory, 1)
            vlans = ask(directory, "vlan")
            subprocess.run([*AIOKVM, "switch", "pcap", str(directory), "vde1", str(tmp_path / "q.pcap")], check=True,
                           capture_output=True, timeout=30)
            ping = subprocess.run([*AIOKVM, "run", "ping", "--name", "pinger", "--net",
                                   f"vde={directory},mac=02:00:00:00:00:0b", "--cmdline",
                                   "ip=10.0.0.2 dst=10.0.0.1 count=100 cpl=3 arp_ms=20000", "--timeout", "120"],
                                  capture_output=True, text=True, timeout=180)
            echo_out, _ = echo.communicate(timeout=60)  # netecho ends after its 101st frame; its port goes
        finally:
            echo.kill()
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert "ping: 100/100 replies" in ping.stdout
    assert "netecho: frames 101 arp 1 icmp 100 udp 0 other 0" in echo_out.decode()
    assert vlans["vde1"] == {"pvid": 1, "vlans": {"1": True}}
    decoded = subprocess.run(["tshark", "-r", str(tmp_path / "q.pcap"), "-T", "fields", "-e", "_ws.col.Protocol",
                              "-e", "_ws.expert.message"], capture_output=True, text=True, check=True).stdout
    protocols = [line.split("\t")[0] for line in decoded.splitlines()]
    assert protocols.count("ICMP") == 200 and "ARP" in protocols and "Malformed" not in decoded


@pytest.mark.kvm
@needs_vde
def test_aiokvm_vms_in_two_processes_meet_on_a_real_vde_switch(tmp_path):
    directory = tmp_path / "vde"
    fifo = tmp_path / "console"
    os.mkfifo(fifo)
    switch = subprocess.Popen(f"exec {VDE_SWITCH} -sock {directory} < {fifo}", shell=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # vde_switch's console ends on EOF: its stdin stays open while the test runs
    with open(fifo, "w") as _hold:
        try:
            deadline = time.monotonic() + 10
            while not (directory / "ctl").exists():
                assert time.monotonic() < deadline, "vde_switch did not start"
                time.sleep(0.05)
            echo = subprocess.Popen([*AIOKVM, "run", "netecho", "--net", f"vde={directory},mac=02:00:00:00:00:0a",
                                     "--cmdline", "ip=10.0.0.1 cpl=3 n=21 timeout_ms=60000", "--timeout", "120"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            ping = subprocess.run([*AIOKVM, "run", "ping", "--net", f"vde={directory},mac=02:00:00:00:00:0b",
                                   "--cmdline", "ip=10.0.0.2 dst=10.0.0.1 count=20 cpl=3 arp_ms=20000",
                                   "--timeout", "120"], capture_output=True, text=True, timeout=180)
            echo_out, echo_err = echo.communicate(timeout=60)
        finally:
            switch.terminate()
            switch.wait(timeout=10)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert "ping: 20/20 replies" in ping.stdout
    assert echo.returncode == 0 and "netecho: frames 21 arp 1 icmp 20" in echo_out, echo_out + echo_err


def test_management_commands_print_text_and_say_what_to_do_without_a_switch(tmp_path):
    directory = tmp_path / "sw"
    nothing = subprocess.run([*AIOKVM, "switch", "show", str(directory)], capture_output=True, text=True, timeout=30)
    assert nothing.returncode == 2 and "no aiokvm switch is running in" in nothing.stderr
    assert "Traceback" not in nothing.stderr and len(nothing.stderr.strip().splitlines()) == 1
    peer = tmp_path / "peer.sock"
    with aiokvm_switch(directory, "--stp", "--name", "lab", "--port",
                       f"dgram:unix:{tmp_path / 'd.sock'},remote={peer},name=d", "--pcap", f"d={tmp_path / 'd.pcap'}"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(peer))
        sock.sendto(bytes.fromhex("ffffffffffff" "020000000001" "88b5") + bytes(46), str(tmp_path / "d.sock"))
        sock.close()
        show = subprocess.run([*AIOKVM, "switch", "show", str(directory)], capture_output=True, text=True,
                              check=True, timeout=30).stdout
        stp = subprocess.run([*AIOKVM, "switch", "stp", str(directory)], capture_output=True, text=True,
                             check=True, timeout=30).stdout
        bad = subprocess.run([*AIOKVM, "switch", "pcap", str(directory), "nope", str(tmp_path / "x.pcap")],
                             capture_output=True, text=True, timeout=30)
        again = subprocess.run([*AIOKVM, "switch", str(directory)], capture_output=True, text=True, timeout=30)
    assert show.startswith("switch lab ") and "stp on" in show
    assert "\nd                dgram    up" in show  # the --port, on from the start
    assert (tmp_path / "d.pcap").stat().st_size == 24 + 16 + 60  # --pcap: the header and the one frame
    assert stp.startswith("bridge id 8000.")
    assert bad.returncode == 2 and "no port 'nope'" in bad.stderr
    assert again.returncode == 2 and "a switch is already running in" in again.stderr
