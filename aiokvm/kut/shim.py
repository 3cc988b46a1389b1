"""``aiokvm-qemu``: enough of ``qemu-system-x86_64``'s command line for
kvm-unit-tests' own runner (``QEMU=aiokvm-qemu ./run_tests.sh``).

It answers the probes the suite's scripts make (``-h``'s version line,
``-device ?`` listing pc-testdev), then runs ``-kernel`` on aiokvm with the
machine x86/run asks for: pc-testdev, isa-debug-exit, ``-smp``, ``-m``,
``-cpu``, ``-append``, ``-initrd``, ``-machine pit=off``; the serial port is
stdout.  It ends as QEMU does: the value v written to isa-debug-exit gives
status ``(v << 1) | 1``.  An option aiokvm has no answer for prints its
reason and ends with 77, which the suite reports as SKIP.
"""

from __future__ import annotations

import sys

from .config import DEFAULT_CPU, DEFAULT_MEMORY_MB, Plan, cpu_unsupported, translate_params

SKIP_STATUS = 77
# The fixed options x86/run passes, and what each needs here: nothing.
_FLAGS = {"--no-reboot", "-no-reboot", "-nodefaults", "-enable-kvm", "-no-user-config", "-nographic"}
_VALUE_IGNORED = {"-display", "-vnc", "-serial", "-name", "-chardev", "-mon", "-vga", "-accel", "-monitor"}


def _answer_probe(argv: list[str]) -> int | None:
    if any(a in ("-h", "--help", "-help", "-version", "--version") for a in argv):
        print("QEMU emulator version 7.2.0 (aiokvm-qemu: the kvm-unit-tests subset of QEMU's options, run on aiokvm)")
        return 0
    if "-device" in argv and argv[argv.index("-device") + 1 if argv.index("-device") + 1 < len(argv) else 0] in (
            "?", "help"):
        print('name "pc-testdev", bus ISA\nname "isa-debug-exit", bus ISA')
        return 0
    return None


def parse(argv: list[str]) -> tuple[dict, list[str], str | None]:
    """(run options, the options left for the test-parameter translation, a reason not to run)."""
    run = {"kernel": None, "initrd": None, "append": "", "smp": 1}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        opt = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else None
        if opt in _FLAGS:
            i += 1
            continue
        if value is None:
            return run, rest, f"option {opt} needs a value"
        i += 2
        if opt == "-kernel":
            run["kernel"] = value
        elif opt == "-initrd":
            run["initrd"] = value
        elif opt == "-append":
            run["append"] = value
        elif opt == "-smp":
            try:
                run["smp"] = int(value.split(",")[0].removeprefix("cpus="))
            except ValueError:
                return run, rest, f"-smp {value} is not a vCPU count"
        elif opt in _VALUE_IGNORED:
            continue
        elif opt in ("-machine", "-M"):
            props = [p for p in value.split(",") if not p.startswith("accel=")]
            if props:
                rest += [opt, ",".join(props)]
        elif opt == "-device" and value.split(",")[0] in ("pc-testdev", "isa-debug-exit"):
            continue
        else:
            rest += [opt, value]
    if run["kernel"] is None:
        return run, rest, "no -kernel given"
    return run, rest, None


async def _run(plan: Plan, initrd: str | None) -> int:
    from ..errors import MachineTimeout
    from ..machine import Machine

    async with Machine(memory=f"{plan.memory_mb}M", vcpus=plan.vcpus, cpu=plan.cpu, pit=plan.pit,
                       serial_output=sys.stdout.buffer) as vm:
        vm.add_pc_testdev()
        vm.load(plan.kernel, plan.cmdline, modules=[initrd] if initrd else [])
        try:
            status = await vm.run()
        except MachineTimeout:  # pragma: no cover - run() has no timeout here; the suite's `timeout` kills us
            return 124
    if status.code is None:
        return 0  # QEMU's status when the guest ends without isa-debug-exit
    return ((status.code << 1) | 1) & 0xFF


def main(argv: list[str] | None = None) -> int:
    import logging
    from pathlib import Path

    import structlog

    from ..errors import AiokvmError
    from .config import KutTest

    argv = list(sys.argv[1:] if argv is None else argv)
    probed = _answer_probe(argv)
    if probed is not None:
        return probed
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
                        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    run, rest, why = parse(argv)
    if why is None and not Path(run["kernel"]).is_file():
        print(f"aiokvm-qemu: could not load kernel '{run['kernel']}'", file=sys.stderr)  # QEMU's words
        return 1
    plan = Plan(KutTest("shim"), Path(run["kernel"] or "."), run["smp"], DEFAULT_MEMORY_MB, DEFAULT_CPU,
                run["append"], 0.0)
    why = why or translate_params(rest, plan) or cpu_unsupported(plan.cpu)
    if why is not None:
        print(f"aiokvm-qemu: SKIP: {why}", file=sys.stderr)
        return SKIP_STATUS
    try:
        import uvloop

        return uvloop.run(_run(plan, run["initrd"]))
    except AiokvmError as exc:
        print(f"aiokvm-qemu: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
