"""A device that raises, or answers a read with nonsense, stops the machine
with a DeviceError naming it and the access, on every dispatch path."""

from __future__ import annotations

import pytest

from aiokvm import Machine
from aiokvm.errors import DeviceError

pytestmark = pytest.mark.kvm


class Faulty:
    """Raises on the nth access; reads answer ``answer`` until then."""

    def __init__(self, answer=0, fail_at: int = 5) -> None:
        self.answer = answer
        self.fail_at = fail_at
        self.accesses = 0

    def _tick(self) -> None:
        self.accesses += 1
        if self.accesses == self.fail_at:
            raise ValueError("register exploded")

    def read(self, offset, size):
        self._tick()
        return self.answer

    def write(self, offset, size, value):
        self._tick()


@pytest.mark.parametrize(("mode", "handoff"), [("inline", "spin"), ("loop", "spin"), ("loop", "futex"),
                                               ("loop", "event")])
@pytest.mark.parametrize("direction", ["out", "in"])
async def test_a_raising_device_is_named_with_its_access(mode, handoff, direction):
    async with Machine(handoff=handoff) as vm:
        dev = Faulty()
        vm.add_device(dev, pio=(0x80, 1), mode=mode, name="widget")
        vm.load("exitloop", cmdline=f"n=100 port=0x80 mode={direction}")
        with pytest.raises(DeviceError, match=rf"widget failed on {direction} port 0x80 size 1: ValueError") as info:
            await vm.run(timeout=60)
    assert isinstance(info.value.__cause__, ValueError)
    assert dev.accesses == 5  # stopped at the failing access, not later


@pytest.mark.parametrize("mode", ["inline", "loop"])
@pytest.mark.parametrize(("answer", "why"), [(None, "TypeError"), ("0", "TypeError")])
async def test_a_read_answered_with_a_non_integer_is_a_device_error(mode, answer, why):
    async with Machine() as vm:
        vm.add_device(Faulty(answer=answer, fail_at=-1), pio=(0x80, 1), mode=mode, name="widget")
        vm.load("exitloop", cmdline="n=10 port=0x80 mode=in")
        with pytest.raises(DeviceError, match=f"widget failed on in port 0x80 size 1: {why}"):
            await vm.run(timeout=60)


class WideEcho:
    """The iostress register (a read returns ~ the last write), but every
    answer is negative and wider than 64 bits: only its low bytes are right."""

    def __init__(self) -> None:
        self.last = 0

    def write(self, offset, size, value):
        self.last = value

    def read(self, offset, size):
        return -1 << 70 | (~self.last & ((1 << 8 * size) - 1))


@pytest.mark.parametrize("mode", ["inline", "loop"])
@pytest.mark.parametrize("size", [1, 4])
async def test_out_of_range_read_values_keep_their_low_bytes(mode, size):
    # The guest checks every read against ~(its last write): it sees the low
    # `size` bytes (two's complement), as a hardware bus would.
    async with Machine() as vm:
        vm.add_device(WideEcho(), pio=(0x510, 4), mode=mode, name="widget")
        vm.load("iostress", cmdline=f"n=300 seed=7 size={size} base=0x510")
        status = await vm.run(timeout=60)
        output = vm.console.output.decode()
    assert status.code == 0, output
    assert "0 errors" in output
