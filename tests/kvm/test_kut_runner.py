"""``aiokvm kut`` end to end on a suite of the test's own making: Multiboot
guests built here stand in for kvm-unit-tests' .flat files (nothing is
fetched), with the suite's unittests.cfg format, statuses and skips; and the
same suite under --compare-qemu.  The real suite runs in tests/kvm/test_kut.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.multiboot_guest import build_multiboot_guest

pytestmark = pytest.mark.kvm

CFG = """
[passes]
file = pass.flat
smp = 2
test_args = 'alpha beta'
qemu_params = -cpu qemu64,-x2apic -m 64

[fails]
file = fail.flat

[skips]
file = skip.flat

[hangs]
file = hang.flat
timeout = 3s

[needs_q35]
file = pass.flat
qemu_params = -M q35

[manual]
file = pass.flat
groups = nodefault

[missing]
file = nowhere.flat

[qemu_refuses]
file = pass.flat
qemu_params = -cpu qemu64,+no-such-feature-anywhere
"""


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("kut")
    build = tmp_path_factory.mktemp("build")
    (root / "x86").mkdir()
    for name, kwargs in (("pass", {"exit_code": 0}), ("fail", {"exit_code": 1}),
                         ("skip", {"exit_code": 77 >> 1}), ("hang", {"hang": True})):
        (root / "x86" / f"{name}.flat").write_bytes(build_multiboot_guest(build, **kwargs).read_bytes())
    (root / "x86" / "unittests.cfg").write_text(CFG)
    return root


def kut(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aiokvm", "kut", *args], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def test_statuses_skips_and_logs_as_the_suite_reports_them(suite, tmp_path):
    proc = kut(str(suite), "--json", str(tmp_path / "r.json"), "--logs", str(tmp_path / "logs"))
    assert proc.returncode == 1, proc.stderr  # a FAIL and a TIMEOUT among them
    results = {r["test"]: r["aiokvm"] for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert {name: r["status"] for name, r in results.items()} == {
        "passes": "PASS", "fails": "FAIL", "skips": "SKIP", "hangs": "TIMEOUT", "needs_q35": "SKIP",
        "manual": "SKIP", "missing": "SKIP", "qemu_refuses": "SKIP"}
    assert [r["exit_status"] for r in (results["passes"], results["fails"], results["skips"])] == [1, 3, 77]
    assert results["needs_q35"]["detail"] == "needs -machine q35"
    assert results["manual"]["detail"] == "test marked as manual run only"
    # The guest got the cfg's vCPUs, memory, CPU model and arguments, and the environment module.
    log = (tmp_path / "logs" / "passes.aiokvm.log").read_text()
    assert "fw_cfg_nb_cpus=2\n" in log and f"fw_cfg_ram_size={64 << 20}\n" in log and "x2apic=0\n" in log
    assert f"cmdline={suite}/x86/pass.flat alpha beta\n" in log
    assert "mod0=TARGET=qemu;QEMU_ACCEL=kvm;" in log
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("PASS    passes") and "1 pass, 1 fail, 5 skip, 1 timeout" in lines[-1]


def test_a_test_named_runs_even_if_nodefault(suite):
    proc = kut(str(suite), "manual")
    assert proc.returncode == 0 and proc.stdout.startswith("PASS    manual"), proc.stdout + proc.stderr


@pytest.mark.qemu
def test_compare_qemu_agrees_on_every_status(suite, tmp_path):
    proc = kut(str(suite), "passes", "fails", "skips", "hangs", "--compare-qemu", "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr  # nothing passes only under QEMU
    for result in json.loads((tmp_path / "r.json").read_text())["results"]:
        assert result["aiokvm"]["status"] == result["qemu"]["status"], result
        assert result["aiokvm"]["exit_status"] == result["qemu"]["exit_status"], result
    assert "0 differ from QEMU microvm" in proc.stdout


def shim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aiokvm.kut.shim", *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


X86_RUN = ["--no-reboot", "-nodefaults", "-global", "kvm-pit.lost_tick_policy=discard", "-device", "pc-testdev",
           "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "-display", "none", "-serial", "stdio",
           "-machine", "accel=kvm", "-kernel"]  # what x86/run puts before the kernel


def test_the_qemu_shim_answers_the_suites_probes():
    version = shim("-h").stdout.splitlines()[0]
    # scripts/arch-run.bash: IFS='[ .]' read -r _ _ _ QEMU_MAJOR QEMU_MINOR QEMU_MICRO
    assert version.startswith("QEMU emulator version 7.2.0 ")
    assert '"pc-testdev"' in shim("-device", "?").stdout and "pci-testdev" not in shim("-device", "?").stdout


def test_the_qemu_shim_runs_x86_runs_command_with_qemus_statuses(suite, tmp_path):
    env = tmp_path / "env"
    env.write_text("NR_CPUS=2\n")
    x86 = suite / "x86"
    passed = shim(*X86_RUN, str(x86 / "pass.flat"), "-smp", "2", "-cpu", "qemu64,-x2apic", "-append", "a b",
                  "-initrd", str(env))
    assert passed.returncode == 1, passed.stderr  # QEMU's (0 << 1) | 1
    assert "fw_cfg_nb_cpus=2\n" in passed.stdout and "x2apic=0\n" in passed.stdout
    assert f"cmdline={x86}/pass.flat a b\n" in passed.stdout and "mod0=NR_CPUS=2;" in passed.stdout
    assert shim(*X86_RUN, str(x86 / "fail.flat")).returncode == 3
    assert shim(*X86_RUN, str(x86 / "skip.flat")).returncode == 77
    unsupported = shim(*X86_RUN, str(x86 / "pass.flat"), "-device", "edu")
    assert unsupported.returncode == 77 and "SKIP: needs -device edu" in unsupported.stderr
    missing = shim(*X86_RUN, "_NO_FILE_4Uhere_", "-smp", "2")
    assert missing.returncode == 1 and "could not load kernel '_NO_FILE_4Uhere_'" in missing.stderr


@pytest.mark.qemu
def test_qemu_exiting_1_with_an_error_is_a_failure_not_a_pass(suite, tmp_path):
    # QEMU's own errors exit 1, which is also a passing guest's status: the suite
    # (scripts/vmm.bash) takes 1 as a pass only when QEMU printed no error.
    proc = kut(str(suite), "qemu_refuses", "--compare-qemu", "--json", str(tmp_path / "r.json"))
    (result,) = json.loads((tmp_path / "r.json").read_text())["results"]
    assert result["qemu"]["status"] == "FAIL" and result["qemu"]["exit_status"] == 1, result
    detail = result["qemu"]["detail"]
    assert detail.startswith("QEMU failed: ") and "no-such-feature-anywhere" in detail
    assert result["aiokvm"]["status"] == "SKIP" and "unknown CPU feature" in result["aiokvm"]["detail"]
    assert proc.returncode == 0  # it passes nowhere, so nothing passes only under QEMU
