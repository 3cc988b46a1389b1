"""Boot-to-exit wall time of the bundled ``hello`` guest: aiokvm against QEMU microvm.

Measures, in one run and interleaved (so drift hits every path alike):

- ``aiokvm-process``: ``python -m aiokvm run hello`` as a user runs it
  (interpreter start and imports included);
- ``aiokvm-inprocess``: ``Machine`` create + load + run + close inside one
  running interpreter (what an embedding application pays per VM);
- ``qemu-process``: ``qemu-system-x86_64 -M microvm,acpi=off -enable-kvm``
  with the same ELF.

It reports medians and ratios to QEMU; it asserts nothing.

    python benchmarks/boot.py [--runs 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import time

import uvloop

from aiokvm import Machine, guests


def qemu_cmd(elf: str) -> list[str] | None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return None
    return [qemu, "-enable-kvm", "-M", "microvm,acpi=off", "-cpu", "qemu64", "-m", "64M", "-nodefaults",
            "-no-user-config", "-nographic", "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel", elf]


def time_process(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


async def time_inprocess() -> float:
    start = time.perf_counter()
    async with Machine(memory="64M") as vm:
        vm.load("hello")
        await vm.run(timeout=30)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    elf = str(guests.path("hello"))
    paths = {"aiokvm-process": [sys.executable, "-m", "aiokvm", "run", "hello"], "qemu-process": qemu_cmd(elf)}
    samples: dict[str, list[float]] = {name: [] for name, cmd in paths.items() if cmd}
    samples["aiokvm-inprocess"] = []
    loop = uvloop.new_event_loop()
    loop.run_until_complete(time_inprocess())  # warm-up
    for _ in range(args.runs):
        for name, cmd in paths.items():
            if cmd:
                samples[name].append(time_process(cmd))
        samples["aiokvm-inprocess"].append(loop.run_until_complete(time_inprocess()))
    loop.close()

    qemu = statistics.median(samples["qemu-process"]) if "qemu-process" in samples else None
    rows = []
    for name, values in samples.items():
        median = statistics.median(values)
        rows.append({"path": name, "runs": len(values), "median_ms": round(median * 1e3, 2),
                     "min_ms": round(min(values) * 1e3, 2),
                     "ratio_to_qemu": round(median / qemu, 3) if qemu else None})
    print(f"{'path':<20}{'median ms':>12}{'min ms':>10}{'x QEMU':>10}")
    for row in rows:
        ratio = f"{row['ratio_to_qemu']:.2f}" if row["ratio_to_qemu"] is not None else "-"
        print(f"{row['path']:<20}{row['median_ms']:>12.1f}{row['min_ms']:>10.1f}{ratio:>10}")
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump({"benchmark": "boot", "guest": "hello", "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
