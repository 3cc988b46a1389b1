"""``aiokvm demo`` and ``aiokvm bench``: they run, write what they say, and
their ordering claims hold on counts (never on times)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

AIOKVM = [sys.executable, "-m", "aiokvm"]
#: the fields each section's table shows, so every row must carry them
TABLE_FIELDS = {"exit": ("label", "us_per_exit", "x_ref", "user_exits_per_exit", "mode_split"),
                "disk": ("label", "mb_s", "exits_per_mb", "mode_split"),
                "net": ("label", "frames_per_s", "exits_per_frame", "mode_split")}


def demo(out: Path, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*AIOKVM, "demo", "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, env=env)


def check_plots(out: Path) -> None:
    for stem in ("demo_disk", "demo_split"):
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        root = ET.parse(out / f"{stem}.svg").getroot()
        assert root.tag.endswith("svg")


@pytest.mark.kvm
@pytest.mark.qemu
@pytest.mark.slow
def test_demo_quick_writes_every_row_plots_and_claims_that_hold_on_counts(tmp_path):
    proc = demo(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "demo.json").read_text())
    assert data["benchmark"] == "demo" and data["qemu"] is True and data["errors"] == []
    rows = {(r["section"], r["path"]): r for r in data["rows"]}
    assert {section for section, _ in rows} == {"exit", "disk", "net"}
    for (section, path), row in rows.items():
        for key in TABLE_FIELDS[section]:
            assert key in row, (section, path, key)
        assert row["value"] > 0
    assert ("exit", "qemu") in rows and ("disk", "qemu:virtio:seq:4k:qd1") in rows and ("net", "qemu") in rows
    # ioeventfd takes the exit out of user mode; Python devices take one per guest write
    assert rows[("exit", "ioeventfd")]["user_exits_per_exit"] < 0.1
    assert all(rows[("exit", p)]["user_exits_per_exit"] >= 0.9 for p in ("inline", "loop:spin", "loop:futex"))
    # ATA one word per exit has the most exits per MB; ioeventfd cuts virtio's
    disk = {p: r["exits_per_mb"] for (s, p), r in rows.items() if s == "disk" and r["exits_per_mb"] is not None}
    assert max(disk, key=disk.get) == "aiokvm:ata-word:seq:4k:qd1"
    assert disk["aiokvm:virtio:seq:4k:qd1"] < disk["aiokvm/no-ioefd:virtio:seq:4k:qd1"]
    assert rows[("net", "aiokvm")]["exits_per_frame"] < 0.5 <= rows[("net", "aiokvm/no-ioeventfd")]["exits_per_frame"]
    assert len(data["sentences"]) >= 5 and all(s.strip() for s in data["sentences"])
    assert "QEMU rows skipped" not in proc.stdout
    assert isinstance(data["machine"]["nested"], bool) and data["machine"]["cores"] >= 1
    assert data["machine"]["tsc_hz"] > 0 and data["machine"]["repeat"] == 1  # --quick: one run per row
    check_plots(tmp_path)


@pytest.mark.kvm
@pytest.mark.slow
def test_without_qemu_on_path_the_demo_says_so_and_exits_0(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in os.environ.get("PATH", "").split(os.pathsep):  # everything on PATH but QEMU
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if not name.startswith("qemu") and not (bin_dir / name).exists():
                (bin_dir / name).symlink_to(Path(folder) / name)
    env = {**os.environ, "PATH": str(bin_dir)}
    assert shutil.which("qemu-system-x86_64", path=str(bin_dir)) is None
    proc = demo(tmp_path / "out", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "QEMU rows skipped" in proc.stdout
    data = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert data["qemu"] is False and not [r for r in data["rows"] if r["vmm"] == "qemu"]
    check_plots(tmp_path / "out")


@pytest.mark.kvm
def test_bench_exits_writes_json_and_compare_reads_two_runs(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for out in (a, b):
        proc = subprocess.run([*AIOKVM, "bench", "exits", "--quick", "--n", "500", "--repeat", "1", "--cpl", "3",
                               "--only", "inline,unclaimed", "--json", str(out), "--plot", str(tmp_path / "e.svg")],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "eta" in proc.stderr  # progress with an ETA, one line per step off a terminal
    ET.parse(tmp_path / "e.svg")
    proc = subprocess.run([*AIOKVM, "bench", "compare", str(a), str(b)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "inline" in proc.stdout and "B/A" in proc.stdout
    from aiokvm.bench.compare import compare, load

    rows = compare(load(str(a)), load(str(a)))
    assert rows and all(r["b_over_a"] == 1.0 and r["verdict"] == "same" for r in rows if r["a"])


def test_bench_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    for args, text in ((["bench", "nope"], "no benchmark 'nope'"),
                       (["bench", "compare", str(bad), str(bad)], "not the JSON of an aiokvm benchmark"),
                       (["bench", "compare", str(bad)], "give `aiokvm bench compare A.json B.json`"),
                       (["bench", "bridge", "--plot", str(tmp_path / "x.gif")], "give a .png or .svg")):
        proc = subprocess.run([*AIOKVM, *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and text in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
