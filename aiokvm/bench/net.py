"""VM-to-VM frames per second through aiokvm's switch, against QEMU's VM-to-VM.

Two VMs run the bundled ``netbench`` guest at CPL 3: one sends ``--n``
frames as fast as its transmit ring allows, the other counts them, both
timing with the TSC (the host's rate comes from ``aiokvm/bench/c/tsc.c``: the
guests assume 3 GHz).  The rate is the receiver's: frames delivered from
its first to its last.

- **aiokvm**: both VMs on one event loop, joined by a ``Switch`` (the bridge
  model: learning, forwarding), each with a virtio-net NIC whose QueueNotify
  goes through an ioeventfd (and, in the ``no-ioeventfd`` row, through an
  exit).
- **QEMU**: the same ELFs in two ``qemu-system-x86_64 -M microvm`` processes
  with ``virtio-net-device``, joined by a ``-netdev dgram`` pair on loopback
  UDP, with no switch: the C baseline of the device work.
- **The seed's setup and its 2x2** (root, in a network namespace made and
  removed here): QEMU VMs on a Linux kernel bridge through TAP
  (``qemu/kernel-bridge``, the ``x seed`` reference), aiokvm VMs on the same
  kind of bridge through aiokvm TAP ports (``aiokvm/kernel-bridge``), QEMU
  VMs on ``-netdev vde`` to ``vde_switch`` (``qemu/vde_switch``) and to
  ``aiokvm switch`` (``qemu/aiokvm-switch``).  With ``aiokvm`` (aiokvm VMs
  on aiokvm's switch) that is {QEMU, aiokvm} devices x {kernel, aiokvm}
  bridge.

Per row: frames/s and Mbit/s (median of ``--repeat``), frames the receiver
lost (its ring and the device's bounded hold were full), the sender's exits
per frame, and the sender vCPU's guest/user/kernel/wait split.  It measures
and does not assert; the goals (aiokvm >= 1.0x QEMU at 64 bytes, >= 100k
frames/s at 64 bytes) are reported, met or not.

    aiokvm bench net [--n 100000] [--repeat 3] [--sizes 64,512,1514] [--only ROW,...] [--quick]
                             [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile

from aiokvm import Machine, guests
from aiokvm.net import Switch

from .hostinfo import calibrate_tsc, fmt, machine_info
from .plot import add_output_options, by_benchmark, parse_with_outputs
from .progress import Steps

LINE = re.compile(rb"netbench: mode=(\w+) size=(\d+) frames=(\d+) bytes=(\d+) ticks=(\d+) tsc_hz=\d+ lost=(\d+)")
RX_MAC, TX_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
QEMU_BASE = ["-enable-kvm", "-M", "microvm,acpi=off", "-cpu", "qemu64", "-m", "64M", "-nodefaults",
             "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
             "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-global", "virtio-mmio.force-legacy=false"]


def parse(output: bytes) -> dict | None:
    m = LINE.search(output)
    if m is None:
        return None
    mode, size, frames, nbytes, ticks, lost = m.groups()
    return {"mode": mode.decode(), "size": int(size), "frames": int(frames), "bytes": int(nbytes),
            "ticks": int(ticks), "lost": int(lost)}


def rates(rx: dict, tsc_hz: float) -> dict:
    seconds = rx["ticks"] / tsc_hz if rx["ticks"] else float("nan")
    return {"frames_per_s": rx["frames"] / seconds, "mbit_per_s": rx["bytes"] * 8 / seconds / 1e6,
            "frames": rx["frames"], "lost": rx["lost"]}


async def run_aiokvm(size: int, n: int, ioeventfd: bool, tsc_hz: float) -> dict:
    async with Switch("bench") as sw:
        return await run_aiokvm_pair(sw, sw, size, n, ioeventfd, tsc_hz)


async def run_aiokvm_pair(rx_sw: Switch, tx_sw: Switch, size: int, n: int, ioeventfd: bool, tsc_hz: float) -> dict:
    async with Machine(name="rx") as rx, Machine(name="tx") as tx:
        rx.add_nic(rx_sw, RX_MAC, ioeventfd=ioeventfd)
        tx.add_nic(tx_sw, TX_MAC, ioeventfd=ioeventfd)
        rx.load("netbench", cmdline=f"mode=rx n={n} size={size} cpl=3")
        tx.load("netbench", cmdline=f"mode=tx n={n} size={size} dst_mac={RX_MAC} cpl=3")
        receiving = asyncio.create_task(rx.run(timeout=300))
        while b"virtio-net:" not in rx.console.output:  # the receiver's ring is posted
            await asyncio.sleep(0.01)
        await tx.run(timeout=300)
        await receiving
        result = parse(rx.console.output)
        stats = tx.stats()
    if result is None:
        raise RuntimeError(f"no netbench line: {rx.console.output[-300:]!r}")
    vcpu = stats["vcpus"][0]
    modes = vcpu.get("modes") or {}
    wall = modes.get("wall_s") or 0
    sample = rates(result, tsc_hz)
    sample["exits_per_frame"] = vcpu["user_exits"] / n
    sample["split"] = {k: modes.get(f"{k}_s", 0) / wall for k in ("guest", "user", "kernel", "wait")} if wall else {}
    return sample


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_qemu(size: int, n: int, tsc_hz: float) -> dict:
    rx_port, tx_port = free_udp_port(), free_udp_port()
    netdev = "dgram,local.type=inet,local.host=127.0.0.1,local.port={},remote.type=inet,remote.host=127.0.0.1," \
             "remote.port={}"
    return run_qemu_pair(size, n, tsc_hz, netdev.format(rx_port, tx_port), netdev.format(tx_port, rx_port))


def start_qemu(mode: str, mac: str, netdev: str, size: int, n: int, extra: str = "",
               prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    qemu = shutil.which("qemu-system-x86_64")
    return subprocess.Popen([*prefix, qemu, *QEMU_BASE, "-netdev", f"{netdev},id=n0",
                             "-device", f"virtio-net-device,netdev=n0,mac={mac}",
                             "-kernel", str(guests.path("netbench")),
                             "-append", f"mode={mode} n={n} size={size} cpl=3 {extra}"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)


def run_qemu_pair(size: int, n: int, tsc_hz: float, rx_netdev: str, tx_netdev: str,
                  prefix: tuple[str, ...] = ()) -> dict:
    """Two QEMU netbench VMs: the receiver boots and posts its ring first."""
    import time

    receiver = start_qemu("rx", RX_MAC, rx_netdev, size, n, prefix=prefix)
    try:
        time.sleep(0.5)
        sender = start_qemu("tx", TX_MAC, tx_netdev, size, n, f"dst_mac={RX_MAC}", prefix=prefix)
        sender.communicate(timeout=300)
        out, _ = receiver.communicate(timeout=300)
    finally:
        receiver.kill()
    result = parse(out)
    if result is None:
        raise RuntimeError(f"no netbench line from QEMU: {out[-300:]!r}")
    return rates(result, tsc_hz)


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


class KernelBridge:
    """A namespace with a Linux bridge (no STP) and two persistent taps on it, made and removed here."""

    def __init__(self) -> None:
        self.ns = f"aiokvm-bench-{os.getpid()}"
        self.taps = ("btap0", "btap1")

    def __enter__(self) -> KernelBridge:
        sh("ip", "netns", "add", self.ns)
        try:
            ns = ("ip", "netns", "exec", self.ns)
            for key in ("all", "default"):
                sh(*ns, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
            sh(*ns, "ip", "link", "add", "br0", "type", "bridge")
            sh(*ns, "ip", "link", "set", "br0", "up")
            for tap in self.taps:
                sh(*ns, "ip", "tuntap", "add", tap, "mode", "tap")
                sh(*ns, "ip", "link", "set", tap, "master", "br0")
                sh(*ns, "ip", "link", "set", tap, "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=60)


def run_qemu_kernel_bridge(size: int, n: int, tsc_hz: float) -> dict:
    with KernelBridge() as br:
        netdev = "tap,ifname={},script=no,downscript=no"
        return run_qemu_pair(size, n, tsc_hz, netdev.format(br.taps[0]), netdev.format(br.taps[1]),
                             prefix=("ip", "netns", "exec", br.ns))


async def run_aiokvm_kernel_bridge(size: int, n: int, tsc_hz: float) -> dict:
    """aiokvm VMs whose NICs reach the kernel bridge through aiokvm TAP ports (one small switch each)."""
    with KernelBridge() as br:
        async with Switch("rx-side") as rx_sw, Switch("tx-side") as tx_sw:
            for sw, tap in ((rx_sw, br.taps[0]), (tx_sw, br.taps[1])):
                await sw.open_port(f"tap:{tap},netns={br.ns}")
            return await run_aiokvm_pair(rx_sw, tx_sw, size, n, True, tsc_hz)


def run_qemu_vde(size: int, n: int, tsc_hz: float, switch: str) -> dict:
    """Two QEMU VMs on -netdev vde to a switch program (vde_switch or aiokvm switch) run here."""
    import time

    with tempfile.TemporaryDirectory(prefix="aiokvm-vde-") as tmp:
        directory = os.path.join(tmp, "sw")
        if switch == "vde_switch":
            proc = subprocess.Popen(["vde_switch", "-sock", directory], stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # stdin open: console
        else:
            proc = subprocess.Popen([sys.executable, "-m", "aiokvm", "switch", directory],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 15
            while not os.path.exists(os.path.join(directory, "ctl")):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{switch} did not start")
                time.sleep(0.05)
            netdev = f"vde,sock={directory}"
            return run_qemu_pair(size, n, tsc_hz, netdev, netdev)
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def median_row(samples: list[dict]) -> dict:
    row = {key: statistics.median(s[key] for s in samples)
           for key in ("frames_per_s", "mbit_per_s", "lost") if samples}
    if samples and "exits_per_frame" in samples[0]:
        row["exits_per_frame"] = statistics.median(s["exits_per_frame"] for s in samples)
        row["split"] = samples[len(samples) // 2]["split"]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="aiokvm bench net", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, help="frames per run (100000; 20000 with --quick)")
    parser.add_argument("--repeat", type=int, help="runs per row, interleaved (3; 1 with --quick)")
    parser.add_argument("--sizes", default="64,512,1514")
    parser.add_argument("--only", help="comma-separated row names (default: every row this host can run)")
    parser.add_argument("--quick", action="store_true")
    add_output_options(parser)
    args = parse_with_outputs(parser, argv)
    n = args.n or (20000 if args.quick else 100000)
    repeat = args.repeat or (1 if args.quick else 3)
    sizes = [int(x) for x in args.sizes.split(",")]
    have_qemu = shutil.which("qemu-system-x86_64") is not None
    with tempfile.TemporaryDirectory(prefix="aiokvm-net-") as tmp:
        tsc_hz, tsc_source = calibrate_tsc(tmp)
    root = os.geteuid() == 0
    have_vde = shutil.which("vde_switch") is not None
    runners = {
        "aiokvm": lambda size: asyncio.run(run_aiokvm(size, n, True, tsc_hz)),
        "aiokvm no-ioeventfd": lambda size: asyncio.run(run_aiokvm(size, n, False, tsc_hz)),
        "qemu": lambda size: run_qemu(size, n, tsc_hz),
        "qemu/kernel-bridge": lambda size: run_qemu_kernel_bridge(size, n, tsc_hz),
        "aiokvm/kernel-bridge": lambda size: asyncio.run(run_aiokvm_kernel_bridge(size, n, tsc_hz)),
        "qemu/vde_switch": lambda size: run_qemu_vde(size, n, tsc_hz, "vde_switch"),
        "qemu/aiokvm-switch": lambda size: run_qemu_vde(size, n, tsc_hz, "aiokvm"),
    }
    available = {"aiokvm": True, "aiokvm no-ioeventfd": True, "qemu": have_qemu,
                 "qemu/kernel-bridge": have_qemu and root, "aiokvm/kernel-bridge": root,
                 "qemu/vde_switch": have_qemu and have_vde, "qemu/aiokvm-switch": have_qemu}
    wanted = args.only.split(",") if args.only else list(runners)
    unknown = [name for name in wanted if name not in runners]
    if unknown:
        parser.error(f"unknown rows {unknown}; the rows are {', '.join(runners)}")
    paths = [name for name in wanted if available[name]]
    skipped = [name for name in wanted if not available[name]]
    samples: dict[tuple[str, int], list[dict]] = {}
    errors: dict[tuple[str, int], str] = {}
    per_round = sum(1 for size in sizes for label in paths if label != "aiokvm no-ioeventfd" or size == 64)
    with Steps(repeat * per_round, "net") as steps:
        for round_no in range(repeat):
            for size in sizes:
                for label in paths:
                    if label == "aiokvm no-ioeventfd" and size != 64:
                        continue
                    try:
                        sample = runners[label](size)
                        samples.setdefault((label, size), []).append(sample)
                    except Exception as exc:  # measured, not asserted
                        errors[(label, size)] = f"{type(exc).__name__}: {exc}"
                    steps.step(f"{label} {size} B, round {round_no + 1}/{repeat}")
    info = machine_info(tsc_hz, tsc_source)
    rows = []
    for (label, size), runs in samples.items():
        row = {"path": label, "size": size, "runs": len(runs), **median_row(runs)}
        for key, reference in (("x_qemu", "qemu"), ("x_seed", "qemu/kernel-bridge")):
            base = samples.get((reference, size))
            if base and label != reference:
                row[key] = row["frames_per_s"] / statistics.median(s["frames_per_s"] for s in base)
        rows.append(row)
    rows.sort(key=lambda r: (r["size"], r["path"]))
    print(f"# {info['cpu_model']}, {info['cores']} CPUs{' (nested)' if info['nested'] else ''}, "
          f"TSC {tsc_hz / 1e9:.3f} GHz, n={n}, medians of {repeat}")
    head = (f"{'path':<22}{'size':>6}{'frames/s':>11}{'Mbit/s':>9}{'x qemu':>8}{'x seed':>8}{'lost':>8}"
            f"{'exits/frame':>12}  split g/u/k/w")
    print(head)
    print("-" * len(head))
    for r in rows:
        split = r.get("split") or {}
        parts = "/".join(f"{split[k]:.2f}" for k in ("guest", "user", "kernel", "wait")) if split else "-"
        print(f"{r['path']:<22}{r['size']:>6}{r['frames_per_s']:>11.0f}{r['mbit_per_s']:>9.1f}"
              f"{fmt(r.get('x_qemu')):>8}{fmt(r.get('x_seed')):>8}{r['lost']:>8.0f}"
              f"{fmt(r.get('exits_per_frame')):>12}  {parts}")
    for key, error in errors.items():
        print(f"# {key[0]} size {key[1]}: {error}")
    aiokvm64 = next((r for r in rows if r["path"] == "aiokvm" and r["size"] == 64), None)
    goals = []
    if aiokvm64:
        x_qemu = aiokvm64.get("x_qemu")
        goals.append({"goal": "VM->VM through aiokvm's switch >= 1.0x QEMU at 64 bytes", "value": x_qemu,
                      "met": None if x_qemu is None else x_qemu >= 1.0})
        goals.append({"goal": ">= 100k frames/s at 64 bytes on one loop", "value": aiokvm64["frames_per_s"],
                      "met": aiokvm64["frames_per_s"] >= 100_000})
    def rate(path: str, size: int = 64) -> float | None:
        row = next((r for r in rows if r["path"] == path and r["size"] == size), None)
        return None if row is None else row["frames_per_s"]

    for goal, ours, theirs in (
            ("aiokvm VMs on aiokvm's switch >= 1.0x QEMU VMs on the kernel bridge at 64 bytes", "aiokvm",
             "qemu/kernel-bridge"),
            ("aiokvm switch >= 1.0x vde_switch with the same QEMU VMs at 64 bytes", "qemu/aiokvm-switch",
             "qemu/vde_switch")):
        if rate(ours) and rate(theirs):
            ratio = rate(ours) / rate(theirs)
            goals.append({"goal": goal, "value": ratio, "met": ratio >= 1.0})
    print("goals (reported, not asserted):")
    for goal in goals:
        print(f"  {goal['goal']}: {fmt(goal['value'])} ({'met' if goal['met'] else 'not met'})")
    if skipped:
        print(f"  (rows skipped on this host: {', '.join(skipped)}: they need QEMU, vde2 or root)")
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump({"benchmark": "net", "guest": "netbench", "n": n, "repeat": repeat, "machine": info,
                       "rows": rows, "goals": goals,
                       "errors": {f"{k[0]}/{k[1]}": v for k, v in errors.items()}}, fh, indent=2)
    if args.plot:
        by_benchmark("net", rows, args.plot)


if __name__ == "__main__":
    main()
