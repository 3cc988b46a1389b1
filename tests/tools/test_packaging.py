"""The wheel ships every module, the bundled guests and the C headers.

It is built from a copy of the source tree (the files git tracks or would
track), so leftovers of an earlier build cannot stand in for a missing
package.  The build uses the installed setuptools and cffi, offline.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # compiles the cffi binding and the guest kit


def source_files() -> list[str]:
    """Paths relative to ROOT of the tracked and not-ignored untracked files."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the source tree")
    proc = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"not a git checkout: {proc.stderr.strip()}")
    return [name for name in proc.stdout.split("\0") if name and (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def files() -> list[str]:
    return source_files()


@pytest.fixture(scope="module")
def wheel(files, tmp_path_factory) -> Iterator[zipfile.ZipFile]:
    pytest.importorskip("setuptools", minversion="68")
    pytest.importorskip("cffi")
    tree = tmp_path_factory.mktemp("src")
    for name in files:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(tree)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = out.glob("aiokvm-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def expected_package_files(files: list[str]) -> set[str]:
    expected = set()
    for name in files:
        if name.endswith(".py") and name.startswith("aiokvm/"):
            expected.add(name)
        elif name.endswith(".py") and name.startswith("devices/"):
            expected.add(f"aiokvm/{name}")  # devices/ installs as aiokvm.devices
        elif name.startswith("aiokvm/kvm/") and name.endswith(".h"):
            expected.add(name)
        elif name.startswith("aiokvm/bench/c/") and name.endswith(".c"):
            expected.add(name)  # the benchmarks' C baseline and TSC calibrator, compiled at run time
        elif name.startswith("guest/programs/") and name.endswith(".c"):
            expected.add(f"aiokvm/guests/{Path(name).stem}.elf")  # each guest program is a bundled guest
    return expected


def test_every_module_guest_and_header_is_in_the_wheel(files, wheel):
    expected = expected_package_files(files)
    assert {"aiokvm/cli.py", "aiokvm/devices/virtio/blk.py", "aiokvm/guests/hello.elf",
            "aiokvm/kvm/_vcpu_loop.h", "aiokvm/bench/c/tsc.c"} <= expected  # the source listing itself worked
    shipped = {name for name in wheel.namelist() if not name.startswith("aiokvm-")}
    assert sorted(expected - shipped) == []


def test_the_wheel_holds_nothing_else(files, wheel):
    shipped = {name for name in wheel.namelist() if not name.startswith("aiokvm-")}
    extensions = {name for name in shipped if name.startswith("aiokvm/kvm/_kvm") and name.endswith(".so")}
    assert len(extensions) == 1, sorted(shipped)  # the compiled cffi binding
    assert sorted(shipped - expected_package_files(files) - extensions) == []  # no objects or build leftovers


def test_the_wheel_installs_the_command(wheel):
    (entry_points,) = [name for name in wheel.namelist() if name.endswith(".dist-info/entry_points.txt")]
    assert "aiokvm = aiokvm.cli:main" in wheel.read(entry_points).decode()
