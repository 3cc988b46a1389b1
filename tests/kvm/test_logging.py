"""What an operator sees in the logs: machine lifecycle with ``vm`` bound,
device errors with ``device`` bound, and nothing per exit."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from aiokvm import Machine

pytestmark = pytest.mark.kvm


async def test_lifecycle_events_carry_the_vm_name_and_nothing_is_logged_per_exit():
    with capture_logs() as logs:
        async with Machine(name="logged") as vm:
            vm.load("exitloop", cmdline="n=200000 port=0x80")
            task = asyncio.create_task(vm.run(timeout=60))
            while vm.stats()["unclaimed"]["pio"]["writes"] < 100:
                await asyncio.sleep(0.002)
            await vm.pause()
            vm.resume()
            status = await task
    events = [e["event"] for e in logs]
    assert events == ["machine created", "machine started", "machine paused", "machine resumed",
                      "machine stopped", "machine closed"]
    assert all(e["vm"] == "logged" for e in logs)
    stopped = next(e for e in logs if e["event"] == "machine stopped")
    assert (stopped["reason"], stopped["code"]) == ("debug-exit", status.code) == ("debug-exit", 0)


async def test_a_guest_error_is_logged_once_with_its_cause():
    with capture_logs() as logs:
        async with Machine(name="faulty") as vm:
            vm.load("triplefault")
            with pytest.raises(Exception, match="triple-faulted"):
                await vm.run(timeout=60)
    [error] = [e for e in logs if e["event"] == "machine stopped on an error"]
    assert error["error_type"] == "GuestError" and error["vm"] == "faulty"


async def test_a_virtio_device_error_is_logged_with_the_device_name(tmp_path):
    from aiokvm.devices.backends.memory import MemoryBackend
    from aiokvm.devices.virtio import mmio

    with capture_logs() as logs:
        async with Machine(name="dev") as vm:
            await vm.add_disk(MemoryBackend(64 * 512))
            transport = vm.devices.get("virtio7")
            transport.device_error("descriptor 3 points outside RAM")  # what a hostile ring causes
            assert transport.read(mmio.STATUS, 4) & mmio.NEEDS_RESET
    [event] = [e for e in logs if e["event"] == "virtio device needs reset"]
    assert event["device"] == "virtio7" and event["vm"] == "dev" and event["kind"] == "virtio-blk"
