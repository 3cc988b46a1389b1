"""Thin wrapper: the benchmark lives in ``aiokvm/bench/exits.py`` (``aiokvm bench exits``)."""

import asyncio

from aiokvm.bench.exits import main

if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
