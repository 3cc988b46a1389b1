"""Split virtqueue (device side) against the driver in aiokvm.testing; no KVM needed."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from aiokvm.devices.virtio.queue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DescriptorChain,
    SplitQueue,
    VirtqueueError,
    need_event,
)
from aiokvm.errors import GuestMemoryError
from aiokvm.memory import GuestMemory, MiB
from aiokvm.testing import VirtqueueDriver

N, R, W, IND = DESC_F_NEXT, 0, DESC_F_WRITE, DESC_F_INDIRECT
RAM = 4 * MiB
BASE = 0x10000
BUF = 0x100000        # a harmless in-RAM buffer for raw descriptors
TABLE = 0x200000      # where raw indirect tables go
TABLE2 = 0x201000


@pytest.fixture
def mem():
    with GuestMemory(RAM) as memory:
        yield memory


def make(mem, size=8, **kwargs):
    drv = VirtqueueDriver(mem, size, BASE, event_idx=kwargs.get("event_idx", False))
    q = SplitQueue(mem, size, drv.desc_addr, drv.avail_addr, drv.used_addr, **kwargs)
    return drv, q


def reference_need_event(event: int, new: int, old: int) -> bool:
    """The spec's rule written out: event lies in the half-open window [old, new) of a mod-2**16 counter."""
    return any((old + k) % 65536 == event for k in range((new - old) % 65536))


# -- round trips --------------------------------------------------------------------------
def test_direct_chain_round_trip(mem):
    drv, q = make(mem)
    assert not q.has_available() and q.pop() is None
    head = drv.add([b"hello ", b"world"], [4, 8])
    assert q.has_available()
    chain = q.pop()
    assert chain.head == head
    assert [n for _a, n in chain.readable] == [6, 5] and [n for _a, n in chain.writable] == [4, 8]
    assert chain.readable_len == 11 and chain.writable_len == 12
    assert chain.gather(mem) == b"hello world"
    assert chain.scatter(mem, b"0123456789") == 10
    q.push(head, 10)
    assert q.pop() is None and not q.has_available()
    assert drv.used() == [(head, 10)]
    assert drv.read_writable(head) == [b"0123", b"456789\0\0"]
    assert (q.num_popped, q.num_pushed, q.errors, q.in_flight) == (1, 1, 0, 0)
    assert drv.free_descriptors == 8


def test_indirect_chain_round_trip(mem):
    drv, q = make(mem, indirect=True)
    head = drv.add([b"a", b"bc", b"def"], [2, 3], indirect=True)
    assert drv.free_descriptors == 7
    chain = q.pop()
    assert chain.head == head and chain.gather(mem) == b"abcdef"
    assert [n for _a, n in chain.writable] == [2, 3]
    q.push(head, chain.scatter(mem, b"XYZW"))
    assert drv.used() == [(head, 4)]
    assert drv.read_writable(head) == [b"XY", b"ZW\0"]


def test_direct_descriptors_followed_by_an_indirect_one(mem):
    drv, q = make(mem, indirect=True)
    mem.write(BUF, b"headTAIL")
    drv.write_table(TABLE, [(BUF + 4, 4, N, 1), (BUF + 16, 8, W, 0)])
    # The WRITE flag on the descriptor that points at the table is ignored.
    drv.add_raw([(BUF, 4, N, 1), (TABLE, 32, IND | W, 0)])
    chain = q.pop()
    assert chain.readable == ((BUF, 4), (BUF + 4, 4)) and chain.writable == ((BUF + 16, 8),)
    assert chain.gather(mem) == b"headTAIL"


def test_zero_length_descriptors_are_kept(mem):
    drv, q = make(mem)
    drv.add_raw([(BUF, 0, N, 1), (BUF, 3, N, 2), (RAM, 0, W, 0)])  # (RAM, 0): at the very end of RAM
    chain = q.pop()
    assert chain.readable == ((BUF, 0), (BUF, 3)) and chain.writable == ((RAM, 0),)
    assert mem.view(*chain.writable[0]).nbytes == 0


