"""kvm-unit-tests' unittests.cfg reading, the plans it gives, statuses and the
environment module (pure logic; the suite itself runs in tests/kvm/test_kut.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiokvm.errors import ConfigError
from aiokvm.kut.config import KutTest, environment, parse_config, parse_duration, plan
from aiokvm.kut.runner import FAIL, PASS, SKIP, other_machine_type, qemu_command, status_of

CFG = '''
# comment
[x2apic]
file = apic.flat
smp = 2
qemu_params = -cpu qemu64,+x2apic,+tsc-deadline
arch = x86_64
timeout = 30
groups = apic

[vmexit_cpuid]
file = vmexit.flat
test_args = 'cpuid'
groups = vmexit

[vmexit_ipi]
file = vmexit.flat
smp = $MAX_SMP
test_args = 'ipi'
extra_params = -machine pit=off
groups = vmexit nodefault

[multi]
file = dummy.flat
qemu_params = """-m 2048
-cpu max,+vmx"""

[edu]
file = intel-iommu.flat
qemu_params = -M q35,kernel-irqchip=split -device intel-iommu,intremap=on,eim=off -device edu

[i386only]
file = cmpxchg8b.flat
arch = i386

[checked]
file = dummy.flat
check = /nonexistent/param=Y
'''


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    (tmp_path / "x86").mkdir()
    for name in ("apic", "vmexit", "dummy", "intel-iommu", "cmpxchg8b"):
        (tmp_path / "x86" / f"{name}.flat").write_bytes(b"")
    (tmp_path / "errata.txt").write_text("# commit:minimum kernel:description\n"
                                         "abcdef012345:4.9:old fix\nfedcba987654:99.0:future fix\n")
    return tmp_path


def test_sections_keys_and_triple_quoted_params():
    tests = {t.name: t for t in parse_config(CFG)}
    assert list(tests) == ["x2apic", "vmexit_cpuid", "vmexit_ipi", "multi", "edu", "i386only", "checked"]
    assert tests["x2apic"].smp == "2" and tests["x2apic"].groups == ["apic"] and tests["x2apic"].timeout == "30"
    assert tests["vmexit_ipi"].params == "-machine pit=off"  # the older key name
    assert tests["multi"].params == "-m 2048 -cpu max,+vmx"


def test_plans_translate_what_aiokvm_offers_and_name_what_it_does_not(suite):
    tests = {t.name: t for t in parse_config(CFG)}
    p = plan(tests["x2apic"], suite, max_vcpus=4)
    assert (p.vcpus, p.cpu, p.timeout, p.memory_mb, p.skip) == (2, "qemu64,+x2apic,+tsc-deadline", 30.0, 128, None)
    p = plan(tests["vmexit_cpuid"], suite, max_vcpus=4)
    assert p.cmdline == "cpuid" and p.cpu == "qemu64" and p.timeout == 90.0
    p = plan(tests["vmexit_ipi"], suite, max_vcpus=4)
    assert p.vcpus == 4 and p.pit is False and p.skip is None
    p = plan(tests["multi"], suite, max_vcpus=4)
    assert p.memory_mb == 2048 and p.cpu == "max,+vmx" and p.skip is None
    edu = plan(tests["edu"], suite, max_vcpus=4)
    assert edu.unsupported == "needs -machine q35" and edu.skip is None  # QEMU may still run it
    assert plan(tests["i386only"], suite, max_vcpus=4).skip == "i386 only"
    assert plan(tests["checked"], suite, max_vcpus=4).skip == "/nonexistent/param not equal to Y"
    tests["x2apic"].params = "-cpu Skylake-Server,+vmx"
    assert "unknown CPU model 'Skylake-Server'" in plan(tests["x2apic"], suite, max_vcpus=4).unsupported
    tests["x2apic"].params, tests["x2apic"].file = "", "missing.flat"
    assert "not found" in plan(tests["x2apic"], suite, max_vcpus=4).skip


def test_nodefault_tests_run_only_when_named(suite):
    tests = {t.name: t for t in parse_config(CFG)}
    assert plan(tests["vmexit_ipi"], suite, max_vcpus=2, named=False).skip == "test marked as manual run only"
    assert plan(tests["vmexit_ipi"], suite, max_vcpus=2, named=True).skip is None


def test_the_qemu_command_is_x86_run_on_microvm(suite):
    tests = {t.name: t for t in parse_config(CFG)}
    cmd = qemu_command(plan(tests["vmexit_ipi"], suite, max_vcpus=2), Path("/tmp/env"))
    # The test's own options as written, after the fixed ones: QEMU merges -machine pit=off into microvm.
    machine = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-machine"]
    assert cmd[cmd.index("-M") + 1] == "microvm" and machine == ["accel=kvm", "pit=off"]  # x86/run's accel spelling:
    # "-accel kvm" would clash with a test's own -enable-kvm
    assert cmd[cmd.index("-append") + 1] == "ipi" and cmd[cmd.index("-smp") + 1] == "2"
    assert "pc-testdev" in cmd and "isa-debug-exit,iobase=0xf4,iosize=0x4" in cmd
    multi = qemu_command(plan(tests["multi"], suite, max_vcpus=2), Path("/tmp/env"))
    assert multi[-10:-6] == ["-m", "2048", "-cpu", "max,+vmx"]  # after the defaults: QEMU takes the last
    assert other_machine_type(plan(tests["edu"], suite, max_vcpus=2)) == "q35"
    assert other_machine_type(plan(tests["vmexit_ipi"], suite, max_vcpus=2)) is None


def test_statuses_follow_the_suite():
    assert status_of(1) == PASS and status_of(77) == SKIP
    assert status_of(3) == FAIL and status_of(0) == FAIL and status_of(124) == FAIL


def test_durations():
    assert parse_duration("90") == 90 and parse_duration("90s") == 90 and parse_duration("2m") == 120
    with pytest.raises(ConfigError):
        parse_duration("soon")


def test_environment_module_names_the_errata_this_kernel_has(suite):
    text = environment(suite, kernel_release="6.1.0-13-amd64")
    assert "KERNEL_VERSION=6\n" in text and "KERNEL_PATCHLEVEL=1\n" in text
    assert "ERRATA_abcdef012345=y" in text and "fedcba987654" not in text


def test_options_it_cannot_read_make_that_test_unsupported_not_the_run_fail(suite):
    bad_quote = KutTest("q", file="dummy.flat", test_args="'unbalanced")
    assert plan(bad_quote, suite, max_vcpus=2).unsupported.startswith("cannot split its options")
    sockets = KutTest("s", file="dummy.flat", params="-smp sockets=2")
    assert plan(sockets, suite, max_vcpus=2).unsupported == "-smp sockets=2 is not a vCPU count aiokvm reads"
    assert plan(KutTest("m", file="dummy.flat", params="-m 4g"), suite, max_vcpus=2).memory_mb == 4096


def test_vmexit_lines_are_read_as_the_guest_prints_them():
    from aiokvm.bench.kut_vmexit import parse_vmexit

    out = "enabling apic\r\ncpuid 16311\r\ninl_from_qemu 21925\r\nipi (skipped)\r\ninl_from_kernel 21953\r\nmov_dr 9\n"
    assert parse_vmexit(out) == {"cpuid": 16311, "inl_from_qemu": 21925, "inl_from_kernel": 21953}
