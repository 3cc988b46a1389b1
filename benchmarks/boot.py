"""Thin wrapper: the benchmark lives in ``aiokvm/bench/boot.py`` (``aiokvm bench boot``)."""

import asyncio

from aiokvm.bench.boot import main

if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
