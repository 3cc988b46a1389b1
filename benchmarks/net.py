"""Thin wrapper: the benchmark lives in ``aiokvm/bench/net.py`` (``aiokvm bench net``)."""

import asyncio

from aiokvm.bench.net import main

if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
