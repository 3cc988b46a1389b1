"""Boot-to-exit wall time of the bundled ``hello`` guest: aiokvm against QEMU microvm.

Measures, in one run and interleaved (so drift hits every path alike):

- ``aiokvm-process``: ``python -m aiokvm run hello`` as a user runs it
  (interpreter start and imports included);
- ``aiokvm-inprocess``: ``Machine`` create + load + run + close inside one
  running interpreter (what an embedding application pays per VM);
- ``qemu-process``: ``qemu-system-x86_64 -M microvm,acpi=off -enable-kvm``
  with the same ELF.

It reports medians and ratios to QEMU; it asserts nothing.

    aiokvm bench boot [--runs 20] [--json out.json]
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

from .hostinfo import fmt, qemu_microvm_cmd
from .plot import add_output_options, by_benchmark, parse_with_outputs
from .progress import Steps


def qemu_cmd(elf: str) -> list[str] | None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return None
    return qemu_microvm_cmd(elf)


#: what a successful boot of `hello` exits with (QEMU reports debug-exit 0 as 1)
GOOD_STATUS = {"aiokvm-process": 0, "qemu-process": 1}


def time_process(cmd: list[str], good: int) -> float | None:
    """Seconds for one boot, or None if it did not end as a good boot does."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    elapsed = time.perf_counter() - start
    return elapsed if proc.returncode == good else None


async def time_inprocess() -> float | None:
    start = time.perf_counter()
    async with Machine(memory="64M") as vm:
        vm.load("hello")
        status = await vm.run(timeout=30)
    elapsed = time.perf_counter() - start
    return elapsed if status.code == 0 else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="aiokvm bench boot", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    add_output_options(parser)
    args = parse_with_outputs(parser, argv)

    elf = str(guests.path("hello"))
    paths = {"aiokvm-process": [sys.executable, "-m", "aiokvm", "run", "hello"], "qemu-process": qemu_cmd(elf)}
    # a failed boot is recorded as None: counted, never timed as a fast sample
    samples: dict[str, list[float | None]] = {name: [] for name, cmd in paths.items() if cmd}
    samples["aiokvm-inprocess"] = []
    loop = uvloop.new_event_loop()
    loop.run_until_complete(time_inprocess())  # warm-up
    with Steps(args.runs, "boot") as steps:
        for run in range(args.runs):
            for name, cmd in paths.items():
                if cmd:
                    samples[name].append(time_process(cmd, GOOD_STATUS[name]))
            samples["aiokvm-inprocess"].append(loop.run_until_complete(time_inprocess()))
            steps.step(f"run {run + 1}/{args.runs}")
    loop.close()

    good = {name: [v for v in values if v is not None] for name, values in samples.items()}
    qemu = statistics.median(good["qemu-process"]) if good.get("qemu-process") else None
    rows = []
    for name, values in good.items():
        median = statistics.median(values) if values else None
        rows.append({"path": name, "runs": len(values), "failed": len(samples[name]) - len(values),
                     "median_ms": round(median * 1e3, 2) if median else None,
                     "min_ms": round(min(values) * 1e3, 2) if values else None,
                     "ratio_to_qemu": round(median / qemu, 3) if qemu and median else None})
    print(f"{'path':<20}{'median ms':>12}{'min ms':>10}{'x QEMU':>10}{'failed':>8}")
    for row in rows:
        print(f"{row['path']:<20}{fmt(row['median_ms'], '.1f'):>12}{fmt(row['min_ms'], '.1f'):>10}"
              f"{fmt(row['ratio_to_qemu']):>10}{row['failed']:>8}")
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump({"benchmark": "boot", "guest": "hello", "rows": rows}, fh, indent=2)
    if args.plot:
        by_benchmark("boot", rows, args.plot)


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
