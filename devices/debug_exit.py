"""isa-debug-exit: a write of value v ends the machine with exit code v.

Compatible with QEMU's ``-device isa-debug-exit,iobase=0xf4,iosize=4``, with
one documented difference: QEMU turns v into the process status
``(v << 1) | 1``; aiokvm reports v itself.  Reads return 0.
"""

from __future__ import annotations

from collections.abc import Callable

DEBUG_EXIT_PORT = 0xF4
DEBUG_EXIT_SIZE = 4


class DebugExit:
    """Register device; runs inline (it only records the code and asks to stop)."""

    kind = "debug-exit"

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1
        self._on_exit(value)

    def metrics(self) -> dict:
        return {"kind": self.kind, "counters": {"writes": self.writes}}
