"""Sans-I/O model of a 16550A UART's eight registers.

This module holds only register state and the rules that connect the
registers. It does no I/O, starts no threads and never touches asyncio.
Whoever embeds it routes guest port accesses to :meth:`Uart16550.read` and
:meth:`Uart16550.write`, passes host input to :meth:`Uart16550.feed`, and
gets transmitted bytes and interrupt-line changes back through two callbacks.

Where the 16550A datasheet and QEMU's ``hw/char/serial.c`` differ, we follow
QEMU, because guest drivers are tested against QEMU. Every intentional
difference from both is marked "Deviation" below.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Uart16550", "UartCounters"]

# Register offsets (relative to the base port).
_RBR_THR_DLL = 0
_IER_DLM = 1
_IIR_FCR = 2
_LCR = 3
_MCR = 4
_LSR = 5
_MSR = 6
_SCR = 7

# IER: only the low nibble exists on a 16550A.
_IER_RDI = 0x01  # received data available
_IER_THRI = 0x02  # THR empty (ETBEI)
_IER_RLSI = 0x04  # receiver line status
_IER_MSI = 0x08  # modem status
_IER_MASK = 0x0F

# IIR interrupt identification codes (bits 0-3) and the FIFO flag (bits 6-7).
_IIR_NO_INT = 0x01
_IIR_MSI = 0x00
_IIR_THRI = 0x02
_IIR_RDI = 0x04
_IIR_RLSI = 0x06
_IIR_FIFO_ENABLED = 0xC0

# FCR bits. Only FE, DMA mode and the RX trigger level (bits 6-7: 1, 4, 8
# or 14 bytes) "stick", as in QEMU; the two reset bits act once and are
# never stored. The trigger level is kept but never delays an interrupt
# (see the class docstring).
_FCR_FE = 0x01
_FCR_RX_RESET = 0x02
_FCR_TX_RESET = 0x04
_FCR_STICKY = 0xC9

_LCR_DLAB = 0x80

# MCR: five writable bits, bit 4 is loopback.
_MCR_DTR = 0x01
_MCR_RTS = 0x02
_MCR_OUT1 = 0x04
_MCR_OUT2 = 0x08
_MCR_LOOP = 0x10
_MCR_MASK = 0x1F

_LSR_DR = 0x01
_LSR_OE = 0x02
_LSR_THRE = 0x20
_LSR_TEMT = 0x40

_MSR_DCTS = 0x01
_MSR_DDSR = 0x02
_MSR_TERI = 0x04
_MSR_DDCD = 0x08
_MSR_CTS = 0x10
_MSR_DSR = 0x20
_MSR_RI = 0x40
_MSR_DCD = 0x80

# Modem inputs seen outside loopback: a permanently "connected" peer, so
# drivers that wait for CTS/DSR/DCD before sending do not hang.
_MSR_IDLE_INPUTS = _MSR_DCD | _MSR_DSR | _MSR_CTS  # 0xB0

# Value returned for a read outside offsets 0-7: an undecoded ISA port
# floats high, so 0xFF is what a guest would see on real hardware.
_UNMAPPED_READ = 0xFF

# Reset values. Source: QEMU hw/char/serial.c, serial_reset().
_RESET_IER = 0x00
_RESET_LCR = 0x00
_RESET_MCR = _MCR_OUT2  # QEMU sets OUT2; the datasheet says 0x00.
_RESET_FCR = 0x00  # QEMU leaves FCR at its zeroed power-on value.
_RESET_SCR = 0x00
_RESET_DIVISOR = 0x000C  # 115200 / 12 = 9600 baud, QEMU's default.


@dataclass
class UartCounters:
    """Counters only ever increase; an embedder may read them at any time."""

    tx_bytes: int = 0  # bytes passed to on_output
    rx_bytes: int = 0  # bytes feed() accepted into the RX FIFO
    rx_refused: int = 0  # bytes feed() could not take (FIFO full or loopback)
    loopback_bytes: int = 0  # THR writes made while MCR loopback was set
    reads: int = 0  # calls to read()
    writes: int = 0  # calls to write()
    irq_raises: int = 0  # low->high transitions of the interrupt output


class Uart16550:
    """16550A at 8 consecutive registers (offsets 0-7).

    Threat model: the guest controls every register write and read, in any
    order and with any value. No register access can raise, grow memory use
    or produce a value outside 0..255 (only exceptions from the embedder's
    own callbacks propagate). Host input is bounded by a 64-byte RX
    FIFO: :meth:`feed` accepts what fits and reports how much; the excess is
    refused, never buffered here, so a fast host writer cannot grow this
    object without limit (cf. CVE-2020-27173, Firecracker's serial device
    buffering unbounded stdin). Back-pressure is the caller's job.

    Behaviour follows QEMU's 16550A model, with these choices:

    * The transmitter is infinitely fast. A THR write goes straight to
      ``on_output`` and LSR.THRE/TEMT read as set at all times. There is no
      TX FIFO to overflow.
    * The RX FIFO is 64 bytes deep whether or not FCR enables FIFOs
      (Deviation: a 16550A in 16450 mode holds one byte). One depth keeps
      ``feed`` and ``rx_space`` simple and never loses host data.
    * Deviation on the RX trigger level: the trigger level from FCR is
      latched, but "received data available" (IIR 0x04) is raised as soon
      as the FIFO holds any byte. Below the trigger level a real chip waits
      for a character timeout (IIR 0x0C) and QEMU uses a timer for it. This
      model has no clock, and waiting for a timeout that never comes would
      stall the guest. Drivers read RBR until LSR.DR clears, so getting
      0x04 with fewer bytes than the trigger level does them no harm.
    * In loopback (MCR bit 4), transmitted bytes go into the RX FIFO. If the
      FIFO is full the byte is dropped and LSR.OE is set. Host input is
      refused in loopback, as the serial input pin is disconnected then.
    * Outside loopback MSR reports CTS|DSR|DCD (0xB0). In loopback it mirrors
      MCR (RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD) and sets the delta bits
      as the 16550A datasheet describes, so modem-status interrupts work
      (QEMU skips the deltas in loopback).
    * MCR.OUT2 does not gate the interrupt output. QEMU does not gate it
      either; PC boards gate it outside the chip.
    * ``irq`` is called only when the computed level changes. A THR write
      briefly clears the THRE interrupt before the instant transmitter
      re-arms it. As in QEMU, an edge-triggered interrupt controller
      therefore sees a fresh rising edge for each byte.
    * Reading outside offsets 0-7 returns 0xFF and writing there is ignored.

    Reset state (QEMU ``serial_reset``): IER 0x00, IIR 0x01, LCR 0x00,
    MCR 0x08 (OUT2), LSR 0x60, MSR 0xB0, SCR 0x00, divisor 12 (9600 baud
    from the 1.8432 MHz clock), FCR 0x00, FIFO empty, interrupt line low.
    """

    FIFO_SIZE = 64
    counters: UartCounters

    def __init__(
        self,
        *,
        on_output: Callable[[bytes], None],
        irq: Callable[[bool], None] | None = None,
    ) -> None:
        self._on_output = on_output
        self._irq = irq
        self.counters = UartCounters()
        self._rx: deque[int] = deque()
        self._irq_level = False
        self._reset()

    def _reset(self) -> None:
        self._ier = _RESET_IER
        self._lcr = _RESET_LCR
        self._mcr = _RESET_MCR
        self._fcr = _RESET_FCR
        self._scr = _RESET_SCR
        self._divisor = _RESET_DIVISOR
        self._overrun = False  # LSR.OE, sticky until LSR is read
        self._msr_delta = 0  # MSR bits 0-3, cleared when MSR is read
        self._thr_ipending = False  # THRE interrupt armed (QEMU thr_ipending)
        self._rx.clear()
        self._update_irq()

    # ------------------------------------------------------------------
    # Public interface
    # ------------------------------------------------------------------

    @property
    def rx_space(self) -> int:
        """Free bytes in the RX FIFO."""
        return self.FIFO_SIZE - len(self._rx)

    @property
    def irq_level(self) -> bool:
        """Current level of the interrupt output (True = asserted)."""
        return self._irq_level

    def feed(self, data: bytes) -> int:
        """Queue host input for the guest and return how many bytes were taken.

        Bytes that do not fit are counted in ``counters.rx_refused`` and
        dropped here. The caller keeps them and offers them again after the
        guest has drained the FIFO.
        """
        # Works for bytes, bytearray and byte memoryviews; only the accepted
        # slice is copied.
        if self._mcr & _MCR_LOOP:
            accepted = 0
        else:
            accepted = min(len(data), self.rx_space)
            self._rx.extend(data[:accepted])
        self.counters.rx_bytes += accepted
        self.counters.rx_refused += len(data) - accepted
        if accepted:
            self._update_irq()
        return accepted

    def read(self, offset: int) -> int:
        """Guest read of register ``offset``; always returns 0..255."""
        self.counters.reads += 1
        dlab = bool(self._lcr & _LCR_DLAB)
        if offset == _RBR_THR_DLL:
            return self._divisor & 0xFF if dlab else self._read_rbr()
        if offset == _IER_DLM:
            return self._divisor >> 8 if dlab else self._ier
        if offset == _IIR_FCR:
            return self._read_iir()
        if offset == _LCR:
            return self._lcr
        if offset == _MCR:
            return self._mcr
        if offset == _LSR:
            return self._read_lsr()
        if offset == _MSR:
            return self._read_msr()
        if offset == _SCR:
            return self._scr
        return _UNMAPPED_READ

    def write(self, offset: int, value: int) -> None:
        """Guest write of ``value`` (masked to 8 bits) to register ``offset``."""
        self.counters.writes += 1
        value &= 0xFF
        dlab = bool(self._lcr & _LCR_DLAB)
        if offset == _RBR_THR_DLL:
            if dlab:
                self._divisor = (self._divisor & 0xFF00) | value
            else:
                self._write_thr(value)
        elif offset == _IER_DLM:
            if dlab:
                self._divisor = (self._divisor & 0x00FF) | (value << 8)
            else:
                self._write_ier(value)
        elif offset == _IIR_FCR:
            # FCR is write-only and unaffected by DLAB (16550A datasheet).
            self._write_fcr(value)
        elif offset == _LCR:
            # Word length, parity, stop bits and break mean nothing on a
            # virtual wire; store them so the guest reads back what it wrote.
            self._lcr = value
        elif offset == _MCR:
            self._write_mcr(value)
        elif offset == _SCR:
            self._scr = value
        # LSR and MSR are read-only (writes there are factory-test only on
        # real parts); out-of-range offsets are ignored.

    # ------------------------------------------------------------------
    # Register behaviour
    # ------------------------------------------------------------------

    def _read_rbr(self) -> int:
        # An empty FIFO reads as 0, as in QEMU's FIFO mode.
        value = self._rx.popleft() if self._rx else 0
        self._update_irq()
        return value

    def _write_thr(self, value: int) -> None:
        # Writing THR acknowledges the THRE interrupt. Lower the line first so
        # that re-arming below gives a new rising edge (see class docstring).
        self._thr_ipending = False
        self._update_irq()
        try:
            if self._mcr & _MCR_LOOP:
                self.counters.loopback_bytes += 1
                if len(self._rx) < self.FIFO_SIZE:
                    self._rx.append(value)
                else:
                    # Receiver overrun: the new byte is lost, FIFO kept.
                    self._overrun = True
            else:
                self._on_output(bytes((value,)))
                self.counters.tx_bytes += 1
        finally:
            # The byte has "left" at once, so THR is empty again. Re-arm even
            # if on_output raised: a lost THRE interrupt stalls guest TX.
            self._thr_ipending = True
            self._update_irq()

    def _write_ier(self, value: int) -> None:
        value &= _IER_MASK
        changed = self._ier ^ value
        self._ier = value
        # QEMU (and Windows relies on it): turning ETBEI on while THR is
        # empty raises THRE even if it was acknowledged before. THR is
        # always empty here. Turning ETBEI off discards the pending state.
        if changed & _IER_THRI:
            self._thr_ipending = bool(value & _IER_THRI)
        if changed:
            self._update_irq()

    def _write_fcr(self, value: int) -> None:
        # Toggling FIFO enable flushes both FIFOs (datasheet and QEMU).
        if (value ^ self._fcr) & _FCR_FE:
            value |= _FCR_RX_RESET | _FCR_TX_RESET
        if value & _FCR_RX_RESET:
            self._rx.clear()
        if value & _FCR_TX_RESET:
            # There is no TX FIFO; like QEMU, a TX reset leaves THR empty and
            # arms the THRE interrupt.
            self._thr_ipending = True
        self._fcr = value & _FCR_STICKY
        self._update_irq()

    def _write_mcr(self, value: int) -> None:
        before = self._modem_inputs()
        self._mcr = value & _MCR_MASK
        after = self._modem_inputs()
        changed = before ^ after
        if changed:
            # Delta bits sit four places below the line they track. RI only
            # sets TERI on its trailing (1 -> 0) edge.
            delta = (changed >> 4) & (_MSR_DCTS | _MSR_DDSR | _MSR_DDCD)
            if (before & _MSR_RI) and not (after & _MSR_RI):
                delta |= _MSR_TERI
            self._msr_delta |= delta
            self._update_irq()

    def _read_iir(self) -> int:
        ident = self._pending_interrupt()
        value = ident | (_IIR_FIFO_ENABLED if self._fcr & _FCR_FE else 0)
        # Reading IIR while it reports THRE acknowledges that interrupt.
        if ident == _IIR_THRI:
            self._thr_ipending = False
            self._update_irq()
        return value

    def _read_lsr(self) -> int:
        value = _LSR_THRE | _LSR_TEMT
        if self._rx:
            value |= _LSR_DR
        if self._overrun:
            value |= _LSR_OE
            # OE is cleared by reading LSR, which also ends the RLS interrupt.
            self._overrun = False
            self._update_irq()
        return value

    def _read_msr(self) -> int:
        value = self._modem_inputs() | self._msr_delta
        if self._msr_delta:
            self._msr_delta = 0
            self._update_irq()
        return value

    def _modem_inputs(self) -> int:
        """MSR bits 4-7: the CTS/DSR/RI/DCD input pins."""
        if not self._mcr & _MCR_LOOP:
            return _MSR_IDLE_INPUTS
        mcr = self._mcr
        inputs = 0
        if mcr & _MCR_RTS:
            inputs |= _MSR_CTS
        if mcr & _MCR_DTR:
            inputs |= _MSR_DSR
        if mcr & _MCR_OUT1:
            inputs |= _MSR_RI
        if mcr & _MCR_OUT2:
            inputs |= _MSR_DCD
        return inputs

    # ------------------------------------------------------------------
    # Interrupt logic
    # ------------------------------------------------------------------

    def _pending_interrupt(self) -> int:
        """Return the IIR id of the highest-priority pending interrupt."""
        ier = self._ier
        if ier & _IER_RLSI and self._overrun:
            return _IIR_RLSI
        if ier & _IER_RDI and self._rx:
            return _IIR_RDI
        if ier & _IER_THRI and self._thr_ipending:
            return _IIR_THRI
        if ier & _IER_MSI and self._msr_delta:
            return _IIR_MSI
        return _IIR_NO_INT

    def _update_irq(self) -> None:
        level = self._pending_interrupt() != _IIR_NO_INT
        if level == self._irq_level:
            return
        # Store the new level before calling out, so a callback that re-enters
        # the UART sees consistent state and the last value passed to irq
        # always equals irq_level.
        self._irq_level = level
        if level:
            self.counters.irq_raises += 1
        if self._irq is not None:
            self._irq(level)
