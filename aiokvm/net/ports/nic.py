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
        device.connect(self.incoming_many)

    def send(self, frame: bytes) -> bool:
        return self.send_many([frame]) == 1

    def send_many(self, frames: list[bytes]) -> int:
        accepted, accepted_bytes = self.device.receive_many(frames)
        counters = self.counters
        counters.tx_frames += accepted
        counters.tx_bytes += accepted_bytes
        if accepted < len(frames):
            # link down, no room: the device's counters say which
            counters.drops["guest"] += len(frames) - accepted
        return accepted

    def set_link(self, up: bool) -> None:
        self.device.set_link(up)  # the guest sees the carrier too
        super().set_link(up)

    async def aclose(self) -> None:
        self.device.connect(None)
        await super().aclose()
