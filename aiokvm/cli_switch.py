"""``aiokvm switch``: run a switch (``DIR``), or ask a running one (``show``,
``fdb``, ``stp``, ``vlan``, ``pcap``).  Called from ``cli.main``, which turns
``AiokvmError`` into one line."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from .errors import ConfigError
from .net.mgmt import COMMANDS, format_fdb, format_show, format_stp, format_vlan, request


def switch_command(args) -> int:
    words = args.words
    if words[0] in COMMANDS:
        return _ask(words, as_json=args.json)
    if len(words) != 1:
        raise ConfigError(f"`aiokvm switch {' '.join(words)}`: give one DIR to run a switch, or one of "
                          f"{', '.join(COMMANDS)} and DIR to ask one (a directory named like a command: ./{words[0]})")
    pcaps = []
    for item in args.pcap:
        port, sep, path = item.partition("=")
        if not sep or not port or not path:
            raise ConfigError(f"--pcap {item}: give PORT=FILE")
        pcaps.append((port, path))
    from .net.daemon import serve_switch

    def ready(directory: str) -> None:
        print(f"aiokvm switch: running in {directory} (join with --net vde={directory},mac=..., "
              f"vde_plug {directory} or qemu -netdev vde,sock={directory}); Ctrl-C stops it", flush=True)

    run = serve_switch(words[0], stp=args.stp, vlan_filtering=args.vlan_filtering, ports=args.port, pcaps=pcaps,
                       name=args.name, ready=ready)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(run)
    else:
        asyncio.run(run)
    return 0


def _ask(words: list[str], *, as_json: bool) -> int:
    cmd = words[0]
    if cmd == "pcap":
        if len(words) != 4:
            raise ConfigError("give `aiokvm switch pcap DIR PORT FILE` (or `off` for FILE to stop)")
        _, directory, port, path = words
        result = request(directory, "pcap", port=port, path=None if path == "off" else os.path.abspath(path))
        print(json.dumps(result) if as_json else (f"capturing {port} to {result['path']}" if result["path"]
                                                  else f"capture of {port} stopped"))
        return 0
    if len(words) != 2:
        raise ConfigError(f"give `aiokvm switch {cmd} DIR`")
    directory = words[1]
    result = request(directory, cmd)
    if as_json:
        json.dump(result, sys.stdout, indent=2)
        print()
    elif cmd == "show":
        sys.stdout.write(format_show(result))
    elif cmd == "fdb":
        sys.stdout.write(format_fdb(result, request(directory, "show")["name"]))
    elif cmd == "stp":
        sys.stdout.write(format_stp(result))
    else:
        sys.stdout.write(format_vlan(result))
    return 0