def test_unknown_flag_bits_are_ignored(mem):
    drv, q = make(mem)
    drv.add_raw([(BUF, 1, N | 0x80, 1), (BUF, 1, W | 0x8000, 0)])
    chain = q.pop()
    assert chain.readable == ((BUF, 1),) and chain.writable == ((BUF, 1),)


def test_out_of_order_completion_and_full_queue(mem):
    drv, q = make(mem, size=4)
    heads = [drv.add([bytes([i])], [1]) for i in range(2)]
    with pytest.raises(RuntimeError, match="queue full"):
        drv.add([b"x"], [1])
    chains = [q.pop(), q.pop()]
    assert [c.head for c in chains] == heads
    assert [c.gather(mem) for c in chains] == [b"\0", b"\1"]
    q.push(heads[1], 1)
    q.push(heads[0], 0)
    assert drv.used() == [(heads[1], 1), (heads[0], 0)]
    assert drv.free_descriptors == 4


def test_max_chain_allows_exactly_the_limit(mem):
    drv, q = make(mem, indirect=True, max_chain=3)
    drv.add([b"a", b"b"], [1])
    drv.add([b"a"], [1, 1], indirect=True)
    assert len(q.pop().readable) == 2 and len(q.pop().writable) == 2


def test_scatter_refuses_too_much(mem):
    chain = DescriptorChain(0, (), ((BUF, 2),))
    with pytest.raises(ValueError, match="do not fit"):
        chain.scatter(mem, b"abc")


def test_push_rejects_device_bugs(mem):
    drv, q = make(mem)
    head = drv.add([b"x"], [4])
    with pytest.raises(ValueError, match="not in flight"):
        q.push(head, 0)
    q.pop()
    with pytest.raises(ValueError, match="4 writable"):
        q.push(head, 5)
    q.push(head, 4)
    with pytest.raises(ValueError, match="not in flight"):
        q.push(head, 4)


# -- notifications --------------------------------------------------------------------------
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 64))
def test_need_event_matches_reference(event, old, step):
    new = (old + step) & 0xFFFF
    assert need_event(event, new, old) == reference_need_event(event, new, old)


@pytest.mark.parametrize(("event", "new", "old", "expected"), [
    (0xFFFF, 0, 0xFFFF, True),      # the window [0xffff, 0) wraps
    (0xFFFE, 1, 0xFFFF, False),
    (0, 1, 0xFFFF, True),
    (1, 1, 0xFFFF, False),
    (5, 5, 5, False),               # nothing new, never
])
def test_need_event_at_the_wrap(event, new, old, expected):
    assert need_event(event, new, old) is expected


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, 0xFFFF), batches=st.lists(st.integers(1, 8), min_size=1, max_size=4),
       events=st.lists(st.integers(0, 0xFFFF), min_size=4, max_size=4), near=st.booleans())
def test_event_idx_notification_against_reference(start, batches, events, near):
    with GuestMemory("2M") as memory:
        drv, q = make(memory, event_idx=True)
        drv.start_at(start)
        q.last_avail_idx = q.next_used = start
        old = start
        for batch, event in zip(batches, events, strict=False):
            if near:  # put used_event inside or just around the window, where the math is delicate
                event = (old + event % (batch + 2) - 1) & 0xFFFF
            drv.set_used_event(event)
            for _ in range(batch):
                drv.add([b"r"], [])
            for _ in range(batch):
                q.push(q.pop().head, 0)
            new = (old + batch) & 0xFFFF
            assert q.needs_notification() == reference_need_event(event, new, old)
            assert not q.needs_notification()  # nothing pushed since
            assert len(drv.used()) == batch
            old = new


def test_event_idx_ignores_no_interrupt(mem):
    drv, q = make(mem, event_idx=True)
    drv.set_no_interrupt(True)
    drv.set_used_event(0)
    drv.add([b"x"], [])
    q.push(q.pop().head, 0)
    assert q.needs_notification()


def test_no_interrupt_flag(mem):
    drv, q = make(mem)
    assert not q.needs_notification()  # nothing pushed yet
    drv.add([b"x"], [])
    q.push(q.pop().head, 0)
    drv.set_no_interrupt(True)
    assert not q.needs_notification()
    drv.used()
    drv.add([b"x"], [])
    q.push(q.pop().head, 0)
    drv.set_no_interrupt(False)
    assert q.needs_notification()
    assert not q.needs_notification()


