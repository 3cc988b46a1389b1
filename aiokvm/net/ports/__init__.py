"""Switch ports: where a ``Switch``'s frames come from and go to.

Every port is a ``SwitchPort`` (``base.py``): frames in from the outside go
to the switch through the ``deliver`` callback it is given when attached;
frames out go through ``send(frame)``, which never blocks and never queues
without bound (a full port drops and counts); a link state; counters; and
``aclose()``.  One module per kind:

- ``nic.py``: a VM's virtio-net device (``NicPort``);
- ``link.py``: an in-memory cable between two switches (``LinkPort`` pairs).
"""

from .base import PortCounters, SwitchPort
from .link import LinkPort, cable
from .nic import NicPort

__all__ = ["LinkPort", "NicPort", "PortCounters", "SwitchPort", "cable"]
