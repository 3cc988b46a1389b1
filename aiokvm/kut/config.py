"""kvm-unit-tests' ``unittests.cfg``, and what each test asks of the VMM.

The file is INI-like: ``[name]`` then ``key = value`` lines (``file``,
``smp``, ``test_args``, ``qemu_params`` or the older ``extra_params``, which
may span lines inside triple quotes, ``arch``, ``groups``, ``timeout``,
``check``, ``accel``, ``machine``, ``disabled_if``), as
``scripts/common.bash`` reads it.  ``plan()`` turns a test into the machine
it needs: vCPUs, memory, CPU model, command line, and which QEMU options
it used that aiokvm has no answer for (then the test is skipped here, with
that reason).  Pure logic: no files but the ones named, no processes.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

DEFAULT_TIMEOUT = 90.0  # scripts/runtime.bash: ${TIMEOUT:-${timeout:-90s}}
DEFAULT_MEMORY_MB = 128  # QEMU's default -m
DEFAULT_CPU = "qemu64"  # QEMU's default -cpu for x86_64 (x86/run passes none)


@dataclass
class KutTest:
    """One ``[section]`` of ``unittests.cfg``."""

    name: str
    file: str = ""
    smp: str = "1"
    test_args: str = ""
    params: str = ""
    arch: str = ""
    groups: list[str] = field(default_factory=list)
    timeout: str = ""
    check: list[str] = field(default_factory=list)
    accel: str = ""
    machine: str = ""
    disabled_if: str = ""


@dataclass
class Plan:
    """What running one test takes."""

    test: KutTest
    kernel: Path
    vcpus: int
    memory_mb: int
    cpu: str
    cmdline: str
    timeout: float
    pit: bool = True
    skip: str | None = None  # a reason not to run it at all (the suite's own: arch, check, nodefault...)
    unsupported: str | None = None  # a reason aiokvm cannot run it (QEMU still may, under --compare-qemu)
    qemu_args: list[str] = field(default_factory=list)  # the options as QEMU takes them (for --compare-qemu)


# cfg key -> KutTest field (qemu_params is the newer name of extra_params).
_STRING_KEYS = {"file": "file", "smp": "smp", "test_args": "test_args", "qemu_params": "params",
                "extra_params": "params", "arch": "arch", "timeout": "timeout", "accel": "accel",
                "machine": "machine", "disabled_if": "disabled_if"}
_LIST_KEYS = {"groups", "check"}  # space-separated lists


def parse_config(text: str) -> list[KutTest]:
    """The tests of a ``unittests.cfg``, in file order."""
    tests: list[KutTest] = []
    current: KutTest | None = None
    lines = iter(text.splitlines())
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        header = re.fullmatch(r"\[(.*)\]", line)
        if header:
            current = KutTest(header.group(1))
            tests.append(current)
            continue
        match = re.fullmatch(r"([A-Za-z_]+)\s*=\s*(.*)", line)
        if match is None or current is None:
            continue  # the suite's reader ignores what it does not match, too
        key, value = match.groups()
        if value.startswith('"""'):
            body = value[3:]
            while '"""' not in body:
                more = next(lines, None)
                if more is None:
                    break
                body = body.rstrip("\\") + " " + more if body.endswith("\\") else body + "\n" + more
            value = body.split('"""', 1)[0].replace("\n", " ")
        if key in _LIST_KEYS:
            setattr(current, key, value.split())
        elif key in _STRING_KEYS:
            setattr(current, _STRING_KEYS[key], value)
    return tests


