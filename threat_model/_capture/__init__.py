"""Packet capture internals: header parsing, pcap I/O, TCP reassembly, sniffer and relay."""
