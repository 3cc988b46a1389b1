"""An in-memory cable between two switches on one event loop.

``cable(a_name, b_name)`` returns two ``LinkPort``s; whatever one is sent
comes in on the other.  Delivery goes through ``call_soon`` with a bounded
queue per direction, not a direct call: a frame that loops between switches
(STP off, a ring) must not recurse, and a storm is bounded and counted
(``drops["queue_full"]``) instead of growing without limit.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .base import SwitchPort

QUEUE_FRAMES = 1024


class LinkPort(SwitchPort):
    kind = "link"

    def __init__(self, name: str, *, queue_frames: int = QUEUE_FRAMES) -> None:
        super().__init__(name)
        self.peer: LinkPort | None = None
        self._queue: deque[bytes] = deque()
        self._limit = queue_frames
        self._scheduled = False

    def send(self, frame: bytes) -> bool:
        peer = self.peer
        if peer is None or not self.link_up:
            self.counters.drops["unplugged" if peer is None else "link_down"] += 1
            return False
        if len(self._queue) >= self._limit:
            self.counters.drops["queue_full"] += 1
            return False
        self._queue.append(bytes(frame))
        self._sent(frame)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return True

    def _flush(self) -> None:
        self._scheduled = False
        queue, peer = self._queue, self.peer
        # What is queued now, as one batch; frames queued meanwhile wait for the next turn.
        frames = [queue.popleft() for _ in range(len(queue))]
        if peer is not None and frames:
            peer.incoming_many(frames)

    def unplug(self) -> None:
        """Pull the cable: both ends lose carrier."""
        peer, self.peer = self.peer, None
        self._queue.clear()
        self.set_link(False)
        if peer is not None:
            peer.peer = None
            peer._queue.clear()
            peer.set_link(False)

    async def aclose(self) -> None:
        self.unplug()
        await super().aclose()


def cable(a_name: str, b_name: str, *, queue_frames: int = QUEUE_FRAMES) -> tuple[LinkPort, LinkPort]:
    a, b = LinkPort(a_name, queue_frames=queue_frames), LinkPort(b_name, queue_frames=queue_frames)
    a.peer, b.peer = b, a
    return a, b
