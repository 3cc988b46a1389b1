"""virtio devices, installed as ``aiokvm.devices.virtio``.

- ``device``: what a virtio device is (``VirtioDevice``), how it interrupts
  (``InterruptKind``, ``VirtioInterrupt``), and the common feature bits.
- ``queue``: the split virtqueue, device side (sans-I/O, pure guest-memory
  reads and writes, every driver-supplied value validated).
- ``chain``: ``ChainReader`` / ``ChainWriter``, bounds-checked cursors over a
  descriptor chain's readable / writable buffers (reads and writes across
  descriptor boundaries, ``split_at``, zero-copy views of guest RAM).
- ``mmio``: the virtio-mmio (version 2) transport.
- ``blk``: virtio-blk (request parser through the chain cursor, device).

The driver side for tests lives in ``aiokvm.testing``.
"""
