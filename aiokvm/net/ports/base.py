"""What every switch port is, and the counters they all keep."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

#: ``deliver(frames)``: frames that came in on this port, in order, for the switch
Deliver = Callable[[list[bytes]], None]


@dataclass
class PortCounters:
    """rx: frames from the outside into the switch; tx: frames the switch sent out."""

    rx_frames: int = 0
    rx_bytes: int = 0
    tx_frames: int = 0
    tx_bytes: int = 0
    drops: Counter = field(default_factory=Counter)  # by reason

    def as_dict(self) -> dict:
        return {"rx_frames": self.rx_frames, "rx_bytes": self.rx_bytes, "tx_frames": self.tx_frames,
                "tx_bytes": self.tx_bytes, "drops": dict(self.drops)}


class SwitchPort:
    """Base of every port.  Subclasses implement ``send`` (and ``aclose`` if they own I/O).

    ``attach(deliver, on_link)`` is called by the switch: ``deliver(frames)``
    takes a batch of frames that came in, ``on_link(up)`` takes link
    changes.  Until then, frames that come in are dropped and counted
    (``detached``).  Batches are how the cost per frame comes down: a guest's
    whole transmit notify, or a socket's whole readiness event, crosses the
    switch as one call, and each port it reaches gets its share as one
    ``send_many``.
    """

    kind = "port"

    def __init__(self, name: str) -> None:
        self.name = name
        self.counters = PortCounters()
        self.link_up = True
        self._deliver: Deliver | None = None
        self._on_link: Callable[[bool], None] | None = None

    def attach(self, deliver: Deliver, on_link: Callable[[bool], None]) -> None:
        self._deliver, self._on_link = deliver, on_link

    def detach(self) -> None:
        self._deliver = self._on_link = None

    def incoming(self, frame: bytes) -> None:
        """A frame from the outside: count it and hand it to the switch."""
        self.incoming_many([frame])

    def incoming_many(self, frames: list[bytes]) -> None:
        """Frames from the outside, in order: count them and hand them to the switch at once."""
        counters = self.counters
        if self._deliver is None:
            counters.drops["detached"] += len(frames)
            return
        counters.rx_frames += len(frames)
        counters.rx_bytes += sum(map(len, frames))
        self._deliver(frames)

    def set_link(self, up: bool) -> None:
        """The outside side's carrier changed; the switch hears of it."""
        up = bool(up)
        if up != self.link_up:
            self.link_up = up
            if self._on_link is not None:
                self._on_link(up)

    def send(self, frame: bytes) -> bool:
        """A frame from the switch to the outside.  Never blocks; False if dropped (counted)."""
        raise NotImplementedError

    def send_many(self, frames: list[bytes]) -> int:
        """Frames from the switch, in order; returns how many were not dropped.
        Ports that can take a batch more cheaply than frame by frame override it."""
        send = self.send
        return sum(1 for frame in frames if send(frame))

    def _sent(self, frame: bytes) -> None:
        self.counters.tx_frames += 1
        self.counters.tx_bytes += len(frame)

    def metrics(self) -> dict:
        return {"kind": self.kind, "link_up": self.link_up, **self.counters.as_dict()}

    async def aclose(self) -> None:
        self.detach()
