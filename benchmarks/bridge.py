"""Thin wrapper: the benchmark lives in ``aiokvm/bench/bridge.py`` (``aiokvm bench bridge``)."""

import asyncio

from aiokvm.bench.bridge import main

if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
