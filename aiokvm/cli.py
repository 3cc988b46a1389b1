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

from .errors import AiokvmError, MachineTimeout

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
    run.add_argument("--timeout", type=float, default=None, help="stop the guest after S seconds (exit 124)")
    run.add_argument("--handoff", default=None, help="vCPU-to-loop handoff mechanism (default: the fastest)")
    run.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop (default uvloop)")
    run.add_argument("--stats", action="store_true", help="print exit counts at the end (on stderr)")
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
    from .handoff import DEFAULT_HANDOFF
    from .machine import Machine

    out = sys.stdout.buffer
    vm = Machine(memory=args.memory, vcpus=args.vcpus, handoff=args.handoff or DEFAULT_HANDOFF,
                 serial_output=out)
    async with vm:
        vm.load(args.guest, cmdline=args.cmdline)
        try:
            status = await vm.run(timeout=args.timeout)
        finally:
            out.flush()
            if args.stats:
                print_stats(vm.stats(), file=sys.stderr)
    if status.code is None:
        print(f"aiokvm: guest ended: {status.reason}", file=sys.stderr)
        return 0
    return status.code & 0xFF


def print_stats(stats: dict, file=sys.stderr) -> None:
    """A plain-text table of exit counts."""
    w = file.write
    w(f"\n== aiokvm stats: {stats['vm']} (handoff {stats['handoff']}) ==\n")
    w(f"{'exits by reason':<28}{'count':>12}\n")
    for reason, n in stats["exits"].items():
        w(f"  {reason:<26}{n:>12}\n")
    if stats["pio"]:
        w(f"{'port I/O exits':<28}{'count':>12}\n")
        for key, n in stats["pio"].items():
            w(f"  {key:<26}{n:>12}\n")
    if stats["mmio"]:
        w(f"{'MMIO exits':<28}{'count':>12}\n")
        for key, n in stats["mmio"].items():
            w(f"  {key:<26}{n:>12}\n")
    w(f"{'handlers by device/path':<28}{'count':>12}\n")
    for key, n in stats["paths"].items():
        w(f"  {key:<26}{n:>12}\n")
    for space, c in stats["unclaimed"].items():
        w(f"  unclaimed {space:<16}{'reads ' + str(c['reads']) + ', writes ' + str(c['writes']):>12}\n")
    for v in stats["vcpus"]:
        w(f"  vCPU {v['index']}: {v['user_exits']} user exits, {v['kicks']} kicks\n")


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
