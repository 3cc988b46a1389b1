"""Serial console: the 16550A model wired to the bus, an IRQ line, and asyncio.

The register model (``serial.Uart16550``) is pure; this adapter adds what it
needs to live in a VMM:

- **Threads.** Register accesses run inline in a vCPU thread (the default) or
  on the loop; host input arrives on the loop.  One lock guards the model.
- **Output.** Transmitted bytes are buffered and flushed to the sink on the
  loop, one ``call_soon_threadsafe`` per burst, not per byte.
- **Input.** A source task reads host input and feeds it to the 64-byte RX
  FIFO as the guest drains it; it stops reading while the guest is behind,
  so host input is never buffered without bound.
- **Transcript.** The last ``transcript_limit`` bytes of output are kept for
  callers and tests (``console.output``).

The sink is a callable taking bytes, or an object with ``write(bytes)`` (an
``asyncio.StreamWriter``, ``sys.stdout.buffer``).  The source is an
``asyncio.StreamReader`` or any async iterable of bytes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterable, Callable
from dataclasses import asdict
from typing import Any

import structlog

from .serial import Uart16550

log = structlog.get_logger("aiokvm.devices.console")

COM1_PORT = 0x3F8
COM1_IRQ = 4
PENDING_INPUT_LIMIT = 4096


class SerialConsole:
    """The bus device for COM1 (8 ports)."""

    kind = "serial"

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        irq: Callable[[bool], None] | None = None,
        sink: Any = None,
        transcript_limit: int = 1 << 20,
    ) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()  # built on the loop thread
        self._lock = threading.Lock()
        self._out = bytearray()
        self._flush_scheduled = False
        self._sink = sink
        self._transcript = bytearray()
        self._transcript_limit = transcript_limit
        self._pending_in = bytearray()
        self._input_room = asyncio.Event()
        self._input_room.set()
        self._source_task: asyncio.Task | None = None
        self.uart = Uart16550(on_output=self._on_tx, irq=irq)

    # -- bus device ---------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self._lock:
            value = self.uart.read(offset)
            if offset == 0 and self._pending_in:
                self._refill_locked()
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self.uart.write(offset, value & 0xFF)

    # -- output ---------------------------------------------------------------------
    def _on_tx(self, data: bytes) -> None:
        # Called with the lock held, in whichever thread touched THR.
        self._out += data
        if not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._flush)
            except RuntimeError:  # loop closed: keep the bytes in the transcript only
                self._flush_scheduled = False

    def _flush(self) -> None:
        with self._lock:
            data = bytes(self._out)
            self._out.clear()
            self._flush_scheduled = False
        if not data:
            return
        self._transcript += data
        overflow = len(self._transcript) - self._transcript_limit
        if overflow > 0:
            del self._transcript[:overflow]
        sink = self._sink
        if sink is None:
            return
        try:
            if callable(sink):
                sink(data)
            else:
                sink.write(data)
                flush = getattr(sink, "flush", None)
                if flush is not None and not asyncio.iscoroutinefunction(flush):
                    flush()
        except Exception:
            log.warning("serial sink failed; output dropped", exc_info=True)

    def drain(self) -> None:
        """Flush buffered output now (on the loop thread), e.g. before exit."""
        self._flush()

    @property
    def output(self) -> bytes:
        """Everything the guest printed (last ``transcript_limit`` bytes)."""
        with self._lock:
            tail = bytes(self._out)
        return bytes(self._transcript) + tail

    # -- input ----------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Queue host input for the guest (loop thread)."""
        with self._lock:
            self._pending_in += data
            self._refill_locked()

    def _refill_locked(self) -> None:
        taken = self.uart.feed(bytes(self._pending_in[:self.uart.rx_space]))
        del self._pending_in[:taken]
        room = len(self._pending_in) < PENDING_INPUT_LIMIT
        if room != self._input_room.is_set():
            setter = self._input_room.set if room else self._input_room.clear
            if threading.get_ident() == self._loop_thread:
                setter()
            else:
                self._loop.call_soon_threadsafe(setter)

    def attach_source(self, source: asyncio.StreamReader | AsyncIterable[bytes]) -> asyncio.Task:
        """Start feeding host input from ``source``; returns the task."""
        self._source_task = self._loop.create_task(self._pump(source))
        return self._source_task

    async def _pump(self, source) -> None:
        if isinstance(source, asyncio.StreamReader):
            while not source.at_eof():
                await self._input_room.wait()
                chunk = await source.read(256)
                if chunk:
                    self.feed(chunk)
        else:
            async for chunk in source:
                await self._input_room.wait()
                self.feed(bytes(chunk))

    @property
    def sink(self):
        """Where the guest's output goes (as given to the constructor)."""
        return self._sink

    def metrics(self) -> dict:
        with self._lock:
            counters = asdict(self.uart.counters)
            counters["input_pending"] = len(self._pending_in)
        return {"kind": self.kind, "counters": counters}

    async def aclose(self) -> None:
        self.close()
        self.drain()

    def close(self) -> None:
        if self._source_task is not None:
            self._source_task.cancel()
            self._source_task = None
