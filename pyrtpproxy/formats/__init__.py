"""File and payload formats: recording files (ad-hoc, pcap), G.711. Pure: bytes in, bytes out."""
