"""virtio devices, installed as ``aiokvm.devices.virtio``.

- ``queue``: the split virtqueue, device side (sans-I/O, pure guest-memory
  reads and writes, every driver-supplied value validated).
- ``mmio``: the virtio-mmio (version 2) transport.
- ``blk``: virtio-blk.

The driver side for tests lives in ``aiokvm.testing``.
"""
