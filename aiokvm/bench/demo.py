"""``aiokvm demo``: the user-mode I/O bottleneck of KVM, in numbers, in one command.

Three contrasts, each measured in this run on the bundled guests:

1. **One exit, by path** (``exitloop`` at CPL 3, port writes): KVM
   completing it alone through an ioeventfd, a Python device inline in the
   vCPU thread, the same device hosted on the event loop, and a handoff that
   sleeps per exit (futex).
2. **A disk read, four ways** (``diskbench``, 4 KiB sequential, QD1): ATA
   with one ``inw`` per 16-bit word, ATA with ``rep insw``, virtio-blk with
   QueueNotify as an exit, virtio-blk with ioeventfd and irqfd.  MB/s, user
   exits per MB and the vCPU's guest/kernel/user/wait split (less a
   one-request run of the same device, so boot and probe drop out).
3. **Two VMs exchanging frames** (``netbench``, 64 bytes) through aiokvm's
   switch, with and without ioeventfd: frames/s and exits per frame.

QEMU microvm runs the same ELFs beside them when it is installed.  Figures
are medians over ``repeat`` runs, and every sentence printed at the end is
computed from this run's rows.  ``--out DIR`` writes ``demo.json`` and the
plots (PNG and SVG).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from ..errors import ConfigError

KIB = 1024


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


class Demo:
    def __init__(self, quick: bool, with_qemu: bool, tmp: str) -> None:
        from .hostinfo import calibrate_tsc

        self.quick = quick
        self.with_qemu = with_qemu
        self.tmp = tmp
        self.repeat = 1 if quick else 3
        self.tsc_hz, self.tsc_source = calibrate_tsc(tmp)
        self.rows: list[dict] = []
        self.errors: list[str] = []

    # -- 1. exits --------------------------------------------------------------------------
    def exit_specs(self):
        from .exits import Spec

        n = 2000 if self.quick else 10000
        specs = [
            ("kernel alone (ioeventfd)", Spec("ioeventfd", "ioeventfd", "vm", 3, n, loop="uvloop",
                                              setup="ioeventfd", alt=False)),
            ("inline Python", Spec("inline", "inline", "vm", 3, n, loop="uvloop", setup="inline", alt=False)),
            ("loop-hosted Python", Spec("loop:spin", "loop", "vm", 3, n, loop="uvloop", setup="loop", handoff="spin",
                                         alt=False)),
            ("loop-hosted, sleeping handoff (futex)",
             Spec("loop:futex", "futex", "vm", 3, max(n // 4, 200), loop="uvloop", setup="loop", handoff="futex",
                  alt=False)),
        ]
        if self.with_qemu:
            specs.append(("QEMU microvm (exit to its user space)", Spec("qemu", "qemu", "qemu", 3, n, alt=False)))
        return specs

    def measure_exits(self, steps) -> None:
        from .exits import Bench, Spec

        bench = Bench(self.tsc_hz, None)
        try:
            # the exits a boot makes (serial output, probing): taken out of every row's count
            boot = bench.measure(Spec("boot", "boot", "vm", 3, 0, loop="uvloop", alt=False))["user_exits"]
            for label, spec in self.exit_specs():
                samples = []
                for _ in range(self.repeat):
                    try:
                        samples.append(bench.measure(spec))
                    except Exception as exc:  # measured, not asserted
                        self.errors.append(f"exits {label}: {type(exc).__name__}: {exc}")
                    steps.step(f"exit: {label}")
                if not samples:
                    continue
                exits = [max(s["user_exits"] - boot, 0) / s["exits"] for s in samples
                         if s.get("user_exits") is not None]
                modes = [s["modes"] for s in samples if s.get("modes")]
                self.rows.append({
                    "section": "exit", "path": spec.path, "label": label, "vmm": "qemu" if spec.kind == "qemu"
                    else "aiokvm", "value": round(_median(s["us"] for s in samples), 3), "unit": "us/exit",
                    "higher_is_better": False, "us_per_exit": round(_median(s["us"] for s in samples), 3),
                    "user_exits_per_exit": round(_median(exits), 3) if exits else None,
                    "mode_split": {k: round(_median(m.get(k) for m in modes), 3) for k in modes[0]} if modes else None,
                })
        finally:
            bench.close()
        base = next((r for r in self.rows if r["section"] == "exit" and r["path"] == "ioeventfd"), None)
        for row in self.rows:
            if row["section"] == "exit" and base:
                row["x_ref"] = round(row["us_per_exit"] / base["us_per_exit"], 2)

    # -- 2. disks --------------------------------------------------------------------------
    def disk_specs(self):
        from .disk import Spec

        size = {"ata-word": 64 * KIB, "ata-rep": 512 * KIB, "virtio": 16 << 20}
        if not self.quick:
            size = {"ata-word": 128 * KIB, "ata-rep": 1 << 20, "virtio": 48 << 20}
        specs = [("ATA, inw per word", Spec("aiokvm", "ata-word", "seq", 4 * KIB, 1, size["ata-word"])),
                 ("ATA, rep insw", Spec("aiokvm", "ata-rep", "seq", 4 * KIB, 1, size["ata-rep"])),
                 ("virtio-blk, notify as an exit", Spec("aiokvm/no-ioefd", "virtio", "seq", 4 * KIB, 1,
                                                        size["virtio"])),
                 ("virtio-blk, ioeventfd + irqfd", Spec("aiokvm", "virtio", "seq", 4 * KIB, 1, size["virtio"]))]
        if self.with_qemu:
            specs += [("QEMU ATA, inw per word", Spec("qemu", "ata-word", "seq", 4 * KIB, 1, size["ata-word"])),
                      ("QEMU virtio-blk", Spec("qemu", "virtio", "seq", 4 * KIB, 1, size["virtio"]))]
        return specs

    def measure_disks(self, steps) -> None:
        from .disk import Bench, io_phase, make_image

        image = os.path.join(self.tmp, "disk.img")
        make_image(image)
        bench = Bench(image, self.tsc_hz)
        try:
            bench.warm_cache()
            for label, spec in self.disk_specs():
                samples = []
                for round_no in range(self.repeat):
                    try:
                        if spec.vmm.startswith("aiokvm"):
                            bench.baseline(spec, round_no)
                        samples.append(bench.measure(spec))
                    except Exception as exc:
                        self.errors.append(f"disk {label}: {type(exc).__name__}: {exc}")
                    steps.step(f"disk: {label}")
                if not samples:
                    continue
                phase = io_phase(samples, bench.baselines.get(spec.config) or []) \
                    if spec.vmm.startswith("aiokvm") else {}
                split = phase.get("mode_split")
                if split and sum(split.values()) > 1.0:
                    # a run less its one-request baseline: on a short run the tick-sampled
                    # split can overshoot; scale it back to fractions of the I/O's time
                    total = sum(split.values())
                    phase["mode_split"] = {k: round(v / total, 3) for k, v in split.items()}
                mb_s = _median(s["mb_s"] for s in samples)
                self.rows.append({
                    "section": "disk", "path": spec.key, "label": label, "vmm": spec.vmm.split("/")[0],
                    "value": round(mb_s, 3), "unit": "MB/s", "higher_is_better": True, "mb_s": round(mb_s, 3),
                    "exits_per_mb": phase.get("exits_per_mb"), "mode_split": phase.get("mode_split"),
                })
        finally:
            bench.close()

    # -- 3. network ------------------------------------------------------------------------
    def net_runs(self) -> list:
        from . import net

        n = 10000 if self.quick else 50000
        runs = [("through aiokvm's switch, ioeventfd", "aiokvm",
                 lambda: asyncio.run(net.run_aiokvm(64, n, True, self.tsc_hz))),
                ("through aiokvm's switch, notify as an exit", "aiokvm/no-ioeventfd",
                 lambda: asyncio.run(net.run_aiokvm(64, n // 5, False, self.tsc_hz)))]
        if self.with_qemu:
            runs.append(("QEMU, -netdev dgram pair", "qemu", lambda: net.run_qemu(64, n, self.tsc_hz)))
        return runs

    def measure_net(self, steps) -> None:
        for label, path, run in self.net_runs():
            samples = []
            for _ in range(self.repeat):
                try:
                    samples.append(run())
                except Exception as exc:
                    self.errors.append(f"net {label}: {type(exc).__name__}: {exc}")
                steps.step(f"net: {label}")
            if not samples:
                continue
            fps = _median(s["frames_per_s"] for s in samples)
            splits = [s["split"] for s in samples if s.get("split")]
            self.rows.append({
                "section": "net", "path": path, "label": label, "vmm": path.split("/")[0], "value": round(fps),
                "unit": "frames/s", "higher_is_better": True, "frames_per_s": round(fps),
                "exits_per_frame": round(_median(s.get("exits_per_frame") for s in samples), 3)
                if any("exits_per_frame" in s for s in samples) else None,
                "mode_split": {k: round(_median(x.get(k) for x in splits), 3) for k in splits[0]} if splits else None,
            })

    def total_steps(self) -> int:
        return self.repeat * (len(self.exit_specs()) + len(self.disk_specs()) + len(self.net_runs()))

    def run(self) -> None:
        from .progress import Steps

        with Steps(self.total_steps(), "demo") as steps:
            self.measure_exits(steps)
            self.measure_disks(steps)
            self.measure_net(steps)


# -- what the numbers say ---------------------------------------------------------------------
def _row(rows, section, path):
    return next((r for r in rows if r["section"] == section and r["path"] == path), None)


def sentences(rows: list[dict]) -> list[str]:
    said = []
    kernel, inline, loop, futex = (_row(rows, "exit", p) for p in ("ioeventfd", "inline", "loop:spin", "loop:futex"))
    if kernel and inline and loop:
        sleeping = f", and a handoff that sleeps per exit {futex['x_ref']:.0f}x" if futex else ""
        said.append(f"An exit that reaches Python costs {inline['x_ref']:.1f}x one KVM completes alone through an "
                    f"ioeventfd ({inline['us_per_exit']:.2f} against {kernel['us_per_exit']:.2f} us); handing it "
                    f"to the event loop costs {loop['us_per_exit'] / inline['us_per_exit']:.2f}x the inline "
                    f"path{sleeping}.")
    word = _row(rows, "disk", "aiokvm:ata-word:seq:4k:qd1")
    rep = _row(rows, "disk", "aiokvm:ata-rep:seq:4k:qd1")
    noefd = _row(rows, "disk", "aiokvm/no-ioefd:virtio:seq:4k:qd1")
    virtio = _row(rows, "disk", "aiokvm:virtio:seq:4k:qd1")
    if word and virtio and word.get("exits_per_mb") and virtio.get("exits_per_mb") is not None:
        said.append(f"Reading a disk one 16-bit word per exit takes {word['exits_per_mb']:,.0f} exits per MB and "
                    f"runs at {word['mb_s']:.2f} MB/s; virtio-blk with ioeventfd and irqfd takes "
                    f"{virtio['exits_per_mb']:,.1f} and runs {virtio['mb_s'] / word['mb_s']:,.0f}x faster.")
    if rep and word and rep.get("exits_per_mb"):
        said.append(f"rep insw moves a sector per exit: {rep['exits_per_mb']:,.0f} exits per MB, "
                    f"{rep['mb_s'] / word['mb_s']:.0f}x the word-at-a-time rate.")
    if noefd and virtio and noefd.get("exits_per_mb") is not None and virtio.get("exits_per_mb") is not None:
        said.append(f"ioeventfd takes QueueNotify out of user mode: {noefd['exits_per_mb']:,.1f} exits per MB "
                    f"without it, {virtio['exits_per_mb']:,.1f} with it.")
    fast, slow = _row(rows, "net", "aiokvm"), _row(rows, "net", "aiokvm/no-ioeventfd")
    if fast and slow:
        said.append(f"Two VMs through aiokvm's switch exchange {fast['frames_per_s']:,} frames/s at "
                    f"{fast['exits_per_frame']:.2f} exits per frame with ioeventfd, and {slow['frames_per_s']:,} "
                    f"at {slow['exits_per_frame']:.2f} without: there every frame waits for the loop.")
    qemu = _row(rows, "net", "qemu")
    if fast and qemu:
        said.append(f"QEMU's C device model moves {qemu['frames_per_s']:,} frames/s between the same guests: "
                    f"aiokvm's Python is at {fast['frames_per_s'] / qemu['frames_per_s']:.2f}x.")
    return said


def print_report(info: dict, rows: list[dict], said: list[str], errors: list[str], with_qemu: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]aiokvm demo[/] on {info['cpu_model']}, {info['cores']} CPUs"
                  f"{' (nested)' if info['nested'] else ''}, Linux {info['kernel']}, TSC "
                  f"{info['tsc_hz'] / 1e9:.3f} GHz; medians of {info['repeat']} run(s)")
    titles = {"exit": "1. The cost of one exit, by path (exitloop, CPL 3)",
              "disk": "2. A disk read, four ways (diskbench, 4 KiB sequential, QD1)",
              "net": "3. Two VMs exchanging 64-byte frames (netbench)"}
    columns = {"exit": (("µs/exit", "us_per_exit", ".3f"), ("× ioeventfd", "x_ref", ".1f"),
                        ("user exits/exit", "user_exits_per_exit", ".2f")),
               "disk": (("MB/s", "mb_s", ".2f"), ("exits/MB", "exits_per_mb", ",.1f")),
               "net": (("frames/s", "frames_per_s", ",.0f"), ("exits/frame", "exits_per_frame", ".2f"))}
    for section, title in titles.items():
        table = Table(title=title, title_justify="left")
        table.add_column("path")
        for name, _, _ in columns[section]:
            table.add_column(name, justify="right")
        table.add_column("guest/kernel/user/wait", justify="right")
        for row in (r for r in rows if r["section"] == section):
            split = row.get("mode_split")
            split_text = "/".join(f"{split.get(k, 0):.2f}" for k in ("guest", "kernel", "user", "wait")) \
                if split else "-"
            table.add_row(row["label"], *("-" if row.get(key) is None else format(row[key], spec)
                                          for _, key, spec in columns[section]), split_text)
        console.print(table)
    for sentence in said:
        console.print(f"- {sentence}")
    if not with_qemu:
        console.print("- QEMU rows skipped: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86).")
    for error in errors:
        console.print(f"[yellow]! {error}[/]")


def write_plots(out: Path, rows: list[dict]) -> list[str]:
    from .plot import _pyplot, stacked_split

    plt = _pyplot()
    disk = [r for r in rows if r["section"] == "disk"]
    written = []
    for ext in ("png", "svg"):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * len(disk) + 1.8), sharey=True)
        labels = [r["label"] for r in disk]
        left.barh(labels, [r["mb_s"] for r in disk], color="#4c72b0")
        left.set_xlabel("MB/s (log)")
        left.set_xscale("log")
        left.invert_yaxis()
        right.barh(labels, [r.get("exits_per_mb") or 0 for r in disk], color="#c44e52")
        right.set_xlabel("user-mode exits per MB (log; QEMU: not counted)")
        right.set_xscale("symlog")
        fig.suptitle("A disk read, four ways: exits per MB set the speed")
        fig.tight_layout()
        path = out / f"demo_disk.{ext}"
        fig.savefig(path)
        plt.close(fig)
        written.append(str(path))
        split_rows = [r for r in rows if r.get("mode_split")]
        path = out / f"demo_split.{ext}"
        stacked_split(str(path), [f"{r['section']}: {r['label']}" for r in split_rows],
                      [r["mode_split"] for r in split_rows], title="Where the vCPU's time goes, by path")
        written.append(str(path))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aiokvm demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about 30 s: one run per row, less data")
    parser.add_argument("--out", metavar="DIR", help="also write demo.json and plots (PNG and SVG) there")
    parser.add_argument("--no-qemu", action="store_true", help="leave QEMU out even if it is installed")
    args = parser.parse_args(argv)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise ConfigError("/dev/kvm is not usable here: the demo runs real VMs (load kvm, or run where KVM is)")
    out = Path(args.out) if args.out else None
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--out {out}: {exc.strerror}") from None
    with_qemu = not args.no_qemu and shutil.which("qemu-system-x86_64") is not None
    from .hostinfo import machine_info

    with tempfile.TemporaryDirectory(prefix="aiokvm-demo-") as tmp:
        demo = Demo(args.quick, with_qemu, tmp)
        demo.run()
    info = machine_info(demo.tsc_hz, demo.tsc_source, repeat=demo.repeat, quick=args.quick)
    said = sentences(demo.rows)
    print_report(info, demo.rows, said, demo.errors, with_qemu)
    if out is not None:
        data = {"benchmark": "demo", "machine": info, "qemu": with_qemu, "rows": demo.rows, "sentences": said,
                "errors": demo.errors}
        (out / "demo.json").write_text(json.dumps(data, indent=2))
        written = write_plots(out, demo.rows)
        print(f"wrote {out / 'demo.json'} and {', '.join(Path(p).name for p in written)}", file=sys.stderr)
    return 0