def test_set_notification_without_event_idx(mem):
    drv, q = make(mem)
    drv.add([b"x"], [])
    assert drv.should_kick()
    q.set_notification(False)
    assert drv.used_flags == 1
    drv.add([b"x"], [])
    assert not drv.should_kick()
    q.set_notification(True)
    assert drv.used_flags == 0
    drv.add([b"x"], [])
    assert drv.should_kick()


def test_set_notification_with_event_idx(mem):
    drv, q = make(mem, event_idx=True)
    drv.add([b"x"], [])
    drv.add([b"x"], [])
    q.set_notification(True)
    assert drv.avail_event == 2 and drv.used_flags == 0
    assert not drv.should_kick()  # the adds so far moved avail.idx over [0, 2), which misses 2
    drv.add([b"x"], [])
    assert drv.should_kick()      # window [2, 3) holds 2
    q.set_notification(False)     # leaves avail_event behind: the driver stops kicking
    drv.add([b"x"], [])
    assert not drv.should_kick()
    assert drv.avail_event == 2 and drv.used_flags == 0


# -- wraparound ------------------------------------------------------------------------------
def test_indexes_wrap_past_65536(mem):
    drv, q = make(mem, size=8, event_idx=True)
    total, notified, batch = 0, 0, 3  # 3 two-descriptor chains: ring slots and descriptors rotate
    while total < 70000:
        drv.set_used_event(drv.last_used_idx)  # interrupt on the first completion of this batch
        heads = [drv.add([total.to_bytes(4, "little")], [4]) for _ in range(batch)]
        for _ in range(batch):
            chain = q.pop()
            q.push(chain.head, chain.scatter(mem, chain.gather(mem)))
        notified += q.needs_notification()
        assert [h for h, _n in drv.used()] == heads
        assert drv.read_writable(heads[-1]) == [total.to_bytes(4, "little")]
        total += batch
    assert q.num_pushed == total and q.last_avail_idx == total % 65536 == q.next_used
    assert mem.read_u16(drv.used_addr + 2) == total % 65536
    assert notified == total // batch
    assert q.errors == 0


# -- constructor validation ----------------------------------------------------------------
@pytest.mark.parametrize(("size", "desc", "avail", "used", "match"), [
    (0, 0x1000, 0x2000, 0x3000, "power of two"),
    (3, 0x1000, 0x2000, 0x3000, "power of two"),
    (65536, 0x1000, 0x2000, 0x3000, "power of two"),
    (8, 0x1008, 0x2000, 0x3000, "descriptor table .* aligned"),
    (8, 0x1000, 0x2001, 0x3000, "available ring .* aligned"),
    (8, 0x1000, 0x2000, 0x3002, "used ring .* aligned"),
    (8, RAM - 64, 0x2000, 0x3000, "descriptor table .* not inside"),
    (8, 0x1000, RAM - 20, 0x3000, "available ring .* not inside"),
    (8, 0x1000, 0x2000, RAM - 68, "used ring .* not inside"),
    (8, 0x1000, 0x2000, 1 << 40, "used ring .* not inside"),
])
def test_constructor_rejects_bad_rings(mem, size, desc, avail, used, match):
    with pytest.raises(VirtqueueError, match=match):
        SplitQueue(mem, size, desc, avail, used)


def test_largest_queue_fits(mem):
    SplitQueue(mem, 32768, 0, 0x80000, 0x90000)


# -- hostile drivers --------------------------------------------------------------------------
def _raw(*descs):
    return lambda drv: drv.add_raw(list(descs))


def _indirect(table, head_desc=None, prefix=()):
    def build(drv):
        drv.write_table(TABLE, table)
        drv.add_raw([*prefix, head_desc or (TABLE, 16 * len(table), IND, 0)])
    return build


def _avail_jump(drv):
    drv.add([b"x"], [])
    drv.set_avail_idx(9)


def _bad_head(drv):
    drv.add_raw([(BUF, 1, R, 0)], publish=False)
    drv.publish(8)


