"""The ``aiokvm`` command line.

    aiokvm run GUEST [--memory 64M] [--vcpus N] [--cmdline STR] [--timeout S] [--stats] [--debug]
    aiokvm info

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
    run.add_argument("guest", help="path to a PVH ELF guest, or a bundled guest name (see `aiokvm info`)")
    run.add_argument("--memory", "-m", default="64M", help="guest RAM, e.g. 64M or 1G (default 64M)")
    run.add_argument("--vcpus", type=int, default=1, help="number of vCPUs (default 1)")
    run.add_argument("--cmdline", default="", help="guest command line")
    run.add_argument("--disk", action="append", default=[], metavar="PATH[,ro][,format=raw|nbd][,if=virtio|ata]",
                     help="attach a disk (repeatable); nbd takes nbd+unix:///EXPORT?socket=PATH or "
                          "nbd://127.0.0.1:PORT/EXPORT")
    run.add_argument("--no-ioeventfd", action="store_true",
                     help="virtio QueueNotify as a plain exit (for measurement)")
    run.add_argument("--timeout", type=float, default=None, help="stop the guest after S seconds (exit 124)")
    run.add_argument("--handoff", default=None,
                     help="vCPU-to-loop handoff: spin (default), wake, futex, event or lock")
    run.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop (default uvloop)")
    run.add_argument("--stats", action="store_true",
                     help="print exit counts, latency percentiles and the mode split at the end (on stderr)")
    run.add_argument("--stats-json", metavar="FILE",
                     help="write the same as JSON (schema aiokvm.stats/2, docs/stats-schema.md)")
    run.add_argument("--debug", action="store_true", help="show tracebacks for errors")

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


async def _run(args) -> int:
    from . import boot, guests
    from .devices.backends.spec import open_backend, parse_disk_spec
    from .handoff import DEFAULT_HANDOFF
    from .machine import Machine

    # Input errors come before /dev/kvm is opened, so that they read the same on a
    # host without KVM.  Constructing a Machine checks memory, vCPUs and handoff
    # but opens nothing; `async with vm` opens KVM.
    out = sys.stdout.buffer
    vm = Machine(memory=args.memory, vcpus=args.vcpus, handoff=args.handoff or DEFAULT_HANDOFF,
                 serial_output=out)
    specs = [parse_disk_spec(disk) for disk in args.disk]
    if sum(spec.interface == "ata" for spec in specs) > 1:
        raise ConfigError("only one ATA disk (the primary master) is supported; make the others if=virtio")
    if args.stats_json:
        _check_writable(args.stats_json)
    guest = guests.resolve(args.guest)
    boot.read_elf(guest)  # vm.load reads it again; this is only the check
    pending = []  # opened backends not yet handed to the machine, which closes the ones it has
    try:
        for spec in specs:
            pending.append((spec, await open_backend(spec)))
        async with vm:
            while pending:
                spec, backend = pending.pop(0)  # add_disk closes it if attaching fails
                await vm.add_disk(backend, interface=spec.interface, ioeventfd=not args.no_ioeventfd)
            vm.load(guest, cmdline=args.cmdline)
            try:
                status = await vm.run(timeout=args.timeout)
            finally:
                out.flush()
                if args.stats or args.stats_json:
                    stats = vm.stats()
                    if args.stats:
                        print_stats(stats, file=sys.stderr)
                    if args.stats_json:
                        _write_json(args.stats_json, stats)
    finally:
        for _, backend in pending:
            await backend.close()
    if status.code is None:
        print(f"aiokvm: guest ended: {status.reason}", file=sys.stderr)
        return 0
    return status.code & 0xFF


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
    print("bundled guests:", ", ".join(guests.names()) or "none")
    return 0


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("aiokvm")
    except Exception:  # pragma: no cover - running from a bare source tree
        return "(source)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    debug = getattr(args, "debug", False)
    try:
        if args.command == "info":
            return _info()
        if args.loop == "uvloop":
            import uvloop

            return uvloop.run(_run(args))
        return asyncio.run(_run(args))
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
