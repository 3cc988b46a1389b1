"""Disk read throughput of aiokvm's ATA and virtio-blk devices against QEMU microvm and the host.

The guest is the bundled ``diskbench`` (always at ``cpl=3``): it reads
``bytes`` in blocks of ``bs`` with ``qd`` requests in flight, sequentially
or at random block-aligned offsets, and times the stream with the TSC
(``ticks``).  The guest's own ``tsc_hz`` is an assumed 3 GHz on hosts
without a TSC CPUID leaf, so the host TSC frequency is calibrated once per
run and every throughput figure is ``bytes / (ticks / host_tsc_hz)``: the
same instrument for aiokvm and QEMU.

One 64 MiB image of random data is written once and kept in the page cache
(read through before every round).  For each pattern (seq, rand) and block
size (4 KiB, 128 KiB), rows are:

- ``ata-word`` (one ``inw`` per 16-bit word), ``ata-rep`` (one ``rep insw``
  per sector), ``virtio`` at QD1 and QD16 (ATA is always QD1), each under
  ``aiokvm`` and ``qemu`` (same ELF, same image);
- ``aiokvm/no-ioefd``: virtio with ``add_disk(..., ioeventfd=False)``, so
  QueueNotify is a plain MMIO exit;
- ``host``: this process reading the same file with ``os.preadv``, the same
  offsets as the guest, one thread (QD1) or 16 threads (QD16).

Per row: MB/s (10^6 bytes), IOPS, user-mode exits per MB and vCPU 0's mode
split (aiokvm only; both are the median run less the median of a
one-request run of the same configuration done every round, so boot, driver
probe and console output drop out; the split is tick-sampled, so runs much
shorter than a second are noisy), and the ratios of MB/s to QEMU (same
device, pattern, bs, qd) and to the host (the faster of its QD1 and QD16
rows for that pattern and bs: the 16-thread reader is GIL-bound and often
the slower).  Data per run: ata-word 256 KiB, ata-rep 2 MiB, virtio 16 MiB
at 4 KiB and 256 MiB at 128 KiB (sequential runs wrap at the end of the
disk).  All rows are run interleaved over ``--repeat`` rounds and the median
is reported.  It measures and reports; it asserts nothing.

    aiokvm bench disk [--repeat 3] [--quick] [--only FILTER,...] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

import uvloop

import aiokvm
from aiokvm import guests

from .hostinfo import calibrate_tsc, fmt, machine_info, median_of, note_problems, qemu_microvm_cmd
from .plot import add_output_options, by_benchmark, parse_with_outputs
from .progress import Steps

IMAGE_BYTES = 64 << 20
KIB = 1024
BLOCK_SIZES = (4 * KIB, 128 * KIB)
PATTERNS = ("seq", "rand")
SEED = 1
DEVICES = ("ata-word", "ata-rep", "virtio-qd1", "virtio-qd16")
VMMS = ("aiokvm", "aiokvm/no-ioefd", "qemu", "host")
GOALS = (
    ("virtio-blk sequential 128 KiB reads >= 1.0x QEMU", "seq", 128 * KIB, (1, 16), 1.0),
    ("virtio-blk random 4 KiB reads at QD16 >= 0.7x QEMU", "rand", 4 * KIB, (16,), 0.7),
)

LINE1_RE = re.compile(rb"diskbench: dev=(\S+) op=\S+ pattern=\S+ bs=(\d+) qd=(\d+) bytes=(\d+) "
                      rb"ticks=(\d+) tsc_hz=(\d+)")
NOTIFIES_RE = re.compile(rb"diskbench: tsc_src=\S+ .*?notifies=(\d+)")

# -- what is measured -------------------------------------------------------------------


@dataclass
class Spec:
    vmm: str             # aiokvm | aiokvm/no-ioefd | qemu | host
    device: str          # ata-word | ata-rep | virtio | preadv (host)
    pattern: str
    bs: int
    qd: int
    nbytes: int
    samples: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    unavailable: str | None = None

    @property
    def key(self) -> str:
        return f"{self.vmm}:{self.device}:{self.pattern}:{self.bs // KIB}k:qd{self.qd}"

    @property
    def config(self) -> tuple:
        """What the one-request baseline run of an aiokvm row depends on."""
        return (self.vmm, self.device, self.qd)

    @property
    def ioeventfd(self) -> bool:
        return self.vmm != "aiokvm/no-ioefd"

    @property
    def interface(self) -> str:
        return "virtio" if self.device == "virtio" else "ata"


def sizes(quick: bool) -> dict[str, int]:
    """bytes per run by device (ata-word pays one exit per 16-bit word)."""
    if quick:
        return {"ata-word": 64 * KIB, "ata-rep": 512 * KIB, "virtio-4k": 4 << 20, "virtio-128k": 16 << 20}
    return {"ata-word": 256 * KIB, "ata-rep": 2 << 20, "virtio-4k": 16 << 20, "virtio-128k": 256 << 20}


def parse_only(text: str | None) -> dict[str, set[str]]:
    """``--only`` items sorted into categories; a row must match every category named."""
    if not text:
        return {}
    chosen: dict[str, set[str]] = {}
    for item in (x.strip().lower() for x in text.split(",")):
        if not item:
            continue
        if item == "virtio":
            chosen.setdefault("device", set()).update({"virtio-qd1", "virtio-qd16"})
        elif item in DEVICES:
            chosen.setdefault("device", set()).add(item)
        elif item in VMMS:
            chosen.setdefault("vmm", set()).add(item)
        elif item in PATTERNS:
            chosen.setdefault("pattern", set()).add(item)
        elif item.endswith("k") and item[:-1].isdigit() and int(item[:-1]) * KIB in BLOCK_SIZES:
            chosen.setdefault("bs", set()).add(item)
        else:
            raise SystemExit(f"--only: unknown item {item!r} (devices {', '.join(DEVICES)}, virtio; "
                             f"vmms {', '.join(VMMS)}; patterns seq, rand; block sizes 4k, 128k)")
    return chosen


def build_specs(quick: bool, only: dict[str, set[str]]) -> list[Spec]:
    """Rows in table order: per pattern and block size, host QD1, ATA, virtio QD1, host QD16, virtio QD16."""
    size = sizes(quick)

    def wanted(category: str, value: str) -> bool:
        return category not in only or value in only[category]

    specs: list[Spec] = []
    for pattern in PATTERNS:
        for bs in BLOCK_SIZES:
            if not (wanted("pattern", pattern) and wanted("bs", f"{bs // KIB}k")):
                continue
            virtio_bytes = size["virtio-4k" if bs == 4 * KIB else "virtio-128k"]
            host_done: set[int] = set()
            for device in DEVICES:
                if not wanted("device", device):
                    continue
                if device.startswith("virtio"):
                    qd = int(device.removeprefix("virtio-qd"))
                    vmms, dev, nbytes = ("aiokvm", "aiokvm/no-ioefd", "qemu"), "virtio", virtio_bytes
                else:
                    qd, vmms, dev, nbytes = 1, ("aiokvm", "qemu"), device, size[device]
                if qd not in host_done and wanted("vmm", "host"):
                    specs.append(Spec("host", "preadv", pattern, bs, qd, virtio_bytes))
                    host_done.add(qd)
                nbytes = max(nbytes // bs, 1) * bs  # what diskbench reads: whole blocks, at least one
                specs.extend(Spec(vmm, dev, pattern, bs, qd, nbytes) for vmm in vmms if wanted("vmm", vmm))
    if shutil.which("qemu-system-x86_64") is None:
        for spec in specs:
            if spec.vmm == "qemu":
                spec.unavailable = "qemu-system-x86_64 not found"
    return specs


def cmdline(device: str, pattern: str, bs: int, qd: int, nbytes: int) -> str:
    return f"dev={device} op=read pattern={pattern} bs={bs} qd={qd} bytes={nbytes} seed={SEED} cpl=3"


def guest_device(spec: Spec) -> str:
    return "virtio" if spec.device == "virtio" else spec.device


# -- runners ------------------------------------------------------------------------------


def parse_output(output: bytes) -> dict:
    match = LINE1_RE.search(output)
    if match is None:
        raise RuntimeError(f"no diskbench line in the output: {output[-300:]!r}")
    notifies = NOTIFIES_RE.search(output)
    return {"bytes": int(match[4]), "bs": int(match[2]), "qd": int(match[3]), "ticks": int(match[5]),
            "notifies": int(notifies[1]) if notifies else None}


def qemu_cmd(elf: str, image: str, spec: Spec, append: str) -> list[str]:
    cmd = qemu_microvm_cmd(elf, append)
    if spec.interface == "virtio":
        cmd += ["-global", "virtio-mmio.force-legacy=false",
                "-drive", f"id=d0,file={image},format=raw,if=none", "-device", "virtio-blk-device,drive=d0"]
    else:
        cmd += ["-device", "isa-ide,iobase=0x1f0,iobase2=0x3f6,irq=14",
                "-drive", f"id=d1,file={image},format=raw,if=none", "-device", "ide-hd,drive=d1,bus=ide.0"]
    return cmd


def run_qemu(elf: str, image: str, spec: Spec) -> dict:
    append = cmdline(guest_device(spec), spec.pattern, spec.bs, spec.qd, spec.nbytes)
    start = time.perf_counter()
    proc = subprocess.run(qemu_cmd(elf, image, spec, append), capture_output=True, timeout=600, check=False)
    wall = time.perf_counter() - start
    # isa-debug-exit: the process exits with (guest code << 1) | 1
    if proc.returncode != 1:
        raise RuntimeError(f"QEMU exited {proc.returncode} (guest code {proc.returncode >> 1}): "
                           f"{(proc.stdout + proc.stderr)[-300:]!r}")
    sample = parse_output(proc.stdout)
    sample["wall_s"] = wall
    return sample


async def run_aiokvm(image: str, spec: Spec, nbytes: int, bs: int) -> dict:
    async with aiokvm.Machine(memory="64M") as vm:
        await vm.add_disk(f"{image},if={spec.interface}", ioeventfd=spec.ioeventfd)
        vm.load("diskbench", cmdline=cmdline(guest_device(spec), spec.pattern, bs, spec.qd, nbytes))
        start = time.perf_counter()
        status = await vm.run(timeout=600)
        wall = time.perf_counter() - start
        output = vm.console.output
        stats = vm.stats()
    if status.code != 0:
        raise RuntimeError(f"guest ended {status}: {output[-300:]!r}")
    sample = parse_output(output)
    vcpus = stats.get("vcpus") or []
    sample.update({
        "wall_s": wall,
        "user_exits": sum(v.get("user_exits", 0) for v in vcpus),
        "modes": dict(vcpus[0].get("modes") or {}) if vcpus else {},
        "paths": stats.get("paths"),
    })
    return sample


def xorshift64(state: int) -> int:
    mask = (1 << 64) - 1
    state ^= (state << 13) & mask
    state ^= state >> 7
    state ^= (state << 17) & mask
    return state


def offsets(pattern: str, bs: int, nbytes: int, image_bytes: int) -> list[int]:
    """The byte offsets diskbench reads, in its order."""
    nblocks = image_bytes // bs
    count = max(nbytes // bs, 1)
    if pattern == "seq":
        return [(i % nblocks) * bs for i in range(count)]
    state, result = SEED, []
    for _ in range(count):
        state = xorshift64(state)
        result.append((state % nblocks) * bs)
    return result


def run_host(fd: int, spec: Spec, image_bytes: int) -> dict:
    """Read the guest's offsets from the page-cached image: one thread per request in flight."""
    where = offsets(spec.pattern, spec.bs, spec.nbytes, image_bytes)
    shares = [where[i::spec.qd] for i in range(spec.qd)]
    short: list[int] = []

    def reader(share: list[int], go: threading.Barrier) -> None:
        buf = [memoryview(bytearray(spec.bs))]
        go.wait()
        for off in share:
            if os.preadv(fd, buf, off) != spec.bs:
                short.append(off)

    if spec.qd == 1:
        go = threading.Barrier(1)
        start = time.perf_counter()
        reader(shares[0], go)
        seconds = time.perf_counter() - start
    else:
        go = threading.Barrier(spec.qd + 1)
        threads = [threading.Thread(target=reader, args=(share, go)) for share in shares]
        for thread in threads:
            thread.start()
        go.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - start
    if short:
        raise RuntimeError(f"{len(short)} short reads from the image")
    return {"bytes": len(where) * spec.bs, "seconds": seconds, "wall_s": seconds}


