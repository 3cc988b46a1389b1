"""kvm-unit-tests' ``vmexit`` figures, under aiokvm and QEMU microvm in one run.

The suite's ``x86/vmexit.flat`` times guest operations in TSC cycles per
iteration.  Two of them are the classic measure of the user-mode I/O
bottleneck: ``inl_from_qemu`` reads port 0x1234, which no in-kernel device
claims, so every read exits to the VMM in user mode; ``inl_from_kernel``
reads the PIC's ELCR (0x4d0), which KVM answers in the kernel.  Their
difference is what going to user mode costs -- where the PIC is in the
kernel.  QEMU microvm runs a split irqchip (its PIC and IOAPIC in user
space), so there the ELCR read exits to QEMU as well and the difference is
not that cost; aiokvm keeps the whole irqchip in the kernel.  ``cpuid`` is
an exit KVM handles without leaving the kernel at all.

Under aiokvm the port-0x1234 read is taken three ways: unclaimed (the C vCPU
loop answers it, all-ones, without Python), claimed by an inline Python
device (the vCPU thread runs it), and by a loop-hosted one (handed to
asyncio) -- the suite's own guest measuring aiokvm's paths.  QEMU microvm
runs the same guest with the same environment module, alternating with
aiokvm, ``repeat`` rounds; medians are reported.  pci-testdev (the
ioeventfd on/off rows) exists on neither microvm board, so those rows are
absent, as the guest itself reports.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

TESTS = ("cpuid", "inl_from_qemu", "inl_from_kernel")
QEMU_PORT = 0x1234  # the port vmexit's inl_from_qemu reads
LINE = re.compile(r"^(\w+) (\d+)\s*$")


class _Zero:
    """Answers port 0x1234 with zero: the cheapest Python device there is."""

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def parse_vmexit(output: str) -> dict[str, int]:
    """``name cycles`` lines of vmexit's output."""
    found = {}
    for line in output.replace("\r\n", "\n").splitlines():
        match = LINE.match(line)
        if match and match.group(1) in TESTS:
            found[match.group(1)] = int(match.group(2))
    return found


async def _aiokvm_once(flat: Path, env: Path, path: str) -> dict[str, int]:
    from ..bus import HandlerMode
    from ..kut.config import DEFAULT_CPU, DEFAULT_MEMORY_MB
    from ..machine import Machine

    async with Machine(memory=f"{DEFAULT_MEMORY_MB}M", vcpus=1, cpu=DEFAULT_CPU, name=f"vmexit-{path}") as vm:
        vm.add_pc_testdev()
        if path != "unclaimed":
            vm.add_device(_Zero(), pio=(QEMU_PORT, 4), name="port-0x1234",
                          mode=HandlerMode.INLINE if path == "inline" else HandlerMode.LOOP)
        vm.load(flat, " ".join(TESTS), modules=[str(env)])
        await vm.run(timeout=600)
        return parse_vmexit(vm.console.output.decode(errors="replace"))


def _qemu_once(flat: Path, env: Path, qemu: str) -> dict[str, int]:
    """The same guest as the kvm-unit-tests runner starts it under QEMU microvm (``kut.runner.qemu_command``)."""
    from ..kut.config import DEFAULT_CPU, DEFAULT_MEMORY_MB, KutTest, Plan
    from ..kut.runner import qemu_command

    plan = Plan(KutTest("vmexit"), flat, 1, DEFAULT_MEMORY_MB, DEFAULT_CPU, " ".join(TESTS), 600.0)
    out = subprocess.run(qemu_command(plan, env, qemu), capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL, check=False)
    return parse_vmexit(out.stdout)


PATHS = ("qemu", "unclaimed", "inline", "loop")


def measure(suite: Path, repeat: int = 3, qemu: str = "qemu-system-x86_64", steps=None) -> dict:
    """Median cycles per iteration for each test on each path, and the user-mode cost."""
    from ..kut.config import environment

    flat = suite / "x86" / "vmexit.flat"
    if not flat.is_file():
        return {"unavailable": f"{flat} not found (build kvm-unit-tests: ./configure && make)"}
    have_qemu = shutil.which(qemu) is not None
    samples: dict[str, list[dict[str, int]]] = {p: [] for p in PATHS}
    with tempfile.NamedTemporaryFile("w", prefix="kut-env-") as env_file:
        env_file.write(environment(suite))
        env_file.flush()
        env = Path(env_file.name)
        for round_no in range(repeat):
            for path in PATHS[round_no % len(PATHS):] + PATHS[:round_no % len(PATHS)]:  # rotate against drift
                started = time.perf_counter()
                if path == "qemu":
                    if have_qemu:
                        samples[path].append(_qemu_once(flat, env, qemu))
                else:
                    samples[path].append(asyncio.run(_aiokvm_once(flat, env, path)))
                if steps is not None:
                    steps.step(f"vmexit {path}, round {round_no + 1}/{repeat} "
                               f"({time.perf_counter() - started:.1f}s)")
    table = {}
    for path, runs in samples.items():
        table[path] = {test: statistics.median(r[test] for r in runs if test in r)
                       for test in TESTS if any(test in r for r in runs)}
    for row in table.values():
        if "inl_from_qemu" in row and "inl_from_kernel" in row:
            row["user_mode_cost"] = row["inl_from_qemu"] - row["inl_from_kernel"]
    return {"repeat": repeat, "unit": "TSC cycles per iteration (median)", "paths": table,
            "samples": samples}


def print_vmexit(result: dict, tsc_hz: float | None) -> None:
    if "unavailable" in result:
        print(f"kvm-unit-tests vmexit: {result['unavailable']}")
        return
    print(f"kvm-unit-tests vmexit (same guest, TSC cycles per iteration, median of {result['repeat']}):")
    columns = ("cpuid", "inl_from_kernel", "inl_from_qemu", "user_mode_cost")
    print(f"  {'path':<28}" + "".join(f"{c:>17}" for c in columns))
    labels = {"qemu": "QEMU microvm", "unclaimed": "aiokvm, port unclaimed (C)",
              "inline": "aiokvm, inline Python device", "loop": "aiokvm, loop-hosted device"}
    for path, row in result["paths"].items():
        if not row:
            continue
        cells = "".join(f"{row[c]:>17,.0f}" if c in row else f"{'-':>17}" for c in columns)
        print(f"  {labels[path]:<28}{cells}")
    qemu = result["paths"].get("qemu", {})
    for path in ("unclaimed", "inline", "loop"):
        row = result["paths"].get(path, {})
        if tsc_hz and row.get("user_mode_cost") is not None:
            line = f"  user-mode cost, {labels[path]}: {row['user_mode_cost'] / tsc_hz * 1e6:.2f} us"
            if qemu.get("inl_from_qemu"):
                line += f"; its inl_from_qemu is {row['inl_from_qemu'] / qemu['inl_from_qemu']:.2f}x QEMU's"
            print(line)
    if qemu.get("user_mode_cost") is not None and tsc_hz:
        print(f"  QEMU microvm: {qemu['user_mode_cost'] / tsc_hz * 1e6:.2f} us between the two, but not a "
              "user-mode cost: microvm's PIC is in user space (split irqchip), so inl_from_kernel exits to QEMU too")
