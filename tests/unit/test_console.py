"""The serial console adapter: sinks, sources, backpressure, thread handoff."""

from __future__ import annotations

import asyncio
import threading

from aiokvm.devices.console import PENDING_INPUT_LIMIT, SerialConsole

THR, LSR = 0, 5


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_output_reaches_a_callable_sink_in_order_from_another_thread():
    got = bytearray()
    console = SerialConsole(asyncio.get_running_loop(), sink=got.extend)

    def guest():
        for b in b"hello, world\n":
            console.write(THR, 1, b)

    t = threading.Thread(target=guest)
    t.start()
    while t.is_alive():
        await asyncio.sleep(0.001)
    await settle()
    assert bytes(got) == b"hello, world\n"
    assert console.output == b"hello, world\n"


async def test_output_reaches_a_stream_writer_sink():
    class Writer:
        def __init__(self):
            self.data = b""

        def write(self, data):
            self.data += data

    writer = Writer()
    console = SerialConsole(asyncio.get_running_loop(), sink=writer)
    console.write(THR, 1, ord("x"))
    await settle()
    assert writer.data == b"x"


async def test_a_failing_sink_does_not_break_the_guest():
    def broken(data):
        raise OSError("pipe closed")

    console = SerialConsole(asyncio.get_running_loop(), sink=broken)
    console.write(THR, 1, ord("y"))
    await settle()
    assert console.output == b"y"


async def test_input_from_a_stream_reader_respects_the_fifo():
    loop = asyncio.get_running_loop()
    irq_levels = []
    console = SerialConsole(loop, irq=irq_levels.append)
    console.write(1, 1, 0x01)  # IER: received-data interrupt on
    reader = asyncio.StreamReader()
    data = bytes(range(256)) * 2
    reader.feed_data(data)
    reader.feed_eof()
    task = console.attach_source(reader)
    await settle()
    received = bytearray()
    while len(received) < len(data):
        if console.read(LSR, 1) & 1:
            received.append(console.read(THR, 1))
        else:
            await asyncio.sleep(0)
        assert console.uart.rx_space >= 0
    assert bytes(received) == data
    assert True in irq_levels
    await task


async def test_async_iterable_source_stops_reading_when_the_guest_is_behind():
    console = SerialConsole(asyncio.get_running_loop())
    produced = 0

    async def source():
        nonlocal produced
        for _ in range(100):
            produced += 1024
            yield b"z" * 1024

    task = console.attach_source(source())
    await asyncio.sleep(0.05)
    # FIFO (64) plus at most one chunk past the pending limit; never all 100 KiB.
    assert produced <= PENDING_INPUT_LIMIT + 2 * 1024 + 64
    assert not task.done()
    console.close()
    await asyncio.sleep(0)
    assert task.cancelled() or task.done()