class Bench:
    def __init__(self, image: str, tsc_hz: float) -> None:
        self.image = image
        self.tsc_hz = tsc_hz
        self.elf = str(guests.path("diskbench"))
        self.loop = uvloop.new_event_loop()
        self.fd = os.open(image, os.O_RDONLY)
        #: one-request aiokvm runs of each configuration, one a round
        self.baselines: dict[tuple, list[dict]] = {}

    def close(self) -> None:
        self.loop.close()
        os.close(self.fd)

    def warm_cache(self) -> None:
        """Read the image through (as ``cat IMG > /dev/null``) so every row starts page-cached."""
        buf = memoryview(bytearray(1 << 20))
        off = 0
        while off < IMAGE_BYTES:
            n = os.preadv(self.fd, [buf], off)
            if n <= 0:
                break
            off += n

    def baseline(self, spec: Spec, round_no: int) -> None:
        """A one-request run (bs=512) of this configuration: boot, probe and console output, nearly only."""
        sample = self.loop.run_until_complete(run_aiokvm(self.image, spec, 512, 512))
        sample.pop("paths", None)
        sample["round"] = round_no + 1
        self.baselines.setdefault(spec.config, []).append(sample)

    def measure(self, spec: Spec) -> dict:
        if spec.vmm == "host":
            sample = run_host(self.fd, spec, IMAGE_BYTES)
        elif spec.vmm == "qemu":
            sample = run_qemu(self.elf, self.image, spec)
            sample["seconds"] = sample["ticks"] / self.tsc_hz
        else:
            sample = self.loop.run_until_complete(run_aiokvm(self.image, spec, spec.nbytes, spec.bs))
            sample["seconds"] = sample["ticks"] / self.tsc_hz
        sample["mb_s"] = sample["bytes"] / 1e6 / sample["seconds"]
        sample["iops"] = sample["bytes"] / spec.bs / sample["seconds"]
        return sample


