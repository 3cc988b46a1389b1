"""Run kvm-unit-tests plans under aiokvm, and under QEMU microvm to compare.

Statuses are the suite's (``scripts/runtime.bash``): a guest that writes v
to isa-debug-exit ends with QEMU's process status ``(v << 1) | 1``; 1 is
PASS, 77 SKIP, anything else FAIL; a run past its timeout is TIMEOUT (the
suite's FAIL "timeout").  A test this VMM cannot run as configured (a
device, machine or CPU model it lacks) is SKIP with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import AiokvmError, MachineTimeout
from .config import DEFAULT_CPU, DEFAULT_MEMORY_MB, Plan

PASS, FAIL, SKIP, TIMEOUT = "PASS", "FAIL", "SKIP", "TIMEOUT"
QEMU = "qemu-system-x86_64"
KVM_INTERNAL_ERROR = b"KVM internal error"  # what QEMU prints when KVM cannot emulate an instruction


@dataclass
class Outcome:
    status: str
    seconds: float
    detail: str = ""  # the guest's SUMMARY line, or why
    exit_status: int | None = None  # QEMU's convention: (v << 1) | 1
    log: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def status_of(exit_status: int) -> str:
    """The suite's verdict on a VMM process status."""
    if exit_status == 1:
        return PASS
    if exit_status == 77:
        return SKIP
    return FAIL


def summary_of(log: Path) -> str:
    """The guest's last ``SUMMARY:`` line (what the suite prints beside the status)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("SUMMARY:"):
            return line.removeprefix("SUMMARY:").strip()
    return ""


async def run_aiokvm(plan: Plan, environment: Path, log: Path) -> Outcome:
    """One test under aiokvm: the machine x86/run gives it (pc-testdev,
    isa-debug-exit, fw_cfg, its CPU model, vCPUs and memory)."""
    from ..machine import Machine

    if plan.skip or plan.unsupported:
        return Outcome(SKIP, 0.0, plan.skip or plan.unsupported)
    started = time.monotonic()
    with open(log, "wb") as out:
        try:
            async with Machine(memory=f"{plan.memory_mb}M", vcpus=plan.vcpus, cpu=plan.cpu, pit=plan.pit,
                               serial_output=out, name=plan.test.name) as vm:
                vm.add_pc_testdev()
                vm.load(plan.kernel, plan.cmdline, modules=[str(environment)])
                status = await vm.run(timeout=plan.timeout)
        except MachineTimeout:
            return Outcome(TIMEOUT, time.monotonic() - started, f"timeout; duration={plan.timeout:g}s",
                           124, str(log))
        except AiokvmError as exc:  # the plan was checked: a ConfigError here is aiokvm's failure, not a skip
            return Outcome(FAIL, time.monotonic() - started, str(exc).splitlines()[0], None, str(log))
    seconds = time.monotonic() - started
    if status.code is None:
        # Not through isa-debug-exit (a shutdown, a reset, every vCPU halted): QEMU exits 0, which the suite fails.
        return Outcome(FAIL, seconds, f"ended without isa-debug-exit ({status.reason})", 0, str(log))
    exit_status = ((status.code << 1) | 1) & 0xFF
    return Outcome(status_of(exit_status), seconds, summary_of(log), exit_status, str(log))


def qemu_command(plan: Plan, environment: Path, qemu: str = QEMU) -> list[str]:
    """x86/run's command line on QEMU's microvm board: its fixed options, the
    test's own ``qemu_params`` as written (QEMU answers for those aiokvm
    cannot), then ``-smp``, the kernel, the environment and the arguments."""
    command = [qemu, "-M", "microvm", "-machine", "accel=kvm", "--no-reboot", "-nodefaults", "-display", "none",
               "-serial", "stdio", "-device", "pc-testdev", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4",
               "-global", "kvm-pit.lost_tick_policy=discard", "-cpu", DEFAULT_CPU, "-m", str(DEFAULT_MEMORY_MB),
               *plan.qemu_args, "-smp", str(plan.vcpus), "-kernel", str(plan.kernel), "-initrd", str(environment)]
    if plan.cmdline:
        command += ["-append", plan.cmdline]
    return command


def other_machine_type(plan: Plan) -> str | None:
    """The board a test's options ask for instead of microvm (``-M q35``), if any."""
    args = plan.qemu_args
    for i, opt in enumerate(args[:-1]):
        if opt in ("-M", "-machine"):
            first = args[i + 1].split(",")[0]
            if "=" not in first and first != "microvm":
                return first
    return None


async def run_qemu(plan: Plan, environment: Path, log: Path, qemu: str = QEMU) -> Outcome:
    """The same test under QEMU microvm, as the suite's own runner would start it."""
    if plan.skip:
        return Outcome(SKIP, 0.0, plan.skip)
    if (board := other_machine_type(plan)) is not None:
        return Outcome(SKIP, 0.0, f"needs -M {board}; the comparison is on microvm")
    if shutil.which(qemu) is None:
        return Outcome(SKIP, 0.0, f"{qemu} not found")
    started = time.monotonic()
    errors_path = log.with_name(log.name + ".stderr")
    with open(log, "wb") as out, open(errors_path, "wb") as errors:
        proc = await asyncio.create_subprocess_exec(*qemu_command(plan, environment, qemu),
                                                    stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=errors)
        try:
            returncode = await asyncio.wait_for(proc.wait(), plan.timeout)
        except TimeoutError:
            returncode = None
        finally:
            if proc.returncode is None:  # timed out, or this run was cancelled: QEMU must not outlive it
                proc.kill()
                await asyncio.shield(proc.wait())
        if returncode is None:
            seconds = time.monotonic() - started
            if KVM_INTERNAL_ERROR in log.read_bytes() + errors_path.read_bytes():
                # QEMU stops a guest KVM cannot emulate and waits; the suite then sees the
                # timeout.  aiokvm ends the run at once: both are this failure.
                return Outcome(FAIL, seconds, "KVM internal error (QEMU stops the guest until the timeout)",
                               124, str(log))
            return Outcome(TIMEOUT, seconds, f"timeout; duration={plan.timeout:g}s", 124, str(log))
    seconds = time.monotonic() - started
    if returncode == 0 or returncode < 0:
        why = f"signal {-returncode}" if returncode < 0 else "exit 0 (no isa-debug-exit)"
        return Outcome(FAIL, seconds, f"QEMU ended with {why}", returncode, str(log))
    # scripts/vmm.bash: status 1 is a pass only if QEMU printed no error (QEMU's own
    # failures, a property it does not know for one, exit 1 too).
    complaints = [line for line in errors_path.read_text(errors="replace").splitlines()
                  if line.strip() and "warning" not in line.lower()]
    if returncode == 1 and complaints:
        return Outcome(FAIL, seconds, f"QEMU failed: {complaints[0]}", returncode, str(log))
    return Outcome(status_of(returncode), seconds, summary_of(log), returncode, str(log))


@contextlib.contextmanager
def environment_file(text: str):
    """The environment module, in a temporary file for the length of the run."""
    fd, name = tempfile.mkstemp(prefix="kut-env-")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        yield Path(name)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)
