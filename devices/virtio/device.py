"""What a virtio device is, independent of its transport (cf. Firecracker's
``VirtioDevice`` and ``VirtioInterrupt``).

A device owns its config space, its queues' work and its backend; the
transport (``mmio.py``) owns feature negotiation, queue setup, the status
state machine and the interrupt status register.  The two meet here:

- the transport calls the device through ``VirtioDevice``;
- the device raises interrupts through the ``VirtioInterrupt`` it is given
  at activation, naming the kind (``InterruptKind``): it never sees the
  transport's registers or constants.

Adding a virtio device means writing a class that satisfies ``VirtioDevice``
(and a backend if it has one), and one ``Machine.add_*`` line that hands it
to ``DeviceManager.attach_virtio``.
"""

from __future__ import annotations

import asyncio
from enum import IntEnum
from typing import Protocol, runtime_checkable

from .queue import SplitQueue

# Feature bits every device may offer (virtio 1.x, section 6).
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32


class InterruptKind(IntEnum):
    """Why the device interrupts the driver (the bits of the ISR / InterruptStatus)."""

    USED_BUFFER = 1    # a queue's used ring moved
    CONFIG_CHANGE = 2  # the config space changed (the transport bumps ConfigGeneration)


class VirtioInterrupt(Protocol):
    def trigger(self, kind: InterruptKind) -> None:
        """Interrupt the driver.  The device decides how often (EVENT_IDX, batching)."""

    def needs_reset(self, why: str) -> None:
        """The driver broke the rules outside a notify (e.g. a hostile receive
        ring met while delivering a frame): NEEDS_RESET, as a ``VirtqueueError``
        raised from ``notify`` would."""


@runtime_checkable
class VirtioDevice(Protocol):
    """What a transport drives.

    ``features`` are the device's offered bits (the transport adds
    VERSION_1).  ``activate`` gets the negotiated features and one
    ``SplitQueue`` per queue (None for a queue the driver left disabled).
    ``notify(queue)`` runs on the event loop for every QueueNotify (or its
    ioeventfd); a ``VirtqueueError`` raised from it or from ``activate``
    puts the device in NEEDS_RESET.

    ``reset()`` forgets the driver's setup.  It returns None when nothing of
    the old setup can still touch guest memory, or an ``asyncio.Future``
    that resolves once nothing can (requests in flight drained, as QEMU
    drains on reset): the transport holds the resetting vCPU until then.

    ``metrics()`` returns the device's counters as plain data, and
    ``aclose()`` waits for its work and releases its backend.
    """

    device_id: int
    features: int
    queue_max_sizes: tuple[int, ...]

    def read_config(self, offset: int, size: int) -> int: ...

    def write_config(self, offset: int, size: int, value: int) -> None: ...

    def activate(self, memory, queues: list[SplitQueue | None], features: int,
                 interrupt: VirtioInterrupt) -> None: ...

    def notify(self, queue: int) -> None: ...

    def reset(self) -> asyncio.Future | None: ...

    def metrics(self) -> dict: ...

    async def aclose(self) -> None: ...
