"""kvm-unit-tests' own x86 guests under aiokvm, beside QEMU microvm, where a
built suite is present (``AIOKVM_KUT_DIR``; nothing is fetched: see the
README's "kvm-unit-tests under aiokvm").  The runner itself is tested
without the suite in tests/kvm/test_kut_runner.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = os.environ.get("AIOKVM_KUT_DIR")

pytestmark = [
    pytest.mark.kvm, pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(1800),
    pytest.mark.skipif(not SUITE or not (Path(SUITE) / "x86" / "vmexit.flat").is_file(),
                       reason="set AIOKVM_KUT_DIR to a built kvm-unit-tests tree to run its guests"),
]

# Tests that pass under QEMU microvm on the project's nested host (the issue's
# oracle); each must pass under aiokvm too.
PASSING_UNDER_QEMU = ["smptest", "smptest3", "setjmp", "idt_test", "rmap_chain", "vmexit_cpuid"]


def test_the_tests_that_pass_under_qemu_microvm_pass_under_aiokvm(tmp_path):
    report = tmp_path / "kut.json"
    proc = subprocess.run([sys.executable, "-m", "aiokvm", "kut", SUITE, *PASSING_UNDER_QEMU, "--compare-qemu",
                           "--json", str(report)], capture_output=True, text=True, timeout=1800,
                          stdin=subprocess.DEVNULL)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = {r["test"]: r for r in json.loads(report.read_text())["results"]}
    for name in PASSING_UNDER_QEMU:
        assert results[name]["qemu"]["status"] == "PASS", (name, results[name])
        assert results[name]["aiokvm"]["status"] == "PASS", (name, results[name])


def test_the_suites_own_runner_drives_aiokvm_through_the_qemu_shim():
    shim = Path(sys.executable).with_name("aiokvm-qemu")
    if not shim.exists():
        pytest.skip("aiokvm-qemu is not installed beside this Python (pip install the project)")
    proc = subprocess.run(["./run_tests.sh", *PASSING_UNDER_QEMU], cwd=SUITE, capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "QEMU": str(shim)}, stdin=subprocess.DEVNULL)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in PASSING_UNDER_QEMU:
        assert f"PASS\x1b[0m {name} " in proc.stdout, name
