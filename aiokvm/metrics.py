"""Counters the VMM keeps per vCPU, aggregated per machine as plain data.

Each vCPU thread owns its ``VcpuMetrics`` and is the only writer, so the hot
path needs no lock; ``Machine.stats()`` reads them (a slightly stale read is
fine for counters).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class VcpuMetrics:
    """Exit counts for one vCPU."""

    index: int
    #: exits returned to user mode, by normalized reason ("io", "mmio", ...)
    exits: Counter = field(default_factory=Counter)
    #: port I/O exits by (port, "in"/"out"); string I/O counts one per exit
    pio: Counter = field(default_factory=Counter)
    #: port I/O elements by (port, "in"/"out"); rep ins/outs count each element
    pio_elements: Counter = field(default_factory=Counter)
    #: MMIO exits by (region name or "unclaimed", "read"/"write")
    mmio: Counter = field(default_factory=Counter)
    #: handler invocations by (device name, path) with path "inline" or "loop"
    paths: Counter = field(default_factory=Counter)
    #: kicks (KVM_RUN returned EINTR)
    kicks: int = 0

    def as_dict(self) -> dict:
        return {
            "index": self.index,
            "user_exits": sum(n for reason, n in self.exits.items() if reason != "intr"),
            "exits": dict(self.exits),
            "pio": {f"{port:#x}/{d}": n for (port, d), n in sorted(self.pio.items())},
            "pio_elements": {f"{port:#x}/{d}": n for (port, d), n in sorted(self.pio_elements.items())},
            "mmio": {f"{name}/{d}": n for (name, d), n in sorted(self.mmio.items())},
            "paths": {f"{dev}/{path}": n for (dev, path), n in sorted(self.paths.items())},
            "kicks": self.kicks,
        }


def merge_counts(vcpus: list[dict], key: str) -> dict:
    total: Counter = Counter()
    for v in vcpus:
        total.update(v[key])
    return dict(sorted(total.items()))
