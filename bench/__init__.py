"""Benchmark harness for pyrtpproxy and other rtpproxy-compatible relays (``python -m bench``)."""
