"""ChainReader / ChainWriter against a reference model (the buffers concatenated
into one bytearray, sliced), and virtio-blk's parse_request under any framing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiokvm.devices.virtio.blk import (
    S_IOERR,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    BadRequest,
    parse_request,
)
from aiokvm.devices.virtio.chain import ChainBoundsError, ChainReader, ChainWriter
from aiokvm.devices.virtio.queue import DescriptorChain, VirtqueueError
from aiokvm.errors import AiokvmError, GuestMemoryError
from aiokvm.memory import GuestMemory, MiB

RAM = 4 * MiB
AREA = 0x100000          # buffers are laid out from here, with sentinel gaps between them
SENTINEL = 0xEE
U16 = struct.Struct("<H")
NET_HDR = struct.Struct("<BBHHHHH")  # virtio_net_hdr v1: 12 bytes, num_buffers last


@pytest.fixture(scope="module")
def mem():
    with GuestMemory(RAM) as memory:
        yield memory


def lay_out(mem, lengths, gaps, contents=None):
    """Place buffers of ``lengths`` from AREA, ``gaps`` bytes of SENTINEL apart; return the pairs."""
    buffers = []
    addr = AREA
    for i, length in enumerate(lengths):
        addr += gaps[i % len(gaps)]
        buffers.append((addr, length))
        addr += length
    mem.write(AREA, bytes([SENTINEL]) * (addr + 16 - AREA))
    if contents is not None:
        at = 0
        for buf_addr, length in buffers:
            mem.write(buf_addr, contents[at:at + length])
            at += length
    return tuple(buffers), addr + 16


def contents_of(mem, buffers) -> bytes:
    return b"".join(mem.read(addr, length) for addr, length in buffers)


def assert_outside_untouched(mem, buffers, end):
    """Every byte of the area that is not in a buffer still holds the sentinel."""
    inside = bytearray(end - AREA)
    for addr, length in buffers:
        inside[addr - AREA:addr - AREA + length] = b"\1" * length
    area = mem.read(AREA, end - AREA)
    escaped = [AREA + i for i, byte in enumerate(area) if not inside[i] and byte != SENTINEL]
    assert not escaped, f"bytes outside the chain's buffers were written: {escaped[:8]}"


def assert_segments_inside(segments, buffers, n):
    """Segments are non-empty, each inside one buffer, and cover exactly n bytes."""
    assert sum(length for _a, length in segments) == n
    for addr, length in segments:
        assert length > 0
        assert any(b <= addr and addr + length <= b + bl for b, bl in buffers), (addr, length)


# Many small and zero-length buffers: the shapes where boundary bugs live.
lengths_strategy = st.lists(st.one_of(st.just(0), st.integers(1, 5), st.integers(6, 40)), max_size=12)
gaps_strategy = st.lists(st.integers(1, 7), min_size=1, max_size=4)
# Byte counts: mostly small, so that steps end exactly on buffer boundaries often.
counts = st.one_of(st.integers(0, 6), st.integers(0, 60))


# -- the reader -------------------------------------------------------------------------
reader_ops = st.lists(st.tuples(
    st.sampled_from(["read", "read_struct", "readinto", "views", "segments", "skip", "split"]),
    st.integers(0, 3),      # which cursor (modulo how many there are)
    counts,                 # a byte count or split offset
), max_size=25)


@settings(max_examples=300, deadline=None)
@given(lengths=lengths_strategy, gaps=gaps_strategy, ops=reader_ops, data=st.data())
def test_reader_matches_the_concatenated_buffers(mem, lengths, gaps, ops, data):
    stream = data.draw(st.binary(min_size=sum(lengths), max_size=sum(lengths)))
    buffers, end = lay_out(mem, lengths, gaps, stream)
    cursors = [ChainReader(mem, buffers)]
    models = [[0, len(stream), 0]]  # per cursor: position and end in the stream, bytes consumed
    for op, which, n in ops:
        i = which % len(cursors)
        cursor, model = cursors[i], models[i]
        pos, stop, consumed = model
        fits = n <= stop - pos
        layout = struct.Struct(f"<{n}s")
        if not fits:
            with pytest.raises(ChainBoundsError):
                if op == "read":
                    cursor.read(n)
                elif op == "read_struct":
                    cursor.read_struct(layout)
                elif op == "readinto":
                    cursor.readinto(bytearray(n))
                elif op == "split":
                    cursor.split_at(n)
                else:
                    getattr(cursor, op)(n)
            assert (cursor.consumed, cursor.remaining) == (consumed, stop - pos)  # nothing moved
            continue
        expected = stream[pos:pos + n]
        if op == "read":
            assert cursor.read(n) == expected
        elif op == "read_struct":
            assert cursor.read_struct(layout) == (expected,)
        elif op == "readinto":
            target = bytearray(n)
            assert cursor.readinto(target) == n and target == expected
        elif op == "views":
            views = cursor.views(n)
            assert b"".join(views) == expected and all(view.readonly for view in views)
        elif op == "segments":
            segments = cursor.segments(n)
            assert_segments_inside(segments, buffers, n)
            assert b"".join(mem.read(a, length) for a, length in segments) == expected
        elif op == "skip":
            cursor.skip(n)
        else:
            cursors.append(cursor.split_at(n))
            models.append([pos + n, stop, 0])
            model[1] = pos + n
            assert cursor.remaining == n
            continue
        model[0] += n
        model[2] += n
        assert (cursor.consumed, cursor.remaining) == (model[2], model[1] - model[0])
    assert_outside_untouched(mem, buffers, end)
    assert contents_of(mem, buffers) == stream  # a reader never writes


# -- the writer -------------------------------------------------------------------------
writer_ops = st.lists(st.tuples(
    st.sampled_from(["write", "write_struct", "write_at", "views", "segments", "skip", "split"]),
    st.integers(0, 3),
    counts,                 # a byte count or split offset
    counts,                 # the offset for write_at
), max_size=25)


@settings(max_examples=300, deadline=None)
@given(lengths=lengths_strategy, gaps=gaps_strategy, ops=writer_ops)
def test_writer_matches_the_concatenated_buffers(mem, lengths, gaps, ops):
    total = sum(lengths)
    initial = bytes(i % 251 for i in range(total))
    buffers, end = lay_out(mem, lengths, gaps, initial)
    expected = bytearray(initial)
    cursors = [ChainWriter(mem, buffers)]
    models = [[0, total, 0, 0]]  # per cursor: position, end, bytes written, origin
    stamp = 0
    for op, which, n, offset in ops:
        i = which % len(cursors)
        cursor, model = cursors[i], models[i]
        pos, stop, written, origin = model
        stamp += 1
        payload = bytes((stamp * 7 + k) % 256 for k in range(n))
        fits = offset + n <= stop - origin if op == "write_at" else n <= stop - pos
        if not fits:
            with pytest.raises(ChainBoundsError):
                if op == "write":
                    cursor.write(payload)
                elif op == "write_struct":
                    cursor.write_struct(struct.Struct(f"<{n}s"), payload)
                elif op == "write_at":
                    cursor.write_at(offset, payload)
                elif op == "split":
                    cursor.split_at(n)
                else:
                    getattr(cursor, op)(n)
            assert (cursor.written, cursor.remaining) == (written, stop - pos)
            assert contents_of(mem, buffers) == expected  # nothing written
            continue
        if op == "write":
            cursor.write(payload)
        elif op == "write_struct":
            cursor.write_struct(struct.Struct(f"<{n}s"), payload)
        elif op == "write_at":
            cursor.write_at(offset, payload)
            expected[origin + offset:origin + offset + n] = payload
            assert (cursor.written, cursor.remaining) == (written, stop - pos)  # the cursor stays
            continue
        elif op == "views":
            at = 0
            for view in cursor.views(n):
                view[:] = payload[at:at + len(view)]
                at += len(view)
        elif op == "segments":
            assert_segments_inside(cursor.segments(n), buffers, n)
        elif op == "skip":
            cursor.skip(n)
        else:
            cursors.append(cursor.split_at(n))
            models.append([pos + n, stop, 0, pos + n])
            model[1] = pos + n
            assert cursor.remaining == n
            continue
        if op in ("write", "write_struct", "views"):
            expected[pos:pos + n] = payload
        model[0] += n
        model[2] += n
        assert (cursor.written, cursor.remaining) == (model[2], model[1] - model[0])
    assert contents_of(mem, buffers) == expected
    assert_outside_untouched(mem, buffers, end)


# -- examples ---------------------------------------------------------------------------
def test_zero_length_buffers_are_skipped(mem):
    buffers, _end = lay_out(mem, [0, 3, 0, 0, 2, 0], [4], b"abcde")
    reader = ChainReader(mem, buffers)
    assert reader.remaining == 5
    assert reader.segments(4) == [(buffers[1][0], 3), (buffers[4][0], 1)]
    assert reader.read(1) == b"e" and reader.remaining == 0 and reader.consumed == 5
    assert reader.read(0) == b"" and reader.segments(0) == [] and reader.views(0) == []
    empty = ChainReader(mem, ((AREA, 0), (AREA + 8, 0)))
    assert empty.remaining == 0 and empty.read(0) == b""
    with pytest.raises(ChainBoundsError):
        empty.read(1)


def test_a_struct_may_span_buffers(mem):
    header = struct.Struct("<IIQ")
    raw = header.pack(8, 0, 0x1122334455667788)
    buffers, _end = lay_out(mem, [1, 0, 7, 8], [3], raw)
    reader = ChainReader(mem, buffers)
    assert reader.read_struct(header) == (8, 0, 0x1122334455667788)
    writer = ChainWriter(mem, buffers)
    writer.write_struct(header, 1, 2, 3)
    assert contents_of(mem, buffers) == header.pack(1, 2, 3)


def test_steps_that_end_exactly_on_a_buffer_boundary(mem):
    header = struct.Struct("<IIQ")
    buffers, end = lay_out(mem, [16, 4, 4], [2], header.pack(1, 2, 3) + b"tail5678")
    reader = ChainReader(mem, buffers)
    assert reader.read_struct(header) == (1, 2, 3) and reader.read(4) == b"tail"
    assert reader.segments(4) == [(buffers[2][0], 4)]
    writer = ChainWriter(mem, buffers)
    writer.skip(14)
    writer.write(b"ab")         # to the end of the first buffer
    writer.write(b"cde")        # less than the first buffer's length, more than is left of it (nothing)
    writer.write(b"fgh")
    assert contents_of(mem, buffers)[14:] == b"abcdefgh78"
    assert_outside_untouched(mem, buffers, end)


def test_a_write_that_does_not_fit_writes_nothing_and_says_why(mem):
    buffers, _end = lay_out(mem, [3, 2], [5], b".....")
    writer = ChainWriter(mem, buffers)
    with pytest.raises(ChainBoundsError, match="write: 6 bytes do not fit in the 5 writable bytes left") as info:
        writer.write(b"abcdef")
    assert (info.value.wanted, info.value.available) == (6, 5)
    assert contents_of(mem, buffers) == b"....." and writer.written == 0
    with pytest.raises(ChainBoundsError, match="read of 6 bytes with 5 left in the readable buffers"):
        ChainReader(mem, buffers).read(6)


def test_the_bounds_error_is_a_request_error_not_a_ring_error():
    # A short buffer is answered with an error status; the ring stays usable.
    assert issubclass(ChainBoundsError, AiokvmError) and issubclass(ChainBoundsError, ValueError)
    assert not issubclass(ChainBoundsError, VirtqueueError)


def test_a_buffer_outside_ram_fails_before_any_byte_moves(mem):
    # Only a cursor over unvalidated pairs can meet one (pop() checks every buffer).
    buffers = ((AREA, 4), (RAM - 2, 4))
    mem.write(AREA, b"....")
    reader = ChainReader(mem, buffers)
    with pytest.raises(GuestMemoryError):
        reader.read(8)
    with pytest.raises(GuestMemoryError):
        reader.views(8)
    assert reader.consumed == 0 and reader.read(4) == b"...."
    writer = ChainWriter(mem, buffers)
    with pytest.raises(GuestMemoryError):
        writer.write(b"abcdefgh")
    assert writer.written == 0 and mem.read(AREA, 4) == b"...."


def test_split_at_keeps_the_head_and_returns_the_tail(mem):
    buffers, _end = lay_out(mem, [4, 4], [1], b"abcdefgh")
    at_boundary = ChainReader(mem, buffers)
    at_boundary.skip(1)
    assert at_boundary.split_at(3).read(4) == b"efgh" and at_boundary.read(3) == b"bcd"
    head = ChainReader(mem, buffers)
    head.skip(1)
    tail = head.split_at(5)
    assert (head.remaining, tail.remaining, tail.consumed) == (5, 2, 0)
    assert tail.read(2) == b"gh"
    assert head.read(5) == b"bcdef"
    with pytest.raises(ChainBoundsError):
        head.read(1)
    with pytest.raises(ChainBoundsError):
        ChainReader(mem, buffers).split_at(9)


def test_net_style_header_written_after_the_payload_with_split_at(mem):
    # An rx buffer: the 12-byte header first, the frame after it, across buffers.
    buffers, end = lay_out(mem, [10, 0, 30, 64], [2])
    header = ChainWriter(mem, buffers)
    body = header.split_at(NET_HDR.size)
    frame = bytes(range(50))
    body.write(frame)
    header.write_struct(NET_HDR, 0, 0, 0, 0, 0, 0, 1)
    assert header.written + body.written == 62  # the used length for this chain
    assert contents_of(mem, buffers)[:62] == NET_HDR.pack(0, 0, 0, 0, 0, 0, 1) + frame
    assert_outside_untouched(mem, buffers, end)


def test_net_style_num_buffers_filled_in_with_write_at(mem):
    # MRG_RXBUF: num_buffers is known only after the frame has filled later chains.
    buffers, end = lay_out(mem, [11, 5], [3])  # num_buffers (bytes 10..11) straddles the two
    writer = ChainWriter(mem, buffers)
    writer.skip(NET_HDR.size)
    writer.write(b"\xab" * 4)
    writer.write_at(10, U16.pack(0x0302))
    assert writer.written == 16 and writer.remaining == 0
    assert contents_of(mem, buffers)[10:] == U16.pack(0x0302) + b"\xab" * 4
    assert_outside_untouched(mem, buffers, end)
    with pytest.raises(ChainBoundsError):
        writer.write_at(15, b"xy")
    with pytest.raises(ChainBoundsError):
        writer.write_at(-1, b"x")


def test_write_at_counts_from_the_tail_origin(mem):
    buffers, _end = lay_out(mem, [5, 5], [1], b"0123456789")
    head = ChainWriter(mem, buffers)
    tail = head.split_at(3)
    tail.write_at(0, b"AB")
    head.write_at(2, b"c")
    assert contents_of(mem, buffers) == b"01cAB56789"
    with pytest.raises(ChainBoundsError):
        head.write_at(2, b"cd")  # past the head's 3 bytes: into the tail's


def test_scatter_and_gather_go_through_the_cursor(mem):
    buffers, _end = lay_out(mem, [0, 2, 3], [2], b"hello")
    chain = DescriptorChain(0, buffers, buffers)
    assert chain.gather(mem) == b"hello"
    with pytest.raises(ChainBoundsError, match="do not fit"):
        chain.scatter(mem, b"toolong")
    assert chain.gather(mem) == b"hello"  # nothing written
    assert chain.scatter(mem, b"HEL") == 3 and chain.gather(mem) == b"HELlo"


# -- virtio-blk: any framing parses like Linux's framing --------------------------------
HEADER = struct.Struct("<IIQ")
CAPACITY = 64


def frame(mem, readable_stream: bytes, writable_len: int, cuts_r, cuts_w, zeros_r=(), zeros_w=()):
    """Lay the two streams out in pieces (cut at ``cuts_*``, zero-length pieces put at ``zeros_*``)."""
    def pieces(total, cuts, zeros):
        points = sorted({c for c in cuts if 0 < c < total})
        bounds = [0, *points, total]
        lengths = [b - a for a, b in zip(bounds, bounds[1:], strict=False)] if total else []
        for z in zeros:
            lengths.insert(z % (len(lengths) + 1), 0)
        return lengths
    r_lengths, w_lengths = pieces(len(readable_stream), cuts_r, zeros_r), pieces(writable_len, cuts_w, zeros_w)
    all_buffers, _end = lay_out(mem, r_lengths + w_lengths, [3], readable_stream + bytes(writable_len))
    return DescriptorChain(0, all_buffers[:len(r_lengths)], all_buffers[len(r_lengths):])


def stream_addresses(buffers):
    return [addr + i for addr, length in buffers for i in range(length)]


@settings(max_examples=300, deadline=None)
@given(
    rtype=st.sampled_from([T_IN, T_OUT, T_FLUSH, T_GET_ID]),
    sector=st.integers(0, CAPACITY - 2),
    data_len=st.sampled_from([0, 512, 1024, 20]),
    cuts_r=st.lists(st.integers(0, 1100), max_size=4),
    cuts_w=st.lists(st.integers(0, 1100), max_size=4),
    zeros_r=st.lists(st.integers(0, 8), max_size=2),
    zeros_w=st.lists(st.integers(0, 8), max_size=2),
    linux_cuts=st.booleans(),
)
def test_parse_request_is_the_same_under_any_framing(mem, rtype, sector, data_len, cuts_r, cuts_w, zeros_r, zeros_w,
                                                     linux_cuts):
    if rtype == T_GET_ID:
        data_len = 20
    if linux_cuts:  # also cut where Linux does: after the header, before the status byte (the fast path)
        cuts_r, cuts_w = [*cuts_r, 16], [*cuts_w, data_len]
    header = HEADER.pack(rtype, 0, sector)
    if rtype == T_OUT:
        chain = frame(mem, header + bytes(range(256)) * (data_len // 256) + bytes(data_len % 256), 1,
                      cuts_r, cuts_w, zeros_r, zeros_w)
    else:
        chain = frame(mem, header, data_len + 1, cuts_r, cuts_w, zeros_r, zeros_w)
    readable_addrs, writable_addrs = stream_addresses(chain.readable), stream_addresses(chain.writable)
    status_addr = writable_addrs[-1]
    try:
        request = parse_request(chain, mem, CAPACITY, False)
    except BadRequest as bad:
        assert rtype in (T_IN, T_OUT) and data_len % 512, bad  # the only bad requests generated here
        assert str(bad) == f"data length {data_len} is not a multiple of 512"
        assert bad.status == S_IOERR and bad.status_addr == status_addr
        return
    assert (request.type, request.sector, request.status_addr) == (rtype, sector, status_addr)
    assert all(n for _a, n in request.data)  # no empty pieces reach the backend
    expected = {T_OUT: readable_addrs[16:], T_FLUSH: []}.get(rtype, writable_addrs[:-1])
    assert stream_addresses(request.data) == expected
    assert request.data_len == len(expected)


def test_a_split_header_and_a_shared_status_buffer_parse_like_linux_framing(mem):
    # Linux: header, data, status each in a descriptor of their own (the fast path).
    linux = frame(mem, HEADER.pack(T_IN, 0, 5), 513, [], [512])
    request = parse_request(linux, mem, CAPACITY, False)
    assert request.data == (linux.writable[0],) and request.status_addr == linux.writable[1][0]
    # The same request with the header split 8+8 and the status byte at the end of the data buffer.
    other = frame(mem, HEADER.pack(T_IN, 0, 5), 513, [8], [], [1])
    request = parse_request(other, mem, CAPACITY, False)
    data_addr = other.writable[0][0]
    assert (request.type, request.sector, request.data_len) == (T_IN, 5, 512)
    assert request.data == ((data_addr, 512),) and request.status_addr == data_addr + 512


@pytest.mark.parametrize(("rtype", "zeros_r", "zeros_w"), [(T_IN, [1], []), (T_IN, [], [1]), (T_OUT, [1], [])])
def test_zero_length_descriptors_between_linux_framed_parts_are_dropped(mem, rtype, zeros_r, zeros_w):
    if rtype == T_IN:
        chain = frame(mem, HEADER.pack(T_IN, 0, 5), 513, [], [512], zeros_r, zeros_w)
        data = tuple(b for b in chain.writable[:-1] if b[1])
    else:
        chain = frame(mem, HEADER.pack(T_OUT, 0, 5) + bytes(512), 1, [16], [], zeros_r, zeros_w)
        data = tuple(b for b in chain.readable[1:] if b[1])
    request = parse_request(chain, mem, CAPACITY, False)
    assert request.data == data and request.data_len == 512 and request.status_addr == chain.writable[-1][0]


@pytest.mark.parametrize(("readable", "writable", "why", "has_status"), [
    ([0, 15], [1], "header shorter than 16 bytes", True),
    ([16], [], "no status byte", False),
    ([16], [0, 0], "no status byte", False),
])
def test_short_chains_are_bad_requests(mem, readable, writable, why, has_status):
    buffers, _end = lay_out(mem, readable + writable, [2], HEADER.pack(T_IN, 0, 0) + bytes(64))
    chain = DescriptorChain(0, buffers[:len(readable)], buffers[len(readable):])
    with pytest.raises(BadRequest, match=why) as info:
        parse_request(chain, mem, CAPACITY, False)
    assert info.value.status == S_IOERR
    assert (info.value.status_addr is not None) == has_status
