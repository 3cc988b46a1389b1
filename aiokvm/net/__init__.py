"""Software Ethernet: frame codecs, pcap files and a Linux-bridge model (pure logic, no sockets)."""
