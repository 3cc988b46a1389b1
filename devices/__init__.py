"""Device models, installed as ``aiokvm.devices``.

Pure register machines, with no I/O and no event loop, where the device
allows it: ``serial.Uart16550``, the virtqueue (``virtio/queue.py``) and
the chain cursor, virtio-blk's request parser.  The rest are loop-hosted
adapters that own I/O: ``console.SerialConsole`` (the UART on the bus, host
input and output), ``ata.AtaDisk`` and ``virtio.blk.VirtioBlk`` (backend
requests as asyncio tasks), ``virtio.mmio.MmioTransport``.  Inline
``debug_exit.DebugExit`` only records a value.

Every device is a bus device (``read``/``write``); those the machine should
report and close have ``metrics()`` and ``aclose()`` (see
``aiokvm/device_manager.py``).  Backends live in ``backends/``.
"""
