"""What the benchmarks record about the host: TSC frequency (guests measure in TSC ticks) and machine facts."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return None


def calibrate_tsc(tmp: str) -> tuple[float, str]:
    """Ticks per second: ``aiokvm/bench/c/tsc.c``, median of 3; else /proc/cpuinfo's cpu MHz."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc:
        exe = os.path.join(tmp, "tsc")
        if subprocess.run([gcc, "-O2", "-o", exe, str(HERE / "c" / "tsc.c")], capture_output=True,
                          check=False).returncode == 0:
            values = [float(subprocess.run([exe], capture_output=True, text=True, check=True).stdout)
                      for _ in range(3)]
            return statistics.median(values), "rdtsc over 250 ms of CLOCK_MONOTONIC_RAW"
    return float(cpuinfo_field("cpu MHz") or 0) * 1e6, "/proc/cpuinfo cpu MHz"


def machine_info(tsc_hz: float, tsc_source: str, **extra) -> dict:
    """CPU, kernel, nesting, TSC, Python/uvloop/QEMU versions and load: the header of every result."""
    import uvloop

    qemu = shutil.which("qemu-system-x86_64")
    qemu_version = None
    if qemu:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=False).stdout
        qemu_version = out.splitlines()[0] if out else None
    return {
        "cpu_model": cpuinfo_field("model name"),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "nested": "hypervisor" in (cpuinfo_field("flags") or "").split(),
        "tsc_hz": round(tsc_hz),
        "tsc_source": tsc_source,
        "python": platform.python_version(),
        "uvloop": uvloop.__version__,
        "qemu": qemu_version,
        **extra,
        "loadavg_end": os.getloadavg(),
    }


# -- shared by the benchmarks ----------------------------------------------------------


def qemu_microvm_cmd(elf: str, append: str | None = None, *extra: str) -> list[str]:
    """QEMU microvm booting ``elf`` the way every benchmark compares against:
    64 MiB, serial on stdio, isa-debug-exit at 0xf4."""
    cmd = ["qemu-system-x86_64", "-enable-kvm", "-M", "microvm,acpi=off", "-cpu", "qemu64", "-m", "64M",
           "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
           "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", elf]
    if append is not None:
        cmd += ["-append", append]
    return cmd + list(extra)


def median_of(samples: list[dict], key: str) -> float | None:
    """The median of ``key`` over the samples that have it."""
    values = [s[key] for s in samples if s.get(key) is not None]
    return statistics.median(values) if values else None


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def note_problems(row: dict, spec) -> None:
    """Put a spec's ``unavailable`` reason and distinct errors into its result row."""
    if spec.unavailable:
        row["unavailable"] = spec.unavailable
    if spec.errors:
        row["errors"] = sorted(set(spec.errors))