# -- setup ------------------------------------------------------------------------------------


def make_image(path: str) -> None:
    with open(path, "wb") as fh:
        for _ in range(IMAGE_BYTES >> 20):
            fh.write(os.urandom(1 << 20))


# -- report -------------------------------------------------------------------------------------


def rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


MODE_KEYS = ("guest", "user", "kernel", "wait", "unaccounted")


def io_phase(samples: list[dict], base: list[dict]) -> dict:
    """Exits per MB and vCPU 0's mode split of the I/O itself: medians of the runs less medians of
    the one-request runs of the same configuration (boot, driver probe and console output cancel)."""
    result: dict = {"exits_per_mb": None, "mode_split": None, "io_wall_s": None}
    if not base:
        return result
    mb = (median_of(samples, "bytes") - median_of(base, "bytes")) / 1e6
    exits = median_of(samples, "user_exits") - median_of(base, "user_exits")
    if mb > 0:
        result["exits_per_mb"] = round(exits / mb, 1)
    runs = [s["modes"] for s in samples if s.get("modes")]
    bases = [b["modes"] for b in base if b.get("modes")]
    if not runs or not bases:
        return result

    def delta(key: str) -> float:
        return (statistics.median(m.get(f"{key}_s", 0.0) for m in runs)
                - statistics.median(m.get(f"{key}_s", 0.0) for m in bases))

    wall = delta("wall")
    result["io_wall_s"] = round(wall, 4)
    if wall > 0:
        result["mode_split"] = {k: round(max(delta(k), 0.0) / wall, 3) for k in MODE_KEYS}
    return result


