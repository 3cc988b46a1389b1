"""Split virtqueue, device side (virtio 1.x, section 2.7 "Split Virtqueues").

Sans-I/O: a ``SplitQueue`` reads and writes guest memory through
``aiokvm.memory.GuestMemory`` and nothing else.  It never interrupts the guest
itself; ``needs_notification()`` says whether the device should.

Layout in guest memory (all little-endian)::

    descriptor table  16 * Q bytes, align 16   {u64 addr; u32 len; u16 flags; u16 next}
    available ring    6 + 2 * Q bytes, align 2 {u16 flags; u16 idx; u16 ring[Q]; u16 used_event}
    used ring         6 + 8 * Q bytes, align 4 {u16 flags; u16 idx; {u32 id; u32 len} ring[Q]; u16 avail_event}

Threat model: the driver is hostile.  Every index, address, length and flag
that comes out of guest memory is checked before it is used, each descriptor
is read exactly once (a driver rewriting a descriptor while we walk it cannot
make us act on a value we did not check), and every walk is bounded.  A
driver that breaks the rules gets ``VirtqueueError``; the transport then sets
DEVICE_NEEDS_RESET.  The error is sticky: once raised, ``pop`` and ``push``
raise it again until the queue is rebuilt (a device reset builds a new one).

What ``pop`` rejects (each with a message saying which rule and where):

- ``avail.idx`` more than Q entries ahead of the last index the device consumed;
- a head index >= Q, or a head the device still holds (popped, not yet pushed);
- a ``next`` index outside the table it indexes (Q, or the indirect table's length);
- a chain longer than its table (Q direct entries, or the indirect table's
  entry count): this is how loops are caught;
- more than ``max_chain`` buffers in total (every descriptor except one that
  points at an indirect table), when ``max_chain`` is given;
- a buffer ``[addr, addr+len)`` that wraps past 2**64 or is not inside one RAM range;
- a device-readable descriptor after a device-writable one;
- INDIRECT together with NEXT, INDIRECT when VIRTIO_F_INDIRECT_DESC was not
  negotiated, or INDIRECT inside an indirect table;
- an indirect table whose length is 0, not a multiple of 16, above 16 * 32768,
  or not inside RAM.

Accepted as the spec allows: a chain of direct descriptors ending in one
INDIRECT descriptor (the WRITE flag of that descriptor is ignored); unknown
flag bits (ignored).  Zero-length descriptors are kept in
``DescriptorChain.readable`` / ``writable`` as ``(addr, 0)``, so the chain mirrors
the descriptor table; their address must still lie inside RAM (at most at the
end of a range), so every ``(addr, len)`` pair a chain holds is safe to pass to
``GuestMemory.view``.

Memory ordering: the element is written before ``used.idx`` (x86 keeps stores
in order).  Before reading ``used_event``/``avail.flags`` after publishing, and
after writing ``avail_event``/``used.flags`` before re-checking ``avail.idx``,
the spec asks for a full barrier; pure Python has none, so ``_full_barrier``
takes and drops a lock (CPython's lock is an atomic read-modify-write, a full
fence on x86).
"""

from __future__ import annotations

import struct
import threading
from typing import NamedTuple

from aiokvm.errors import AiokvmError

from .chain import ChainReader, ChainWriter

__all__ = [
    "DESC_F_INDIRECT",
    "DESC_F_NEXT",
    "DESC_F_WRITE",
    "MAX_QUEUE_SIZE",
    "DescriptorChain",
    "SplitQueue",
    "VirtqueueError",
    "need_event",
]

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4

AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768
DESC_SIZE = 16
MAX_INDIRECT_LEN = DESC_SIZE * MAX_QUEUE_SIZE
U64_LIMIT = 1 << 64

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")

_barrier_lock = threading.Lock()


def _full_barrier() -> None:
    with _barrier_lock:
        pass


