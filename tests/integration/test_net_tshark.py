"""tshark judges the frames two VMs exchange through aiokvm's switch:
ARP and ICMP, checksums right, nothing malformed."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest

from aiokvm import Machine
from aiokvm.net import Switch

TSHARK = shutil.which("tshark")
pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(TSHARK is None, reason="tshark is not installed (.ci/run installs it)")]


async def test_tshark_decodes_a_ping_exchange_as_arp_and_icmp(tmp_path):
    capture = tmp_path / "b.pcap"
    async with Switch("br0") as sw, Machine(name="a") as a, Machine(name="b") as b:
        a.add_nic(sw, "02:00:00:00:00:0a")
        b.add_nic(sw, "02:00:00:00:00:0b")
        sw.capture("b", capture)
        a.load("netecho", cmdline="ip=10.0.0.1 cpl=3 n=6 timeout_ms=30000")
        b.load("ping", cmdline="ip=10.0.0.2 dst=10.0.0.1 count=5 cpl=3")
        echo = asyncio.create_task(a.run(timeout=120))
        assert (await b.run(timeout=120)).code == 0
        await echo
        sw.capture("b", None)
    proc = subprocess.run([TSHARK, "-n", "-r", str(capture), "-o", "ip.check_checksum:TRUE",
                           "-T", "fields", "-E", "separator=|", "-e", "frame.protocols", "-e", "arp.opcode",
                           "-e", "icmp.type", "-e", "icmp.seq", "-e", "ip.checksum.status",
                           "-e", "icmp.checksum.status", "-e", "_ws.malformed", "-e", "_ws.expert.message"],
                          capture_output=True, text=True, timeout=120)
    rows = [line.split("|") for line in proc.stdout.splitlines()]
    assert len(rows) == 12, proc.stdout  # ARP request and reply, 5 echo requests and 5 replies
    protocols = [r[0] for r in rows]
    assert protocols[:2] == ["eth:ethertype:arp"] * 2
    assert all(p == "eth:ethertype:ip:icmp:data" for p in protocols[2:])
    assert [r[1] for r in rows[:2]] == ["1", "2"]
    assert [(r[2], r[3]) for r in rows[2:]] == [(t, str(s)) for s in range(1, 6) for t in ("8", "0")]
    assert all(r[4] == "1" and r[5] == "1" for r in rows[2:])  # IP and ICMP checksums: good
    assert all(r[6] == "" and r[7] == "" for r in rows)  # nothing malformed, no expert complaint


def tshark_protocols(capture) -> list[str]:
    """Each frame's protocol stack as tshark decodes it; AssertionError if any frame is malformed
    or draws an expert complaint (other tests' captures go through here too)."""
    proc = subprocess.run([TSHARK, "-n", "-r", str(capture), "-T", "fields", "-E", "separator=|",
                           "-e", "frame.protocols", "-e", "_ws.malformed", "-e", "_ws.expert.message"],
                          capture_output=True, text=True, timeout=120, check=True)
    rows = [line.split("|") for line in proc.stdout.splitlines()]
    bad = [r for r in rows if r[1] or r[2]]
    assert not bad, bad
    return [r[0] for r in rows]