def summarize(specs: list[Spec], baselines: dict[tuple, list[dict]]) -> list[dict]:
    mb_s = {spec.key: median_of(spec.samples, "mb_s") for spec in specs}
    qemu = {(s.device, s.pattern, s.bs, s.qd): mb_s[s.key] for s in specs if s.vmm == "qemu"}
    # Best-of-runs: on a shared host, load only ever takes throughput away; both are reported.
    best = {spec.key: max((s["mb_s"] for s in spec.samples), default=None) for spec in specs}
    qemu_best = {(s.device, s.pattern, s.bs, s.qd): best[s.key] for s in specs if s.vmm == "qemu"}
    host: dict[tuple, float] = {}  # the faster host row (QD1 or QD16) of each pattern and block size
    for s in specs:
        if s.vmm == "host" and mb_s[s.key] is not None:
            host[(s.pattern, s.bs)] = max(host.get((s.pattern, s.bs), 0.0), mb_s[s.key])
    rows = []
    for spec in specs:
        speed = mb_s[spec.key]
        ref_qemu = qemu.get((spec.device, spec.pattern, spec.bs, spec.qd)) if spec.vmm.startswith("aiokvm") else None
        ref_qemu_best = (qemu_best.get((spec.device, spec.pattern, spec.bs, spec.qd))
                         if spec.vmm.startswith("aiokvm") else None)
        ref_host = host.get((spec.pattern, spec.bs)) if spec.vmm != "host" else None
        row = {
            "key": spec.key, "vmm": spec.vmm, "device": spec.device, "pattern": spec.pattern, "bs": spec.bs,
            "qd": spec.qd, "bytes": spec.nbytes, "runs": len(spec.samples),
            "mb_s": rounded(speed, 4),
            "mb_s_min": rounded(min((s["mb_s"] for s in spec.samples), default=None), 4),
            "mb_s_max": rounded(best[spec.key], 4),
            "iops": rounded(median_of(spec.samples, "iops"), 1),
            "seconds": rounded(median_of(spec.samples, "seconds"), 5),
            "wall_s": rounded(median_of(spec.samples, "wall_s"), 4),
            "exits_per_mb": None, "mode_split": None,
            "ratio_to_qemu": rounded(speed / ref_qemu, 3) if speed and ref_qemu else None,
            "ratio_to_qemu_best": (rounded(best[spec.key] / ref_qemu_best, 3)
                                   if best[spec.key] and ref_qemu_best else None),
            "ratio_to_host": rounded(speed / ref_host, 3) if speed and ref_host else None,
        }
        if spec.vmm.startswith("aiokvm") and spec.samples:
            row.update(io_phase(spec.samples, baselines.get(spec.config) or []))
            row["paths"] = spec.samples[-1].get("paths")  # last run, whole run (boot included)
        if spec.device == "virtio" and spec.samples:
            row["notifies"] = median_of(spec.samples, "notifies")
        note_problems(row, spec)
        rows.append(row)
    return rows


