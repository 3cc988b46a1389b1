"""Test helpers for device models.  Nothing here runs in a real machine.

``VirtqueueDriver`` plays the guest driver of one split virtqueue inside a
``GuestMemory``, so a device model can be driven without KVM::

    mem = GuestMemory("4M")
    drv = VirtqueueDriver(mem, 16, 0x10000)
    q = SplitQueue(mem, 16, drv.desc_addr, drv.avail_addr, drv.used_addr)
    head = drv.add([b"request"], [64])
    chain = q.pop()
    q.push(chain.head, chain.scatter(mem, b"reply"))
    assert drv.used() == [(head, 5)]
    assert drv.read_writable(head)[0][:5] == b"reply"

Buffers come from a data area after the rings (up to the end of the RAM range
that holds ``base``, or ``data_size`` bytes).  It is a bump allocator that
starts over whenever ``add`` finds no chain of its own in flight, so the
buffers of completed chains stay readable until the next ``add``.
``add_raw``, ``write_table``, ``publish`` and ``set_avail_idx`` write whatever
they are given, for crafting hostile rings.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from aiokvm.devices.virtio.queue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DESC_SIZE,
    need_event,
)

__all__ = ["VirtqueueDriver"]

_DESC = struct.Struct("<QIHH")


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


@dataclass
class _Outstanding:
    descriptors: list[int]
    writable: list[tuple[int, int]]


class VirtqueueDriver:
    """Plays the guest driver for one split virtqueue in a GuestMemory."""

    def __init__(self, memory, size: int, base: int, *, event_idx: bool = False, data_size: int | None = None):
        if size < 1 or size & (size - 1):
            raise ValueError(f"queue size {size} is not a power of two")
        self.memory = memory
        self.size = size
        self.event_idx = event_idx
        self.desc_addr = _align(base, 16)
        self.avail_addr = self.desc_addr + DESC_SIZE * size
        self.used_addr = _align(self.avail_addr + 6 + 2 * size, 4)
        self.data_addr = _align(self.used_addr + 6 + 8 * size, 16)
        if data_size is None:
            ends = [start + length for start, length in memory.ram_ranges() if start <= base < start + length]
            if not ends:
                raise ValueError(f"base {base:#x} is not in guest RAM")
            self.data_end = ends[0]
        else:
            self.data_end = self.data_addr + data_size
        if not memory.contains(self.desc_addr, self.data_end - self.desc_addr):
            raise ValueError("the rings and data area do not fit in guest RAM")
        memory.write(self.desc_addr, bytes(self.data_addr - self.desc_addr))
        self._data_next = self.data_addr
        self._free: deque[int] = deque(range(size))
        self._outstanding: dict[int, _Outstanding] = {}
        self._completed: dict[int, list[tuple[int, int]]] = {}
        self.avail_idx = 0      # the driver's shadow of avail.idx
        self.last_used_idx = 0  # used.idx as of the last used() call
        self._kick_old = 0

    # -- ring fields ------------------------------------------------------------------
    @property
    def used_event_addr(self) -> int:
        return self.avail_addr + 4 + 2 * self.size

    @property
    def avail_event_addr(self) -> int:
        return self.used_addr + 4 + 8 * self.size

    @property
    def avail_event(self) -> int:
        return self.memory.read_u16(self.avail_event_addr)

    @property
    def used_flags(self) -> int:
        return self.memory.read_u16(self.used_addr)

    @property
    def free_descriptors(self) -> int:
        return len(self._free)

    def set_used_event(self, idx: int) -> None:
        self.memory.write_u16(self.used_event_addr, idx & 0xFFFF)

    def set_no_interrupt(self, flag: bool) -> None:
        self.memory.write_u16(self.avail_addr, 1 if flag else 0)

    def program(self, write, index: int) -> None:
        """Set this queue up as queue ``index`` of a virtio-mmio transport and make it
        ready, the way a driver does: ``write(offset, value)`` writes a 32-bit register."""
        from .devices.virtio import mmio

        write(mmio.QUEUE_SEL, index)
        write(mmio.QUEUE_NUM, self.size)
        for reg, addr in ((mmio.QUEUE_DESC_LOW, self.desc_addr), (mmio.QUEUE_DRIVER_LOW, self.avail_addr),
                          (mmio.QUEUE_DEVICE_LOW, self.used_addr)):
            write(reg, addr & 0xFFFFFFFF)
            write(reg + 4, addr >> 32)
        write(mmio.QUEUE_READY, 1)

    def start_at(self, idx: int) -> None:
        """Pretend the queue already carried ``idx`` chains: avail.idx = used.idx = idx.

        Pair it with ``queue.last_avail_idx = queue.next_used = idx`` on the device side.
        """
        if self._outstanding:
            raise RuntimeError("start_at() with chains in flight")
        idx &= 0xFFFF
        self.avail_idx = self.last_used_idx = self._kick_old = idx
        self.memory.write_u16(self.avail_addr + 2, idx)
        self.memory.write_u16(self.used_addr + 2, idx)

    # -- buffers ------------------------------------------------------------------------
    def alloc(self, length: int, data: bytes = b"", *, align: int = 16) -> int:
        """Reserve ``length`` bytes in the data area (zeroed, then ``data`` at the start)."""
        addr = _align(self._data_next, align)
        if addr + length > self.data_end:
            raise RuntimeError(f"data area exhausted: {length} bytes do not fit")
        self.memory.write(addr, bytes(length))
        if data:
            self.memory.write(addr, data)
        self._data_next = addr + length
        return addr

    def write_table(self, addr: int, descriptors: list[tuple[int, int, int, int]]) -> None:
        """Write raw ``(addr, len, flags, next)`` descriptors at a guest address (an indirect table)."""
        self.memory.write(addr, b"".join(_DESC.pack(*d) for d in descriptors))

    # -- available ring --------------------------------------------------------------
    def publish(self, head: int) -> None:
        """Put ``head`` in the next avail ring slot and bump avail.idx (element first)."""
        self.memory.write_u16(self.avail_addr + 4 + 2 * (self.avail_idx % self.size), head & 0xFFFF)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail_addr + 2, self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        """Write avail.idx directly (e.g. to jump ahead of the device)."""
        self.avail_idx = idx & 0xFFFF
        self.memory.write_u16(self.avail_addr + 2, self.avail_idx)

    def add(self, readable: list[bytes], writable: list[int], *, indirect: bool = False) -> int:
        """Make a chain of ``readable`` buffers then ``writable`` buffers of the given sizes available.

        With ``indirect`` the chain is an indirect table with one descriptor
        pointing at it.  Returns the head index.
        """
        count = len(readable) + len(writable)
        if count == 0:
            raise ValueError("a chain needs at least one buffer")
        needed = 1 if indirect else count
        if len(self._free) < needed:
            raise RuntimeError(f"queue full: {needed} descriptors needed, {len(self._free)} free")
        if not self._outstanding:
            self._data_next = self.data_addr
        buffers = [(self.alloc(len(data), data), len(data), 0) for data in readable]
        buffers += [(self.alloc(length), length, DESC_F_WRITE) for length in writable]
        descriptors = [self._free.popleft() for _ in range(needed)]
        if indirect:
            table = [(addr, length, flags | (DESC_F_NEXT if i + 1 < count else 0), i + 1 if i + 1 < count else 0)
                     for i, (addr, length, flags) in enumerate(buffers)]
            table_addr = self.alloc(DESC_SIZE * count)
            self.write_table(table_addr, table)
            self._write_desc(descriptors[0], (table_addr, DESC_SIZE * count, DESC_F_INDIRECT, 0))
        else:
            for i, (addr, length, flags) in enumerate(buffers):
                last = i + 1 == count
                self._write_desc(descriptors[i], (addr, length, flags | (0 if last else DESC_F_NEXT),
                                                  0 if last else descriptors[i + 1]))
        head = descriptors[0]
        self._outstanding[head] = _Outstanding(descriptors, [(a, n) for a, n, f in buffers if f & DESC_F_WRITE])
        self.publish(head)
        return head

    def add_raw(self, descriptors: list[tuple[int, int, int, int]], *, head: int = 0, publish: bool = True) -> int:
        """Write raw ``(addr, len, flags, next)`` entries at table indexes ``head, head+1, ...``.

        Those slots leave the free list (``add`` will not reuse them).  With
        ``publish``, ``head`` is made available.  Returns ``head``.
        """
        if head < 0 or head + len(descriptors) > self.size:
            raise ValueError(f"{len(descriptors)} descriptors at index {head} do not fit in {self.size}")
        for i, desc in enumerate(descriptors):
            if head + i in self._free:
                self._free.remove(head + i)
            self._write_desc(head + i, desc)
        if publish:
            self.publish(head)
        return head

    def _write_desc(self, index: int, desc: tuple[int, int, int, int]) -> None:
        self.memory.write(self.desc_addr + DESC_SIZE * index, _DESC.pack(*desc))

    def should_kick(self) -> bool:
        """Should the driver notify the device for the chains published since the last call?"""
        old, new = self._kick_old, self.avail_idx
        self._kick_old = new
        if old == new:
            return False
        if self.event_idx:
            return need_event(self.avail_event, new, old)
        return not self.used_flags & 1

    # -- used ring ---------------------------------------------------------------------
    def used(self) -> list[tuple[int, int]]:
        """New used elements ``(id, len)`` since the last call; frees their descriptors."""
        new = self.memory.read_u16(self.used_addr + 2)
        count = (new - self.last_used_idx) & 0xFFFF
        if count > self.size:
            raise RuntimeError(f"used.idx {new} is {count} ahead of {self.last_used_idx} (size {self.size})")
        elements = []
        for i in range(count):
            slot = (self.last_used_idx + i) % self.size
            head = self.memory.read_u32(self.used_addr + 4 + 8 * slot)
            length = self.memory.read_u32(self.used_addr + 8 + 8 * slot)
            elements.append((head, length))
            chain = self._outstanding.pop(head, None)
            if chain is not None:
                self._free.extend(chain.descriptors)
                self._completed[head] = chain.writable
        self.last_used_idx = new
        return elements

    def read_writable(self, head: int) -> list[bytes]:
        """Contents of each writable buffer (whole buffers) of a chain ``used()`` returned."""
        if head not in self._completed:
            raise ValueError(f"head {head} has not completed (call used() first)")
        return [self.memory.read(addr, length) for addr, length in self._completed[head]]


class LinkSimulator:
    """Wires ``Bridge`` ports together in memory and runs them in injected time.

    ``connect(br1, "p1", br2, "p1")`` joins two ports by a cable;
    ``attach_host(br, "h1")`` gives a port a host that records what it
    receives.  ``inject(br, port, frame)`` plays a frame received on a port
    and delivers everything that results, hop by hop, until the network is
    quiet (or ``max_frames`` were delivered: a loop).  ``run(seconds)``
    advances the clock in ``step`` increments and ticks every bridge.
    """

    def __init__(self, *, step: float = 0.25, max_frames: int = 100_000) -> None:
        self.now = 0.0
        self.step = step
        self.max_frames = max_frames
        self.bridges: list = []
        self._wires: dict[tuple[int, str], tuple[object, str]] = {}
        self.hosts: dict[tuple[int, str], list[bytes]] = {}
        self.delivered = 0

    def _add(self, br) -> None:
        if all(b is not br for b in self.bridges):
            self.bridges.append(br)

    def connect(self, a, a_port: str, b, b_port: str) -> None:
        self._add(a)
        self._add(b)
        self._wires[(id(a), a_port)] = (b, b_port)
        self._wires[(id(b), b_port)] = (a, a_port)

    def disconnect(self, a, a_port: str) -> None:
        peer = self._wires.pop((id(a), a_port), None)
        if peer is not None:
            self._wires.pop((id(peer[0]), peer[1]), None)
            self._deliver(a.set_port_link(a_port, False, self.now), a)
            self._deliver(peer[0].set_port_link(peer[1], False, self.now), peer[0])

    def attach_host(self, br, port: str) -> list[bytes]:
        self._add(br)
        received: list[bytes] = []
        self.hosts[(id(br), port)] = received
        return received

    def inject(self, br, port: str, frame: bytes) -> None:
        self._deliver(br.receive(port, frame, self.now), br)

    def _deliver(self, out, source) -> None:
        queue = deque((source, port, frame) for port, frame in out)
        budget = self.max_frames  # per burst: a loop detector, not a lifetime cap
        while queue:
            br, port, frame = queue.popleft()
            self.delivered += 1
            budget -= 1
            if budget < 0:
                raise RuntimeError("frame storm: more than max_frames deliveries (a forwarding loop?)")
            host = self.hosts.get((id(br), port))
            if host is not None:
                host.append(frame)
                continue
            peer = self._wires.get((id(br), port))
            if peer is None:
                continue  # an unplugged port
            peer_br, peer_port = peer
            queue.extend((peer_br, p, f) for p, f in peer_br.receive(peer_port, frame, self.now))

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = min(self.now + self.step, end)
            for br in self.bridges:
                self._deliver(br.tick(self.now), br)