def _head_in_flight(drv):
    drv.publish(drv.add([b"x"], []))


def _nested(drv):
    drv.write_table(TABLE2, [(BUF, 1, R, 0)])
    _indirect([(BUF, 1, N, 1), (TABLE2, 16, IND, 0)])(drv)


HOSTILE = [
    ("avail_idx_jump", {}, _avail_jump, "ahead"),
    ("head_out_of_range", {}, _bad_head, "head 8, not below"),
    ("head_still_in_flight", {}, _head_in_flight, "still holds"),
    ("next_out_of_range", {}, _raw((BUF, 1, N, 8)), "next index 8 is outside the descriptor table"),
    ("next_far_out_of_range", {}, _raw((BUF, 1, N, 0xFFFF)), "next index 65535"),
    ("next_outside_indirect_table", {"indirect": True},
     _indirect([(BUF, 1, N, 1), (BUF, 1, N, 2)]), "next index 2 is outside the indirect table"),
    ("loop_direct", {}, _raw((BUF, 1, N, 1), (BUF, 1, N, 0)), "loop"),
    ("self_loop", {}, _raw((BUF, 1, N, 0)), "loop"),
    ("loop_indirect", {"indirect": True}, _indirect([(BUF, 1, N, 1), (BUF, 1, N, 0)]), "indirect table .*loop"),
    ("buffer_past_end_of_ram", {}, _raw((RAM - 8, 16, R, 0)), "not inside guest RAM"),
    ("buffer_in_the_mmio_hole", {}, _raw((0xFEB00000, 4, W, 0)), "not inside guest RAM"),
    ("buffer_wraps_64_bits", {}, _raw((2**64 - 8, 16, R, 0)), "wraps past 2\\*\\*64"),
    ("writable_buffer_wraps_64_bits", {}, _raw((2**64 - 1, 2**32 - 1, W, 0)), "wraps past"),
    ("readable_after_writable", {}, _raw((BUF, 1, W | N, 1), (BUF, 1, R, 0)), "readable buffer after"),
    ("readable_after_writable_across_indirect", {"indirect": True},
     _indirect([(BUF, 1, R, 0)], prefix=[(BUF, 1, W | N, 1)]), "readable buffer after"),
    ("readable_after_writable_in_indirect", {"indirect": True},
     _indirect([(BUF, 1, W | N, 1), (BUF, 1, R, 0)]), "readable buffer after"),
    ("indirect_with_next", {"indirect": True},
     _indirect([(BUF, 1, R, 0)], head_desc=(TABLE, 16, IND | N, 1)), "both INDIRECT and NEXT"),
    ("indirect_not_negotiated", {}, _indirect([(BUF, 1, R, 0)]), "not negotiated"),
    ("indirect_len_zero", {"indirect": True}, _indirect([], head_desc=(TABLE, 0, IND, 0)), "table length 0"),
    ("indirect_len_not_multiple_of_16", {"indirect": True},
     _indirect([(BUF, 1, R, 0)], head_desc=(TABLE, 24, IND, 0)), "table length 24"),
    ("indirect_len_too_large", {"indirect": True},
     _indirect([(BUF, 1, R, 0)], head_desc=(0, 16 * 32769, IND, 0)), "table length 524304"),
    ("indirect_table_outside_ram", {"indirect": True},
     _indirect([], head_desc=(RAM - 16, 32, IND, 0)), "indirect table .* not inside guest RAM"),
    ("indirect_table_wraps_64_bits", {"indirect": True},
     _indirect([], head_desc=(2**64 - 16, 32, IND, 0)), "indirect table .* not inside guest RAM"),
    ("nested_indirect", {"indirect": True}, _nested, "indirect descriptor inside an indirect table"),
    ("max_chain_direct", {"max_chain": 2}, _raw((BUF, 1, N, 1), (BUF, 1, N, 2), (BUF, 1, R, 0)), "more than 2"),
    ("max_chain_indirect", {"indirect": True, "max_chain": 2},
     _indirect([(BUF, 1, N, 1), (BUF, 1, N, 2), (BUF, 1, W, 0)]), "more than 2"),
    ("max_chain_direct_then_indirect", {"indirect": True, "max_chain": 2},
     _indirect([(BUF, 1, N, 1), (BUF, 1, W, 0)], prefix=[(BUF, 1, N, 1)]), "more than 2"),
]


