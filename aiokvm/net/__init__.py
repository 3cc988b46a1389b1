"""Software Ethernet: frame codecs, pcap files, a Linux-bridge model (pure logic,
no sockets), and the ``Switch`` that hosts it on the event loop with its ports."""

from .bridge import Bridge, BridgeError, FdbView, Port
from .pcap import PcapReader, PcapWriter
from .stp import PortState, Stp
from .switch import Switch

__all__ = ["Bridge", "BridgeError", "FdbView", "PcapReader", "PcapWriter", "Port", "PortState", "Stp", "Switch"]
