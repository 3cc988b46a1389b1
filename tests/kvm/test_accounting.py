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
@pytest.mark.parametrize(("handoff", "mode"), [("spin", "loop"), ("futex", "loop"), ("event", "loop"),
                                               ("spin", "inline"), ("spin", None)])
async def test_modes_partition_the_vcpu_thread_wall_time(handoff, mode):
    n = 40000 if handoff == "spin" else 8000
    async with Machine(handoff=handoff) as vm:
        if mode:
            vm.add_device(Sink(), pio=(0x80, 1), mode=mode, name="sink")
        vm.load("exitloop", cmdline=f"n={n} port=0x80")
        await vm.run(timeout=120)
        v = vm.stats()["vcpus"][0]
    modes = v["modes"]
    parts = [modes[k] for k in ("guest_s", "user_s", "kernel_s", "wait_s")]
    assert all(p >= 0 for p in parts)
    assert sum(parts) <= modes["wall_s"] * 1.001  # a partition: nothing counted twice
    assert modes["accounted_fraction"] >= 0.95, modes
    if mode == "loop":
        assert modes["wait_s"] > 0  # time blocked on the loop-hosted handler is seen
        assert v["latency"]["handler"]["count"] > 0
    else:
        assert modes["wait_s"] == 0


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
    assert data["schema"] == "aiokvm.stats/1"
    vcpu = data["vcpus"][0]
    assert vcpu["user_exits"] >= 3000
    for key in ("exits", "io_exits", "mmio_exits"):
        assert isinstance(vcpu["kvm"][key], int)
    assert set(vcpu["modes"]) >= {"guest_s", "user_s", "kernel_s", "wait_s", "wall_s"}
    assert data["pio"]["0x80/out"] == 3000