@pytest.mark.parametrize(("kwargs", "build", "match"), [case[1:] for case in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_driver_is_rejected(mem, kwargs, build, match):
    drv, q = make(mem, **kwargs)
    build(drv)
    with pytest.raises(VirtqueueError, match=match):
        while q.pop() is not None:
            pass
    assert q.errors == 1
    # Sticky: the queue refuses to go on until the device is reset (a new SplitQueue).
    with pytest.raises(VirtqueueError, match=match):
        q.pop()
    with pytest.raises(VirtqueueError, match=match):
        q.push(0, 0)


def test_a_rejected_chain_is_not_consumed(mem):
    drv, q = make(mem)
    drv.add_raw([(BUF, 1, N, 0)])
    with pytest.raises(VirtqueueError):
        q.pop()
    assert q.last_avail_idx == 0 and q.num_popped == 0 and q.in_flight == 0


# -- fuzz -------------------------------------------------------------------------------------
FUZZ_RAM = 2 * MiB
FUZZ_TABLES = (0x1000, 0x2000)

addresses = st.one_of(
    st.integers(0, FUZZ_RAM),
    st.integers(FUZZ_RAM - 64, FUZZ_RAM + 64),
    st.integers(2**64 - 64, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.sampled_from(FUZZ_TABLES),
)
lengths = st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 48, 2**32 - 1, 16 * 32768]),
                    st.integers(0, 2**32 - 1))
flag_bits = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
# Mostly-valid values, so that many chains get through and are compared with the reference.
tame_addresses = st.one_of(st.integers(0x100000, 0x100100), st.sampled_from(FUZZ_TABLES))
tame_lengths = st.sampled_from([0, 1, 16, 32, 48, 64])
tame_flags = st.sampled_from([R, N, N, N, W, N | W, N | W, IND, IND | W])


def descriptor(table_len, tame, index=0):
    if tame:  # ``next`` mostly points forward, so most chains end instead of looping
        forward = st.integers(min(index + 1, table_len - 1), table_len - 1)
        nexts = st.one_of(forward, forward, st.integers(0, table_len))
        return st.tuples(tame_addresses, tame_lengths, tame_flags, nexts)
    return st.tuples(addresses, lengths, flag_bits, st.one_of(st.integers(0, table_len + 1), st.integers(0, 0xFFFF)))


@st.composite
def hostile_rings(draw):
    tame = draw(st.booleans())
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    table = [draw(descriptor(size, tame, i)) for i in range(size)]
    indirect_tables = []
    for _ in FUZZ_TABLES:
        entries = draw(st.integers(0, 6))
        indirect_tables.append([draw(descriptor(entries, tame, i)) for i in range(entries)])
    heads = st.integers(0, size - 1) if tame else st.one_of(st.integers(0, size), st.integers(0, 0xFFFF))
    ring = draw(st.lists(heads, min_size=size, max_size=size))
    start = draw(st.integers(0, 0xFFFF))
    ahead = draw(st.integers(1, size) if tame else st.one_of(st.integers(0, size + 1), st.integers(0, 0xFFFF)))
    options = {
        "event_idx": draw(st.booleans()),
        "indirect": draw(st.booleans()),
        "max_chain": draw(st.one_of(st.none(), st.integers(1, 40))),
    }
    pushes = draw(st.lists(st.booleans(), min_size=size + 2, max_size=size + 2))
    return size, table, indirect_tables, ring, start, ahead, options, pushes


