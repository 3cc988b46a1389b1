"""The three-mode split, latency histograms and the stats schema."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from aiokvm import Machine

pytestmark = pytest.mark.kvm


class Sink:
    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        pass


@pytest.mark.asyncio(loop_factories=["uvloop"])
@pytest.mark.parametrize(("handoff", "mode"), [("spin", "loop"), ("futex", "loop"), ("wake", "loop"),
                                               ("event", "loop"), ("spin", "inline"), ("spin", None)])
async def test_the_mode_split_agrees_with_the_kernels_own_accounting(handoff, mode):
    """The waits aiokvm measures with its own clock, checked against what the
    kernel says about the same thread (schedstat): a thread asleep on a futex
    is off the CPU, and a thread spinning is on it or waiting for it.  (The
    split itself is a partition of wall time by construction; how much of the
    wall time it explains is a figure for benchmarks, not a test.)"""
    n = 20000 if handoff == "spin" else 5000
    async with Machine(handoff=handoff) as vm:
        if mode:
            vm.add_device(Sink(), pio=(0x80, 1), mode=mode, name="sink")
        vm.load("exitloop", cmdline=f"n={n} port=0x80")
        await vm.run(timeout=120)
        v = vm.stats()["vcpus"][0]
    modes, waited, handoff_counts = v["modes"], v["time"], v["handoff"]
    assert modes["on_cpu_s"] is not None and modes["runqueue_s"] is not None  # schedstat is there
    assert modes["on_cpu_s"] <= modes["wall_s"]
    if mode != "loop":
        # Nothing was loop-hosted: the vCPU never waited for the loop.
        assert waited["wait_s"] == modes["wait_s"] == 0
        assert handoff_counts["to_loop"] == handoff_counts["futex_waits"] == 0
        return
    assert v["latency"]["handler"]["count"] >= n - 1
    if handoff == "event":
        # A Python-level handoff: every exit waited on a threading.Event.
        assert handoff_counts["to_python"] >= n and waited["sleep_wait_s"] > 0
        assert waited["sleep_wait_s"] <= modes["wall_s"]
        return
    assert handoff_counts["to_loop"] >= n
    # Asleep on the futex means off the CPU: our sleep time fits in the time
    # the kernel saw the thread off the CPU, give or take the futex calls'
    # own few microseconds on the CPU inside each measured sleep.
    off_cpu = modes["wall_s"] - modes["on_cpu_s"]
    assert waited["sleep_wait_s"] <= off_cpu + 5e-6 * handoff_counts["futex_waits"] + 1e-3, (waited, modes)
    # Spinning means on the CPU, or runnable and waiting for it.
    assert waited["spin_wait_s"] <= modes["on_cpu_s"] + modes["runqueue_s"] + 1e-3, (waited, modes)
    if handoff in ("futex", "wake"):
        assert handoff_counts["futex_waits"] >= n // 2  # these sleep per exit, by design
        assert waited["sleep_wait_s"] > 0


@pytest.mark.parametrize("mode", ["inline", "loop"])
async def test_latency_histograms_record_every_handled_exit(mode):
    async with Machine() as vm:
        vm.add_device(Sink(), pio=(0x80, 1), mode=mode, name="sink")
        vm.load("exitloop", cmdline="n=2000 port=0x80")
        await vm.run(timeout=60)
        v = vm.stats()["vcpus"][0]
    handled = sum(v["paths"].values())
    for name in ("exit_to_handler", "handler", "handler_to_entry"):
        h = v["latency"][name]
        # every exit a handler saw, except the last (the vCPU never re-enters after it)
        assert handled - 1 <= h["count"] <= handled
        assert h["p50_us"] <= h["p99_us"] <= h["max_us"]
    assert v["latency"]["handler"]["p50_us"] > 0
    if mode == "loop":  # both sides of the handoff take time
        assert v["latency"]["exit_to_handler"]["p50_us"] > 0
        assert v["latency"]["handler_to_entry"]["p50_us"] > 0


async def test_sample_every_thins_the_latency_record():
    async with Machine(sample_every=10) as vm:
        vm.add_device(Sink(), pio=(0x80, 1), mode="inline", name="sink")
        vm.load("exitloop", cmdline="n=2000 port=0x80")
        await vm.run(timeout=60)
        v = vm.stats()["vcpus"][0]
    handled = sum(v["paths"].values())
    assert handled // 10 - 1 <= v["latency"]["handler"]["count"] <= handled // 10 + 1


@pytest.mark.kvm
def test_cli_stats_json_follows_the_schema(tmp_path):
    out = tmp_path / "stats.json"
    proc = subprocess.run([sys.executable, "-m", "aiokvm", "run", "exitloop", "--cmdline", "n=3000",
                           "--stats", "--stats-json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "latency (us)" in proc.stderr
    assert "handled in the kernel" in proc.stderr
    data = json.loads(out.read_text())
    assert data["schema"] == "aiokvm.stats/2"
    vcpu = data["vcpus"][0]
    assert vcpu["user_exits"] >= 3000
    for key in ("exits", "io_exits", "mmio_exits"):
        assert isinstance(vcpu["kvm"][key], int)
    assert set(vcpu["modes"]) >= {"guest_s", "user_s", "kernel_s", "wait_s", "wall_s"}
    assert data["pio"]["0x80/out"] == 3000
