"""``aiokvm kut DIR [TEST...]``: kvm-unit-tests' x86 guests under aiokvm.

DIR is a built kvm-unit-tests tree (``./configure && make``).  Each
selected test of ``DIR/x86/unittests.cfg`` runs with its options and
timeout; the line per test is the suite's (PASS, FAIL, SKIP, TIMEOUT).
``--compare-qemu`` runs each under QEMU microvm too, with the same
environment module, and marks where the two differ.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import ConfigError
from .kut.runner import FAIL, PASS, SKIP, TIMEOUT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiokvm kut", description=__doc__.splitlines()[0])
    parser.add_argument("suite", metavar="DIR", help="a built kvm-unit-tests tree")
    parser.add_argument("tests", nargs="*", metavar="TEST", help="test names or globs (default: all)")
    parser.add_argument("--group", "-g", action="append", default=[], help="only tests of this group (repeatable)")
    parser.add_argument("--compare-qemu", action="store_true", help="run each test under QEMU microvm too")
    parser.add_argument("--qemu", default="qemu-system-x86_64", help="the QEMU binary for --compare-qemu")
    parser.add_argument("--logs", metavar="DIR", help="keep each test's serial output here (default: a temporary "
                                                      "directory, removed)")
    parser.add_argument("--json", dest="json_path", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--timeout", type=float, help="override every test's timeout (seconds)")
    return parser


def select(tests, names: list[str], groups: list[str]):
    chosen = []
    for test in tests:
        if names and not any(fnmatch.fnmatchcase(test.name, pattern) for pattern in names):
            continue
        if groups and not set(groups) & set(test.groups):
            continue
        chosen.append(test)
    return chosen


def _line(name: str, ours, theirs=None) -> str:
    text = f"{ours.status:<8}{name:<28}{ours.seconds:7.2f}s"
    if theirs is not None:
        mark = "" if ours.status == theirs.status else "  <- differs"
        text += f"   qemu {theirs.status:<8}{theirs.seconds:7.2f}s{mark}"
    detail = ours.detail or (theirs.detail if theirs is not None else "")
    return f"{text}   {detail}" if detail else text


async def run_suite(args) -> int:
    from .kut.config import parse_config

    suite = Path(args.suite)
    cfg = suite / "x86" / "unittests.cfg"
    if not cfg.is_file():
        raise ConfigError(f"{cfg} not found; give the top of a kvm-unit-tests tree built with "
                          "./configure && make")
    tests = select(parse_config(cfg.read_text()), args.tests, args.group)
    if not tests:
        raise ConfigError("no test matches; see the [names] in x86/unittests.cfg")
    if args.timeout is not None:
        os.environ["TIMEOUT"] = f"{args.timeout:g}"
    logs = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="aiokvm-kut-"))
    logs.mkdir(parents=True, exist_ok=True)
    try:
        return await _run_tests(args, suite, tests, logs)
    finally:
        if not args.logs:
            shutil.rmtree(logs, ignore_errors=True)


async def _run_tests(args, suite: Path, tests, logs: Path) -> int:
    from .kut.config import environment, plan
    from .kut.runner import environment_file, run_aiokvm, run_qemu

    max_vcpus = os.cpu_count() or 1
    results = []
    regressions = failures = 0
    with environment_file(environment(suite)) as env:
        for test in tests:
            named = any(test.name == pattern for pattern in args.tests)
            p = plan(test, suite, max_vcpus=max_vcpus, named=named)
            ours = await run_aiokvm(p, env, logs / f"{test.name}.aiokvm.log")
            theirs = await run_qemu(p, env, logs / f"{test.name}.qemu.log", args.qemu) if args.compare_qemu else None
            print(_line(test.name, ours, theirs), flush=True)
            entry = {"test": test.name, "aiokvm": ours.as_dict()}
            if theirs is not None:
                entry["qemu"] = theirs.as_dict()
                if theirs.status == PASS and ours.status != PASS:
                    regressions += 1
            if ours.status in (FAIL, TIMEOUT):
                failures += 1
            results.append(entry)
    counts = {s: sum(r["aiokvm"]["status"] == s for r in results) for s in (PASS, FAIL, SKIP, TIMEOUT)}
    summary = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    if args.compare_qemu:
        differ = sum(r["aiokvm"]["status"] != r["qemu"]["status"] for r in results)
        summary += f"; {differ} differ from QEMU microvm ({regressions} pass only under QEMU)"
    print(f"aiokvm kut: {summary}" + (f"; logs in {logs}" if args.logs else " (--logs DIR keeps the logs)"))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"suite": str(suite), "results": results}, indent=2))
    if args.compare_qemu:
        return 1 if regressions else 0
    return 1 if failures else 0


def kut_command(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    import logging

    import structlog
    import uvloop

    # One line per test is the report; the machines' own warnings (a CPU
    # feature this host lacks, for one) would interleave with it.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))

    return uvloop.run(run_suite(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(kut_command(sys.argv[1:]))
