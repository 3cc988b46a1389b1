"""A VM's NIC as a switch port: a ``VirtioNet`` device on one side, the switch on the other."""

from __future__ import annotations

from .base import SwitchPort


class NicPort(SwitchPort):
    """Frames the guest transmits come in; frames the switch sends go into the
    guest's receive buffers (or the device's bounded hold, or are dropped:
    the device counts why)."""

    kind = "nic"

    def __init__(self, name: str, device) -> None:
        super().__init__(name)
        self.device = device
        device.connect(self.incoming)

    def send(self, frame: bytes) -> bool:
        if self.device.receive(frame):
            self._sent(frame)
            return True
        self.counters.drops["guest"] += 1  # link down, no room: the device's counters say which
        return False

    def set_link(self, up: bool) -> None:
        self.device.set_link(up)  # the guest sees the carrier too
        super().set_link(up)

    async def aclose(self) -> None:
        self.device.connect(None)
        await super().aclose()
