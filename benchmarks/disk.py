"""Thin wrapper: the benchmark lives in ``aiokvm/bench/disk.py`` (``aiokvm bench disk``)."""

import asyncio

from aiokvm.bench.disk import main

if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
