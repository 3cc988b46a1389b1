"""Unit tests for the sans-I/O 16550A UART model."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# Whether ruff sees aiokvm as first- or third-party depends on how packaging
# maps devices/, so this import gets its own block to sort the same either way.
# isort: split
from aiokvm.devices.serial import Uart16550, UartCounters

# Register offsets, spelled out so each test reads like a driver would.
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

DLAB = 0x80
LOOP = 0x10


class Harness:
    """A UART plus a record of everything it reported through callbacks."""

    def __init__(self) -> None:
        self.output: list[bytes] = []
        self.irq_calls: list[bool] = []
        self.uart = Uart16550(on_output=self.output.append, irq=self.irq_calls.append)

    @property
    def out(self) -> bytes:
        return b"".join(self.output)


@pytest.fixture
def h() -> Harness:
    return Harness()


def assert_no_repeated_irq_values(calls: list[bool]) -> None:
    for previous, current in itertools.pairwise(calls):
        assert previous != current, calls
    if calls:
        assert calls[0] is True, "the line starts low, so the first change is a raise"


# ----------------------------------------------------------------------
# Reset state and plain registers
# ----------------------------------------------------------------------


def test_reset_values(h: Harness) -> None:
    u = h.uart
    assert u.read(IER) == 0x00
    assert u.read(IIR) == 0x01
    assert u.read(LCR) == 0x00
    assert u.read(MCR) == 0x08
    assert u.read(LSR) == 0x60
    assert u.read(MSR) == 0xB0
    assert u.read(SCR) == 0x00
    assert u.read(RBR) == 0x00
    u.write(LCR, DLAB)
    assert (u.read(DLL), u.read(DLM)) == (0x0C, 0x00)
    assert u.FIFO_SIZE == 64
    assert u.rx_space == 64
    assert u.irq_level is False
    assert h.irq_calls == []
    assert h.output == []


def test_metrics_start_at_zero_and_count_accesses(h: Harness) -> None:
    assert h.uart.counters == UartCounters()
    h.uart.read(LSR)
    h.uart.read(99)
    h.uart.write(SCR, 1)
    assert h.uart.counters.reads == 2
    assert h.uart.counters.writes == 1


def test_scratch_register_round_trips(h: Harness) -> None:
    for value in (0x00, 0x5A, 0xA5, 0xFF):
        h.uart.write(SCR, value)
        assert h.uart.read(SCR) == value


def test_write_value_is_masked_to_8_bits(h: Harness) -> None:
    h.uart.write(SCR, 0x1234)
    assert h.uart.read(SCR) == 0x34
    h.uart.write(SCR, -1)
    assert h.uart.read(SCR) == 0xFF


def test_ier_keeps_only_low_nibble(h: Harness) -> None:
    h.uart.write(IER, 0xF0)
    assert h.uart.read(IER) == 0x00
    h.uart.write(IER, 0xFD)
    assert h.uart.read(IER) == 0x0D


def test_mcr_keeps_five_bits_and_lcr_keeps_eight(h: Harness) -> None:
    h.uart.write(MCR, 0xFF)
    assert h.uart.read(MCR) == 0x1F
    h.uart.write(LCR, 0x7F)
    assert h.uart.read(LCR) == 0x7F


def test_lsr_and_msr_ignore_writes(h: Harness) -> None:
    h.uart.write(LSR, 0x00)
    h.uart.write(MSR, 0x00)
    assert h.uart.read(LSR) == 0x60
    assert h.uart.read(MSR) == 0xB0


@pytest.mark.parametrize("offset", [-1, 8, 0x3F8, 1 << 40])
def test_out_of_range_offsets(h: Harness, offset: int) -> None:
    assert h.uart.read(offset) == 0xFF
    h.uart.write(offset, 0x41)
    assert h.output == []
    assert h.uart.read(SCR) == 0x00


# ----------------------------------------------------------------------
# Divisor latch
# ----------------------------------------------------------------------


def test_divisor_latch_has_no_side_effects_on_thr_or_ier(h: Harness) -> None:
    u = h.uart
    u.feed(b"x")
    u.write(LCR, DLAB | 0x03)
    u.write(DLL, 0x01)
    u.write(DLM, 0x02)  # would enable ETBEI if it reached IER
    assert (u.read(DLL), u.read(DLM)) == (0x01, 0x02)
    assert h.output == []
    assert h.irq_calls == []
    assert u.rx_space == 63, "reading DLL must not pop the RX FIFO"

    u.write(LCR, 0x03)
    assert u.read(IER) == 0x00
    assert u.read(RBR) == ord("x")
    assert u.read(LCR) == 0x03

    # The latch keeps its value once DLAB is cleared again.
    u.write(LCR, DLAB)
    assert (u.read(DLL), u.read(DLM)) == (0x01, 0x02)


def test_fcr_is_reachable_while_dlab_is_set(h: Harness) -> None:
    h.uart.write(LCR, DLAB)
    h.uart.write(FCR, 0x01)
    h.uart.write(LCR, 0x00)
    assert h.uart.read(IIR) == 0xC1


# ----------------------------------------------------------------------
# Transmit path
# ----------------------------------------------------------------------


def test_thr_write_calls_on_output_one_byte_at_a_time(h: Harness) -> None:
    for b in b"hi\n":
        h.uart.write(THR, b)
    assert h.output == [b"h", b"i", b"\n"]
    assert h.uart.counters.tx_bytes == 3
    assert h.uart.read(LSR) & 0x60 == 0x60, "transmitter is always empty"


def test_loopback_sends_to_rx_not_output(h: Harness) -> None:
    u = h.uart
    u.write(MCR, LOOP)
    u.write(THR, 0x41)
    assert h.output == []
    assert u.counters.tx_bytes == 0
    assert u.counters.loopback_bytes == 1
    assert u.read(LSR) & 0x01
    assert u.read(RBR) == 0x41
    assert u.read(LSR) & 0x01 == 0

    u.write(MCR, 0x00)
    u.write(THR, 0x42)
    assert h.output == [b"B"]


def test_loopback_overrun_sets_oe_and_keeps_fifo(h: Harness) -> None:
    u = h.uart
    u.write(MCR, LOOP)
    for i in range(u.FIFO_SIZE + 3):
        u.write(THR, i)
    assert u.rx_space == 0
    assert u.counters.loopback_bytes == u.FIFO_SIZE + 3
    lsr = u.read(LSR)
    assert lsr & 0x03 == 0x03  # DR | OE
    assert u.read(LSR) & 0x02 == 0, "OE clears when LSR is read"
    assert [u.read(RBR) for _ in range(u.FIFO_SIZE)] == list(range(u.FIFO_SIZE))


def test_loopback_refuses_host_input(h: Harness) -> None:
    h.uart.write(MCR, LOOP)
    assert h.uart.feed(b"abc") == 0
    assert h.uart.counters.rx_refused == 3
    assert h.uart.rx_space == 64


def test_on_output_error_still_rearms_thre(h: Harness) -> None:
    def broken(_: bytes) -> None:
        raise OSError("host side gone")

    calls: list[bool] = []
    u = Uart16550(on_output=broken, irq=calls.append)
    u.write(IER, 0x02)
    with pytest.raises(OSError):
        u.write(THR, 0x41)
    assert u.irq_level is True
    assert u.read(IIR) == 0x02
    assert u.counters.tx_bytes == 0


# ----------------------------------------------------------------------
# Receive path
# ----------------------------------------------------------------------


def test_feed_is_capped_at_fifo_size(h: Harness) -> None:
    u = h.uart
    assert u.feed(b"a" * 10) == 10
    assert u.rx_space == 54
    assert u.feed(bytes(100)) == 54
    assert u.rx_space == 0
    assert u.feed(b"more") == 0
    assert u.counters.rx_bytes == 64
    assert u.counters.rx_refused == 46 + 4
    u.read(RBR)
    assert u.rx_space == 1
    assert u.feed(bytearray(b"xy")) == 1


def test_feed_accepts_memoryview_and_empty_input(h: Harness) -> None:
    assert h.uart.feed(memoryview(b"ok")) == 2
    assert h.uart.feed(b"") == 0
    assert bytes(h.uart.read(RBR) for _ in range(2)) == b"ok"


def test_rbr_pops_in_order_and_empty_reads_zero(h: Harness) -> None:
    u = h.uart
    u.feed(b"abc")
    assert bytes(u.read(RBR) for _ in range(3)) == b"abc"
    assert u.read(RBR) == 0
    assert u.rx_space == 64


def test_lsr_data_ready_tracks_fifo(h: Harness) -> None:
    u = h.uart
    assert u.read(LSR) & 0x01 == 0
    u.feed(b"12")
    assert u.read(LSR) == 0x61
    u.read(RBR)
    assert u.read(LSR) == 0x61
    u.read(RBR)
    assert u.read(LSR) == 0x60


@pytest.mark.parametrize("fcr", [0x01, 0x41, 0x81, 0xC1])
def test_rx_interrupt_fires_on_first_byte_at_any_trigger_level(
    h: Harness, fcr: int
) -> None:
    # Documented choice: no character-timeout timer, so data present
    # always means "received data available".
    u = h.uart
    u.write(FCR, fcr)
    u.write(IER, 0x01)
    assert h.irq_calls == []
    u.feed(b"x")
    assert h.irq_calls == [True]
    assert u.read(IIR) == 0xC4
    u.read(RBR)
    assert h.irq_calls == [True, False]


# ----------------------------------------------------------------------
# FIFO control
# ----------------------------------------------------------------------


def test_fcr_enable_sets_iir_fifo_bits(h: Harness) -> None:
    h.uart.write(FCR, 0x01)
    assert h.uart.read(IIR) == 0xC1
    h.uart.write(FCR, 0x00)
    assert h.uart.read(IIR) == 0x01


def test_fcr_rx_reset_clears_fifo(h: Harness) -> None:
    u = h.uart
    u.write(FCR, 0x01)
    u.feed(b"abc")
    u.write(FCR, 0x03)
    assert u.rx_space == 64
    assert u.read(LSR) & 0x01 == 0
    assert u.read(RBR) == 0


def test_fcr_toggling_enable_flushes_fifo(h: Harness) -> None:
    u = h.uart
    u.feed(b"abc")
    u.write(FCR, 0x01)
    assert u.rx_space == 64
    u.feed(b"def")
    u.write(FCR, 0x01)  # no toggle, no reset bit: data stays
    assert u.rx_space == 61
    u.write(FCR, 0x00)
    assert u.rx_space == 64


def test_fcr_rx_reset_drops_pending_rx_interrupt(h: Harness) -> None:
    u = h.uart
    u.write(IER, 0x01)
    u.feed(b"z")
    assert u.irq_level is True
    u.write(FCR, 0x02)
    assert u.irq_level is False
    assert h.irq_calls == [True, False]


def test_fcr_tx_reset_arms_thre(h: Harness) -> None:
    u = h.uart
    u.write(IER, 0x02)
    u.read(IIR)  # acknowledge THRE
    assert u.irq_level is False
    u.write(FCR, 0x04)
    assert u.irq_level is True
    assert u.read(IIR) == 0x02


# ----------------------------------------------------------------------
# Interrupt identification and the irq line
# ----------------------------------------------------------------------


def test_etbei_raises_irq_immediately_when_thr_empty(h: Harness) -> None:
    h.uart.write(IER, 0x02)
    assert h.irq_calls == [True]
    assert h.uart.irq_level is True
    assert h.uart.read(IIR) == 0x02
    assert h.uart.counters.irq_raises == 1


def test_thri_is_cleared_by_iir_read(h: Harness) -> None:
    u = h.uart
    u.write(IER, 0x02)
    assert u.read(IIR) == 0x02
    assert u.read(IIR) == 0x01
    assert u.irq_level is False
    assert h.irq_calls == [True, False]


def test_thri_is_rearmed_by_each_thr_write_with_a_fresh_edge(h: Harness) -> None:
    u = h.uart
    u.write(IER, 0x02)
    # Writing THR while THRE is pending acknowledges it; the instant
    # transmitter empties THR again, giving edge-triggered PICs a new edge.
    u.write(THR, ord("a"))
    assert h.irq_calls == [True, False, True]
    u.read(IIR)
    assert h.irq_calls == [True, False, True, False]
    u.write(THR, ord("b"))
    assert h.irq_calls == [True, False, True, False, True]
    assert u.counters.irq_raises == 3
    assert h.out == b"ab"


def test_rewriting_ier_does_not_rearm_thre(h: Harness) -> None:
    # QEMU resamples THRE only when ETBEI goes from 0 to 1.
    u = h.uart
    u.write(IER, 0x02)
    u.read(IIR)
    u.write(IER, 0x02)
    assert u.irq_level is False
    u.write(IER, 0x00)
    u.write(IER, 0x02)
    assert u.irq_level is True


def test_disabling_etbei_lowers_irq(h: Harness) -> None:
    h.uart.write(IER, 0x02)
    h.uart.write(IER, 0x00)
    assert h.irq_calls == [True, False]
    assert h.uart.read(IIR) == 0x01


def test_iir_priority_order(h: Harness) -> None:
    u = h.uart
    u.write(FCR, 0x01)
    u.write(IER, 0x0F)
    assert u.read(IIR) & 0x0F == 0x02  # THRE only (read acknowledges it)

    # Re-arm THRE, then add received data: RDA outranks THRE.
    u.write(IER, 0x0D)
    u.write(IER, 0x0F)
    u.feed(b"q")
    assert u.read(IIR) == 0xC4
    assert u.read(IIR) == 0xC4, "reading IIR does not acknowledge RDA"

    # Overrun (via loopback) outranks everything.
    u.write(MCR, LOOP)
    for _ in range(u.FIFO_SIZE):
        u.write(THR, 0x55)
    assert u.read(IIR) == 0xC6
    u.read(LSR)  # clears OE
    assert u.read(IIR) == 0xC4

    # Drain the FIFO: the THRE re-armed by the last THR write shows next.
    while u.read(LSR) & 0x01:
        u.read(RBR)
    assert u.read(IIR) == 0xC2
    # Entering loopback changed the modem inputs, so modem status is last.
    assert u.read(IIR) == 0xC0
    u.read(MSR)  # clears the delta bits
    assert u.read(IIR) == 0xC1
    assert u.irq_level is False
    assert_no_repeated_irq_values(h.irq_calls)


def test_interrupts_masked_by_ier_do_not_raise(h: Harness) -> None:
    u = h.uart
    u.feed(b"data")
    u.write(THR, 0x41)
    u.write(MCR, LOOP | 0x0F)
    assert u.read(IIR) == 0x01
    assert h.irq_calls == []


def test_irq_callback_only_on_changes(h: Harness) -> None:
    u = h.uart
    u.write(IER, 0x01)
    u.feed(b"a")
    u.feed(b"b")  # level already high: no second call
    u.read(LSR)
    u.read(IIR)
    u.read(RBR)  # one byte left: still high
    assert h.irq_calls == [True]
    u.read(RBR)
    assert h.irq_calls == [True, False]
    u.read(RBR)  # empty read: still low
    u.write(IER, 0x01)
    assert h.irq_calls == [True, False]


def test_irq_callback_is_optional() -> None:
    out: list[bytes] = []
    u = Uart16550(on_output=out.append)
    u.write(IER, 0x03)
    assert u.irq_level is True
    u.feed(b"x")
    assert u.read(IIR) == 0x04
    u.write(THR, 0x21)
    assert out == [b"!"]


def test_reentrant_irq_callback_sees_consistent_state() -> None:
    seen: list[bool] = []
    uart: Uart16550

    def irq(level: bool) -> None:
        seen.append(level)
        assert uart.irq_level is level
        if level:
            uart.read(IIR)  # acknowledges THRE from inside the callback

    uart = Uart16550(on_output=lambda _: None, irq=irq)
    uart.write(IER, 0x02)
    assert seen == [True, False]
    assert uart.irq_level is False


# ----------------------------------------------------------------------
# Modem status
# ----------------------------------------------------------------------


def test_msr_in_loopback_mirrors_mcr(h: Harness) -> None:
    u = h.uart
    cases = {
        0x01: 0x20,  # DTR -> DSR
        0x02: 0x10,  # RTS -> CTS
        0x04: 0x40,  # OUT1 -> RI
        0x08: 0x80,  # OUT2 -> DCD
        0x0A: 0x90,  # what Linux's 8250 autoconfig probes for
        0x0F: 0xF0,
        0x00: 0x00,
    }
    for mcr_bits, msr_high in cases.items():
        u.write(MCR, LOOP | mcr_bits)
        assert u.read(MSR) & 0xF0 == msr_high
    u.write(MCR, 0x00)
    assert u.read(MSR) & 0xF0 == 0xB0


def test_msr_delta_bits_and_modem_interrupt(h: Harness) -> None:
    u = h.uart
    u.write(IER, 0x08)
    u.write(MCR, LOOP | 0x0F)  # inputs 0xB0 -> 0xF0: only RI rises
    assert u.irq_level is False, "RI rising edge sets no delta bit"
    u.write(MCR, LOOP | 0x0B)  # RI falls: trailing edge
    assert u.irq_level is True
    assert u.read(IIR) == 0x00
    assert u.read(MSR) == 0xB4
    assert u.read(MSR) == 0xB0, "delta bits clear on read"
    assert u.irq_level is False
    u.write(MCR, LOOP)  # CTS, DSR, DCD all drop
    assert u.read(MSR) == 0x0B
    assert h.irq_calls == [True, False, True, False]


# ----------------------------------------------------------------------
# Property test: arbitrary guest and host activity
# ----------------------------------------------------------------------

guest_read = st.tuples(st.just("read"), st.integers(0, 7))
guest_write = st.tuples(
    st.just("write"),
    st.integers(0, 7),
    st.one_of(st.integers(0, 255), st.integers(-(1 << 16), 1 << 16)),
)
host_feed = st.tuples(st.just("feed"), st.binary(max_size=80))
operations = st.lists(st.one_of(guest_read, guest_write, host_feed), max_size=300)


@settings(max_examples=400, deadline=None)
@given(ops=operations)
def test_random_operations_keep_invariants(ops: list[tuple]) -> None:
    h = Harness()
    u = h.uart
    for op in ops:
        kind = op[0]
        if kind == "read":
            value = u.read(op[1])
            assert isinstance(value, int)
            assert 0 <= value <= 255
        elif kind == "write":
            assert u.write(op[1], op[2]) is None
        else:
            space = u.rx_space
            accepted = u.feed(op[1])
            assert 0 <= accepted <= min(space, len(op[1]))
            assert u.rx_space == space - accepted
        assert 0 <= u.rx_space <= u.FIFO_SIZE
        expected_level = h.irq_calls[-1] if h.irq_calls else False
        assert u.irq_level is expected_level

    assert_no_repeated_irq_values(h.irq_calls)
    assert all(len(chunk) == 1 for chunk in h.output)
    m = u.counters
    assert m.tx_bytes == len(h.output)
    assert m.irq_raises == h.irq_calls.count(True)
    assert m.reads == sum(op[0] == "read" for op in ops)
    assert m.writes == sum(op[0] == "write" for op in ops)
    fed = sum(len(op[1]) for op in ops if op[0] == "feed")
    assert m.rx_bytes + m.rx_refused == fed