def need_event(event: int, new_idx: int, old_idx: int) -> bool:
    """The EVENT_IDX rule: has the index moved from ``old_idx`` to ``new_idx`` past ``event``?

    True when ``event`` is in ``[old_idx, new_idx)`` modulo 2**16, i.e.
    ``(u16)(new - event - 1) < (u16)(new - old)``.
    """
    return ((new_idx - event - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class VirtqueueError(AiokvmError):
    """The driver broke the virtqueue rules; the device must go to DEVICE_NEEDS_RESET."""


class DescriptorChain(NamedTuple):
    """One available descriptor chain, already validated.

    ``readable`` and ``writable`` hold ``(guest address, length)`` of the
    device-readable and device-writable buffers in chain order (indirect
    tables flattened), zero-length buffers included.  (A named tuple: one
    is built per request, and a frozen dataclass costs several times more.)
    ``chain.ChainReader`` / ``chain.ChainWriter`` read and write them as one
    byte stream each.
    """

    head: int
    readable: tuple[tuple[int, int], ...]
    writable: tuple[tuple[int, int], ...]

    @property
    def readable_len(self) -> int:
        return sum(length for _addr, length in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(length for _addr, length in self.writable)

    def gather(self, memory) -> bytes:
        """All readable bytes, concatenated."""
        reader = ChainReader(memory, self.readable)
        return reader.read(reader.remaining)

    def scatter(self, memory, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` across the writable buffers in order; returns the byte count.

        Raises ``ChainBoundsError`` (a ``ValueError``), writing nothing, if
        ``data`` is longer than ``writable_len``.  For anything more than one
        blob each way, use ``ChainReader`` / ``ChainWriter`` directly.
        """
        writer = ChainWriter(memory, self.writable)
        writer.write(data)
        return writer.written


class SplitQueue:
    """Device side of one split virtqueue in guest memory.

    ``pop()`` hands out validated chains; ``push(head, written)`` returns them;
    ``needs_notification()`` after a batch of pushes says whether to interrupt.
    ``last_avail_idx`` (next avail entry to consume) and ``next_used`` (next
    used index to publish) are free-running 16-bit counters; both may be set
    before first use to restore a queue's state.
    """

    def __init__(
        self,
        memory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        max_chain: int | None = None,
    ) -> None:
        if not isinstance(size, int) or not 1 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise VirtqueueError(f"queue size {size!r} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        if max_chain is not None and max_chain < 1:
            raise ValueError(f"max_chain must be at least 1, not {max_chain}")
        regions = (
            ("descriptor table", desc_addr, DESC_SIZE * size, 16),
            ("available ring", avail_addr, 6 + 2 * size, 2),
            ("used ring", used_addr, 6 + 8 * size, 4),
        )
        for name, addr, length, align in regions:
            if addr < 0 or addr % align:
                raise VirtqueueError(f"{name} address {addr:#x} is not {align}-byte aligned")
            if not memory.contains(addr, length):
                raise VirtqueueError(f"{name} [{addr:#x}, +{length:#x}) is not inside guest RAM")
        self.memory = memory
        self.size = size
        self.desc_addr = desc_addr
        self.avail_addr = avail_addr
        self.used_addr = used_addr
        self.event_idx = event_idx
        self.indirect = indirect
        self.max_chain = max_chain
        # Views stay valid as long as guest memory does (RAM is never remapped).
        self._desc = memory.view(desc_addr, DESC_SIZE * size)
        self._avail = memory.view(avail_addr, 6 + 2 * size)
        self._used = memory.view(used_addr, 6 + 8 * size)
        self.last_avail_idx = 0
        self._next_used = 0
        self._signalled_used = 0
        self._in_flight: dict[int, int] = {}  # head -> writable_len
        self.num_popped = 0
        self.num_pushed = 0
        self.errors = 0
        self.failure: VirtqueueError | None = None

    # -- state -------------------------------------------------------------------------
    @property
    def next_used(self) -> int:
        return self._next_used

    @next_used.setter
    def next_used(self, value: int) -> None:
        self._next_used = value & 0xFFFF
        self._signalled_used = self._next_used

    @property
    def in_flight(self) -> int:
        """Chains popped and not yet pushed."""
        return len(self._in_flight)

    def _avail_idx(self) -> int:
        return _U16.unpack_from(self._avail, 2)[0]

    def has_available(self) -> bool:
        """Is there an available chain the device has not popped yet?"""
        return self._avail_idx() != self.last_avail_idx

    def _fail(self, message: str) -> VirtqueueError:
        self.errors += 1
        self.failure = VirtqueueError(message)
        return self.failure

    # -- available ring ------------------------------------------------------------------
    def pop(self) -> DescriptorChain | None:
        """The next available chain, walked and validated, or None if there is none."""
        if self.failure is not None:
            raise self.failure
        last = self.last_avail_idx
        avail_idx = _U16.unpack_from(self._avail, 2)[0]
        pending = (avail_idx - last) & 0xFFFF
        if pending == 0:
            return None
        size = self.size
        if pending > size:
            raise self._fail(
                f"avail.idx {avail_idx} is {pending} entries ahead of the device's {last} (queue size {size})"
            )
        slot = last % size
        head = _U16.unpack_from(self._avail, 4 + 2 * slot)[0]
        if head >= size:
            raise self._fail(f"avail.ring[{slot}] holds head {head}, not below queue size {size}")
        if head in self._in_flight:
            raise self._fail(f"avail.ring[{slot}] holds head {head}, which the device still holds")
        chain, writable_len = self._walk(head)
        self.last_avail_idx = (last + 1) & 0xFFFF
        self._in_flight[head] = writable_len
        self.num_popped += 1
        return chain

    def _walk(self, head: int) -> tuple[DescriptorChain, int]:
        """The chain at ``head`` and its writable length.  Runs once per request:
        everything it touches per descriptor is a local."""
        contains = self.memory.contains
        unpack = _DESC.unpack_from
        # A chain of one plain descriptor (a network buffer, most often): the
        # same checks as below, without the loop's bookkeeping.
        addr, length, flags, _nxt = unpack(self._desc, DESC_SIZE * head)
        if not flags & (DESC_F_NEXT | DESC_F_INDIRECT) and addr + length <= U64_LIMIT and contains(addr, length):
            if flags & DESC_F_WRITE:
                return DescriptorChain(head, (), ((addr, length),)), length
            return DescriptorChain(head, ((addr, length),), ()), 0
        max_chain = self.max_chain
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        writable_len = 0
        table = self._desc
        table_len = self.size
        where = "descriptor"
        index = head
        count = 0  # descriptors read from the current table
        total = 0  # buffers (descriptors other than an indirect-table pointer)
        while True:
            count += 1
            if count > table_len:
                raise self._fail(
                    f"chain at head {head} is longer than its {where} table ({table_len} entries): a loop"
                )
            addr, length, flags, nxt = unpack(table, DESC_SIZE * index)
            if flags & DESC_F_INDIRECT:
                if table is not self._desc:
                    raise self._fail(f"chain at head {head}: indirect descriptor inside an indirect table")
                if not self.indirect:
                    raise self._fail(
                        f"chain at head {head}: descriptor {index} is INDIRECT but VIRTIO_F_INDIRECT_DESC"
                        " was not negotiated"
                    )
                if flags & DESC_F_NEXT:
                    raise self._fail(f"chain at head {head}: descriptor {index} has both INDIRECT and NEXT")
                if length == 0 or length % DESC_SIZE or length > MAX_INDIRECT_LEN:
                    raise self._fail(
                        f"chain at head {head}: indirect table length {length} is not a positive multiple"
                        f" of 16 up to {MAX_INDIRECT_LEN}"
                    )
                if addr + length > U64_LIMIT or not contains(addr, length):
                    raise self._fail(
                        f"chain at head {head}: indirect table [{addr:#x}, +{length:#x}) is not inside guest RAM"
                    )
                table = self.memory.view(addr, length)
                table_len = length // DESC_SIZE
                where = "indirect"
                index = 0
                count = 0
                continue
            total += 1
            if max_chain is not None and total > max_chain:
                raise self._fail(f"chain at head {head} has more than {max_chain} buffers")
            if addr + length > U64_LIMIT:
                raise self._fail(f"chain at head {head}: buffer {addr:#x} + {length:#x} wraps past 2**64")
            if not contains(addr, length):
                raise self._fail(
                    f"chain at head {head}: buffer [{addr:#x}, +{length:#x}) is not inside guest RAM"
                )
            if flags & DESC_F_WRITE:
                writable.append((addr, length))
                writable_len += length
            elif writable:
                raise self._fail(f"chain at head {head}: device-readable buffer after a device-writable one")
            else:
                readable.append((addr, length))
            if not flags & DESC_F_NEXT:
                return DescriptorChain(head, tuple(readable), tuple(writable)), writable_len
            if nxt >= table_len:
                raise self._fail(
                    f"chain at head {head}: next index {nxt} is outside the {where} table ({table_len} entries)"
                )
            index = nxt

    # -- used ring ------------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` with ``written`` bytes written; publishes ``used.idx``.

        ``ValueError`` for device bugs: a head that is not in flight, or
        ``written`` above the chain's writable length.
        """
        if self.failure is not None:
            raise self.failure
        self._check_push(head, written)
        del self._in_flight[head]
        slot = self._next_used % self.size
        # Slice stores, not pack_into: pack_into zero-fills its target first,
        # and the driver polls these words from another CPU (see GuestMemory).
        elem = 4 + 8 * slot
        self._used[elem:elem + 8] = _USED_ELEM.pack(head, written)
        self._next_used = (self._next_used + 1) & 0xFFFF
        self._used[2:4] = _U16.pack(self._next_used)  # after the element
        self.num_pushed += 1

    def push_many(self, elements: list[tuple[int, int]]) -> None:
        """Return several chains at once: every element is written before
        ``used.idx`` moves, once, so the driver sees all of them or none (a
        frame spread over several receive buffers must become used together)."""
        if self.failure is not None:
            raise self.failure
        seen = set()
        for head, written in elements:
            if head in seen:
                raise ValueError(f"push of head {head} twice in one batch")
            self._check_push(head, written)
            seen.add(head)
        used, size, nxt = self._used, self.size, self._next_used
        for head, written in elements:
            del self._in_flight[head]
            elem = 4 + 8 * (nxt % size)
            used[elem:elem + 8] = _USED_ELEM.pack(head, written)
            nxt = (nxt + 1) & 0xFFFF
        self._next_used = nxt
        used[2:4] = _U16.pack(nxt)  # after every element
        self.num_pushed += len(elements)

    def _check_push(self, head: int, written: int) -> None:
        """``ValueError`` for a device bug: ``head`` not in flight, or more written than it holds."""
        limit = self._in_flight.get(head)
        if limit is None:
            raise ValueError(f"push of head {head}, which is not in flight")
        if not 0 <= written <= limit:
            raise ValueError(f"push of head {head} with {written} bytes written; it has {limit} writable")

    def unpop(self, head: int) -> None:
        """Give back the chain ``pop()`` returned last, untouched: the next
        ``pop()`` returns it again (a receive that ran out of buffers midway)."""
        if self._in_flight.get(head) is None or self.num_popped == 0:
            raise ValueError(f"unpop of head {head}, which is not in flight")
        del self._in_flight[head]
        self.last_avail_idx = (self.last_avail_idx - 1) & 0xFFFF
        self.num_popped -= 1

    def needs_notification(self) -> bool:
        """Should the device interrupt the driver for the pushes since the last call?

        With EVENT_IDX: when ``used_event`` lies in the range of used indexes
        published since then.  Without: unless the driver set NO_INTERRUPT.
        Never when nothing was pushed since the last call.
        """
        old, new = self._signalled_used, self._next_used
        self._signalled_used = new
        if old == new:
            return False
        _full_barrier()  # used.idx must be visible before we read the driver's reply
        if self.event_idx:
            used_event = _U16.unpack_from(self._avail, 4 + 2 * self.size)[0]
            return need_event(used_event, new, old)
        return not _U16.unpack_from(self._avail, 0)[0] & AVAIL_F_NO_INTERRUPT

    def set_notification(self, enabled: bool) -> None:
        """Ask the driver to kick (or not) when it adds buffers.

        With EVENT_IDX, enabling sets ``avail_event`` to the current
        ``avail.idx`` (the next add kicks) and disabling leaves it alone;
        without, ``used.flags`` NO_NOTIFY is cleared or set.  Either way it is
        advice: after enabling, check ``has_available()`` once more before
        waiting, or a buffer added meanwhile may go unnoticed.
        """
        if self.event_idx:
            if enabled:
                at = 4 + 8 * self.size
                self._used[at:at + 2] = _U16.pack(self._avail_idx())
        else:
            self._used[0:2] = _U16.pack(0 if enabled else USED_F_NO_NOTIFY)
        if enabled:
            _full_barrier()  # the write must be visible before the caller re-reads avail.idx
