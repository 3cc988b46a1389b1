"""The switch program's management socket: ``DIR/mgmt``.

One JSON object per line each way over a unix stream socket, a request and
its answer, like ``ovs-appctl``'s idea with a plainer wire:

    {"cmd": "show"}                              -> {"ok": true, "result": {...}}
    {"cmd": "pcap", "port": "p1", "path": "x"}   -> {"ok": false, "error": "..."}

Commands: ``show`` (ports, their state and counters), ``fdb``, ``stp``,
``vlan``, ``pcap`` (``path`` null stops).  A request is at most
``MAX_REQUEST`` bytes; a client that sends more, or not JSON, gets an error
and is closed.  The text renderings (what ``aiokvm switch fdb DIR`` prints)
live here too, next to the data they render.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from dataclasses import asdict

from ..errors import AiokvmError, ConfigError

MGMT_NAME = "mgmt"
MAX_REQUEST = 64 * 1024
COMMANDS = ("show", "fdb", "stp", "vlan", "pcap")


class MgmtError(AiokvmError):
    """The switch answered a management request with an error."""


# -- the server side (in the switch's process) --------------------------------------------------
def answer(switch, request: dict) -> dict:
    """The answer to one request (pure: no I/O besides what a pcap command starts)."""
    cmd = request.get("cmd")
    try:
        if cmd == "show":
            return {"ok": True, "result": show(switch)}
        if cmd == "fdb":
            return {"ok": True, "result": [asdict(row) for row in switch.fdb()]}
        if cmd == "stp":
            return {"ok": True, "result": switch.stp_state()}
        if cmd == "vlan":
            return {"ok": True, "result": switch.vlans()}
        if cmd == "pcap":
            port, path = request.get("port"), request.get("path")
            if not isinstance(port, str) or not (path is None or isinstance(path, str)):
                return {"ok": False, "error": "pcap needs a port name and a path (or null to stop)"}
            switch.capture(port, path)
            return {"ok": True, "result": {"port": port, "path": path}}
    except ConfigError as exc:
        return {"ok": False, "error": str(exc)}
    return {"ok": False, "error": f"unknown command {cmd!r}; give one of {', '.join(COMMANDS)}"}


def show(switch) -> dict:
    counters = switch.counters()
    stp = switch.stp_state()
    return {
        "name": switch.name, "stp": switch.bridge.stp_enabled, "vlan_filtering": switch.bridge.vlan_filtering,
        "bridge_id": stp["bridge_id"], "root_id": stp["root_id"], "bridge": counters["bridge"],
        "ports": {name: {**entry, "state": stp["ports"].get(name, {}).get("state"),
                         "role": stp["ports"].get(name, {}).get("role")}
                  for name, entry in counters["ports"].items()},
    }


class MgmtServer:
    def __init__(self, switch, path: str) -> None:
        self.switch = switch
        self.path = path
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._client, self.path, limit=MAX_REQUEST)
        os.chmod(self.path, 0o700)  # it can start captures: its owner's only

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than the limit
                    writer.write(b'{"ok": false, "error": "request too long"}\n')
                    break
                if not line:
                    break
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("not an object")
                except ValueError:
                    writer.write(b'{"ok": false, "error": "a request is one JSON object per line"}\n')
                    break
                writer.write(json.dumps(answer(self.switch, request), default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


# -- the client side (aiokvm switch show|fdb|stp|vlan|pcap DIR) ---------------------------------
def request(directory: str, cmd: str, timeout: float = 5.0, **args) -> object:
    """Ask the switch running in ``directory``; its result, or ``MgmtError``/``ConfigError``."""
    path = os.path.join(directory, MGMT_NAME)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ConfigError(f"no aiokvm switch is running in {directory} (start one with "
                              f"`aiokvm switch {directory}`)") from None
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    if not reply.get("ok"):
        raise MgmtError(reply.get("error", "the switch gave no reason"))
    return reply["result"]


def format_show(result: dict) -> str:
    lines = [f"switch {result['name']}  bridge id {result['bridge_id']}  root {result['root_id']}"
             f"  stp {'on' if result['stp'] else 'off'}  vlan_filtering {'on' if result['vlan_filtering'] else 'off'}"]
    lines.append(f"{'port':<16} {'kind':<8} {'link':<5} {'state':<11} {'rx':>10} {'tx':>10}  drops")
    for name, p in result["ports"].items():
        drops = {**p.get("drops", {}), **{f"bridge:{k}": v for k, v in p.get("bridge", {}).get("drops", {}).items()}}
        drop_text = " ".join(f"{k}={v}" for k, v in sorted(drops.items())) or "-"
        link = "up" if p.get("link_up") else "down"
        lines.append(f"{name:<16} {p.get('kind', '?'):<8} {link:<5} {p.get('state') or '-':<11} "
                     f"{p.get('rx_frames', 0):>10} {p.get('tx_frames', 0):>10}  {drop_text}")
    return "\n".join(lines) + "\n"


def format_fdb(rows: list[dict], bridge: str) -> str:
    """Like ``bridge fdb show``."""
    out = []
    for row in rows:
        parts = [row["mac"], "dev", row["port"] or bridge]
        if row["vid"]:
            parts += ["vlan", str(row["vid"])]
        if row["port"] is not None:
            parts += ["master", bridge]
        if row["kind"] in ("permanent", "static"):
            parts.append(row["kind"])
        else:
            parts.append(f"age {row['age']:.0f}s")
        out.append(" ".join(parts))
    return "\n".join(out) + ("\n" if out else "")


def format_stp(state: dict) -> str:
    lines = [f"bridge id {state['bridge_id']}", f"root id   {state['root_id']}",
             f"root port {state['root_port'] or '-'}  root path cost {state['root_path_cost']}"
             f"  topology change {'yes' if state['topology_change'] else 'no'}"]
    for name, p in state["ports"].items():
        lines.append(f"  {name:<16} {p['role']:<11} {p['state']:<11} cost {p['path_cost']}"
                     f"  designated bridge {p['designated_bridge']}")
    return "\n".join(lines) + "\n"


def format_vlan(vlans: dict) -> str:
    """Like ``bridge vlan show``."""
    lines = [f"{'port':<16} vlan-id"]
    for name, entry in vlans.items():
        first = True
        for vid, untagged in sorted(entry["vlans"].items(), key=lambda kv: int(kv[0])):
            flags = (" PVID" if entry["pvid"] == int(vid) else "") + (" Egress Untagged" if untagged else "")
            lines.append(f"{name if first else '':<16} {vid}{flags}")
            first = False
        if first:
            lines.append(f"{name:<16} -")
    return "\n".join(lines) + "\n"
