"""``aiokvm switch DIR``: a switch as a program.

It holds one ``Switch`` on its loop with a VDE-compatible control socket
(``DIR/ctl``: vde_plug, QEMU ``-netdev vde,sock=DIR`` and ``aiokvm run
--net vde=DIR`` join there), a management socket (``DIR/mgmt``, see
``mgmt.py``) and the ports given with ``--port``, until SIGINT or SIGTERM.

It logs through structlog what an operator watches: ports going up and
down, STP roles and states changing, topology changes, and drops by port
and reason summed over each ``summary_s`` (never per frame).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import structlog

from .mgmt import MGMT_NAME, MgmtServer
from .switch import Switch
from .vde_server import VdeServer, prepare_directory

log = structlog.get_logger("aiokvm.switch")

WATCH_S = 0.5
SUMMARY_S = 10.0


class Watcher:
    """Turns the switch's state into log events when it changes (polled: the bridge stays sans-I/O)."""

    def __init__(self, switch: Switch, summary_s: float = SUMMARY_S) -> None:
        self.switch = switch
        self.summary_s = summary_s
        self._links: dict[str, bool] = {}
        self._stp: dict[str, tuple[str, str]] = {}
        self._root: str | None = None
        self._tc = False
        self._drops: dict[tuple[str, str], int] = {}
        self._last_summary = 0.0

    def poll(self, now: float) -> None:
        sw = self.switch
        for name, port in sw.ports.items():
            if self._links.get(name) != port.link_up:
                if name in self._links or not port.link_up:
                    log.info("port link", port=name, up=port.link_up)
                self._links[name] = port.link_up
        for gone in set(self._links) - set(sw.ports):
            del self._links[gone]
        state = sw.stp_state()
        if state["root_id"] != self._root:
            if self._root is not None:
                log.info("stp root changed", root=state["root_id"], root_port=state["root_port"])
            self._root = state["root_id"]
        if state["topology_change"] and not self._tc:
            log.info("stp topology change")
        self._tc = bool(state["topology_change"])
        for name, entry in state["ports"].items():
            now_state = (entry["role"], entry["state"])
            if self._stp.get(name) != now_state:
                if name in self._stp:
                    log.info("stp port", port=name, role=entry["role"], state=entry["state"])
                self._stp[name] = now_state
        if now - self._last_summary >= self.summary_s:
            self._last_summary = now
            self.summarise_drops()

    def summarise_drops(self) -> None:
        counters = self.switch.counters()
        totals: dict[tuple[str, str], int] = {}
        for reason, count in counters["bridge"].items():
            totals[("-", f"bridge:{reason}")] = count
        for name, entry in counters["ports"].items():
            for reason, count in entry.get("drops", {}).items():
                totals[(name, reason)] = count
            for reason, count in entry.get("bridge", {}).get("drops", {}).items():
                totals[(name, f"bridge:{reason}")] = count
        new = {key: count - self._drops.get(key, 0) for key, count in totals.items()
               if count > self._drops.get(key, 0)}
        self._drops = totals
        if new:
            log.warning("drops", **{f"{port}/{reason}": n for (port, reason), n in sorted(new.items())},
                        over_s=self.summary_s)


async def serve_switch(directory: str, *, stp: bool = False, vlan_filtering: bool = False,
                       ports: list[str] = (), pcaps: list[tuple[str, str]] = (), name: str | None = None,
                       ready=None, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set (or SIGINT/SIGTERM).  ``ready(directory)`` is called once it listens."""
    directory = prepare_directory(directory)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        await _serve(directory, stop, loop, stp=stp, vlan_filtering=vlan_filtering, ports=ports, pcaps=pcaps,
                     name=name, ready=ready)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(directory)  # as vde_switch does, when nothing else is left in it
    log.info("switch stopped", dir=directory)


async def _serve(directory, stop, loop, *, stp, vlan_filtering, ports, pcaps, name, ready) -> None:
    async with Switch(name or os.path.basename(directory) or "switch", stp=stp,
                      vlan_filtering=vlan_filtering) as sw:
        vde = VdeServer(sw, directory)
        mgmt = MgmtServer(sw, os.path.join(directory, MGMT_NAME))
        handled = []
        try:
            await vde.start()
            await mgmt.start()
            for spec in ports:
                await sw.open_port(spec)
            for port, path in pcaps:
                sw.capture(port, path)
            for signum in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(signum, stop.set)
                    handled.append(signum)
            log.info("switch running", dir=directory, stp=stp, vlan_filtering=vlan_filtering, ports=list(sw.ports))
            if ready is not None:
                ready(directory)
            watcher = Watcher(sw)
            while not stop.is_set():
                watcher.poll(loop.time())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), WATCH_S)
            watcher.summarise_drops()
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)
            await vde.aclose()
            await mgmt.aclose()
