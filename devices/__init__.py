"""Device models, installed as ``aiokvm.devices``.

Each model is a sans-I/O state machine (register reads and writes in,
effects out); asyncio adapters live beside it.
"""
