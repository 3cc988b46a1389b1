"""``aiokvm bench NAME [options]``: one benchmark, all of them, or ``compare``."""

from __future__ import annotations

import asyncio
import importlib

from ..errors import ConfigError
from . import BENCHMARKS


def bench_command(name: str, rest: list[str]) -> int:
    if name == "compare":
        if len(rest) != 2:
            raise ConfigError("give `aiokvm bench compare A.json B.json` (two --json outputs of one benchmark)")
        from .compare import print_comparison

        return print_comparison(*rest)
    names = BENCHMARKS if name == "all" else (name,)
    if name != "all" and name not in BENCHMARKS:
        raise ConfigError(f"no benchmark {name!r}: give one of {', '.join(BENCHMARKS)}, all, or compare")
    if name == "all" and any(arg in ("--json", "--plot") for arg in rest):
        raise ConfigError("`aiokvm bench all` writes no single --json or --plot; run the benchmarks one by one")
    for each in names:
        asyncio.set_event_loop_policy(None)  # each benchmark picks its own loops
        if name == "all":
            print(f"== aiokvm bench {each} ==", flush=True)
        module = importlib.import_module(f"aiokvm.bench.{each}")
        module.main(_options_for(each, rest) if name == "all" else rest)
    return 0


def _options_for(name: str, rest: list[str]) -> list[str]:
    """``all``: pass on what each benchmark takes (boot and bridge have no --quick)."""
    if name in ("boot", "bridge"):
        return [arg for arg in rest if arg != "--quick"]
    return list(rest)
