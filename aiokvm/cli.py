"""The ``aiokvm`` command line.

    aiokvm run GUEST [--memory 64M] [--vcpus N] [--cmdline STR] [--timeout S] [--disk ...] [--net ...]
               [--stats] [--debug] [+ GUEST [options]]...
    aiokvm switch DIR [--stp] [--vlan-filtering] [--port SPEC]... [--pcap PORT=FILE]
    aiokvm switch show|fdb|stp|vlan DIR [--json]  |  aiokvm switch pcap DIR PORT FILE|off
    aiokvm demo [--quick] [--out DIR]
    aiokvm bench exits|disk|net|boot|bridge|all [options] | aiokvm bench compare A.json B.json
    aiokvm info

``+`` starts another machine in the same process: all share the event loop
and the in-process switches their ``--net`` NICs join.

The process exit status of ``run`` is the guest's debug-exit code (low 8
bits).  Errors print one line and exit 2 (124 on timeout); ``--debug`` adds
the traceback.  This module is the only place that configures structlog.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import NoReturn

import structlog

from .errors import AiokvmError, ConfigError, MachineTimeout

EXIT_ERROR = 2
EXIT_TIMEOUT = 124


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="aiokvm", description="A Python VMM on Linux KVM, with exits handed to asyncio.")
    parser.add_argument("--log-format", choices=("console", "json"), default="console",
                        help="log rendering on stderr (default: console)")
    parser.add_argument("--log-level", default="warning",
                        choices=("debug", "info", "warning", "error"), help="default: warning")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True)

    run = sub.add_parser("run", help="boot a guest and run it until it exits")
    run.add_argument("guest", help="path to a guest (a PVH ELF or a Multiboot image, such as kvm-unit-tests' "
                                   ".flat files), or a bundled guest name (see `aiokvm info`)")
    run.add_argument("--memory", "-m", default="64M", help="guest RAM, e.g. 64M or 1G (default 64M)")
    run.add_argument("--vcpus", type=int, default=1, help="number of vCPUs (default 1)")
    run.add_argument("--cmdline", default="", help="guest command line")
    run.add_argument("--initrd", action="append", default=[], metavar="FILE[ ARGS]",
                     help="a boot module (repeatable): Multiboot modules, or PVH's module list; the whole text "
                          "is the module's string, as QEMU's -initrd")
    run.add_argument("--cpu", metavar="MODEL[,+feat][,-feat]",
                     help="CPU model as QEMU's -cpu: host, max, qemu64, kvm64 or Opteron_G1, with +feat/-feat and "
                          "vendor= (default: everything KVM supports)")
    run.add_argument("--testdev", action="store_true",
                     help="attach QEMU's pc-testdev (ports 0xe0, 0xe4, 0x2000+n; MMIO at 0xff000000), "
                          "as kvm-unit-tests expect")
    run.add_argument("--no-pit", action="store_true", help="no in-kernel PIT (QEMU's -machine pit=off)")
    run.add_argument("--disk", action="append", default=[], metavar="PATH[,ro][,format=raw|nbd][,if=virtio|ata]",
                     help="attach a disk (repeatable); nbd takes nbd+unix:///EXPORT?socket=PATH or "
                          "nbd://127.0.0.1:PORT/EXPORT")
    run.add_argument("--net", action="append", default=[],
                     metavar="MAC[,switch=NAME][,port=NAME][,vlan=V][,mtu=N][,mac_filter] | vde=DIR,mac=MAC[,vlan=V]",
                     help="attach a virtio-net NIC to an in-process switch (default br0), or to the switch "
                          "of `aiokvm switch DIR` (or a vde_switch) in another process (repeatable)")
    run.add_argument("--switch", action="append", default=[], metavar="NAME[,stp][,vlan_filtering]",
                     help="options of an in-process switch the NICs join")
    run.add_argument("--name", help="the machine's name (default vmN; names its switch ports and output)")
    run.add_argument("--no-ioeventfd", action="store_true",
                     help="virtio QueueNotify as a plain exit (for measurement)")
    run.add_argument("--timeout", type=float, default=None, help="stop the guest after S seconds (exit 124)")
    run.add_argument("--handoff", default=None,
                     help="vCPU-to-loop handoff: spin (default), wake, futex, event or lock")
    run.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop (default uvloop)")
    run.add_argument("--accel", choices=("kvm", "unicorn", "auto"), default="kvm",
                     help="CPU backend: kvm (default), unicorn (a software CPU, no /dev/kvm needed), or auto "
                          "(kvm when /dev/kvm is usable, else unicorn)")
    run.add_argument("--stats", action="store_true",
                     help="print exit counts, latency percentiles and the mode split at the end (on stderr)")
    run.add_argument("--stats-json", metavar="FILE",
                     help="write the same as JSON (schema aiokvm.stats/2, docs/stats-schema.md)")
    run.add_argument("--debug", action="store_true", help="show tracebacks for errors")

    switch = sub.add_parser(
        "switch", help="run a switch that VMs in other processes, QEMU and VDE tools join; or ask one",
        description="aiokvm switch DIR [options]  runs a switch (VDE control socket DIR/ctl, management "
                    "DIR/mgmt) until interrupted.  aiokvm switch show|fdb|stp|vlan DIR [--json] asks a "
                    "running one; aiokvm switch pcap DIR PORT FILE|off starts or stops a capture.")
    switch.add_argument("words", nargs="+", metavar="DIR | show|fdb|stp|vlan DIR | pcap DIR PORT FILE|off")
    switch.add_argument("--stp", action="store_true", help="run 802.1D STP")
    switch.add_argument("--vlan-filtering", action="store_true", help="filter by VLAN (802.1Q)")
    switch.add_argument("--port", action="append", default=[], metavar="SPEC",
                        help="a port to the outside: tap:IFNAME[,netns=NS], stream:unix:PATH[,server], "
                             "stream:tcp:HOST:PORT[,server], dgram:..., vxlan:VNI,..., vde:DIR (repeatable)")
    switch.add_argument("--pcap", action="append", default=[], metavar="PORT=FILE",
                        help="capture a port from the start (repeatable)")
    switch.add_argument("--name", help="the switch's name (default: DIR's last part)")
    switch.add_argument("--json", action="store_true", help="management commands answer in JSON")
    switch.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop (default uvloop)")
    switch.add_argument("--debug", action="store_true", help="show tracebacks for errors")

    sub.add_parser("demo", help="the user-mode I/O bottleneck of KVM in numbers, in about two minutes "
                                "(`aiokvm demo --help`)", add_help=False)
    bench = sub.add_parser("bench", help="run a benchmark (exits, disk, net, boot, bridge, all) or compare two runs",
                           description="aiokvm bench NAME [its options; NAME --help lists them] | "
                                       "aiokvm bench compare A.json B.json")
    bench.add_argument("name", metavar="NAME", help="exits, disk, net, boot, bridge, all, or compare")

    sub.add_parser("kut", help="run kvm-unit-tests' x86 guests under aiokvm (`aiokvm kut --help`)",
                   add_help=False)
    sub.add_parser("info", help="show KVM, capabilities and bundled guests")
    return parser


def configure_logging(fmt: str, level: str) -> None:
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def _fail(message: str) -> int:
    print(f"aiokvm: error: {message}", file=sys.stderr)
    return EXIT_ERROR


class _Prefixed:
    """A serial sink that writes whole lines, each starting with ``[name] ``
    (several machines, one stdout: their lines must not interleave)."""

    def __init__(self, name: str, out) -> None:
        self._prefix = f"[{name}] ".encode()
        self._out = out
        self._partial = b""

    def __call__(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if lines:
            self._out.write(b"".join(self._prefix + line + b"\n" for line in lines))
            self._out.flush()

    def close(self) -> None:
        """Write a last line that never got its newline."""
        if self._partial:
            self._out.write(self._prefix + self._partial + b"\n")
            self._partial = b""
            self._out.flush()


def _switch_options(all_args) -> dict[str, dict]:
    """``--switch NAME[,stp][,vlan_filtering]`` from every machine, merged by name."""
    options: dict[str, dict] = {}
    for args in all_args:
        for text in args.switch:
            name, *flags = text.split(",")
            if not name or any(flag not in ("stp", "vlan_filtering") for flag in flags):
                raise ConfigError(f"--switch {text}: give NAME[,stp][,vlan_filtering]")
            entry = options.setdefault(name, {"stp": False, "vlan_filtering": False})
            for flag in flags:
                entry[flag] = True
    return options


async def _join_vde(stack, vm, net, index: int):
    """A NIC on a switch in another process: a two-port in-process switch, the
    NIC on one side and a VDE port to DIR on the other."""
    import getpass
    import os

    from .net.ports.vde import VdePort
    from .net.switch import Switch

    name = vm.name or "vm"
    description = f"aiokvm {name}: user={getpass.getuser()} pid={os.getpid()}"
    if net.vlan is not None:
        description += f" vlan={net.vlan}"
    switch = await stack.enter_async_context(Switch(f"{name}-vde{index}"))
    port = await VdePort(net.vde, name="uplink", description=description).open()
    switch.add_port(port)
    return switch


async def _run(all_args: list) -> int:
    """Run one machine, or several joined by ``+`` on one event loop (and its switches)."""
    from contextlib import AsyncExitStack

    from . import boot, guests, loader
    from .devices.backends.spec import open_backend, parse_disk_spec
    from .handoff import DEFAULT_HANDOFF
    from .machine import Machine
    from .net.spec import parse_net_spec
    from .net.switch import Switch

    # Input errors come before /dev/kvm is opened, so that they read the same on a
    # host without KVM.  Constructing a Machine checks memory, vCPUs and handoff
    # but opens nothing; `async with vm` opens KVM.
    out = sys.stdout.buffer
    several = len(all_args) > 1
    plans = []
    names = set()
    for index, args in enumerate(all_args):
        name = args.name or (f"vm{index + 1}" if several else None)
        if name is not None and name in names:
            raise ConfigError(f"two machines are named {name!r}; give each its own --name")
        names.add(name)
        vm = Machine(memory=args.memory, vcpus=args.vcpus, handoff=args.handoff or DEFAULT_HANDOFF, accel=args.accel,
                     serial_output=_Prefixed(name, out) if several else out, name=name, cpu=args.cpu,
                     pit=not args.no_pit)
        disks = [parse_disk_spec(disk) for disk in args.disk]
        if sum(spec.interface == "ata" for spec in disks) > 1:
            raise ConfigError("only one ATA disk (the primary master) is supported; make the others if=virtio")
        nets = [parse_net_spec(net) for net in args.net]
        if args.stats_json:
            _check_writable(args.stats_json)
        guest = guests.resolve(args.guest)
        loader.read_guest(guest)  # vm.load reads it again; this is only the check
        for module in args.initrd:
            boot.read_module(module)
        plans.append((args, vm, disks, nets, guest))
    switch_options = _switch_options(all_args)
    for _, _, _, nets, _ in plans:
        for net in nets:
            if net.vde is not None:
                continue  # its switch is in another process (see _join_vde)
            entry = switch_options.setdefault(net.switch, {"stp": False, "vlan_filtering": False})
            if net.vlan is not None:
                entry["vlan_filtering"] = True

    statuses: list = []
    async with AsyncExitStack() as stack:
        switches = {name: await stack.enter_async_context(Switch(name, **options))
                    for name, options in switch_options.items()}
        for args, vm, disks, nets, guest in plans:
            pending = [await open_backend(spec) for spec in disks]  # image errors before KVM opens
            stack.push_async_callback(_close_all, pending)  # the ones the machine never took
            await stack.enter_async_context(vm)
            for spec in disks:
                backend = pending.pop(0)  # add_disk closes it if attaching fails
                await vm.add_disk(backend, interface=spec.interface, ioeventfd=not args.no_ioeventfd)
            for index, net in enumerate(nets):
                if net.vde is not None:
                    switch = await _join_vde(stack, vm, net, index)
                    vm.add_nic(switch, net.mac, port=vm.name or "vm", mtu=net.mtu, mac_filter=net.mac_filter,
                               ioeventfd=not args.no_ioeventfd)
                    continue
                vm.add_nic(switches[net.switch], net.mac, port=net.port, vlan=net.vlan, mtu=net.mtu,
                           mac_filter=net.mac_filter, ioeventfd=not args.no_ioeventfd)
            if args.testdev:
                vm.add_pc_testdev()
            vm.load(guest, cmdline=args.cmdline, modules=args.initrd)
        try:
            statuses = await asyncio.gather(*(vm.run(timeout=args.timeout) for args, vm, *_ in plans))
        finally:
            for _, vm, *_ in plans:
                if isinstance(vm.console.sink, _Prefixed):
                    vm.console.sink.close()
            out.flush()
            for args, vm, *_ in plans:
                if args.stats or args.stats_json:
                    stats = vm.stats()
                    if args.stats:
                        print_stats(stats, file=sys.stderr)
                    if args.stats_json:
                        _write_json(args.stats_json, stats)
    code = 0
    for (_, vm, *_), status in zip(plans, statuses, strict=True):
        if status.code is None:
            print(f"aiokvm: {vm.name if several else 'guest'} ended: {status.reason}", file=sys.stderr)
        elif status.code & 0xFF and not code:
            code = status.code & 0xFF  # the first machine that failed gives the status
    return code


async def _close_all(backends: list) -> None:
    for backend in backends:
        await backend.close()


def print_stats(stats: dict, file=sys.stderr) -> None:
    """Exit counts, latency percentiles and the three-mode split as tables."""
    w = file.write
    w(f"\n== aiokvm stats: {stats['vm']} (handoff {stats['handoff']}) ==\n")
    w(f"{'exits by reason':<34}{'count':>12}\n")
    for reason, n in stats["exits"].items():
        w(f"  {reason:<32}{n:>12}\n")
    if stats["pio"]:
        w(f"{'port I/O exits (port/dir)':<34}{'count':>12}\n")
        for key, n in stats["pio"].items():
            w(f"  {key:<32}{n:>12}\n")
    if stats["mmio"]:
        w(f"{'MMIO exits (region)':<34}{'count':>12}\n")
        for key, n in stats["mmio"].items():
            w(f"  {key:<32}{n:>12}\n")
    w(f"{'accesses by device/path':<34}{'count':>12}\n")
    for key, n in stats["paths"].items():
        w(f"  {key:<32}{n:>12}\n")
    for space, c in stats["unclaimed"].items():
        w(f"  {'unclaimed ' + space + ' reads/writes':<32}{str(c['reads']) + '/' + str(c['writes']):>12}\n")
    for v in stats["vcpus"]:
        kvm = v.get("kvm", {})
        w(f"\n-- vCPU {v['index']}: {v['user_exits']} exits to user mode")
        if "exits" in kvm:
            w(f", KVM counted {kvm['exits']} exits ({kvm['exits'] - v['user_exits']} handled in the kernel)")
        w("\n")
        latency = v.get("latency", {})
        if any(h.get("count") for h in latency.values()):
            w(f"  {'latency (us)':<22}{'count':>8}{'p50':>9}{'p99':>9}{'max':>10}\n")
            for name, h in latency.items():
                if h.get("count"):
                    w(f"  {name:<22}{h['count']:>8}{h['p50_us']:>9.2f}{h['p99_us']:>9.2f}{h['max_us']:>10.1f}\n")
        modes = v.get("modes", {})
        if modes.get("wall_s"):
            wall = modes["wall_s"]
            w(f"  {'mode':<22}{'seconds':>10}{'% wall':>8}\n")
            for key in ("guest_s", "user_s", "kernel_s", "wait_s", "runnable_s", "unaccounted_s"):
                w(f"  {key[:-2]:<22}{modes[key]:>10.4f}{100 * modes[key] / wall:>7.1f}%\n")
            w(f"  {'wall':<22}{wall:>10.4f}\n")
    devices = stats.get("devices", {})
    if devices:
        w("\n-- devices (non-zero counters)\n")
        for name, entry in devices.items():
            w(f"  {name} ({entry.get('kind', '?')})\n")
            for section, counters in (("", entry.get("counters", {})), ("transport ", entry.get("transport", {}))):
                for key, value in counters.items():
                    if isinstance(value, list):
                        for item in value[:4]:
                            w(f"    {section + key:<30} {item}\n")
                    elif value:
                        w(f"    {section + key:<30}{value:>12}\n")


def _check_writable(path: str) -> None:
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write stats to {path}: {exc.strerror}; give a writable --stats-json path") from None


def _write_json(path: str, stats: dict) -> None:
    import json

    try:
        with open(path, "w") as fh:
            json.dump(stats, fh, indent=2, sort_keys=True)
            fh.write("\n")
    except OSError as exc:
        raise ConfigError(f"cannot write stats to {path}: {exc.strerror}") from None


def _info() -> int:
    from . import guests
    from .kvm import Kvm

    print("aiokvm", _version())
    try:
        with Kvm() as kvm:
            print(f"KVM API version {kvm.api_version}")
            caps = kvm.capabilities()
    except AiokvmError as exc:
        print(f"KVM: unavailable: {exc}")
        caps = None
    if caps is not None:
        print("capabilities:")
        for name, value in caps.items():
            state = "present" if value else "MISSING"
            extra = f" ({value})" if value not in (0, 1) else ""
            print(f"  {name:<24}{state}{extra}")
    from .accel import accelerators

    print("accelerators (Machine(accel=...), --accel):")
    for name, why in accelerators().items():
        print(f"  {name:<10}{'usable' if why is None else 'unusable: ' + why}")
    print("bundled guests:", ", ".join(guests.names()) or "none")
    return 0


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("aiokvm")
    except Exception:  # pragma: no cover - running from a bare source tree
        return "(source)"


def _split_machines(argv: list[str]) -> list[list[str]]:
    """``run A ... + B ...``: one argument list per machine, each starting with ``run``
    (options before ``run`` apply to the whole process)."""
    if "run" not in argv:
        return [argv]
    at = argv.index("run")
    head, rest = argv[:at], argv[at + 1:]
    segments, current = [], []
    for arg in rest:
        if arg == "+":
            segments.append(current)
            current = []
        else:
            current.append(arg)
    segments.append(current)
    return [[*head, "run", *segment] for segment in segments]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # `demo` and `bench NAME` hand every later word to their own parser (argparse's
    # REMAINDER would not take words that look like options).
    passthrough: list[str] = []
    for at, word in enumerate(argv):
        if word in ("demo", "bench", "kut") and all(w.startswith("-") or argv[i - 1] in ("--log-format", "--log-level")
                                              for i, w in enumerate(argv[:at])):
            keep = 2 if word == "bench" else 1
            argv, passthrough = argv[:at + keep], argv[at + keep:]
            break
    all_args = [parser.parse_args(segment) for segment in _split_machines(argv)]
    if getattr(all_args[0], "command", None) in ("demo", "bench", "kut"):
        all_args[0].rest = passthrough
    args = all_args[0]
    configure_logging(args.log_format, args.log_level)
    debug = any(getattr(a, "debug", False) for a in all_args)
    try:
        if args.command == "info":
            return _info()
        if args.command == "demo":
            from .bench.demo import main as demo_main

            return demo_main(args.rest)
        if args.command == "kut":
            from .cli_kut import kut_command

            return kut_command(args.rest)
        if args.command == "bench":
            from .bench.run import bench_command

            return bench_command(args.name, args.rest)
        if args.command == "switch":
            from .cli_switch import switch_command

            return switch_command(args)
        if args.loop == "uvloop":
            import uvloop

            return uvloop.run(_run(all_args))
        return asyncio.run(_run(all_args))
    except MachineTimeout as exc:
        if debug:
            raise
        print(f"aiokvm: error: {exc}; give a longer --timeout or check the guest", file=sys.stderr)
        return EXIT_TIMEOUT
    except AiokvmError as exc:
        if debug:
            raise
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