def parse_duration(text: str) -> float:
    """``timeout``'s forms: ``90``, ``90s``, ``2m``, ``1h``, ``1d`` (coreutils' timeout)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None:
        raise ConfigError(f"timeout {text!r} is not a duration like 90, 90s or 2m")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def _words(text: str) -> list[str]:
    """Split as the suite's shell would; backquotes are what it runs
    (``test_args = "10000000 `date +%s`"``)."""
    if "`" in text or "$(" in text:
        out = subprocess.run(["bash", "-c", f"printf '%s\\0' {text}"], capture_output=True, text=True, check=False)
        return [w for w in out.stdout.split("\0") if w]
    return shlex.split(text)


# QEMU options that change nothing here (kvm-unit-tests' own defaults, or accelerator spellings).
_IGNORED = {"-enable-kvm", "-no-reboot", "--no-reboot", "-nodefaults", "-display"}


def plan(test: KutTest, suite: Path, *, max_vcpus: int, host_arch: str = "x86_64", named: bool = True) -> Plan:
    """The machine a test needs, or why it cannot run here (``Plan.skip``).

    ``max_vcpus``: what ``$MAX_SMP`` stands for (the suite: the host's CPUs).
    ``named``: the user asked for this test by name; a test in the
    ``nodefault`` group runs only then, as in the suite's runner."""
    kernel = suite / "x86" / test.file
    try:
        timeout = parse_duration(os.environ.get("TIMEOUT") or test.timeout or "90s")
    except ConfigError:
        timeout = DEFAULT_TIMEOUT
    smp_text = test.smp.replace("$MAX_SMP", str(max_vcpus))
    try:
        vcpus = int(smp_text)
    except ValueError:
        vcpus = 1
    try:
        cmdline, args, split_error = " ".join(_words(test.test_args)), _words(test.params), None
    except ValueError as exc:  # an unbalanced quote: this test only, not the whole run
        cmdline, args, split_error = "", [], f"cannot split its options: {exc}"
    result = Plan(test, kernel, vcpus, DEFAULT_MEMORY_MB, DEFAULT_CPU, cmdline, timeout)
    result.qemu_args = args
    unsupported = split_error or translate_params(args, result) or cpu_unsupported(result.cpu)
    result.unsupported = unsupported
    skip = None
    if "nodefault" in test.groups and not named:
        skip = "test marked as manual run only"
    elif test.arch and test.arch != host_arch:
        skip = f"{test.arch} only"
    elif test.accel and test.accel != "kvm":
        skip = f"{test.accel} only"
    elif test.machine and test.machine != "microvm":
        skip = f"{test.machine} only"
    elif test.disabled_if:
        skip = f"disabled if {test.disabled_if}"
    elif not kernel.is_file():
        skip = f"test file {kernel} not found"
    for condition in test.check:
        path, _, want = condition.partition("=")
        try:
            have = Path(path).read_text().strip()
        except OSError:
            have = None
        if have != want:
            skip = skip or f"{path} not equal to {want}"
    result.skip = skip
    return result


def cpu_unsupported(cpu: str) -> str | None:
    """Why aiokvm cannot give this ``-cpu`` (a model or feature it does not know), or None."""
    from ..cpu.models import parse_cpu

    try:
        parse_cpu(cpu)
    except ConfigError as exc:
        return str(exc).split(";")[0]  # the reason, without the list of what is known
    return None


def translate_params(args: list[str], result: Plan) -> str | None:
    """Apply the QEMU options aiokvm understands; return why not, for the first it does not."""
    i = 0
    while i < len(args):
        opt = args[i]
        value = args[i + 1] if i + 1 < len(args) else ""
        if opt in _IGNORED:
            i += 1 + (opt == "-display")
            continue
        i += 2
        if opt == "-cpu":
            result.cpu = value
        elif opt == "-m":
            match = re.fullmatch(r"(\d+)([MGT]?)", value.split(",")[0].removeprefix("size=").upper())
            if match is None:
                return f"-m {value} is not a size aiokvm reads"
            result.memory_mb = int(match.group(1)) * {"": 1, "M": 1, "G": 1024, "T": 1 << 20}[match.group(2)]
        elif opt == "-smp":
            first = value.split(",")[0].removeprefix("cpus=")
            if not first.isdigit():
                return f"-smp {value} is not a vCPU count aiokvm reads"
            result.vcpus = int(first)
        elif opt == "-append":
            result.cmdline = value
        elif opt in ("-machine", "-M"):
            for prop in value.split(","):
                if prop in ("pit=off",):
                    result.pit = False
                elif prop in ("accel=kvm", "microvm"):
                    continue
                else:
                    return f"needs -machine {prop}"
        elif opt == "-global":
            if not value.startswith("kvm-pit.lost_tick_policy"):
                return f"needs -global {value}"
        elif opt == "-device":
            if value.split(",")[0] not in ("pc-testdev", "isa-debug-exit"):
                return f"needs -device {value.split(',')[0]}"
        else:
            return f"needs QEMU option {opt}"
    return None


def environment(suite: Path, kernel_release: str | None = None) -> str:
    """The environment module the suite's runner hands each test
    (``scripts/arch-run.bash``): the target, the accelerator, the host
    kernel's version, and an ``ERRATA_<commit>=y`` for each erratum whose
    fix that kernel has (``errata.txt``), so that the guests run the same
    checks under either VMM."""
    release = kernel_release or os.uname().release
    lines = ["TARGET=qemu", "QEMU_ACCEL=kvm", f"KERNEL_VERSION_STRING={release}"]
    numbers = re.match(r"(\d+)\.(\d+)\.?(\d*)(.*)", release)
    if numbers:
        version, patchlevel, sublevel, extra = numbers.groups()
        lines += [f"KERNEL_VERSION={version}", f"KERNEL_PATCHLEVEL={patchlevel}",
                  f"KERNEL_SUBLEVEL={sublevel or 0}", f"KERNEL_EXTRAVERSION={extra}"]
        have = (int(version), int(patchlevel), int(sublevel or 0))
        errata = suite / "errata.txt"
        if errata.is_file():
            for raw in errata.read_text().splitlines():
                parts = [p.strip() for p in raw.split(":")]
                if raw.lstrip().startswith("#") or len(parts) < 2:
                    continue
                need = tuple(int(x) for x in re.findall(r"\d+", parts[1])[:3])
                if need and have >= need + (0,) * (3 - len(need)):
                    lines.append(f"ERRATA_{parts[0]}=y")
    return "\n".join(lines) + "\n"