def baseline_log(baselines: dict[tuple, list[dict]]) -> list[dict]:
    return [{"vmm": vmm, "device": device, "qd": qd, "round": b["round"], "user_exits": b["user_exits"],
             "wall_s": round(b["wall_s"], 4), "vcpu_wall_s": b["modes"].get("wall_s")}
            for (vmm, device, qd), runs in baselines.items() for b in runs]


def goals(rows: list[dict]) -> list[dict]:
    found = []
    for text, pattern, bs, qds, target in GOALS:
        for qd in qds:
            row = next((r for r in rows if r["vmm"] == "aiokvm" and r["device"] == "virtio"
                        and r["pattern"] == pattern and r["bs"] == bs and r["qd"] == qd), None)
            if row is None:
                continue
            ratio = row["ratio_to_qemu"]
            found.append({"goal": text, "qd": qd, "target": target, "ratio_to_qemu": ratio,
                          "ratio_to_qemu_best": row["ratio_to_qemu_best"],
                          "met": None if ratio is None else ratio >= target})
    return found


def size_text(nbytes: int) -> str:
    return f"{nbytes >> 20}M" if nbytes >= 1 << 20 else f"{nbytes >> 10}K"


def num_text(value: float | None, large: str = ".1f") -> str:
    """MB/s and IOPS: three decimals below 1, two below 100, ``large`` above."""
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else format(value, large)


