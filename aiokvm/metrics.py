"""Exit accounting: counts, latency histograms and the three-mode time split.

Sources, cheapest first:

- **The C vCPU loop's counters** (``struct aiokvm_vcpu``): exits by kind,
  per-port and per-region counts, unclaimed accesses, handoff outcomes, and
  time spent in KVM_RUN, waiting for loop-hosted handlers, and in Python.
  Each vCPU thread is the only writer of its counters, so the hot path takes
  no lock; readers tolerate a slightly stale value.
- **Latency**: the C loop timestamps every handled exit and records one of
  every ``sample_every`` (default: all) into C arrays laid out as
  ``hdrhistogram`` buckets (``LatencyHistograms``); no ring, no drain.
- **/proc/self/task/<tid>/stat** for guest / user / kernel time per vCPU
  thread (``procstat.py``), and **KVM's binary stats** (``kvm/stats.py``).

- **Device counters**: every device with ``metrics()`` (the device manager
  collects them).

``machine_stats`` assembles all of it into plain data for
``Machine.stats()``; the schema is documented in ``docs/stats-schema.md``
(``"schema": STATS_SCHEMA``).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

from .kvm import ffi, lib
from .procstat import diff, read_thread_times_precise

STATS_SCHEMA = "aiokvm.stats/2"
HIST_MAX_NS = 60 * 10**9
PERCENTILES = (50.0, 90.0, 99.0, 99.9)

#: latency components, in the order the C loop records them
LATENCIES = ("exit_to_handler", "handler", "handler_to_entry")


@dataclass
class VcpuMetrics:
    """Python-side counts for one vCPU (non-I/O exits, decoded in Python)."""

    index: int
    exits: Counter = field(default_factory=Counter)


class LatencyHistograms:
    """One vCPU's three latency histograms (nanoseconds), recorded by the C loop.

    Each ``HdrHistogram`` lends its bucket layout to a ``struct aiokvm_hist``
    in the vCPU context; the C loop increments a C array in that layout for
    every recorded exit (a few instructions, no GIL, no sampling ring), and
    ``summary()`` folds the non-zero buckets into fresh histograms, so the
    library does the percentiles.  Exact sums, maxima and counts come from C.
    """

    SIGNIFICANT_FIGURES = 3

    def __init__(self, ctx) -> None:
        self._ctx = ctx
        self._counts = []  # keeps the C arrays alive as long as ctx uses them
        layout = self._layout()
        for k, _name in enumerate(LATENCIES):
            counts = ffi.new("uint64_t[]", layout.counts_len)
            self._counts.append(counts)
            h = ctx.hist[k]
            h.len = layout.counts_len
            h.sub_mask = layout.sub_bucket_mask
            h.half_mag = layout.sub_bucket_half_count_magnitude
            h.unit_mag = layout.unit_magnitude
            h.half_count = layout.sub_bucket_half_count
            h.counts = counts

    _layout_cache: HdrHistogram | None = None

    @classmethod
    def _layout(cls) -> HdrHistogram:
        """An empty histogram whose bucket parameters every vCPU shares (built once)."""
        if cls._layout_cache is None:
            cls._layout_cache = cls._new_histogram()
        return cls._layout_cache

    @classmethod
    def _new_histogram(cls) -> HdrHistogram:
        return HdrHistogram(1, HIST_MAX_NS, cls.SIGNIFICANT_FIGURES)

    def histogram(self, name: str) -> HdrHistogram:
        """A snapshot of one component as an ``HdrHistogram``."""
        k = LATENCIES.index(name)
        hist = self._new_histogram()
        counts = self._counts[k]
        keys = ffi.new("uint32_t[]", len(counts))
        values = ffi.new("uint64_t[]", len(counts))
        n = lib.aiokvm_nonzero(counts, len(counts), keys, values, len(counts))
        for i in range(n):
            hist.record_value(hist.get_value_from_index(keys[i]), values[i])
        return hist

    def summary(self) -> dict:
        out = {}
        for k, name in enumerate(LATENCIES):
            c = self._ctx.hist[k]
            count = int(c.total)
            if count == 0:
                out[name] = {"count": 0}
                continue
            p = self.histogram(name).get_percentile_to_value_dict(list(PERCENTILES))  # one pass for all
            out[name] = {
                "count": count,
                "p50_us": p[50.0] / 1000,
                "p90_us": p[90.0] / 1000,
                "p99_us": p[99.0] / 1000,
                "p999_us": p[99.9] / 1000,
                "max_us": int(c.max) / 1000,
                "mean_us": int(c.sum) / count / 1000,
            }
        return out


def pio_counts(counts) -> dict[str, int]:
    """Non-zero per-port exit counts as ``{"0x80/out": n}``."""
    keys = ffi.new("uint32_t[]", 4096)
    values = ffi.new("uint64_t[]", 4096)
    n = lib.aiokvm_nonzero(counts, 0x20000, keys, values, 4096)
    out = {}
    for i in range(n):
        key = keys[i]
        out[f"{key >> 1:#x}/{'out' if key & 1 else 'in'}"] = int(values[i])
    return out


def vcpu_stats(thread, bus, *, kvm: dict | None, modes: dict | None, latency: dict | None) -> dict:
    """Plain-data stats of one vCPU thread (see docs/stats-schema.md)."""
    ctx = thread.ctx
    exits = {"io": int(ctx.io_exits), "mmio": int(ctx.mmio_exits)}
    exits.update(thread.metrics.exits)
    exits = {k: v for k, v in exits.items() if v}
    mmio: dict[str, int] = {}
    paths: dict[str, int] = {}
    for region in bus.regions_by_id:
        if region is None:
            continue
        hits = int(ctx.region_hits[region.id])
        if not hits:
            continue
        paths[f"{region.name}/{region.mode.value}"] = paths.get(f"{region.name}/{region.mode.value}", 0) + hits
        if region.space.value == "mmio":
            mmio[region.name] = hits
    if ctx.unclaimed_mmio_reads or ctx.unclaimed_mmio_writes:
        mmio["unclaimed/read"] = int(ctx.unclaimed_mmio_reads)
        mmio["unclaimed/write"] = int(ctx.unclaimed_mmio_writes)
    return {
        "index": thread.index,
        # exits returned from KVM_RUN to user mode (kicks excluded)
        "user_exits": int(ctx.exits),
        "exits": exits,
        "kicks": int(ctx.intr_exits),
        "pio": pio_counts(thread.pio_counts),
        "string_io_elements": int(ctx.string_io_elements),
        "mmio": mmio,
        "paths": paths,
        "unclaimed": {
            "pio_reads": int(ctx.unclaimed_pio_reads), "pio_writes": int(ctx.unclaimed_pio_writes),
            "mmio_reads": int(ctx.unclaimed_mmio_reads), "mmio_writes": int(ctx.unclaimed_mmio_writes),
        },
        "handoff": {
            "to_python": int(ctx.to_python), "to_loop": int(ctx.to_loop),
            "completed_while_spinning": int(ctx.spin_hits), "futex_waits": int(ctx.futex_waits),
            "loop_wakeups_sent": int(ctx.wakeups_sent),
        },
        "time": {
            "kvm_run_s": ctx.kvm_run_ns / 1e9, "wait_s": ctx.wait_ns / 1e9,
            "spin_wait_s": ctx.spin_wait_ns / 1e9, "sleep_wait_s": ctx.sleep_wait_ns / 1e9,
            "python_s": ctx.python_ns / 1e9,
        },
        "latency": latency or {},
        "kvm": kvm or {},
        "modes": modes or {},
    }


def mode_split(times, *, wall_s: float, spin_wait_s: float, sleep_wait_s: float) -> dict:
    """Guest / user / kernel / wait / runnable seconds of a vCPU thread, partitioning ``wall_s``.

    ``times`` is a ``procstat.ThreadTimes`` difference.  The tick-based split
    (10 ms resolution) is scaled to schedstat's exact on-CPU time when it is
    available.  ``wait_s`` is the measured wall time waiting for loop-hosted
    handlers (spinning, then sleeping).  CPU time spent *inside* those waits
    would otherwise count twice, so it leaves the other modes: the spinning
    leaves ``user_s``, and whatever still overlaps leaves ``kernel_s``, then
    ``user_s``, so the modes partition ``wall_s`` by construction.  ``runnable_s`` is time the thread waited on a run
    queue for a CPU (schedstat), as far as the rest leaves room for it (a
    wait on the run queue inside a handoff wait is already ``wait_s``).
    ``unaccounted_s`` is what remains: waiting for the GIL, or parked by
    ``pause()``.
    """
    guest, user, kernel = times.guest_s, times.user_s, times.kernel_s
    ticks = guest + user + kernel
    if times.on_cpu_s is not None and ticks > 0:
        scale = times.on_cpu_s / ticks
        guest, user, kernel = guest * scale, user * scale, kernel * scale
    user = max(user - spin_wait_s, 0.0)
    wait = spin_wait_s + sleep_wait_s
    # Whatever still overlaps the waits (futex calls, and for a Python-level
    # handoff the GIL and Python code inside its measured wait) leaves
    # kernel time first, then user time: the result is a partition.
    overlap = max(guest + user + kernel + wait - wall_s, 0.0)
    taken = min(kernel, overlap)
    kernel -= taken
    user = max(user - (overlap - taken), 0.0)
    on_cpu_or_waiting = guest + user + kernel + wait
    runnable = min(times.runqueue_s or 0.0, max(wall_s - on_cpu_or_waiting, 0.0))
    accounted = on_cpu_or_waiting + runnable
    return {
        "guest_s": guest,
        "user_s": user,
        "kernel_s": kernel,
        "wait_s": wait,
        "runnable_s": runnable,
        "wall_s": wall_s,
        "on_cpu_s": times.on_cpu_s,
        "runqueue_s": times.runqueue_s,
        "unaccounted_s": max(wall_s - accounted, 0.0),
        "accounted_fraction": (accounted / wall_s) if wall_s > 0 else None,
    }


def emulated_modes(thread) -> dict:
    """The mode split of an emulated vCPU (``accel=unicorn``): there is no mode switch, so
    guest time is time inside ``emu_start`` less the handlers it called, user time is the
    handlers (``python_ns``), loop-hosted waits are inside them, kernel time is 0."""
    if thread.started_ns is None:
        return {}
    end_ns = thread.ended_ns or time.monotonic_ns()
    wall = (end_ns - thread.started_ns) / 1e9
    ctx = thread.ctx
    handlers = ctx.python_ns / 1e9
    guest = max(ctx.kvm_run_ns / 1e9 - handlers, 0.0)
    out = {"guest_s": guest, "user_s": handlers, "kernel_s": 0.0, "wait_s": 0.0, "runnable_s": 0.0,
           "wall_s": wall, "on_cpu_s": None, "runqueue_s": None,
           "unaccounted_s": max(wall - guest - handlers, 0.0),
           "accounted_fraction": min((guest + handlers) / wall, 1.0) if wall > 0 else None}
    return out


def thread_modes(thread) -> dict:
    """The mode split of a vCPU thread (``VcpuThread``) from its start to its end (or now)."""
    if getattr(thread, "accel", "kvm") == "unicorn":
        return emulated_modes(thread)
    start = thread.times_start
    if start is None or thread.started_ns is None:
        return {}
    end, end_ns = thread.times_end, thread.ended_ns
    if end_ns is None:  # still running (or ending right now): read it live, CPU first, then wall
        if end is None:
            if thread.native_id is None:
                return {}
            try:
                end = read_thread_times_precise(thread.native_id)
            except OSError:
                return {}
        end_ns = time.monotonic_ns()
    elif end is None:  # no /proc
        return {}
    ctx = thread.ctx
    return mode_split(diff(start, end), wall_s=(end_ns - thread.started_ns) / 1e9,
                      spin_wait_s=ctx.spin_wait_ns / 1e9, sleep_wait_s=ctx.sleep_wait_ns / 1e9)


def machine_stats(*, name: str, handoff: str, threads: list, bus, devices, slot_server, kvm,
                  accel: str = "kvm") -> dict:
    """``Machine.stats()``: every counter of one machine as plain data (docs/stats-schema.md).

    ``kvm(index)`` returns KVM's own counters of vCPU ``index``; ``devices``
    is the machine's ``DeviceManager`` (or None before it is open).
    """
    vcpus = [vcpu_stats(t, bus, kvm=kvm(i), modes=thread_modes(t), latency=t.latency.summary())
             for i, t in enumerate(threads)]
    unclaimed = {
        space: {"reads": sum(v["unclaimed"][f"{space}_reads"] for v in vcpus),
                "writes": sum(v["unclaimed"][f"{space}_writes"] for v in vcpus)}
        for space in ("pio", "mmio")
    }
    paths = merge_counts(vcpus, "paths")
    if devices is not None:
        for key, count in devices.kernel_path_counts().items():
            paths[key] = paths.get(key, 0) + count
    server = slot_server
    return {
        "schema": STATS_SCHEMA,
        "vm": name,
        # kvm: guest time is time in KVM_RUN; unicorn: time inside emu_start, user time is in handlers
        "accel": accel,
        "handoff": handoff,
        "vcpus": vcpus,
        "exits": merge_counts(vcpus, "exits"),
        "pio": merge_counts(vcpus, "pio"),
        "mmio": merge_counts(vcpus, "mmio"),
        "paths": dict(sorted(paths.items())),
        "unclaimed": unclaimed,
        "kernel_paths": devices.kernel_paths() if devices is not None else {},
        "loop": {"wakeups": server.wakeups, "served": server.served, "idle_sleeps": server.idle_sleeps,
                 "held_writes": server.held} if server is not None else {},
        "devices": devices.metrics() if devices is not None else {},
    }


def merge_counts(vcpus: list[dict], key: str) -> dict:
    total: Counter = Counter()
    for v in vcpus:
        total.update(v[key])
    return dict(sorted(total.items()))
