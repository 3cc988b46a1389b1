"""Runs inside a test network namespace for tests/test_kernel_bridge.py.

Started as ``ip netns exec NS python netns_bridge_helper.py``; reads one JSON
script on stdin and prints one JSON answer on stdout.  Two modes:

``{"mode": "forward", "ports": ["t1", ...], "settle": 0.04, "steps": [...]}``
    Each step is ``{"cmd": [argv...]}`` (run at once, must succeed),
    ``{"sleep": seconds}`` or
    ``{"send": "t1", "frame": "<hex>"}``: the frame goes out of that veth end
    through an AF_PACKET socket, and after ``settle`` seconds every socket is
    drained.  The answer has one entry per send: ``{"t2": ["<hex>", ...]}``
    for each port that received a frame of EtherType ``ethertype`` (looked
    for under any VLAN tags).  The sending socket's own outgoing copy
    (pkttype PACKET_OUTGOING) is ignored.  A VLAN tag the kernel kept out of
    band (veth offloads it) is put back into the bytes from PACKET_AUXDATA.

``{"mode": "stp", "port": "t1", "bridge": {...}, "duration": 9.0, "snapshots": [3.0]}``
    Runs aiokvm's model bridge with STP in real time, its one port "p1" bound
    to the veth end ``port``: received frames go to ``Bridge.receive``,
    ``Bridge.tick`` runs every ``tick`` seconds, and what the model returns is
    sent out of the veth.  At each snapshot time (and at the end) it records
    the model's ``stp_state()`` and the kernel bridge's sysfs view of br0 and
    its port v1; it also logs every port-state change on both sides.

Only stdlib is needed for "forward"; "stp" imports aiokvm.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import subprocess
import sys
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_AUXDATA = 8
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6
AUXDATA = struct.Struct("=IIIHHHH")  # struct tpacket_auxdata
VLAN_TPIDS = (0x8100, 0x88A8)


def open_port(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((ifname, ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    sock.setblocking(False)
    return sock


def read_frames(sock: socket.socket) -> list[bytes]:
    """Every frame waiting on ``sock`` that came in (not our own transmissions), tag restored."""
    frames = []
    while True:
        try:
            data, ancdata, _flags, addr = sock.recvmsg(65536, socket.CMSG_SPACE(AUXDATA.size))
        except BlockingIOError:
            return frames
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        for level, kind, payload in ancdata:
            if level == SOL_PACKET and kind == PACKET_AUXDATA and len(payload) >= AUXDATA.size:
                status, _len, _snap, _mac, _net, tci, tpid = AUXDATA.unpack_from(payload)
                if status & TP_STATUS_VLAN_VALID:
                    if not status & TP_STATUS_VLAN_TPID_VALID:
                        tpid = 0x8100
                    data = data[:12] + struct.pack(">HH", tpid, tci) + data[12:]
        frames.append(data)


def ethertype(frame: bytes) -> int | None:
    offset = 12
    while len(frame) >= offset + 2:
        value = int.from_bytes(frame[offset:offset + 2], "big")
        if value not in VLAN_TPIDS:
            return value
        offset += 4
    return None


def run_forward(script: dict) -> dict:
    socks = {name: open_port(name) for name in script["ports"]}
    wanted = script.get("ethertype", 0x88B5)
    settle = script.get("settle", 0.04)
    results = []
    stray = 0
    for step in script["steps"]:
        if "sleep" in step:
            time.sleep(step["sleep"])
            continue
        if "cmd" in step:
            proc = subprocess.run(step["cmd"], capture_output=True, text=True)
            if proc.returncode:
                return {"error": f"{' '.join(step['cmd'])}: {proc.stderr.strip()}"}
            continue
        for sock in socks.values():  # anything left over belongs to no step
            stray += sum(ethertype(f) == wanted for f in read_frames(sock))
        socks[step["send"]].send(bytes.fromhex(step["frame"]))
        deadline = time.monotonic() + settle
        received: dict[str, list[str]] = {}
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select(list(socks.values()), [], [], left)
            for name, sock in socks.items():
                if sock in ready:
                    for frame in read_frames(sock):
                        if ethertype(frame) == wanted:
                            received.setdefault(name, []).append(frame.hex())
        results.append(received)
    for sock in socks.values():
        sock.close()
    return {"results": results, "stray": stray}


def read_sysfs(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        return f"error: {exc}"


KERNEL_PORT_STATES = {"0": "disabled", "1": "listening", "2": "learning", "3": "forwarding", "4": "blocking"}


def kernel_view() -> dict:
    base = "/sys/class/net/br0/bridge/"
    port = "/sys/class/net/v1/brport/"
    view = {key: read_sysfs(base + key) for key in ("bridge_id", "root_id", "root_port", "root_path_cost",
                                                    "topology_change")}
    view["port_state"] = KERNEL_PORT_STATES.get(read_sysfs(port + "state"), "?")
    view["port_designated_root"] = read_sysfs(port + "designated_root")
    view["port_designated_bridge"] = read_sysfs(port + "designated_bridge")
    return view


def run_stp(script: dict) -> dict:
    from aiokvm.net.bridge import Bridge

    sock = open_port(script["port"])
    tick = script.get("tick", 0.05)
    start = time.monotonic()
    br = Bridge("ours", **script["bridge"], stp=True, now=start)
    br.add_port("p1", mac=script.get("port_mac"), now=start)
    out = br.tick(start)
    sent = received = 0
    first_rx: list[str] = []
    first_tx: list[str] = []
    snapshots = []
    pending = sorted(script.get("snapshots", []))
    timeline: dict[str, list] = {"model": [], "kernel": []}
    last = {"model": None, "kernel": None}
    end = start + script["duration"]
    next_tick = start
    while True:
        for _port, frame in out:
            sock.send(frame)
            sent += 1
            if len(first_tx) < 3:
                first_tx.append(frame.hex())
        out = []
        now = time.monotonic()
        states = {"model": br.stp_state()["ports"]["p1"]["state"], "kernel": kernel_view()["port_state"]}
        for side, state in states.items():
            if state != last[side]:
                timeline[side].append([round(now - start, 3), state])
                last[side] = state
        while pending and now - start >= pending[0]:
            snapshots.append({"at": pending.pop(0), "model": br.stp_state(), "kernel": kernel_view()})
        if now >= end:
            break
        if now >= next_tick:
            out += br.tick(now)
            next_tick = now + tick
            continue
        ready, _, _ = select.select([sock], [], [], max(min(next_tick, end) - now, 0))
        if ready:
            for frame in read_frames(sock):
                received += 1
                if len(first_rx) < 3:
                    first_rx.append(frame.hex())
                out += br.receive("p1", frame, time.monotonic())
    snapshots.append({"at": round(time.monotonic() - start, 3), "model": br.stp_state(), "kernel": kernel_view()})
    sock.close()
    return {"snapshots": snapshots, "timeline": timeline, "sent": sent, "received": received,
            "first_sent": first_tx, "first_received": first_rx,
            "counters": br.counters(), "stp_errors": dict(br.stp.errors),
            "stp_ignored": {f"{p}:{r}": n for (p, r), n in br.stp.ignored.items()}}


def main() -> None:
    script = json.load(sys.stdin)
    modes = {"forward": run_forward, "stp": run_stp}
    json.dump(modes[script["mode"]](script), sys.stdout)


if __name__ == "__main__":
    main()
