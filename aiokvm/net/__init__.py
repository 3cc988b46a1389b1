"""Software Ethernet: frame codecs, pcap files and a Linux-bridge model (pure logic, no sockets)."""

from .bridge import Bridge, BridgeError, FdbView, Port
from .pcap import PcapReader, PcapWriter
from .stp import PortState, Stp

__all__ = ["Bridge", "BridgeError", "FdbView", "PcapReader", "PcapWriter", "Port", "PortState", "Stp"]
