"""Coverage-guided fuzzing campaigns (atheris/libFuzzer) over ``fuzz/targets.py``.

    python fuzz/run.py --seconds 60                 # every target for 60 s each
    python fuzz/run.py --seconds 600 --target bridge
    python fuzz/run.py --target elf --replay CRASH  # one input, with its traceback

Each target runs in its own process (libFuzzer owns the process), with a
per-input timeout of 5 s and a 2 GiB memory limit: a hang or a runaway
allocation is a crash like an uncaught exception.  New inputs that reach new
coverage go to ``fuzz/corpus/TARGET/`` (replayed by the test suite), crashes
to ``fuzz/crashes/TARGET/``, the fuzzer's log to ``fuzz/logs/TARGET.log``.  It prints, and writes as JSON with --json,
executions, coverage (libFuzzer's ``cov``/``ft``) and crashes per target.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DONE = re.compile(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+)")
STAT = re.compile(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)")


def child(target: str, argv: list[str]) -> None:
    """Inside the libFuzzer process: instrument, then fuzz one target."""
    import atheris

    sys.path.insert(0, str(HERE))
    # Only the project's code (and the targets) are instrumented: coverage of
    # asyncio or structlog would steer the fuzzer nowhere and slows each run.
    with atheris.instrument_imports(include=["aiokvm", "targets"]):
        import targets  # noqa: F401 - imports under instrumentation

        import aiokvm.boot  # noqa: F401
        import aiokvm.devices.ata  # noqa: F401
        import aiokvm.devices.backends.base  # noqa: F401
        import aiokvm.devices.backends.memory  # noqa: F401
        import aiokvm.devices.backends.nbd  # noqa: F401
        import aiokvm.devices.serial  # noqa: F401
        import aiokvm.devices.virtio.blk  # noqa: F401
        import aiokvm.devices.virtio.chain  # noqa: F401
        import aiokvm.devices.virtio.mmio  # noqa: F401
        import aiokvm.devices.virtio.net  # noqa: F401
        import aiokvm.devices.virtio.queue  # noqa: F401
        import aiokvm.loader  # noqa: F401
        import aiokvm.multiboot  # noqa: F401
        import aiokvm.net.bridge  # noqa: F401
        import aiokvm.net.ports.stream  # noqa: F401
        import aiokvm.net.ports.vxlan  # noqa: F401
        import aiokvm.net.stp  # noqa: F401
        import aiokvm.net.vde_server  # noqa: F401
    targets.quiet()
    fn = targets.TARGETS[target]
    atheris.Setup([sys.argv[0], *argv], fn)
    atheris.Fuzz()


def campaign(target: str, seconds: int) -> dict:
    corpus = HERE / "corpus" / target
    crashes = HERE / "crashes" / target
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    if target == "elf" and not any(corpus.iterdir()):
        from aiokvm import guests  # a real guest is the seed: the fuzzer mutates from there

        (corpus / "seed-hello").write_bytes(guests.path("hello").read_bytes())
    if target == "multiboot" and not any(corpus.iterdir()):
        # A Multiboot image of each kind is the seed: an ELF32 and an a.out-kludge one.
        sys.path.insert(0, str(HERE.parent))
        from tests.unit.test_multiboot import mb_elf, mb_header

        (corpus / "seed-elf").write_bytes(mb_elf(memsz=0x2000))
        (corpus / "seed-aout").write_bytes(mb_header(1 << 16, addresses=(0x200000, 0x200000, 0x200100, 0x201000,
                                                                       0x200020)) + bytes(0xEC))
    max_len = 65536 if target in ("elf", "multiboot") else 16384
    args = [sys.executable, str(Path(__file__)), "--child", target, "--", str(corpus),
            f"-max_total_time={seconds}", "-timeout=5", "-rss_limit_mb=2048", f"-max_len={max_len}",
            f"-artifact_prefix={crashes}/", "-print_final_stats=1"]
    # The fuzzer's log goes to a file as it runs (fuzz/logs/TARGET.log), so a
    # campaign that overruns is killed with its figures still readable.
    logs = HERE / "logs"
    logs.mkdir(exist_ok=True)
    log_path = logs / f"{target}.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            returncode = proc.wait(timeout=seconds + 120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            returncode = "overran"
    log = log_path.read_text(errors="replace")
    execs = cov = ft = 0
    for match in STAT.finditer(log):
        execs, cov, ft = (int(x) for x in match.groups())
    done = DONE.search(log)
    if done:
        execs, cov, ft = (int(x) for x in done.groups())
    found = sorted(p.name for p in crashes.iterdir())
    return {"target": target, "seconds": seconds, "executions": execs, "cov": cov, "ft": ft,
            "crashes": found, "exit": returncode, "corpus": len(list(corpus.iterdir())),
            "tail": log[-1500:] if returncode else ""}


def main() -> None:
    if "--child" in sys.argv:
        at = sys.argv.index("--child")
        rest = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
        child(sys.argv[at + 1], rest)
        return
    sys.path.insert(0, str(HERE))
    import targets

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="per target")
    parser.add_argument("--target", action="append", help=f"one of {', '.join(targets.TARGETS)} (repeatable)")
    parser.add_argument("--replay", metavar="FILE", help="run one input through --target and show what happens")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    chosen = args.target or list(targets.TARGETS)
    if args.replay:
        targets.run_one(chosen[0], Path(args.replay).read_bytes())
        print("no crash")
        return
    results = []
    print(f"{'target':<14}{'executions':>12}{'cov':>7}{'ft':>7}{'corpus':>8}  crashes")
    for target in chosen:
        result = campaign(target, args.seconds)
        results.append(result)
        print(f"{target:<14}{result['executions']:>12,}{result['cov']:>7}{result['ft']:>7}{result['corpus']:>8}  "
              f"{len(result['crashes'])}", flush=True)
        if result["tail"] and not result["crashes"]:
            print(result["tail"], file=sys.stderr)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))
    sys.exit(1 if any(r["crashes"] for r in results) else 0)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