def reference_walk(memory, size, desc_addr, head, *, indirect, max_chain):
    """An independent reading of the chain rules: ``(readable, writable)``, or None to reject.

    Loops are found with a visited set (the queue counts instead); both reject
    exactly the chains that revisit a descriptor.
    """
    buffers = []  # (addr, len, device-writable)

    def in_ram(addr, length):
        return addr + length <= 2**64 and memory.contains(addr, length)

    def walk(base, entries, index, nested):
        seen = set()
        while True:
            if index >= entries or index in seen:
                return False
            seen.add(index)
            addr, length, flags, nxt = struct.unpack("<QIHH", memory.read(base + 16 * index, 16))
            if flags & IND:
                if nested or not indirect or flags & N:
                    return False
                if length == 0 or length % 16 or length > 16 * 32768 or not in_ram(addr, length):
                    return False
                return walk(addr, length // 16, 0, True)
            if not in_ram(addr, length):
                return False
            buffers.append((addr, length, bool(flags & W)))
            if not flags & N:
                return True
            index = nxt

    if not walk(desc_addr, size, head, False):
        return None
    if max_chain is not None and len(buffers) > max_chain:
        return None
    kinds = [writable for _a, _n, writable in buffers]
    if kinds != sorted(kinds):  # every readable (False) before every writable (True)
        return None
    return (tuple((a, n) for a, n, w in buffers if not w), tuple((a, n) for a, n, w in buffers if w))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_rings())
def test_random_rings_match_the_reference_and_fail_only_with_virtqueue_error(case):
    size, table, indirect_tables, ring, start, ahead, options, pushes = case
    with GuestMemory(FUZZ_RAM) as memory:
        drv = VirtqueueDriver(memory, size, 0x10000)
        for addr, entries in zip(FUZZ_TABLES, indirect_tables, strict=True):
            drv.write_table(addr, entries)
        drv.add_raw(table, publish=False)
        for slot, head in enumerate(ring):
            memory.write_u16(drv.avail_addr + 4 + 2 * slot, head)
        q = SplitQueue(memory, size, drv.desc_addr, drv.avail_addr, drv.used_addr, **options)
        q.last_avail_idx = q.next_used = start
        drv.set_avail_idx(start + ahead)
        held: set[int] = set()
        try:
            for push in pushes:  # bounded: at most size + 2 pops
                pending = (drv.avail_idx - q.last_avail_idx) & 0xFFFF
                head = ring[q.last_avail_idx % size]
                if pending == 0:
                    expected = "none"
                elif pending > size or head >= size or head in held:
                    expected = None
                else:
                    expected = reference_walk(memory, size, drv.desc_addr, head, indirect=options["indirect"],
                                              max_chain=options["max_chain"])
                try:
                    chain = q.pop()
                except VirtqueueError as exc:
                    assert expected is None, f"rejected a valid chain: {exc}"
                    assert str(exc) and q.errors == 1
                    event("rejected")
                    break
                if chain is None:
                    assert expected == "none"
                    break
                assert expected == (chain.readable, chain.writable)
                event("accepted a chain")
                assert all(memory.contains(a, n) for a, n in chain.readable + chain.writable)
                chain.gather(memory)
                held.add(chain.head)
                if push:
                    q.push(chain.head, chain.writable_len)
                    held.discard(chain.head)
                    q.needs_notification()
        except GuestMemoryError as exc:  # pragma: no cover - the point of the test
            raise AssertionError(f"the queue touched memory outside RAM: {exc}") from exc
        q.has_available()
        q.set_notification(True)
        q.set_notification(False)


def test_unpop_gives_the_last_chains_back_in_reverse_and_push_many_publishes_once():
    from aiokvm.devices.virtio.queue import SplitQueue
    from aiokvm.memory import GuestMemory
    from aiokvm.testing import VirtqueueDriver

    memory = GuestMemory("4M")
    drv = VirtqueueDriver(memory, 8, 0x10000)
    q = SplitQueue(memory, 8, drv.desc_addr, drv.avail_addr, drv.used_addr)
    heads = [drv.add([], [64]) for _ in range(3)]
    a, b = q.pop(), q.pop()
    q.unpop(b.head)
    q.unpop(a.head)
    with pytest.raises(ValueError):
        q.unpop(a.head)  # not in flight any more
    assert [q.pop().head for _ in range(3)] == heads
    with pytest.raises(ValueError):
        q.push_many([(heads[0], 1), (heads[0], 1)])  # the same head twice: nothing published
    assert memory.read_u16(drv.used_addr + 2) == 0
    q.push_many([(h, 8) for h in heads])
    assert drv.used() == [(h, 8) for h in heads]