def print_table(rows: list[dict], found: list[dict], info: dict, repeat: int) -> None:
    print(f"# {info['cpu_model']}, {info['cores']} CPUs, Linux {info['kernel']}"
          f"{' (nested)' if info['nested'] else ''}, TSC {info['tsc_hz'] / 1e9:.3f} GHz ({info['tsc_source']}), "
          f"load {info['loadavg_start'][0]:.2f} -> {info['loadavg_end'][0]:.2f}, median of {repeat}")
    head = (f"{'pat':<5}{'bs':>5} {'device':<9}{'vmm':<16}{'qd':>3}{'data':>6}{'MB/s':>9}{'IOPS':>9}"
            f"{'exit/MB':>9}{'guest':>6}{'user':>5}{'kern':>5}{'wait':>5}{'xQEMU':>7}{'best':>6}{'xhost':>7}  note")
    print(head)
    print("-" * len(head))
    group = None
    for row in rows:
        if group is not None and group != (row["pattern"], row["bs"]):
            print()
        group = (row["pattern"], row["bs"])
        split = row["mode_split"] or {}
        note = ""
        if row.get("unavailable"):
            note = f"n/a: {row['unavailable']}"
        elif row.get("errors"):
            note = f"errors: {row['errors'][0][:70]}"
        print(f"{row['pattern']:<5}{str(row['bs'] // KIB) + 'K':>5} {row['device']:<9}{row['vmm']:<16}{row['qd']:>3}"
              f"{size_text(row['bytes']):>6}{num_text(row['mb_s']):>9}{num_text(row['iops'], '.0f'):>9}"
              f"{fmt(row['exits_per_mb'], '.0f'):>9}"
              f"{fmt(split.get('guest')):>6}{fmt(split.get('user')):>5}{fmt(split.get('kernel')):>5}"
              f"{fmt(split.get('wait')):>5}{fmt(row['ratio_to_qemu']):>7}{fmt(row['ratio_to_qemu_best']):>6}"
              f"{fmt(row['ratio_to_host']):>7}"
              f"  {note}".rstrip())
    print("MB = 10^6 bytes; data = bytes read per run.  exit/MB and the guest/user/kern/wait split (vCPU 0) are\n"
          "deltas against a one-request run of the same aiokvm configuration.  xQEMU: median MB/s over QEMU's (same\n"
          "device, pattern, bs, qd); best: the same for the fastest run of each; xhost: over the faster host row\n"
          "(QD1 or QD16) of the same pattern and bs.")
    if found:
        print("goals (aiokvm virtio against QEMU, reported, not asserted):")
        for goal in found:
            state = {True: "met", False: "not met", None: "not measured"}[goal["met"]]
            print(f"  {goal['goal']}: QD{goal['qd']} {fmt(goal['ratio_to_qemu'])}x ({state}; "
                  f"best runs {fmt(goal['ratio_to_qemu_best'])}x)")


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="aiokvm bench disk", description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, help="interleaved rounds; medians are reported (3; 2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="less data per run: ata-word 64 KiB, ata-rep 512 KiB, virtio 4/16 MiB; 2 rounds")
    parser.add_argument("--only", help="comma-separated filters, a row must match every category named: "
                        "devices (ata-word, ata-rep, virtio-qd1, virtio-qd16, virtio), "
                        "vmms (aiokvm, aiokvm/no-ioefd, qemu, host), patterns (seq, rand), block sizes (4k, 128k)")
    add_output_options(parser)
    args = parse_with_outputs(parser, argv)
    repeat = args.repeat or (2 if args.quick else 3)
    specs = build_specs(args.quick, parse_only(args.only))
    if not specs:
        raise SystemExit("--only selected no rows")

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="aiokvm-disk-") as tmp:
        tsc_hz, tsc_source = calibrate_tsc(tmp)
        image = os.path.join(tmp, "disk.img")
        make_image(image)
        bench = Bench(image, tsc_hz)
        runnable = [s for s in specs if not s.unavailable]
        configs = {s.config: s for s in runnable if s.vmm.startswith("aiokvm")}
        try:
            bench.warm_cache()
            # Warm-up: imports, the loop, the ELF and QEMU binary in the page cache.
            warm = Spec("aiokvm", "virtio", "seq", 4 * KIB, 1, 1 << 20)
            bench.measure(warm)
            if shutil.which("qemu-system-x86_64"):
                try:
                    run_qemu(bench.elf, image, Spec("qemu", "virtio", "seq", 4 * KIB, 1, 1 << 20))
                except (RuntimeError, subprocess.TimeoutExpired):
                    pass  # the rows will say what is wrong
            with Steps(repeat * len(runnable), "disk") as steps:
                for round_no in range(repeat):
                    bench.warm_cache()
                    for config, spec in configs.items():
                        try:
                            bench.baseline(spec, round_no)
                        except Exception as exc:  # measured, not asserted: those rows go without deltas
                            for other in runnable:
                                if other.config == config:
                                    other.errors.append(f"baseline: {type(exc).__name__}: {exc}")
                    k = round_no * len(runnable) // repeat
                    for spec in runnable[k:] + runnable[:k]:  # rotate: drift spreads over all rows
                        try:
                            spec.samples.append(bench.measure(spec))
                        except Exception as exc:  # measured, not asserted: keep going
                            spec.errors.append(f"{type(exc).__name__}: {exc}")
                        steps.step(f"{spec.key}, round {round_no + 1}/{repeat}")
        finally:
            bench.close()

    info = machine_info(tsc_hz, tsc_source, loadavg_start=load_start)
    rows = summarize(specs, bench.baselines)
    found = goals(rows)
    print_table(rows, found, info, repeat)
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump({"benchmark": "disk", "guest": "diskbench", "repeat": repeat, "quick": args.quick,
                       "image_bytes": IMAGE_BYTES, "seed": SEED, "machine": info, "goals": found, "rows": rows,
                       "baselines": baseline_log(bench.baselines)}, fh, indent=2)
    if args.plot:
        by_benchmark("disk", rows, args.plot)


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
